"""A model of data-parallel scaling (DDP, ring all-reduce) for ResNet-50 at 224 px and the face model
(Inception-ResNet-V1 at 160 px): the tables in docs/SCALING.md come from this script.

    python benchmarks/scaling_model.py            # markdown tables on stdout

Per step, each of N GPUs runs forward and backward on its own batch b, then the gradients are averaged with a ring
all-reduce (Horovod's algorithm, which NCCL runs for DDP): every GPU sends and receives 2(N-1)/N x S bytes for S
bytes of gradients, in 2(N-1) hops. DDP cuts the gradients into buckets (25 MiB) and starts each bucket's all-reduce
as soon as backward has produced it, so communication hides behind the rest of backward; what sticks out after
backward is the cost of going from 1 GPU to N.

    t_comm(bucket)  = 2(N-1)/N x bytes / bandwidth + 2(N-1) x latency
    bucket i ready  = t_fwd + t_bwd x (gradient bytes produced so far) / S      (gradients produced evenly)
    buckets go one after another on one communication stream; step = max(end of backward, end of last bucket)
    efficiency(N)   = step time on 1 GPU / step time on N GPUs           (per-GPU batch b fixed: weak scaling)

Inputs, each printed with the tables: parameter counts (torchvision's resnet50; facenet-pytorch 2.6.0's
InceptionResnetV1 without its classifier), FLOPs per image counted with torch.utils.flop_counter, and published
single-GPU training throughputs (NVIDIA DeepLearningExamples, ResNet-50 v1.5 PyTorch, batch 256 per GPU). The face
model's compute time is ResNet-50's scaled by the FLOP ratio (the same achieved FLOP rate: if its smaller
convolutions run less efficiently, its compute takes longer and it scales better than shown).
"""
from __future__ import annotations

import argparse
import math
import platform
from dataclasses import dataclass
from datetime import date

import torch

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb (danlu: dist.bucket_mb)
LATENCY = 10e-6  # seconds per ring hop (an assumption: NCCL's few-microsecond hops plus launch overhead)

# bytes/s per direction per GPU, as the issue states them
LINKS = {"NVLink 4 (450 GB/s)": 450e9, "PCIe 4 x16 (25 GB/s)": 25e9, "InfiniBand 200 Gb/s (25 GB/s)": 25e9}

# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md (pytorch-21.03 container),
# "Training performance", 1 GPU, batch 256: images per second
PUBLISHED = {"V100 16GB FP32": 367, "V100 16GB AMP": 1200, "A100 80GB TF32": 938, "A100 80GB AMP": 2470}



@dataclass
class Net:
    name: str
    params: int
    fwd_flops: float  # per image
    train_flops: float  # forward + backward, per image

    @property
    def grad_bytes(self) -> int:
        return 4 * self.params  # fp32 gradients: DDP all-reduces the parameters' dtype


def resnet50() -> Net:
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    m = torchvision.models.resnet50()
    x = torch.randn(2, 3, 224, 224)
    with FlopCounterMode(display=False) as fc:
        m(x).sum().backward()
    train = fc.get_total_flops() / 2
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.eval()(x)
    return Net("ResNet-50, 224 px", sum(p.numel() for p in m.parameters()), fc.get_total_flops() / 2, train)


def face() -> Net:
    """danlu's inception_resnet_v1 (facenet-pytorch's layout): the embedding network, its identity head left out
    (its size depends on the number of identities)."""
    import danlu
    from torch.utils.flop_counter import FlopCounterMode

    m = danlu.create_model("inception_resnet_v1", num_classes=10, in_channels=3).backbone
    x = torch.randn(2, 3, 160, 160)
    with FlopCounterMode(display=False) as fc:
        m(x).sum().backward()
    train = fc.get_total_flops() / 2
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.eval()(x)
    return Net("Inception-ResNet-V1 (face), 160 px", sum(p.numel() for p in m.parameters()),
               fc.get_total_flops() / 2, train)


def all_reduce_seconds(nbytes: float, n: int, bandwidth: float) -> float:
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * LATENCY if n > 1 else 0.0


def step_seconds(net: Net, n: int, t_compute: float, bandwidth: float) -> float:
    """One step on n GPUs whose forward+backward takes t_compute, with DDP's bucketed overlap."""
    t_fwd = t_compute * net.fwd_flops / net.train_flops
    t_bwd = t_compute - t_fwd
    comm_end, sent = t_fwd, 0
    buckets = [BUCKET_BYTES] * (net.grad_bytes // BUCKET_BYTES) + [net.grad_bytes % BUCKET_BYTES]
    for b in (b for b in buckets if b):  # in the order backward produces them
        sent += b
        ready = t_fwd + t_bwd * sent / net.grad_bytes
        comm_end = max(ready, comm_end) + all_reduce_seconds(b, n, bandwidth)
    return max(t_fwd + t_bwd, comm_end)


def efficiency(net: Net, n: int, t_compute: float, bandwidth: float) -> float:
    return step_seconds(net, 1, t_compute, bandwidth) / step_seconds(net, n, t_compute, bandwidth)


def smallest_batch(net: Net, n: int, per_image: float, bandwidth: float, target: float = 0.9) -> int:
    """The smallest per-GPU batch (power of two) at which n GPUs reach `target` efficiency."""
    b = 1
    while b <= 4096 and efficiency(net, n, b * per_image, bandwidth) < target:
        b *= 2
    return b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="per-GPU batch for the efficiency tables (default 64)")
    a = p.parse_args()
    gpus = (2, 4, 8, 16, 64)
    nets = [resnet50(), face()]
    r50 = nets[0]
    print(f"<!-- {date.today()}: python benchmarks/scaling_model.py --batch {a.batch} (torch {torch.__version__}, "
          f"Python {platform.python_version()}) -->\n")
    print("| model | parameters | gradient bytes / step | GFLOP / image (fwd, fwd+bwd) |\n|---|---|---|---|")
    for net in nets:
        print(f"| {net.name} | {net.params / 1e6:.2f} M | {net.grad_bytes / 1e6:.1f} MB | "
              f"{net.fwd_flops / 1e9:.2f}, {net.train_flops / 1e9:.2f} |")
    import torchvision

    r = torchvision.models.resnet50()
    last = sum(p.numel() for n, p in r.named_parameters() if n.startswith(("layer4", "fc")))
    print(f"\nface / ResNet-50 FLOP ratio (forward+backward): {nets[1].train_flops / r50.train_flops:.2f}; "
          f"ResNet-50's layer4 + fc hold {last / r50.params:.0%} of its gradient bytes")
    print(f"\nRing all-reduce of one step's gradients, 2(N-1)/N x bytes / bandwidth (+ {LATENCY * 1e6:.0f} us per hop "
          f"x 2(N-1) hops x buckets), in ms:\n")
    print("| model | link | " + " | ".join(f"N={n}" for n in gpus) + " |\n|---|---|" + "---|" * len(gpus))
    for net in nets:
        for link, bw in LINKS.items():
            buckets = math.ceil(net.grad_bytes / BUCKET_BYTES)
            ms = [(all_reduce_seconds(net.grad_bytes, n, bw) + 2 * (n - 1) * LATENCY * (buckets - 1)) * 1e3
                  for n in gpus]
            print(f"| {net.name} | {link} | " + " | ".join(f"{v:.1f}" for v in ms) + " |")
    for gpu, ips in PUBLISHED.items():
        face_ms = a.batch / ips * 1e3 * nets[1].train_flops / r50.train_flops
        print(f"\n**{gpu}** ({ips} img/s published for ResNet-50; per-GPU batch {a.batch}: ResNet-50 forward+backward "
              f"{a.batch / ips * 1e3:.0f} ms, face model {face_ms:.0f} ms). Predicted scaling efficiency:\n")
        print("| model | link | " + " | ".join(f"N={n}" for n in gpus) + " | batch/GPU for 90% at N=64 |\n"
              "|---|---|" + "---|" * (len(gpus) + 1))
        for net in nets:
            per_image = 1 / ips * net.train_flops / r50.train_flops  # seconds of forward+backward per image
            for link, bw in LINKS.items():
                e = [efficiency(net, n, a.batch * per_image, bw) for n in gpus]
                b90 = smallest_batch(net, 64, per_image, bw)
                print(f"| {net.name} | {link} | " + " | ".join(f"{100 * v:.0f}%" for v in e) +
                      f" | {b90 if b90 <= 4096 else '> 4096'} |")


if __name__ == "__main__":
    main()

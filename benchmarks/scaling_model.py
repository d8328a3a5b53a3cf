"""A model of data-parallel scaling (DDP, ring all-reduce) for ResNet-50 at 224 px and the face model
(Inception-ResNet-V1 at 160 px): the tables in docs/evidence/scaling.md come from this script.

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
InceptionResnetV1 without its classifier), FLOPs per image counted with torch.utils.flop_counter, published
single-GPU training throughputs (NVIDIA DeepLearningExamples, ResNet-50 v1.5 PyTorch) and, per GPU model, the links
of its own generation (NVIDIA data sheets and DGX system descriptions), each with the GPU counts it can join. The face
model's compute time is ResNet-50's scaled by the FLOP ratio (the same achieved FLOP rate: if its smaller
convolutions run less efficiently, its compute takes longer and it scales better than shown).

Between boxes the ring crosses each box boundary once per ring; with NCCL running one ring per NIC, a box's NICs
together carry what one GPU sends, so the ring's bandwidth is (NICs per box x NIC rate), capped by the link inside the
box. That is a model assumption (an upper bound: measured NCCL bus bandwidth is lower); the one-NIC row is the same
bound for a box that has a single NIC.
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
GPU_COUNTS = (2, 4, 8, 16, 64)
BOX = 8  # GPUs per box (DGX-1, DGX A100); N > 8 means more than one box


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per direction that one GPU's ring traffic gets
    sizes: tuple[int, ...]  # the GPU counts (of GPU_COUNTS) this link can join
    where: str  # where it applies
    source: str  # where the figure comes from; "inference"/"estimate"/"model assumption" where it is one


@dataclass(frozen=True)
class Gpu:
    name: str
    published: dict[str, int]  # precision -> images/s, 1 GPU
    measured_on: str
    links: tuple[Link, ...]
    note: str = ""  # further inferences in its tables


IN_BOX = tuple(n for n in GPU_COUNTS if n <= BOX)
BETWEEN = tuple(n for n in GPU_COUNTS if n > BOX)
# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training performance results"
# (pytorch-21.03 container), the 1-GPU rows: images per second
DLE = "DeepLearningExamples ResNet-50 v1.5 PyTorch README"
GPUS = (
    Gpu("V100", {"FP32": 367, "AMP": 1200}, "V100 16GB SXM2, DGX-1 16GB table", (
        Link("NVLink 2, 6 x 25 = 150 GB/s", 150e9, IN_BOX + (16,),
             "inside one box: DGX-1, up to 8 GPUs (hybrid cube-mesh, no NVSwitch: 150 GB/s is all six links, a ring "
             "on 2 or 4 of its GPUs uses fewer, so an upper bound); N=16 only on a DGX-2 (16 V100 SXM3 on NVSwitch)",
             "NVIDIA V100 data sheet (NVLink 300 GB/s, both directions, SXM2); DGX-1 and DGX-2 system descriptions"),
        Link("PCIe 3.0 x16, ~12 GB/s", 12e9, IN_BOX,
             "inside one box of V100 PCIe boards, up to 8 GPUs",
             "NVIDIA V100 data sheet (PCIe 32 GB/s, both directions: 15.75 GB/s per direction theoretical); "
             "~12 GB/s is a typical achieved copy rate (an estimate, not a data-sheet figure)"),
        Link("InfiniBand EDR 100 Gb/s, 1 NIC per box, 12.5 GB/s", 12.5e9, BETWEEN,
             "between boxes of 8 (N > 8), a box with one EDR NIC",
             "EDR signalling rate; ring bandwidth = NICs x rate (model assumption)"),
        Link("InfiniBand EDR 100 Gb/s, 4 NICs per box (DGX-1), 50 GB/s", 50e9, BETWEEN,
             "between DGX-1 boxes of 8 (N > 8)",
             "DGX-1 system description: 4 x EDR per 8 GPUs; ring bandwidth = NICs x rate (model assumption)"),
    ), "; the NVLink N=16 cell applies it to a DGX-2's V100 SXM3 boards, also an inference"),
    Gpu("A100", {"TF32": 938, "AMP": 2470}, "A100 80GB SXM4, DGX A100 table", (
        Link("NVLink 3, 12 x 25 = 300 GB/s", 300e9, IN_BOX,
             "inside one box: DGX A100 (NVSwitch: every GPU at full rate), up to 8 GPUs",
             "NVIDIA A100 data sheet (NVLink 600 GB/s, both directions, SXM4); DGX A100 system description"),
        Link("PCIe 4.0 x16, ~25 GB/s", 25e9, IN_BOX,
             "inside one box of A100 PCIe boards, up to 8 GPUs",
             "NVIDIA A100 data sheet (PCIe Gen4 64 GB/s, both directions: ~32 GB/s per direction theoretical); "
             "~25 GB/s is a typical achieved copy rate (an estimate, not a data-sheet figure)"),
        Link("InfiniBand HDR 200 Gb/s, 1 NIC per box, 25 GB/s", 25e9, BETWEEN,
             "between boxes of 8 (N > 8), a box with one HDR NIC",
             "HDR signalling rate; ring bandwidth = NICs x rate (model assumption)"),
        Link("InfiniBand HDR 200 Gb/s, 8 NICs per box (DGX A100), 200 GB/s", 200e9, BETWEEN,
             "between DGX A100 boxes of 8 (N > 8), one NIC per GPU",
             "DGX A100 system description: 8 x HDR for compute traffic; ring bandwidth = NICs x rate, below the "
             "300 GB/s NVLink inside the box (model assumption)"),
    )),
)


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
    from torch.utils.flop_counter import FlopCounterMode

    import danlu

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

    print(f"\nLinks, per GPU per direction (input figures; N > {BOX} means more than one box of {BOX}):\n")
    print("| GPU | link | joins N = | where it applies | source |\n|---|---|---|---|---|")
    for gpu in GPUS:
        for link in gpu.links:
            print(f"| {gpu.name} | {link.name} | {', '.join(map(str, link.sizes))} | {link.where} | {link.source} |")

    def cells(values: dict[int, str]) -> str:  # n/a where the link does not join that many GPUs
        return " | ".join(values.get(n, "n/a") for n in GPU_COUNTS)

    print(f"\nRing all-reduce of one step's gradients (model output), 2(N-1)/N x bytes / bandwidth (+ "
          f"{LATENCY * 1e6:.0f} us per hop x 2(N-1) hops x buckets), in ms; n/a where the link does not join N GPUs:\n")
    print("| model | GPU | link | " + " | ".join(f"N={n}" for n in GPU_COUNTS) + " |\n|---|---|---|" +
          "---|" * len(GPU_COUNTS))
    for net in nets:
        buckets = math.ceil(net.grad_bytes / BUCKET_BYTES)
        for gpu in GPUS:
            for link in gpu.links:
                ms = {n: all_reduce_seconds(net.grad_bytes, n, link.bandwidth) + 2 * (n - 1) * LATENCY * (buckets - 1)
                      for n in link.sizes}
                print(f"| {net.name} | {gpu.name} | {link.name} | "
                      f"{cells({n: f'{t * 1e3:.1f}' for n, t in ms.items()})} |")

    for gpu in GPUS:
        for precision, ips in gpu.published.items():
            face_ms = a.batch / ips * 1e3 * nets[1].train_flops / r50.train_flops
            print(f"\n**{gpu.name} {precision}** ({ips} img/s published for ResNet-50 on 1 GPU: {gpu.measured_on}, "
                  f"{DLE}; per-GPU batch {a.batch}: ResNet-50 forward+backward {a.batch / ips * 1e3:.0f} ms, face "
                  f"model {face_ms:.0f} ms). Predicted scaling efficiency, a model output (the PCIe rows reuse the "
                  f"SXM board's throughput, an inference{gpu.note}):\n")
            print("| model | link | " + " | ".join(f"N={n}" for n in GPU_COUNTS) +
                  " | batch/GPU for 90% at the row's largest N |\n|---|---|" + "---|" * (len(GPU_COUNTS) + 1))
            for net in nets:
                per_image = 1 / ips * net.train_flops / r50.train_flops  # seconds of forward+backward per image
                for link in gpu.links:
                    eff = {n: f"{100 * efficiency(net, n, a.batch * per_image, link.bandwidth):.0f}%" for n in link.sizes}
                    top = max(link.sizes)
                    b90 = smallest_batch(net, top, per_image, link.bandwidth)
                    print(f"| {net.name} | {link.name} | {cells(eff)} | "
                          f"{b90 if b90 <= 4096 else '> 4096'} (N={top}) |")

if __name__ == "__main__":
    main()

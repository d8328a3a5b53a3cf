"""`danlu bench`: the speed matrix, measured so that it tells the truth.

    danlu bench --model lenet --size 28 --batch 64 --precision fp32,bf16 --compile off --steps 30 --json b.json
    rows = danlu.bench.run(model="lenet", size=28, batch=64, precisions=["fp32", "bf16"], steps=30)["rows"]

For each combination of precision x compile x CUDA graphs x processes that the device supports, on synthetic uint8
images already on the device:

- danlu's real training step: `engine.loop.train_loop` on `Parts` built by the same builders `danlu.train` uses
  (model, optimizer, Precision, Speed, Augment, DeviceLoader), with a stand-in log that marks the end of every step;
- a plain hand-written PyTorch loop on the same model, batch and switches (autocast, one GradScaler for fp16,
  torch.compile, channels-last, CUDA graphs written out by hand), marking its steps the same way.

Both warm up first (compilation, cuDNN autotuning, allocator), then run `steps` timed steps interleaved step by step
(danlu, plain, danlu, plain, ...: a plain step runs at the end of each danlu step, from train_loop's per-step log
call) so that a change in machine load hits both alike. A step's time is the interval between the ends of
consecutive steps: CUDA events on the stream on a GPU (no host sync inside the timed steps),
`time.perf_counter` on the CPU. Reported per combination: images/s (batch x processes / median step), ms per step
(median, p90), peak device memory, FLOPs per step counted by `torch.utils.flop_counter.FlopCounterMode`, achieved
TFLOP/s and MFU against the device's peak (a data-sheet table for known GPUs; otherwise a large matmul measured
here, marked "measured"), speed-up against fp32 eager, and danlu / plain loop. With `procs` > 1 the processes are
started by danlu's launcher (danlu.launch.run_workers) and rank 0's steps are timed.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import DanluError, nearest

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
COMPILE_WORDS = {"off": False, "on": True, "max-autotune": "max-autotune"}
SWITCH_WORDS = {"off": False, "on": True}
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # SGD as in Caffe's LeNet solver (and shared/checks/raw_loop.py)

# Dense peak TFLOP/s (no structured sparsity) from NVIDIA's data sheets: fp32 on CUDA cores; tf32, bf16 and fp16 on
# tensor cores with fp32 accumulation. First match of the pattern in torch.cuda.get_device_name() wins, so the more
# specific names come first. A precision missing from a device's entry (T4 and V100 have no tf32/bf16 tensor cores)
# and any device not listed here get a measured matmul instead.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    (r"H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    (r"H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),  # SXM5 ("H100 80GB HBM3")
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    (r"\bA10\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    (r"\bT4\b", {"fp32": 8.1, "fp16": 65.0}),
    (r"V100S", {"fp32": 16.4, "fp16": 130.0}),
    (r"V100-PCIE", {"fp32": 14.0, "fp16": 112.0}),
    (r"V100", {"fp32": 15.7, "fp16": 125.0}),
]
ROW_FIELDS = ("device", "model", "precision", "compile", "procs", "batch", "images_per_second", "ms_per_step_median",
              "ms_per_step_p90", "peak_memory_mb", "tflops", "mfu", "speedup_vs_fp32_eager", "vs_plain_loop")


@dataclass(frozen=True)
class Combo:
    precision: str
    compile: str  # off | on | max-autotune
    cuda_graphs: bool
    procs: int

    @property
    def label(self) -> str:
        """'bf16 compile+graphs x2' style: what the row ran, in a few words."""
        how = {"off": "eager", "on": "compile"}.get(self.compile, self.compile)
        graphs, procs = "+graphs" if self.cuda_graphs else "", f" x{self.procs}" if self.procs > 1 else ""
        return f"{self.precision} {how}{graphs}{procs}"


# ---------------------------------------------------------------- parsing the command line's lists


def parse_list(text: str, allowed: dict[str, Any] | tuple[str, ...], flag: str) -> list[str]:
    """'fp32,bf16' -> ['fp32', 'bf16'], every item checked against `allowed` (DanluError names the bad one)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise DanluError(f"{flag} {text!r}: empty; expected a comma-separated list of {', '.join(allowed)}")
    for t in items:
        if t not in allowed:
            raise DanluError(f"{flag} {text}: '{t}' is not one of {', '.join(allowed)}{nearest(t, allowed)}")
    return list(dict.fromkeys(items))


def parse_procs(text: str) -> list[int]:
    out = []
    for t in str(text).split(","):
        t = t.strip()
        if not t.isdigit() or int(t) < 1:
            raise DanluError(f"--procs {text}: '{t}' is not a process count; expected whole numbers >= 1, e.g. 1,2")
        out.append(int(t))
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- timing


class _StepMarks:
    """Marks the end of each training step: a CUDA event on the current stream (read after one sync at the end) or
    the host clock. Also a stand-in for RunLog in train_loop: `tick` is called once per step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.last_event: dict[str, Any] = {}

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def tick(self, it: int, meter: Any, images_per_second: float) -> None:
        self.mark()

    def event(self, record: dict[str, Any]) -> None:
        self.last_event = record

    def close(self) -> None:
        pass

    def seconds(self) -> list[float]:
        """Durations between consecutive marks (the first mark only starts the count)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class _Paired(_StepMarks):
    """Interleaves the two loops step by step: at the end of each danlu step (train_loop's `tick`), one plain-loop
    step runs. Every danlu step is timed from the end of the plain step before it, every plain step from the end of
    the danlu step before it, so both meet the same machine (load, clocks, caches) at every step."""

    def __init__(self, device: torch.device, plain: "_Plain"):
        super().__init__(device)
        self.plain = plain

    def tick(self, it: int, meter: Any, images_per_second: float) -> None:
        self.mark()  # danlu's step ends
        self.plain.step()
        self.mark()  # the plain step ends

    def split(self) -> tuple[list[float], list[float]]:
        """(danlu step seconds, plain step seconds); the first mark is the start."""
        d = self.seconds()
        return d[0::2], d[1::2]


class _WaitTimer:
    """A loader that counts the seconds spent waiting for each batch (as the loop's DeviceMonitor does on CUDA)."""

    def __init__(self, loader: Any):
        self.loader, self.wait = loader, 0.0
        self.device, self.global_batch = loader.device, loader.global_batch

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start: int = 0):
        from danlu.engine.speed import timed

        return timed(self.loader.epoch(epoch, start=start), self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sig(v: Optional[float], digits: int = 4) -> Optional[float]:
    """`digits` significant digits (a CPU's TFLOP/s are 0.0001s; rounding to decimals would zero them)."""
    return None if v is None else float(f"{v:.{digits}g}")


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------- the two loops


def _recipe(model: str, size: int, channels: int, classes: int, batch: int, combo: Combo, channels_last: Any,
            device: torch.device):
    from danlu.config import build_recipe

    return build_recipe({
        "model": {"name": model},
        "data": {"name": "synthetic", "batch_size": batch, "test_batch_size": batch, "size": size,
                 "channels": channels, "num_classes": classes},
        "augment": "none",
        "optim": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "lr_scaling": "none"},
        "schedule": {"policy": "fixed"},
        "run": {"max_iter": 1, "tensorboard": False},
        "precision": combo.precision, "compile": COMPILE_WORDS[combo.compile], "channels_last": channels_last,
        "cuda_graphs": combo.cuda_graphs, "devices": {"device": str(device)},
    }, origin="danlu bench")


class _Danlu:
    """danlu's training step, exactly as `danlu.train` runs it: train_loop on Parts from the API's own builders
    (a DDP-wrapped model and this rank's slice of every batch where `dist` has several processes)."""

    def __init__(self, recipe, train, device: torch.device, loader_kind: str, dist):
        from danlu import api
        from danlu.data.loader import DeviceLoader
        from danlu.engine.loop import Parts
        from danlu.engine.precision import Precision
        from danlu.engine.speed import Speed

        torch.manual_seed(0)  # the same initial weights as the plain loop's model
        speed = Speed(device, compile=recipe.compile, channels_last=recipe.channels_last,
                      cuda_graphs=recipe.cuda_graphs, world=dist.world)
        model = speed.layout(api._build_model(recipe, train).to(device))
        optimizer = api._build_optimizer(recipe, model, recipe.optim.lr)
        self.precision = Precision(recipe.precision, device, autocast_cache=not recipe.cuda_graphs)
        augment = api._build_augment(recipe, train)
        augment.memory_format = speed.memory_format
        b = recipe.data.batch_size
        self.loader = _WaitTimer(_make_loader(loader_kind, train, b, device, dist))
        test = DeviceLoader(train.images[:b * dist.world], train.labels[:b * dist.world], b, device=device,
                            shuffle=False, drop_last=False, rank=dist.rank, world=dist.world)
        self.speed, self.channels_last = speed, speed.channels_last
        self.parts = Parts(model=speed.wrap(dist.wrap(model), (b, *train.shape), self.precision),
                           optimizer=optimizer, criterion=nn.CrossEntropyLoss(), augment=augment, generator=None,
                           train_loader=self.loader, test_loader=test, precision=self.precision, dist=dist,
                           lr_at=lambda it: recipe.optim.lr)
        self.it = 0

    def run(self, steps: int, marks: _StepMarks) -> None:
        """`steps` more iterations of train_loop (it ends each call with its end-of-run evaluation, untimed)."""
        from danlu.engine.loop import Plan, train_loop

        plan = Plan(max_iter=self.it + steps, test_interval=10 ** 9, display=10 ** 9, snapshot_every=0, test_iter=1)
        stats = train_loop(self.parts, plan, marks, snapshot=lambda it, state: None, on_test=lambda r: None,
                           start=self.it)
        self.it = stats.iterations


def _make_loader(kind: str, train, batch: int, device: torch.device, dist):
    from danlu.data import loader as loaders

    if kind == "device":
        return loaders.DeviceLoader(train.images, train.labels, batch, device=device, seed=0, rank=dist.rank,
                                    world=dist.world)
    return loaders.StreamLoader(train.images.cpu(), train.labels.cpu(), batch, device=device, seed=0, rank=dist.rank,
                  world=dist.world)


class _Plain:
    """A plain PyTorch training loop, written out as a user would, with the same switches as the danlu row (and
    DistributedDataParallel over the same process group where there are several processes)."""

    def __init__(self, recipe, train, device: torch.device, channels_last: bool, compile_mode: Optional[str],
                 dist):
        from danlu import api

        torch.manual_seed(0)
        model = api._build_model(recipe, train).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if dist.world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.precision)
        self.device, self.batch, self.rank, self.world = device, recipe.data.batch_size, dist.rank, dist.world
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(device.type) if recipe.precision == "fp16" else None
        cache = not recipe.cuda_graphs
        self.autocast = (lambda: torch.autocast(device.type, dtype=self.dtype, cache_enabled=cache)) \
            if self.dtype else contextlib.nullcontext
        if recipe.compile:
            model = torch.compile(model, mode=compile_mode)
        elif recipe.cuda_graphs:
            sample = torch.randn(self.batch, *train.shape, device=device).contiguous(memory_format=self.memory_format)
            with self.autocast():
                model = torch.cuda.make_graphed_callables(model, (sample,))
        self.model = model
        self.images, self.labels = train.images.to(device), train.labels.to(device)  # (N, C, H, W) uint8, (N,)
        self.g, self.order, self.pos = torch.Generator().manual_seed(1), None, 0

    def step(self) -> None:
        """One training step on the next batch."""
        model, opt, b, n = self.model, self.opt, self.batch, len(self.labels)
        gb = b * self.world  # a global batch; this process takes its slice
        if self.order is None or self.pos + gb > n:  # a new epoch: a fresh permutation, as DeviceLoader makes
            self.order, self.pos = torch.randperm(n, generator=self.g).to(self.device), 0
        idx = self.order[self.pos + self.rank * b:self.pos + (self.rank + 1) * b]
        self.pos += gb
        x = self.images[idx].to(torch.float32, memory_format=self.memory_format).mul_(1 / 255)  # (B, C, H, W)
        y = self.labels[idx]
        with self.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()

    def run(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            self.step()


def _synthetic(cfg: dict[str, Any], device: torch.device, world: int):
    """Seeded random uint8 images and labels on the device: 8 global batches (an epoch every 8 steps)."""
    from danlu.data.datasets import ImageSet

    g = torch.Generator().manual_seed(0)
    n, c, s, k = 8 * cfg["batch"] * world, cfg["channels"], cfg["size"], cfg["classes"]
    images = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)  # (N, C, H, W)
    labels = torch.randint(0, k, (n,), generator=g)
    return ImageSet(images.to(device), labels.to(device), [str(i) for i in range(k)])


def time_both(combo: Combo, cfg: dict[str, Any]) -> dict[str, Any]:
    """In this process (one of `combo.procs`): build danlu's step and the plain loop, warm both up, then time
    `steps` steps of each, interleaved step by step. Returns the step seconds of both and what else the row needs."""
    from danlu.api import resolve_device
    from danlu.engine import distributed

    device = resolve_device(cfg["device"])
    dist = distributed.setup(device) if combo.procs > 1 else distributed.Dist()
    if combo.procs > 1 and device.type == "cuda":
        device = dist.device  # this rank's GPU
    train = cfg.get("train") or _synthetic(cfg, device, dist.world)
    recipe = _recipe(cfg["model"], cfg["size"], cfg["channels"], cfg["classes"], cfg["batch"], combo,
                     cfg["channels_last"], device)
    if combo.compile != "off":
        torch.compiler.reset()  # a fresh compile cache for each combination (dynamo's recompile limit is per code)
    _free(device)
    danlu = _Danlu(recipe, train, device, cfg["loader"], dist)
    danlu.run(cfg["warmup"], _StepMarks(device))
    _sync(device)
    peak_memory = _peak_memory_mb(device)
    plain = _Plain(recipe, train, device, danlu.channels_last, danlu.speed.compile_mode, dist)
    plain.run(cfg["warmup"])
    _sync(device)

    wait0 = danlu.loader.wait
    paired = _Paired(device, plain)  # one train_loop call; a plain step after each of its steps
    paired.mark()  # the start: danlu's first timed step is timed from here
    danlu.run(cfg["steps"], paired)
    d_times, p_times = paired.split()
    out = {"danlu": d_times, "plain": p_times, "wait": danlu.loader.wait - wait0, "peak_memory_mb": peak_memory,
           "channels_last": danlu.channels_last, "skipped_steps": danlu.precision.skipped_steps,
           "device": device_name(device)}
    del danlu, plain
    _free(device)
    return out


def _worker(combo: Combo, cfg: dict[str, Any]) -> dict[str, Any]:
    """One process of a multi-process row (started by danlu.launch.run_workers)."""
    return time_both(combo, cfg)


# ---------------------------------------------------------------- FLOPs and peaks


def count_flops(recipe, train) -> Optional[int]:
    """FLOPs of one training step (forward, loss, backward; the optimizer's elementwise work is not counted), by
    FlopCounterMode on a copy of the model on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from danlu import api

    try:
        with torch.device("meta"):
            model = api._build_model(recipe, train)
            x = torch.empty(recipe.data.batch_size, *train.shape)  # (B, C, H, W)
            y = torch.zeros(recipe.data.batch_size, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), y).backward()
        return int(counter.get_total_flops())
    except Exception as e:  # an op without a meta kernel: leave FLOPs (and MFU) out rather than guess
        print(f"bench: FLOPs not counted ({type(e).__name__}: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return None


_MEASURED: dict[tuple[str, str], tuple[float, str]] = {}


def table_peak(gpu_name: str, precision: str) -> Optional[tuple[float, str]]:
    """The data sheet's dense peak for a GPU by its torch.cuda.get_device_name(): (TFLOP/s, source), or None for an
    unlisted GPU, a precision it lacks tensor cores for, or a MIG slice (a fraction of the GPU)."""
    if "MIG" in gpu_name:
        return None
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, gpu_name):
            if precision not in peaks:
                return None
            return peaks[precision], f"data sheet ({pattern.replace(chr(92) + 'b', '')}, dense)"
    return None


def peak_tflops(device: torch.device, precision: str) -> tuple[Optional[float], str]:
    """(peak TFLOP/s, where it comes from) for `precision` on `device`: the data-sheet table for known GPUs, else a
    measured matmul (call after the precision's Precision object is built: tf32's switches must be set)."""
    if device.type == "cuda":
        known = table_peak(torch.cuda.get_device_name(device), precision)
        if known is not None:
            return known
    key = (str(device), precision)
    if key not in _MEASURED:
        _MEASURED[key] = _measure_matmul(device, precision)
    if precision in ("fp16", "bf16") and device.type == "cpu":
        # a CPU without half-precision units is slower in fp16 than in fp32, while autocast's kernels may convert
        # and compute in fp32: the peak is then the fp32 one (else the MFU of such a run reads above 100%)
        fp32 = peak_tflops(device, "fp32")
        if fp32[0] > _MEASURED[key][0]:
            return fp32[0], f"{fp32[1]}, faster here than {precision}"
    return _MEASURED[key]


def _measure_matmul(device: torch.device, precision: str) -> tuple[float, str]:
    """Best of 3 square matmuls in the precision's dtype, the size doubled until one takes >= 50 ms (or n reaches
    2048 on a CPU, 8192 on a GPU)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n, top = (512, 2048) if device.type == "cpu" else (4096, 8192)
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up (library init, kernel selection)
        _sync(device)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - t)
        if min(times) >= 0.05 or n >= top:
            break
        n *= 2
    name = str(dtype).replace("torch.", "")
    return 2 * n ** 3 / min(times) / 1e12, f"measured ({n}x{n} {name} matmul, best of {len(times)})"


# ---------------------------------------------------------------- environment


def _git_commit() -> Optional[str]:
    """danlu's commit (with -dirty for local changes): the source tree danlu runs from, else the current folder."""
    here = Path(__file__).resolve().parents[2]
    for root in (here, Path.cwd()):
        pyproject = root / "pyproject.toml"
        if not (root / ".git").exists() or not pyproject.is_file() or 'name = "danlu"' not in pyproject.read_text():
            continue
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return (head + ("-dirty" if dirty else "")) if head else None
    return None


def _driver() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from danlu import __version__

    try:
        torchvision = version("torchvision")  # the version only: importing torchvision costs seconds
    except PackageNotFoundError:
        torchvision = None

    env = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "driver": _driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "torch": torch.__version__, "torchvision": torchvision,
        "danlu": __version__, "danlu_commit": _git_commit(),
        "python": platform.python_version(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "command": " ".join(["danlu", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("danlu", "__main__.py") else None,
    }
    return env


# ---------------------------------------------------------------- one combination


def _peak_memory_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return None  # the CPU allocator keeps no peak; see the README


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # the last combination's models and graphs must leave the GPU's memory first
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _why_not(combo: Combo, device: torch.device) -> Optional[str]:
    """Why this device cannot run the combination (None: it can)."""
    if combo.precision == "tf32" and device.type != "cuda":
        return "tf32 needs CUDA"
    if combo.cuda_graphs and device.type != "cuda":
        return "CUDA graphs need CUDA"
    if combo.cuda_graphs and combo.procs > 1:
        return "CUDA graphs run in one process only"
    if combo.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"bf16 is not supported by {torch.cuda.get_device_name(device)}"
    return None


def measure(combo: Combo, cfg: dict[str, Any], flops: Optional[int], say: Callable[[str], None]) -> dict[str, Any]:
    """One row: the timings of danlu and the plain loop (in this process, or in `combo.procs` processes started by
    danlu's launcher: rank 0's steps, every rank stepping together through DDP's gradient all-reduce)."""
    from danlu.api import resolve_device

    device = resolve_device(cfg["device"])
    if combo.procs == 1:
        t = time_both(combo, cfg)
    else:
        from danlu.launch import run_workers

        on_gpus = device.type == "cuda"
        t = run_workers(_worker, combo, {k: v for k, v in cfg.items() if k != "train"},
                        procs=None if on_gpus else combo.procs, gpus=str(combo.procs) if on_gpus else None)[0]
    d_times, p_times, batch, world = t["danlu"], t["plain"], cfg["batch"], combo.procs
    med, p90 = statistics.median(d_times), _percentile(d_times, 90)
    plain_med = statistics.median(p_times)
    peak, peak_source = peak_tflops(device, combo.precision)
    if peak and device.type == "cuda":
        peak *= world  # a GPU per process; CPU processes share the cores the measured matmul already used
    tflops = flops * world / med / 1e12 if flops else None
    row = {
        "device": t["device"], "model": cfg["model"], "size": cfg["size"], "channels": cfg["channels"],
        "classes": cfg["classes"], "precision": combo.precision, "compile": combo.compile,
        "cuda_graphs": combo.cuda_graphs, "channels_last": t["channels_last"], "procs": world, "batch": batch,
        "global_batch": batch * world, "loader": cfg["loader"], "steps": len(d_times), "warmup": cfg["warmup"],
        "images_per_second": round(batch * world / med, 2),
        "ms_per_step_median": round(med * 1e3, 3), "ms_per_step_p90": round(p90 * 1e3, 3),
        "ms_per_step_mean": round(statistics.fmean(d_times) * 1e3, 3),
        "data_wait_share": round(min(1.0, t["wait"] / sum(d_times)), 4),
        "peak_memory_mb": t["peak_memory_mb"],
        "flops_per_step": flops, "tflops": _sig(tflops), "peak_tflops": _sig(peak), "peak_source": peak_source,
        "mfu": _sig(tflops / peak) if tflops is not None and peak else None,
        "skipped_steps": t["skipped_steps"],
        "speedup_vs_fp32_eager": None,  # filled in once the whole matrix is measured
        "plain_images_per_second": round(batch * world / plain_med, 2),
        "plain_ms_per_step_median": round(plain_med * 1e3, 3),
        "plain_ms_per_step_p90": round(_percentile(p_times, 90) * 1e3, 3),
        "vs_plain_loop": round(plain_med / med, 4),
    }
    say(f"bench: {cfg['model']} {combo.label}: {row['images_per_second']:.1f} img/s, {row['ms_per_step_median']:.2f}"
        f" ms median; plain loop {row['plain_images_per_second']:.1f} img/s; danlu/plain {row['vs_plain_loop']:.3f}")
    return row


# ---------------------------------------------------------------- the matrix


def run(*, model: str = "tv:resnet50", size: int = 224, batch: int = 256, precisions=("fp32", "bf16", "fp16"),
        compiles=("off", "on"), cuda_graphs=("off",), procs=(1,), steps: int = 50, warmup: int = 10,
        device: str = "auto", channels: Optional[int] = None, classes: int = 10,
        channels_last: Any = "auto", loader: str = "device", json_out: Optional[str] = None,
        plot_out: Optional[str] = None, quiet: bool = False) -> dict[str, Any]:
    """Measure the matrix and return {'env': {...}, 'rows': [...], 'skipped': [...]}; write JSON / PNG if asked."""
    from danlu.api import resolve_device

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    if steps < 1 or warmup < 1:
        raise DanluError(f"--steps {steps}, --warmup {warmup}: expected at least 1 each")
    if batch < 1 or size < 1 or classes < 2:
        raise DanluError(f"--batch {batch}, --size {size}, --classes {classes}: expected batch and size >= 1, "
                         f"classes >= 2")
    if loader not in ("device", "stream"):
        raise DanluError(f"--loader {loader}: expected device or stream")
    for p in precisions:
        if p not in PRECISIONS:
            raise DanluError(f"--precision: '{p}' is not one of {', '.join(PRECISIONS)}")
    for c in compiles:
        if c not in COMPILE_WORDS:
            raise DanluError(f"--compile: '{c}' is not one of {', '.join(COMPILE_WORDS)}")
    from danlu.models.registry import entry_point, list_models

    if entry_point(model) is None and not model.startswith("tv:"):
        raise DanluError(f"--model {model}: unknown model; expected one of {', '.join(list_models())} or tv:<name>"
                         f"{nearest(model, list_models())}")
    dev = resolve_device(device)
    if any(n > 1 for n in procs):
        if dev.type == "cuda" and max(procs) > torch.cuda.device_count():
            raise DanluError(f"--procs {','.join(map(str, procs))}: one process per GPU and this machine has "
                             f"{torch.cuda.device_count()}; expected at most {torch.cuda.device_count()}")
    channels = channels or (1 if model == "lenet" else 3)
    combos = [Combo(p, c, SWITCH_WORDS[g], n) for n in procs for c in compiles for g in cuda_graphs
              for p in precisions]
    skipped = [{"precision": c.precision, "compile": c.compile, "cuda_graphs": c.cuda_graphs, "procs": c.procs,
                "reason": _why_not(c, dev)} for c in combos if _why_not(c, dev)]
    combos = [c for c in combos if not _why_not(c, dev)]
    if not combos:
        raise DanluError(f"danlu bench: nothing {device_name(dev)} can run: "
                         + "; ".join(sorted({s['reason'] for s in skipped})))
    for s in skipped:
        say(f"bench: {model} {Combo(s['precision'], s['compile'], s['cuda_graphs'], s['procs']).label}: skipped "
            f"({s['reason']})")
    env = environment(dev)

    cfg = {"model": model, "size": size, "channels": channels, "classes": classes, "batch": batch, "steps": steps,
           "warmup": warmup, "device": str(dev), "channels_last": channels_last, "loader": loader}
    cfg["train"] = _synthetic(cfg, dev, 1)  # made once for the single-process rows; other processes make their own
    flops = count_flops(_recipe(model, size, channels, classes, batch, combos[0], channels_last, dev), cfg["train"])

    rows = []
    for combo in combos:
        say(f"bench: {model} {combo.label} on {env['device']}: {warmup} warm-up + {steps} timed steps of batch "
            f"{batch} ...")
        rows.append(measure(combo, cfg, flops, say))
        _speedups(rows)
        if json_out:  # after every row: a run cut short (a time limit, Ctrl-C) keeps what it measured
            write_json({"env": env, "rows": rows, "skipped": skipped, "complete": False}, Path(json_out))
    env["load_average_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result = {"env": env, "rows": rows, "skipped": skipped, "complete": True}
    if json_out:
        write_json(result, Path(json_out))
    if plot_out:
        write_plot(result, Path(plot_out))
    return result


def _speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_fp32_eager: images/s over the fp32, compile off, no-graphs row of the same model, input, batch,
    process count and device (None where the matrix has no such row)."""
    same = ("device", "model", "size", "channels", "batch", "procs", "loader")
    for r in rows:
        base = next((b for b in rows if b["precision"] == "fp32" and b["compile"] == "off" and not b["cuda_graphs"]
                     and all(b[k] == r[k] for k in same)), None)
        r["speedup_vs_fp32_eager"] = round(r["images_per_second"] / base["images_per_second"], 4) if base else None


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several `danlu bench` results (e.g. one per model) as one: the first's env, all rows and skips, and
    speed-ups recomputed across them (a compile-only run finds its fp32 eager row in another)."""
    if not results:
        raise DanluError("merge: no bench results given")
    rows = [dict(r) for res in results for r in res["rows"]]
    _speedups(rows)
    env = dict(results[0]["env"])
    env["load_average_end"] = results[-1]["env"].get("load_average_end")
    return {"env": env, "rows": rows, "skipped": [s for res in results for s in res.get("skipped", [])],
            "complete": all(res.get("complete", True) for res in results)}


def _short(commit: str) -> str:
    """'75f9442a30f4...-dirty' -> '75f9442a30f4-dirty' (a figure from uncommitted code says so)."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def markdown(result: dict[str, Any], command: Optional[str] = None) -> str:
    """One Markdown table of the rows, headed by the date, device, versions and commit (for docs/BENCHMARKS.md)."""
    env = result["env"]
    load = env.get("load_average_start"), env.get("load_average_end")
    head = [f"{env['date'][:10]}, {env['device']}" + (f", driver {env['driver']}" if env.get("driver") else "")
            + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + f", torch {env['torch']}, danlu {env['danlu']}"
            + (f" ({_short(env['danlu_commit'])})" if env.get("danlu_commit") else "")
            + (f"; load average {load[0][0]} before, {load[1][0]} after" if load[0] and load[1] else "")]
    if command:
        head.append(f"`{command}`")
    cols = ["model", "px", "batch", "precision", "compile", "graphs", "procs", "img/s", "ms/step", "p90 ms",
            "peak MB", "TFLOP/s", "MFU", "x fp32 eager", "vs plain loop"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in result["rows"]:
        lines.append("| " + " | ".join([
            r["model"], str(r["size"]), str(r["batch"]), r["precision"], r["compile"], "on" if r["cuda_graphs"] else
            "off", str(r["procs"]), f(r["images_per_second"], ",.0f"), f(r["ms_per_step_median"], ".2f"),
            f(r["ms_per_step_p90"], ".2f"), f(r["peak_memory_mb"], ",.0f"), f(r["tflops"], ".3g"), f(r["mfu"], ".1%"),
            f(r["speedup_vs_fp32_eager"], ".2f"), f(r["vs_plain_loop"], ".3f")]) + " |")
    notes = [f"skipped: {s['precision']} compile {s['compile']} (procs {s['procs']}): {s['reason']}"
             for s in result.get("skipped", [])]
    peaks = sorted({f"{r['precision']}: {r['peak_source']}" for r in result["rows"] if r.get("peak_source")})
    if peaks:
        notes.append("MFU against " + "; ".join(peaks))
    if not result.get("complete", True):
        notes.append("incomplete: the run stopped before the whole matrix was measured")
    return "\n".join(head + [""] + lines + [""] + [f"- {n}" for n in notes]) + "\n"


# ---------------------------------------------------------------- output


def write_json(result: dict[str, Any], path: Path) -> None:
    from danlu.engine.checkpoint import write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart: images/s of danlu and of the plain loop for each combination."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from danlu.engine.checkpoint import write_bytes

    rows = result["rows"]
    labels = [Combo(r["precision"], r["compile"], r["cuda_graphs"], r["procs"]).label for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["images_per_second"] for r in rows], 0.4, label="danlu", color="#c0392b")
    ax.bar([x + 0.2 for x in xs], [r["plain_images_per_second"] for r in rows], 0.4, label="plain PyTorch loop",
           color="#7f8c8d")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['images_per_second']:.0f}", (x - 0.2, r["images_per_second"]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel("images / s")
    first = rows[0] if rows else {}
    env = result["env"]
    ax.set_title(f"{first.get('model', '')} {first.get('size', '')}px, batch {first.get('batch', '')} on "
                 f"{env['device']}\ntorch {env['torch']}, {env['date'][:10]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    env = result["env"]
    t = Table(title=f"danlu bench: {env['device']}, torch {env['torch']}, danlu {env['danlu']} "
                    f"({_short(env['danlu_commit'] or 'no git')}), {env['date']}")
    for name, justify in (("model", "left"), ("precision", "left"), ("compile", "left"), ("graphs", "left"),
                          ("procs", "right"), ("batch", "right"), ("img/s", "right"), ("ms/step", "right"),
                          ("p90 ms", "right"), ("peak MB", "right"), ("TFLOP/s", "right"), ("MFU", "right"),
                          ("x fp32 eager", "right"), ("vs plain", "right")):
        t.add_column(name, justify=justify)

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in result["rows"]:
        t.add_row(r["model"], r["precision"], r["compile"], "on" if r["cuda_graphs"] else "off", str(r["procs"]),
                  str(r["batch"]), f(r["images_per_second"], ".1f"), f(r["ms_per_step_median"], ".2f"),
                  f(r["ms_per_step_p90"], ".2f"), f(r["peak_memory_mb"], ".0f"), f(r["tflops"], ".3g"),
                  f(r["mfu"], ".1%"), f(r["speedup_vs_fp32_eager"], ".2f"), f(r["vs_plain_loop"], ".3f"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a file or a pipe: the whole table, not an 80-column squeeze
    console.print(t)
    for s in result.get("skipped", []):
        console.print(f"skipped: {s['precision']} compile {s['compile']}{' graphs' if s['cuda_graphs'] else ''} "
                      f"x{s['procs']}: {s['reason']}")
    peaks = {(r["precision"], r["peak_source"]) for r in result["rows"] if r["peak_tflops"]}
    for precision, source in sorted(peaks):
        console.print(f"peak for MFU, {precision}: {source}")

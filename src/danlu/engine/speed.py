"""Speed switches: how the same numbers are computed faster, never which numbers (that is `precision`'s job).

    speed = Speed(device, compile=True, channels_last="auto", cuda_graphs=False)
    model = speed.layout(model)                     # channels-last weights; cuDNN autotuning on CUDA
    augment.memory_format = speed.memory_format     # input batches leave preprocessing in the model's layout
    model = speed.wrap(model, (B, C, H, W), precision)   # torch.compile or CUDA graphs (after any DDP wrap)

The switches are recipe fields:

compile       false | true | max-autotune. torch.compile of the model (inductor; mode "default" or max-autotune).
              The compiled wrapper keeps the plain module as `_orig_mod`; snapshots and weights are saved from the
              plain module, so they load into a compiled or an uncompiled model alike. The first steps are slow
              (compilation); `images_per_second` leaves the first 20 steps out.
channels_last auto | true | false. NHWC layout for the weights and the input batches. auto: on CUDA for models with
              convolutions (tensor-core convolution kernels want NHWC); off on CPU, where the NCHW kernels are as
              fast or faster for these models.
cuda_graphs   false | true (CUDA only). Replays the forward and backward of the model as recorded CUDA graphs, so a
              small model stops paying a kernel launch per op. With compile: inductor's CUDA graphs (mode
              reduce-overhead; max-autotune keeps its own); without: torch.cuda.make_graphed_callables. Limits: the
              input shape is fixed (the training batch; the loader drops the last partial batch), one process only
              (no DDP), no host synchronisation or data-dependent Python control flow inside the model's forward,
              evaluation runs eagerly (the graph is recorded in training mode), and the recorded graph's memory stays
              reserved for the run.
cudnn.benchmark is on for every CUDA run: the training shapes are fixed, so autotuning convolution algorithms pays.

Freed memory is kept for reuse (`reuse_freed_memory`, once per process: `danlu` commands and every training run):
glibc gives each block of 32 MiB or more (a 64 x 3 x 224 x 224 float32 batch is 38.5 MiB) its own mapping and
returns it to the system when freed, so the next batch's tensor page-faults its memory in again (10,240 faults for
a 40 MiB batch); on a 2-core CPU that cost a MobileFaceNet run a fifth of its speed and capped the store pipeline at
half of what it reaches now (docs/evidence/benchmarks.md). Not where the process already runs another allocator
(jemalloc, tcmalloc, mimalloc through LD_PRELOAD) or glibc's MALLOC_* variables are set.

`DeviceMonitor` says what the device is doing (GPU utilisation, memory, the share of step time spent waiting for
data) for the train events; on the CPU it is silent and costs nothing.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import torch
from torch import nn

from danlu.errors import DanluError

CompileSetting = Union[bool, str]  # False | True | "max-autotune"
COMPILE_MODES = (False, True, "max-autotune")  # the recipe's `compile` values
COMPILE_WORDS = {"off": False, "on": True, "max-autotune": "max-autotune"}  # the same on the command line


_REUSING: Optional[bool] = None


def reuse_freed_memory() -> bool:
    """Linux/glibc: serve every allocation from the heap (M_MMAP_MAX 0) and keep up to 1 GiB freed at its top (trim
    threshold; 64 MiB of padding when it grows), as jemalloc or tcmalloc would, which PyTorch's CPU tuning guide
    recommends. Once per process; returns whether it is in effect."""
    global _REUSING
    if _REUSING is not None:
        return _REUSING
    import ctypes
    import os
    import sys

    env = os.environ
    chosen = "malloc" in env.get("LD_PRELOAD", "") or any(k.startswith("MALLOC_") for k in env)
    _REUSING = False
    if sys.platform.startswith("linux") and not chosen:
        try:
            libc = ctypes.CDLL("libc.so.6")
            M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # malloc.h
            _REUSING = bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
                            and libc.mallopt(M_TOP_PAD, 64 << 20))
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            pass
    return _REUSING


def has_conv(model: nn.Module) -> bool:
    """Whether the model has 2-D convolutions (where channels-last layout matters)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


class Speed:
    def __init__(self, device: torch.device | str, *, compile: CompileSetting = False,
                 channels_last: Union[bool, str] = "auto", cuda_graphs: bool = False, world: int = 1):
        self.device = torch.device(device)
        if compile not in COMPILE_MODES:
            raise DanluError(f"compile: {compile!r} is not a setting; expected false, true or max-autotune")
        if channels_last not in (True, False, "auto"):
            raise DanluError(f"channels_last: {channels_last!r} is not a setting; expected auto, true or false")
        if cuda_graphs and self.device.type != "cuda":
            raise DanluError(f"cuda_graphs: true needs a CUDA device but this run is on {self.device}; "
                             f"expected cuda_graphs: false here")
        if cuda_graphs and world > 1:
            raise DanluError(f"cuda_graphs: true works in one process only, this run has {world}; expected "
                             f"cuda_graphs: false with several processes")
        self.compile, self.channels_last, self.cuda_graphs = compile, channels_last, bool(cuda_graphs)
        self.memory_format = torch.preserve_format  # for input batches; set by layout()

    def __repr__(self) -> str:
        return (f"Speed({self.device}, compile={self.compile!r}, channels_last={self.channels_last!r}, "
                f"cuda_graphs={self.cuda_graphs})")

    @property
    def compile_mode(self) -> Optional[str]:
        """The torch.compile mode these switches ask for (None: torch's default)."""
        if self.compile == "max-autotune":
            return "max-autotune" if self.cuda_graphs else "max-autotune-no-cudagraphs"
        return "reduce-overhead" if self.cuda_graphs else None

    def layout(self, model: nn.Module) -> nn.Module:
        """Channels-last weights where asked (auto: CUDA and a conv net), cuDNN autotuning on CUDA. In place; call
        before a DDP wrap (DDP's gradient buckets follow the parameters' layout at wrap time)."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        on = self.channels_last if self.channels_last != "auto" else (self.device.type == "cuda" and has_conv(model))
        self.channels_last = bool(on)  # resolved
        if on:
            model = model.to(memory_format=torch.channels_last)
            self.memory_format = torch.channels_last
        return model

    def wrap(self, model: nn.Module, batch_shape: tuple[int, ...], precision: Any) -> nn.Module:
        """The module to call in training: compiled, graphed, or `model` itself. `batch_shape` (B, C, H, W) is the
        training input's; `precision` provides the autocast the graphs are recorded under."""
        if self.compile:
            return torch.compile(model, mode=self.compile_mode)
        if self.cuda_graphs:
            return _graphed(model, batch_shape, self.memory_format, precision)
        return model


def _graphed(model: nn.Module, batch_shape: tuple[int, ...], memory_format: torch.memory_format,
             precision: Any) -> nn.Module:
    """torch.cuda.make_graphed_callables on a sample batch, leaving the model's buffers (BatchNorm running
    statistics) as they were: the warm-up and recording passes run on noise and must not count as training."""
    device = next(model.parameters()).device
    layout = torch.channels_last if memory_format == torch.channels_last else torch.contiguous_format
    sample = torch.randn(batch_shape, device=device).contiguous(memory_format=layout)  # (B, C, H, W) float32
    saved = [b.detach().clone() for b in model.buffers()]
    was_training = model.training
    model.train()  # the graph is recorded (and replayed) in training mode; eval runs the plain forward
    with precision.autocast():
        graphed = torch.cuda.make_graphed_callables(model, (sample,))
    with torch.no_grad():
        for b, s in zip(graphed.buffers(), saved):
            b.copy_(s)  # in place: the recorded graph keeps reading and writing these very tensors
    graphed.train(was_training)
    return graphed


# ---------------------------------------------------------------- what the device is doing


def gpu_utilization(device: torch.device) -> Optional[int]:
    """Percent of the last NVML sample period in which a kernel ran on `device`; None where NVML is missing."""
    try:
        return int(torch.cuda.utilization(device))
    except Exception:  # no nvidia-ml-py, no NVML library, or a device NVML cannot see (MIG): leave it out
        return None


class DeviceMonitor:
    """On CUDA: GPU utilisation and memory, and the share of step time spent waiting for the next batch, for the
    train events. On any other device `batches()` hands the batches through untouched and `read()` is empty.

        monitor = DeviceMonitor(device)
        for x, y in monitor.batches(loader.epoch(e)): ...
        event.update(monitor.read(seconds_in_steps_since_last_read))
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.on = self.device.type == "cuda"
        self.wait = 0.0  # seconds blocked in the loader since the last read

    def batches(self, batches: Iterable[Any]) -> Iterable[Any]:
        return timed(batches, self) if self.on else batches

    def read(self, step_seconds: float) -> dict[str, Any]:
        """{'gpu_utilization': %, 'gpu_memory_mb', 'gpu_max_memory_mb', 'data_wait_share'} ({} off CUDA);
        `step_seconds`: time spent in training steps since the last read (the share's denominator)."""
        if not self.on:
            return {}
        out: dict[str, Any] = {}
        util = gpu_utilization(self.device)
        if util is not None:
            out["gpu_utilization"] = util
        out["gpu_memory_mb"] = round(torch.cuda.memory_allocated(self.device) / 2 ** 20, 1)
        out["gpu_max_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
        out["data_wait_share"] = round(min(1.0, self.wait / step_seconds), 4) if step_seconds > 0 else None
        self.wait = 0.0
        return out


def timed(batches: Iterable[Any], counter: Any) -> Iterator[Any]:
    """The batches, adding the seconds spent waiting for each to `counter.wait`."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            counter.wait += time.perf_counter() - t
        yield batch

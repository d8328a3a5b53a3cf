"""How bench times steps: marks at the end of each step (CUDA events on a GPU, the clock on a CPU), the two loops
interleaved step by step, the time spent waiting for batches, percentiles."""
from __future__ import annotations

import gc
import time
from typing import Any, Optional

import torch


class StepMarks:
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


class Paired(StepMarks):
    """Interleaves the two loops step by step: at the end of each danlu step (train_loop's `tick`), one plain-loop
    step runs. Every danlu step is timed from the end of the plain step before it, every plain step from the end of
    the danlu step before it, so both meet the same machine (load, clocks, caches) at every step."""

    def __init__(self, device: torch.device, plain: Any):  # danlu.bench.plain.Plain
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


class WaitTimer:
    """A loader that counts the seconds spent waiting for each batch (as the loop's DeviceMonitor does on CUDA)."""

    def __init__(self, loader: Any):
        self.loader, self.wait = loader, 0.0
        self.device, self.global_batch = loader.device, loader.global_batch

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start: int = 0):
        from danlu.engine.speed import timed

        return timed(self.loader.epoch(epoch, start=start), self)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)



def peak_memory_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return None  # the CPU allocator keeps no peak; see the README


def free(device: torch.device) -> None:
    if device.type == "cuda":  # the last combination's models and graphs must leave the GPU's memory first
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


"""What a run tells the user while it trains: a progress bar, metrics.jsonl, TensorBoard events.

Meters accumulate on the device and are read (one sync) only when something is shown or logged.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional, Union

import torch

from danlu.engine.devices import wide_float
from danlu.errors import require


class Meter:
    """Running sums of loss, correct predictions and samples (device tensors; no sync per step).

    With several ranks (`dist`), `read()` and `state_dict()` give the sums over all ranks (one all-reduce, so every
    rank calls them at the same points); `read(local=True)`, for the progress bar, stays on this rank."""

    def __init__(self, device: torch.device, dist: Optional[Any] = None):
        self.loss_sum = torch.zeros((), dtype=wide_float(device), device=device)  # sum of loss * batch
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.n = 0
        self.dist = dist  # danlu.engine.distributed.Dist, or None: this process alone

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """y: (B,) labels, or (B, classes) soft labels (mixup, cutmix), of which the dominant one counts."""
        if y.dim() == 2:
            y = y.argmax(1)
        self.loss_sum += loss.detach() * y.shape[0]
        self.correct += (logits.argmax(1) == y).sum()
        self.n += y.shape[0]

    def _sums(self, local: bool) -> tuple[float, int, int]:
        """(loss sum, correct, samples), over all ranks unless `local`."""
        if local or self.dist is None or not self.dist.grouped:
            return self.loss_sum.item(), int(self.correct.item()), self.n
        t = torch.stack([self.loss_sum, self.correct.to(self.loss_sum.dtype),
                         torch.tensor(float(self.n), dtype=self.loss_sum.dtype, device=self.loss_sum.device)])  # (3,)
        loss_sum, correct, n = self.dist.all_reduce_sum(t).tolist()
        return loss_sum, int(correct), int(n)

    def state_dict(self) -> dict[str, Any]:
        """The sums over all ranks (what a snapshot keeps, so it resumes on any number of ranks)."""
        loss_sum, correct, n = self._sums(local=False)
        return {"loss_sum": torch.tensor(loss_sum, dtype=torch.float64), "correct": torch.tensor(correct), "n": n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Sums over all ranks: rank 0 holds them, the others start from zero (their sum is the saved one)."""
        if self.dist is not None and not self.dist.is_main:
            return
        self.loss_sum.copy_(state["loss_sum"].to(self.loss_sum.dtype)), self.correct.copy_(state["correct"])
        self.n = int(state["n"])

    def read(self, reset: bool = True, local: bool = False) -> tuple[float, float, int]:
        """(mean loss, accuracy, samples) since the last reset, over all ranks unless `local`."""
        loss_sum, correct, n = self._sums(local)
        if reset:
            self.loss_sum.zero_(), self.correct.zero_()
            self.n = 0
        return (loss_sum / n, correct / n, n) if n else (float("nan"), float("nan"), 0)


class Best:
    """The best test figure so far and how many test events since it improved (run.keep_best, run.early_stop).
    `metric`: a test figure (acc, top5, loss, verification_acc; lower is better for a loss); `patience`: test events
    without a better one after which `exhausted` is set (None: never).

        best = Best("acc", patience=3)
        if best.update(it, test): ...        # this event is the best so far: keep its weights
        if best.exhausted: stop
    """

    def __init__(self, metric: str, patience: Optional[int] = None):
        self.metric, self.patience = metric, patience
        self.value: Optional[float] = None
        self.iteration: Optional[int] = None
        self.since = 0  # test events since the best one
        self.improved = False  # whether the last update was the best so far

    def update(self, it: int, test: dict[str, Any]) -> bool:
        v = test.get(self.metric)
        if v is None:
            self.improved = False
            return False
        self.improved = self.value is None or (v < self.value if self.metric.endswith("loss") else v > self.value)
        if self.improved:
            self.value, self.iteration, self.since = float(v), it, 0
        else:
            self.since += 1
        return self.improved

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.since >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "iteration": self.iteration, "since": self.since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.iteration = state.get("value"), state.get("iteration")
        self.since = int(state.get("since", 0))


class RunLog:
    """metrics.jsonl (one JSON object per event), TensorBoard scalars, and the console (rank 0 only). A test
    event's console line is the task's (`test_line(record, total)`, danlu.tasks)."""

    def __init__(self, run_dir: Optional[Path], *, total: int, start: int, tensorboard: Union[bool, str] = "auto",
                 quiet: bool = False, enabled: bool = True,
                 test_line: Optional[Callable[[dict[str, Any], int], str]] = None):
        self.enabled, self.total, self.quiet, self.start = enabled, total, quiet, start
        self.test_line = test_line or _test_line
        self.path = run_dir / "metrics.jsonl" if run_dir and enabled else None
        self._file = open(self.path, "a") if self.path else None
        self._tb = _tensorboard(run_dir, tensorboard) if (tensorboard and run_dir and enabled) else None
        self._bar = _Bar(total, start) if (enabled and not quiet and sys.stdout.isatty()) else None
        self._last_shown = 0.0

    def event(self, record: dict[str, Any]) -> None:
        """Log one train or test event: {'kind': 'train'|'test', 'iter': ..., 'loss': ..., ...}."""
        if not self.enabled:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb:
            for k, v in record.items():
                if k not in ("kind", "iter", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{record['kind']}/{k}", v, record["iter"])
        if self._bar or not self.quiet:
            line = (self.test_line(record, self.total) if record["kind"] == "test"
                    else _train_line(record, self.total, self.start))
            if record.get("starting_weights"):  # model.keep_start put the starting weights back
                line += "  (the starting weights, kept: model.keep_start)"
            if self._bar:
                self._bar.show(record, line)
            else:
                print(line, flush=True)

    def tick(self, it: int, meter: Meter, images_per_second: float) -> None:
        """Refresh the progress bar (at most 4 times a second: reading the meter costs a device sync)."""
        now = time.perf_counter()
        if self._bar and now - self._last_shown > 0.25:
            self._last_shown = now
            loss, acc, _ = meter.read(reset=False, local=True)  # rank 0 only: no collective
            self._bar.update(it, loss, acc, images_per_second)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def _test_line(r: dict[str, Any], total: int) -> str:
    """A test event's figures as they are, where no task words them."""
    figures = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float) and k not in ("epoch", "time"))
    return f"[test]  iter {r['iter']:>6}/{total}  {figures}"


def _train_line(r: dict[str, Any], total: int, start: int = 0) -> str:
    """A train event as one line; `start`: the iteration this process began at (a resumed run's snapshot)."""
    return (f"[train] iter {r['iter']:>6}/{total}  epoch {r['epoch']:.2f}  lr {r['lr']:.3g}  loss {r['loss']:.4f}  "
            f"acc {r['acc']:.4f}  {r['images_per_second']:.0f} img/s{_gpu(r)}{_eta(r, total, start)}")


def _eta(r: dict[str, Any], total: int, start: int) -> str:
    """'  eta 4:13': the time left at the run's own pace so far, the seconds since this process's loop began
    (`time`: training, evaluation and logging alike) per iteration since `start`; '' at the end or without a time.
    What the progress bar shows in a terminal, for logs and pipes."""
    done, left = r["iter"] - start, total - r["iter"]
    if r.get("time") is None or done <= 0 or left <= 0:
        return ""
    return f"  eta {as_clock(r['time'] / done * left)}"


def as_clock(seconds: float) -> str:
    """Seconds as a clock reading: 9 -> '0:09', 253 -> '4:13', 3723 -> '1:02:03'."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _gpu(r: dict[str, Any]) -> str:
    """'  gpu 84% 1234 MB, data wait 2%' where a train event carries the GPU's figures (CUDA), else ''."""
    if "gpu_memory_mb" not in r:
        return ""
    util = f" {r['gpu_utilization']}%" if r.get("gpu_utilization") is not None else ""
    wait = f", data wait {r['data_wait_share']:.0%}" if r.get("data_wait_share") is not None else ""
    return f"  gpu{util} {r['gpu_memory_mb']:.0f} MB{wait}"


def _tensorboard(run_dir: Path, wanted: Union[bool, str]):
    """A TensorBoard writer into run_dir/tensorboard: with run.tensorboard auto where the package is installed (None
    elsewhere), with true always (one line naming the extra's pip command where it is missing)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is an extra
        if wanted is True:
            require("tensorboard", "tensorboard", "run.tensorboard=true")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class _Bar:
    """A rich progress bar: iteration, loss, accuracy, images/s, ETA."""

    def __init__(self, total: int, start: int, console: Any = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[ips]} img/s"
                                            "{task.fields[gpu]}"),
                                 TimeRemainingColumn(), refresh_per_second=4, console=console)
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", acc="-", ips="-", gpu="")
        self.progress.start()

    def update(self, it: int, loss: float, acc: float, ips: float) -> None:
        self.progress.update(self.task, completed=it, loss=f"{loss:.4f}", acc=f"{acc:.4f}", ips=f"{ips:.0f}")

    def show(self, record: dict[str, Any], line: str) -> None:
        if record["kind"] == "train" and "gpu_memory_mb" in record:  # CUDA: keep the GPU's figures in the bar
            self.progress.update(self.task, gpu=_gpu(record))
        if record["kind"] == "test":  # as text: rich would read "[test]" as markup and drop it
            self.progress.console.print(line, markup=False, highlight=False)

    def stop(self) -> None:
        self.progress.stop()

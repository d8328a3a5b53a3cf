"""The training loop, on one screen. It knows nothing of dtypes or process counts: `precision` and `dist` hide both.

One step: the schedule sets each parameter group's LR (and unfreezes, at its iteration) -> uint8 batch on the device
-> augment + normalize (batched, on the device; mixup / cutmix turn the labels soft) -> forward + loss under the
precision's autocast -> backward -> clip + step -> the weights' average (optim.ema). Around it: meters, display events,
evaluation every `test_interval` (run.early_stop ends the run after that many without a better one), a snapshot every
`snapshot_every` (all at iteration boundaries, so a snapshot at iteration k resumes exactly like the uninterrupted run
continues from k). `p.guard` (engine/faults.py) holds the NaN policy and stop requests: a SIGTERM adds a snapshot at
the next boundary, after which the run stops.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from danlu.data.augment import Augment
from danlu.data.loader import Loader
from danlu.engine.distributed import Dist
from danlu.engine.faults import Diverged, Guard  # noqa: F401 (Diverged: raised here, re-exported)
from danlu.engine.ema import EMA
from danlu.engine.metrics import Best, Meter, RunLog
from danlu.engine.precision import Precision
from danlu.engine.speed import DeviceMonitor


@dataclass
class Parts:
    """Everything one training step touches, built from a recipe by `danlu.engine.build`."""
    model: torch.nn.Module  # the module to call (DDP-wrapped where world > 1)
    optimizer: torch.optim.Optimizer
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    augment: Augment
    generator: Optional[torch.Generator]  # draws of the augmentation (saved in snapshots)
    train_loader: Loader  # DeviceLoader, StreamLoader or a shard loader: danlu.data.loader.Loader
    test_loader: Loader
    precision: Precision
    dist: Dist
    schedule: Callable[[int, torch.optim.Optimizer], float]  # engine.schedule.Schedule: group LRs, unfreezing
    # the task's test metric (danlu.tasks): evaluate(model, loader, augment, precision, dist, max_batches,
    # label_smoothing) -> figures
    evaluate: Callable[..., dict[str, Any]]
    guard: Guard = field(default_factory=Guard)  # NaN policy and stop requests (SIGTERM / SIGINT)
    ema: Optional[EMA] = None  # optim.ema: an average of the weights, evaluated beside them
    best: Best = field(default_factory=lambda: Best("acc"))  # the best test event (run.keep_best, run.early_stop)


@dataclass
class Plan:
    max_iter: int
    test_interval: int
    display: int
    snapshot_every: int  # 0: only at the end
    test_iter: Optional[int] = None  # test batches per evaluation (None: the whole test set)
    clip_grad_norm: Optional[float] = None
    label_smoothing: float = 0.0
    warmup_iters: int = 20  # steps left out of the throughput figure (allocator and cache warm-up)
    accumulate: int = 1  # micro-batches per step: the loader's batch (A*B) is cut into A micro-batches of B
    target: Optional[tuple[str, float]] = None  # (metric, value): stop at the first test event reaching it


@dataclass
class LoopStats:
    iterations: int
    train_seconds: float  # time in training steps only (no evaluation, logging or snapshots)
    images_per_second: float  # after the warm-up steps, per process
    last_test: dict[str, float]
    to_target: Optional[dict[str, float]] = None  # iterations, seconds (training only), images: where it was reached
    early_stopped: bool = False  # run.early_stop: stopped after that many test events without a better one


def train_loop(p: Parts, plan: Plan, log: RunLog, snapshot: Callable[[int, dict[str, Any]], None],
               on_test: Callable[[dict[str, float]], None], start: int = 0,
               loop_state: Optional[dict[str, Any]] = None) -> LoopStats:
    """Train from iteration `start` to `plan.max_iter`. `snapshot(it, loop_state)` saves; `loop_state` (the meters
    between display events) comes back from a snapshot so a resumed run logs exactly what the uninterrupted one did."""
    model, opt, per_epoch = p.model, p.optimizer, len(p.train_loader)
    params = list(model.parameters())  # frozen ones (no gradient) are left out of clipping by torch itself
    meter, last_test = Meter(p.train_loader.device, p.dist), {}  # read: summed over ranks
    monitor = DeviceMonitor(p.train_loader.device)  # CUDA: utilisation, memory, data wait; elsewhere silent
    clock = _Clock(warm_from=start + min(plan.warmup_iters, max(0, plan.max_iter - start - 1)))
    if loop_state:
        meter.load_state_dict(loop_state["meter"])
        clock.load_state_dict(loop_state.get("clock", {}))  # a resumed run reports the whole run's time and rate
        p.best.load_state_dict(loop_state.get("best", {}))
    it, A, to_target, done = start, plan.accumulate, None, False
    model.train()
    while it < plan.max_iter:
        epoch, index = divmod(it, per_epoch)
        for x, y in monitor.batches(p.train_loader.epoch(epoch, start=index)):  # x: (B, C, H, W) uint8, y: (B,)
            lr = p.schedule(it, opt)  # every group's LR (head_lr_mult), unfreezing at model.unfreeze_at
            # (A*B, C, H, W) float32, normalized; A = plan.accumulate. y: labels, or (A*B, classes) soft labels (mixup)
            x, y = p.augment.train_batch(x, y, p.generator)
            opt.zero_grad(set_to_none=True)
            micro = []  # (loss, logits, labels) of each micro-batch, detached
            for k, (xb, yb) in enumerate(zip(x.chunk(A), y.chunk(A))):  # (B, ...) each; A=1: the batch itself
                with p.dist.no_sync(model, skip=k < A - 1):  # DDP all-reduces once, after the last micro-batch
                    with p.precision.autocast():
                        logits = model(xb)  # (B, classes)
                        loss = p.criterion(logits, yb)
                    p.precision.backward(loss / A)
                micro.append((loss.detach(), logits.detach(), yb))
            if p.guard.keep(micro):  # run.on_nan=skip drops a step whose loss is not finite (stop: no check here)
                if p.precision.step(opt, params, plan.clip_grad_norm) and p.ema is not None:
                    p.ema.update()
                for loss_k, logits_k, y_k in micro:
                    meter.add(loss_k, logits_k, y_k)
            it += 1
            clock.step(it, y.shape[0])
            log.tick(it, meter, clock.window_rate())

            if it % plan.display == 0 or it == plan.max_iter:
                with clock.paused():
                    loss_avg, acc_avg, _ = meter.read()
                    p.guard.check(loss_avg, it, lr)
                    device = monitor.read(clock.window_seconds)  # before the window resets below
                    log.event({"kind": "train", "iter": it, "epoch": it / per_epoch, "lr": lr, "loss": loss_avg,
                               "acc": acc_avg, "images_per_second": clock.window_rate(reset=True) * p.dist.world,
                               "time": clock.elapsed(), **p.guard.counts(),
                               "skipped_steps": p.precision.skipped_steps, **device})
            if it % plan.test_interval == 0 or it == plan.max_iter:
                with clock.paused():
                    last_test = test_figures(p, model, plan)  # the weights, and their average (ema_acc, ...) beside
                    log.event({"kind": "test", "iter": it, "epoch": it / per_epoch, **last_test,
                               "time": clock.elapsed()})
                    p.best.update(it, last_test)
                    on_test(last_test)
                    if reached(plan.target, last_test):
                        to_target = {"iterations": it, "seconds": clock.train_seconds,
                                     "images": clock.all_images * p.dist.world}
            done = it == plan.max_iter or to_target is not None or p.best.exhausted
            if (plan.snapshot_every and it % plan.snapshot_every == 0) or done or p.guard.stop:
                with clock.paused():
                    state = {"meter": meter.state_dict(), "clock": clock.state_dict(),  # meter: sums over all ranks
                             "best": p.best.state_dict()}
                    p.guard.check(state["meter"]["loss_sum"].item(), it, lr)  # never snapshot non-finite weights
                    snapshot(it, state)
            if done:
                break
        if done:
            break
    return LoopStats(it, clock.train_seconds, clock.rate(), last_test, to_target,
                     early_stopped=p.best.exhausted and it < plan.max_iter)


def test_figures(p: Parts, model: torch.nn.Module, plan: Plan) -> dict[str, Any]:
    """The test figures of the weights and, with optim.ema, of their average beside them (ema_acc, ema_loss, ...);
    the model is back in training mode after."""
    test = p.evaluate(model, p.test_loader, p.augment, p.precision, p.dist, plan.test_iter, plan.label_smoothing)
    if p.ema is not None:
        ema = p.evaluate(p.ema.model, p.test_loader, p.augment, p.precision, p.dist, plan.test_iter,
                         plan.label_smoothing)
        test.update({f"ema_{k}": v for k, v in ema.items() if k != "samples"})
    model.train()
    return test


def reached(target: Optional[tuple[str, float]], test: dict[str, Any]) -> bool:
    """Whether the test figures reach the target (metric, value): at least the value, at most for a loss."""
    if target is None or test.get(target[0]) is None:
        return False
    metric, value = target
    return test[metric] <= value if metric.endswith("loss") else test[metric] >= value


class _Clock:
    """Seconds spent in training steps, and images per second after the warm-up steps."""

    def __init__(self, warm_from: int):
        self.warm_from, self.train_seconds, self.images, self.warm_seconds = warm_from, 0.0, 0, 0.0
        self.window_images, self.window_seconds, self.all_images = 0, 0.0, 0
        self.t0 = self.last = time.perf_counter()

    def step(self, it: int, batch: int) -> None:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        self.train_seconds += dt
        self.window_images += batch
        self.window_seconds += dt
        self.all_images += batch
        if it > self.warm_from:
            self.images += batch
            self.warm_seconds += dt

    def state_dict(self) -> dict[str, float]:
        return {"train_seconds": self.train_seconds, "images": self.images, "warm_seconds": self.warm_seconds,
                "all_images": self.all_images}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Count the time and images of the run before a snapshot as this run's (floats and ints only)."""
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.images, self.warm_seconds = int(state.get("images", 0)), float(state.get("warm_seconds", 0.0))
        self.all_images = int(state.get("all_images", 0))

    def paused(self) -> "_Clock":
        return self

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        self.last = time.perf_counter()  # time spent in the block is not training time

    def rate(self) -> float:
        if self.images == 0:  # a run shorter than the warm-up
            return self.all_images / self.train_seconds if self.train_seconds else 0.0
        return self.images / self.warm_seconds

    def window_rate(self, reset: bool = False) -> float:
        r = self.window_images / self.window_seconds if self.window_seconds else 0.0
        if reset:
            self.window_images, self.window_seconds = 0, 0.0
        return r

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

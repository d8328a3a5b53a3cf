"""Learning-rate policies as a pure function of the iteration number.

The schedule has no state besides ``it``, so resuming from a snapshot at iteration ``it`` gives exactly the same
rates as an uninterrupted run. ``it`` counts from 0; the rate returned is the one used for the update at ``it``.

Caffe policies (caffe/src/caffe/solvers/sgd_solver.cpp, ``SGDSolver::GetLearningRate``):

    fixed      base_lr
    step       base_lr * gamma ^ floor(it / stepsize)
    exp        base_lr * gamma ^ it
    inv        base_lr * (1 + gamma * it) ^ (-power)
    multistep  base_lr * gamma ^ (number of stepvalues <= it)
    poly       base_lr * (1 - it / max_iter) ^ power                       (it clamped to max_iter)
    sigmoid    base_lr * 1 / (1 + exp(-gamma * (it - stepsize)))

Others:

    poly_decay base_lr * (1 - epoch / max_epochs) ^ power, epoch = it // iters_per_epoch,
               max_epochs = ceil(max_iter / iters_per_epoch)   (the Keras MiniGoogLeNet article, per epoch)
    cosine     min_lr + (base_lr - min_lr) * (1 + cos(pi * it / max_iter)) / 2          (it clamped to max_iter)
    onecycle   torch.optim.lr_scheduler.OneCycleLR(max_lr=base_lr, total_steps=max_iter, anneal_strategy='cos',
               three_phase=False): cosine from base_lr/div_factor up to base_lr over iterations
               [0, pct_start*max_iter - 1], then cosine down to base_lr/div_factor/final_div_factor at max_iter - 1
               (torch's indexing: its lr after k scheduler.step() calls is lr_at(k)); constant after that.

Warmup (any policy; ``target`` = the policy's rate at ``it``), for ``it < warmup``:

    warmup_start is None:  target * (it + 1) / warmup          (no wasted zero-rate step at it = 0)
    warmup_start given:    warmup_start + (target - warmup_start) * it / warmup
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from danlu.errors import DanluError, nearest

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid", "poly_decay", "cosine", "onecycle")


def _cos_anneal(start: float, end: float, pct: float) -> float:
    """torch OneCycleLR's cosine interpolation: start at pct=0, end at pct=1."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def _onecycle(it: int, base_lr: float, max_iter: int, pct_start: float, div_factor: float,
              final_div_factor: float) -> float:
    initial = base_lr / div_factor
    final = initial / final_div_factor
    up_end = float(pct_start * max_iter) - 1.0  # torch: phase ends are inclusive step indices
    down_end = float(max_iter - 1)
    if it <= up_end and up_end > 0:
        return _cos_anneal(initial, base_lr, it / up_end)
    return _cos_anneal(base_lr, final, min(it - up_end, down_end - up_end) / (down_end - up_end))


def lr_at(it: int, *, policy: str, base_lr: float, max_iter: int, iters_per_epoch: int, gamma: float = 0.1,
          power: float = 1.0, stepsize: int = 0, stepvalues: Sequence[int] = (), min_lr: float = 0.0,
          warmup: int = 0, warmup_start: float | None = None, pct_start: float = 0.3, div_factor: float = 25.0,
          final_div_factor: float = 1e4) -> float:
    """The learning rate for iteration ``it`` (0-based) under ``policy``; see the module docstring for formulas."""
    if policy not in POLICIES:
        raise DanluError(f"schedule.policy: unknown policy {policy!r}; expected one of {', '.join(POLICIES)}"
                         + nearest(policy, POLICIES))
    if policy == "step" and stepsize <= 0:
        raise DanluError(f"schedule.stepsize must be > 0 for policy step (got {stepsize})")
    if policy == "fixed":
        lr = base_lr
    elif policy == "step":
        lr = base_lr * gamma ** (it // stepsize)
    elif policy == "exp":
        lr = base_lr * gamma ** it
    elif policy == "inv":
        lr = base_lr * (1.0 + gamma * it) ** (-power)
    elif policy == "multistep":
        lr = base_lr * gamma ** sum(1 for v in stepvalues if it >= v)
    elif policy == "poly":
        lr = base_lr * (1.0 - min(it, max_iter) / max_iter) ** power
    elif policy == "sigmoid":
        lr = base_lr * (1.0 / (1.0 + math.exp(-gamma * (it - stepsize))))
    elif policy == "poly_decay":
        max_epochs = math.ceil(max_iter / iters_per_epoch)
        lr = base_lr * (1.0 - min(it // iters_per_epoch, max_epochs) / max_epochs) ** power
    elif policy == "cosine":
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(it, max_iter) / max_iter))
    else:  # onecycle
        lr = _onecycle(it, base_lr, max_iter, pct_start, div_factor, final_div_factor)
    if warmup > 0 and it < warmup:
        if warmup_start is None:
            lr = lr * (it + 1) / warmup
        else:
            lr = warmup_start + (lr - warmup_start) * it / warmup
    return lr


class Schedule:
    """What changes with the iteration, applied by the training loop once per step, before the step: every
    parameter group's LR (the policy's rate x the group's `lr_mult`, engine/params.py); from iteration
    `unfreeze_at` on, the `frozen` parameters train; a face head's margin grows to its full size over the first
    `margin_iters` steps (model.margin_warmup). A pure function of `it`, so a resumed run continues exactly.

        schedule = Schedule(lambda it: 0.1 * 0.5 ** (it // 100), frozen=backbone, unfreeze_at=300)
        lr = schedule(it, optimizer)          # the policy's rate (what the log shows)
    """

    def __init__(self, rate: Callable[[int], float], frozen: Sequence = (), unfreeze_at: int | None = None,
                 margin: Any = None, margin_iters: int = 0):
        self.rate, self.frozen, self.unfreeze_at = rate, list(frozen), unfreeze_at
        self.margin, self.margin_iters = margin, margin_iters  # a MarginLoss whose margin grows over margin_iters

    def __call__(self, it: int, optimizer) -> float:
        lr = self.rate(it)
        if self.margin is not None and self.margin_iters > 0:
            self.margin.ramp = min(1.0, (it + 1) / self.margin_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        if self.frozen and self.unfreeze_at is not None and it >= self.unfreeze_at:
            for p in self.frozen:
                p.requires_grad_(True)
            self.frozen = []
        return lr

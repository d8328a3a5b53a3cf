"""Faults a long run meets, each turned into a clean stop that says why and how to go on.

    guard = Guard(on_nan="stop", named_parameters=model.named_parameters(), run_dir=run_dir)
    with guard.signals():                  # SIGTERM / SIGINT now set guard.stop instead of killing the process
        train_loop(parts, ...)             # the loop asks guard.keep(micro) per step, guard.check(...) at boundaries

- SIGTERM / SIGINT: the step in flight finishes, the loop sees `guard.stop` at its snapshot condition, a snapshot is
  written and `Stopped` carries the exit code (128 + signal: 143 / 130) and the `danlu train --resume DIR` line.
  A second Ctrl-C stops at once (KeyboardInterrupt).
- NaN / Inf: `on_nan="stop"` (default) costs nothing per step; at display and snapshot time a non-finite loss or
  weight stops the run with `diagnosis.json` (iteration window, LR, first non-finite parameter and gradient) and
  keeps the last good snapshot. `on_nan="skip"` reads the loss's finiteness every step (one host read; on a GPU,
  one sync) and drops those steps, counting them; fp16 loss-scaler skips are the precision's business, not this.
- Out of memory: `find_batch_size` probes the largest power-of-two batch that fits before training;
  `out_of_memory` turns torch.OutOfMemoryError during training into one line naming the batch and a fitting one.
- A rank or node lost, or stuck past `dist.timeout`: `lost_ranks` is the one line the ranks left behind say (who,
  where it ran, after which iteration, how the collective failed); danlu.launch adds what happens next.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from danlu.errors import DanluError, Stopped  # noqa: F401 (Stopped: raised here)

ON_NAN = ("stop", "skip")
MAX_SKIP_STREAK = 50  # on_nan=skip: this many non-finite steps in a row cannot recover; stop with the diagnosis


class Diverged(DanluError):
    """The loss or the weights became NaN or infinite: the run stops (keeping its last good snapshot) instead of
    training on."""


class Guard:
    """What the loop asks at each step (`keep`) and at its boundaries (`check`, `stop`). One per run."""

    def __init__(self, on_nan: str = "stop", named_parameters: Iterable[tuple[str, torch.Tensor]] = (),
                 run_dir: Optional[Path] = None, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                 any_rank: Callable[[bool], bool] = lambda flag: flag, world: int = 1):
        if on_nan not in ON_NAN:
            raise DanluError(f"run.on_nan={on_nan!r}: expected one of {', '.join(ON_NAN)}")
        self.on_nan, self.named, self.run_dir = on_nan, list(named_parameters), run_dir
        self.all_reduce_sum, self.world = all_reduce_sum, world  # ranks must agree on skipping (losses differ)
        self.any_rank = any_rank  # ... and on stopping: Dist.any_rank, all ranks at the same iteration
        self.nan_skipped = 0  # steps dropped by on_nan=skip (carried through snapshots: state_dict)
        self.signal: Optional[int] = None
        self._streak, self._checked_at = 0, None
        if on_nan == "stop":
            self.keep = _keep_all  # no per-step check at all: the default costs nothing

    @property
    def stop(self) -> bool:
        """A signal asked the run to stop at this iteration boundary (on any rank: every rank asks at the same
        points, and `any_rank` gives them one answer, so all snapshot and stop at the same iteration)."""
        if self.any_rank(self.signal is not None):
            self.signal = self.signal or signal.SIGTERM  # a rank the signal did not reach stops as if it had
            return True
        return False

    def keep(self, micro: list[tuple[torch.Tensor, ...]]) -> bool:
        """on_nan=skip: False (and counted) when the step's loss is not finite on any rank. `micro`: the step's
        (loss, ...) per micro-batch."""
        loss = sum(m[0] for m in micro) if len(micro) > 1 else micro[0][0]
        bad = 0.0 if math.isfinite(loss.item()) else 1.0  # one host read (on a GPU: one sync); ~1 us on a CPU
        if self.world > 1:  # every rank takes the same decision: skip where any rank's loss is not finite
            bad = self.all_reduce_sum(torch.tensor([bad], device=loss.device)).item()
        if bad == 0:
            self._streak = 0
            return True
        self.nan_skipped += 1
        self._streak += 1
        return False

    def counts(self) -> dict[str, int]:
        """Extra fields for train events: the skipped-step count where on_nan=skip."""
        return {"nan_skipped_steps": self.nan_skipped} if self.on_nan == "skip" else {}

    def check(self, loss: float, it: int, lr: float) -> None:
        """At display and snapshot time (one sync): raise Diverged, writing diagnosis.json, when the loss is not
        finite (on_nan=stop), the weights are not (any mode: a snapshot never holds them), or skipping has not
        recovered for MAX_SKIP_STREAK steps."""
        params_ok = bool(torch.stack([torch.isfinite(p).all() for _, p in self.named]).all()) if self.named else True
        if self.on_nan == "stop" and not math.isfinite(loss):
            what = f"loss is {loss}"
        elif not params_ok:
            what = "weights are not finite"
        elif self._streak >= MAX_SKIP_STREAK:
            what = f"the last {self._streak} steps all had a non-finite loss (skipped)"
        else:
            self._checked_at = it
            return
        raise self._diverged(what, loss, it, lr)

    def _diverged(self, what: str, loss: float, it: int, lr: float) -> Diverged:
        from danlu.engine.checkpoint import snapshots

        param = _first_nonfinite((n, p) for n, p in self.named)
        grad = _first_nonfinite((n, p.grad) for n, p in self.named if p.grad is not None)
        good = snapshots(self.run_dir / "snapshots") if self.run_dir else []
        since = f"finite at {self._checked_at}" if self._checked_at is not None else "from the start"
        diagnosis = {
            "error": what, "iteration": it, "finite_at_iteration": self._checked_at, "lr": lr,
            "loss": loss if math.isfinite(loss) else str(loss), "first_nonfinite_parameter": param[0],
            "nonfinite_parameters": param[1], "first_nonfinite_gradient": grad[0], "nonfinite_gradients": grad[1],
            "on_nan": self.on_nan, "nan_skipped_steps": self.nan_skipped,
            "last_good_snapshot": str(good[-1]) if good else None,
        }
        where = ""
        if self.run_dir is not None:
            from danlu.io import write_bytes

            write_bytes(self.run_dir / "diagnosis.json", (json.dumps(diagnosis, indent=2) + "\n").encode())
            where = f"; diagnosis in {self.run_dir / 'diagnosis.json'}"
        first = ", ".join(f"{k} {v[0]}" for k, v in (("parameter", param), ("gradient", grad)) if v[0])
        kept = f"last good snapshot {good[-1].name} is kept" if good else "no snapshot was written before it"
        return Diverged(f"{what} by iteration {it} ({since}; lr {lr:.3g}): training diverged"
                        f"{'; first non-finite ' + first if first else ''}{where}; {kept}. Lower optim.lr, set "
                        f"optim.clip_grad_norm{' or run.on_nan=skip' if self.on_nan == 'stop' else ''}")

    @contextlib.contextmanager
    def signals(self) -> Iterator["Guard"]:
        """Within the block, SIGTERM and SIGINT set `self.signal` (the loop then snapshots and stops) instead of
        killing the process; a second SIGINT raises KeyboardInterrupt at once. Only the main thread can do this:
        elsewhere the block runs with the handlers as they are."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handle(signum: int, frame: Any) -> None:
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = self.signal or signum

        old = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    def after(self, save: Callable[[int, dict[str, Any]], None], max_iter: int, run_dir: Optional[Path]
              ) -> Callable[[int, dict[str, Any]], None]:
        """`save` (the loop's snapshot callback), then stop with `Stopped` when a signal asked to; at the last
        iteration the run finishes normally instead."""
        def save_then_stop(it: int, loop_state: dict[str, Any]) -> None:
            save(it, loop_state)
            if self.stop and it < max_iter:
                raise self.stopped(it, run_dir)
        return save_then_stop

    def state_dict(self) -> dict[str, int]:
        return {"nan_skipped": self.nan_skipped, "streak": self._streak}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.nan_skipped, self._streak = int(state.get("nan_skipped", 0)), int(state.get("streak", 0))

    def stopped(self, it: int, run_dir: Optional[Path]) -> Stopped:
        assert self.signal is not None
        name = signal.Signals(self.signal).name
        snap = f"; snapshot {Path(run_dir) / 'snapshots' / f'iter_{it:08d}.pt'} written" if run_dir else ""
        return Stopped(self.signal, f"stopped by {name} at iteration {it}{snap}; continue with: "
                                    f"danlu train --resume {run_dir}")


def _keep_all(micro: list[tuple[torch.Tensor, ...]]) -> bool:
    return True


def _first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[Optional[str], int]:
    """(name of the first tensor holding NaN/Inf, how many do) in the given order."""
    bad = [n for n, t in named if not bool(torch.isfinite(t).all())]
    return (bad[0] if bad else None), len(bad)


# ---------------------------------------------------------------- lost or stuck ranks


def lost_ranks(call: Optional[dict[str, dict[int, dict]]], *, rank: int, world: int, iteration: Optional[int],
               timed_out: bool, timeout: float) -> str:
    """What rank `rank` of `world` says when a collective failed: who is lost or stuck (`call`, from
    Dist.roll_call: {"lost": {rank: where}, "stuck": {rank: where}}; None: the job's store is gone with rank 0's
    node), where they ran, after which iteration, and how (`timed_out`: waited `timeout` s, dist.timeout; else a
    peer's connection closed).

    >>> lost_ranks({"lost": {1: {"host": "n2", "node": 1, "pid": 7}}, "stuck": {}}, rank=0, world=2, iteration=20,
    ...            timed_out=False, timeout=300)
    'lost rank 1 (host n2, node 1, pid 7) after iteration 20: its connection closed (rank 0 of 2 noticed)'
    """
    after = f"after iteration {iteration}" if iteration is not None else "before training started"
    waited = f"no answer for {timeout:g} s (dist.timeout)"
    if call is None:
        how = waited if timed_out else "its connection closed"
        return (f"lost rank 0's node (the job's store, which it kept, is gone too) {after}: {how} (rank {rank} of "
                f"{world} noticed)")
    said = []
    if call["lost"]:
        how = (f"{waited} and no heartbeat" if timed_out else
               "their connections closed" if len(call["lost"]) > 1 else "its connection closed")
        said.append(f"lost {_ranks(call['lost'])} {after}: {how} (rank {rank} of {world} noticed)")
    if call["stuck"]:
        said.append(f"{_ranks(call['stuck'])} stuck: alive but {waited} {after} (rank {rank} of {world} gave up "
                    f"waiting)")
    if not said:  # everybody answered: nobody is gone, they waited on each other
        said.append(f"every rank of {world} is alive but a collective {'timed out' if timed_out else 'failed'} on "
                    f"rank {rank} {after}: the ranks called different collectives")
    return "; ".join(said)


def _ranks(where: dict[int, dict]) -> str:
    """'rank 1 (host n2, node 1, pid 7)', or per machine 'ranks 8-15 (host n2, node 1)'."""
    by_host: dict[tuple, list[int]] = {}
    for r, w in sorted(where.items()):
        by_host.setdefault((w.get("host"), w.get("node")), []).append(r)
    said = []
    for (host, node), ranks in by_host.items():
        place = ", ".join(p for p in (f"host {host}" if host else "", f"node {node}" if node is not None else "") if p)
        if len(ranks) == 1:
            pid = where[ranks[0]].get("pid")
            place = ", ".join(p for p in (place, f"pid {pid}" if pid else "") if p)
            said.append(f"rank {ranks[0]}" + (f" ({place})" if place else ""))
        else:
            span = f"{ranks[0]}-{ranks[-1]}" if ranks == list(range(ranks[0], ranks[-1] + 1)) else \
                ",".join(map(str, ranks))
            said.append(f"ranks {span}" + (f" ({place})" if place else ""))
    return ", ".join(said)


# ---------------------------------------------------------------- out of memory


def probe_batch_size(model: torch.nn.Module, images: Any, device: torch.device, augment: Callable[..., torch.Tensor],
                     autocast: Callable[[], contextlib.AbstractContextManager], batch_size: int, limit: int,
                     say: Callable[[str], None] = print) -> int:
    """run.find_batch_size: the largest batch that fits (powers of two up to `limit`, the per-device training set),
    measured with forward + backward of the real model under the run's precision. Raises DanluError before
    anything is written when the recipe's `batch_size` does not fit; the recipe's batch is never changed behind the
    user's back (it sets the learning rate and the result)."""
    def loss_of(x: torch.Tensor) -> torch.Tensor:  # x: (b, C, H, W) uint8
        with autocast():
            logits = model(augment(x, train=False))  # (b, classes)
        return torch.nn.functional.cross_entropy(logits.float(), torch.zeros(len(x), dtype=torch.long,
                                                                              device=x.device))

    n = min(64, len(images))  # real images, cycled to make the big batches
    if isinstance(images, torch.Tensor):
        sample = images[:n]  # (n, C, H, W) uint8
    else:  # a prepared store's ShardedImages, read on demand
        sample = torch.from_numpy(images.gather(np.arange(n)))
    fits = find_batch_size(model, sample.to(device), loss_of, limit, also=batch_size)
    if fits == 0:
        raise DanluError(f"run.find_batch_size: the model does not fit in {device} memory even for one image")
    if batch_size > fits:
        raise DanluError(f"data.batch_size={batch_size}: does not fit in {device} memory (run.find_batch_size: the "
                         f"largest batch that fits forward+backward is {fits}); expected at most {fits}, e.g. "
                         f"--set data.batch_size={fits}")
    capped = fits * 2 > limit  # no power of two ran out of memory: the training set ended the probe
    say(f"danlu: run.find_batch_size: {'every batch up to ' if capped else 'the largest batch that fits '}{fits}"
        f"{' fits' if capped else ''} forward+backward on {device} (powers of two up to {limit}, the training images "
        f"per device); training with data.batch_size={batch_size}")
    return fits


def find_batch_size(model: torch.nn.Module, images: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor],
                    limit: int, also: Optional[int] = None) -> int:
    """The largest power of two b <= limit for which forward + backward of a b-image batch fits in memory (0: not
    even one image); `also` (the recipe's batch) is tried too when no power of two ran out of memory. `images`:
    (N, C, H, W) uint8 on the device, cycled to make big batches; `loss_of(x)` maps a uint8 batch to a scalar loss.
    The model's weights, buffers (BatchNorm statistics), gradients and the random generators are left as they
    were, so a probed run trains exactly like an unprobed one."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    fits, b, ran_out = 0, 1, False
    try:
        while b <= limit and not ran_out:
            ran_out = not _fits(model, images, loss_of, b)
            fits, b = (fits if ran_out else b), b * 2
        if also is not None and not ran_out and fits < also <= limit and _fits(model, images, loss_of, also):
            fits = also
    finally:
        with torch.no_grad():
            for n, buf in model.named_buffers():
                buf.copy_(buffers[n])
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return fits


def _fits(model: torch.nn.Module, images: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor],
          b: int) -> bool:
    failed = False
    try:
        idx = torch.arange(b, device=images.device) % images.shape[0]  # (b,)
        loss_of(images[idx]).backward()
    except torch.OutOfMemoryError:
        failed = True  # free the tensors outside the except block: its traceback holds them
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available() and images.device.type == "cuda":
        torch.cuda.empty_cache()
    return not failed


def out_of_memory(batch_size: int, device: torch.device, fits: Optional[int]) -> DanluError:
    """The one-line error for torch.OutOfMemoryError during training."""
    if fits:
        smaller = fits if fits < batch_size else max(1, batch_size // 2)
        hint = (f"run.find_batch_size found {fits} fits for forward+backward (the optimizer state and evaluation "
                f"need more); try --set data.batch_size={smaller}")
    else:
        hint = (f"try --set data.batch_size={max(1, batch_size // 2)}, or --set run.find_batch_size=true to "
                f"find the largest batch that fits")
    return DanluError(f"out of memory on {device} with data.batch_size={batch_size} (per device; evaluation uses "
                      f"data.test_batch_size, default 4x); {hint}")

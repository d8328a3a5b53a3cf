#!/usr/bin/env python
"""Loop overhead: danlu's training loop against a plain hand-written PyTorch loop, same model, batch and threads.

    python benchmarks/loop_overhead.py                   # LeNet and ResNet-18, 3 rounds (~2.5 min on 2 idle cores)
    python benchmarks/loop_overhead.py --models lenet --steps lenet=520 --repeats 5 --json lenet.json
    python benchmarks/loop_overhead.py --wait-quiet 120  # on a shared machine: wait out others' jobs, redo runs

For each model, in one process, runs alternate (a) danlu (`danlu.train` through the public API: augmentation off,
fixed LR, one evaluation at the end on 64 images, no intermediate snapshots) and (b) a plain loop (uint8 batch from a
random permutation, `.float().mul_(1/255)`, cross-entropy, SGD momentum 0.9 / weight decay 5e-4,
`zero_grad(set_to_none=True)`, backward, step) for `--repeats` rounds, and reports the median images per second of
each and the median of the rounds' danlu/plain ratios (each pair runs back to back, so drift cancels). Both figures leave out the same warm-up steps: danlu's rule, the first 20 steps, or all but the
last one when a run has 20 steps or fewer. danlu's figure is `RunResult.images_per_second`, which also leaves out the
evaluation, logging and snapshot time; the plain loop has none of those. The target is danlu/plain >= 0.97; a miss
is reported, not an error (the exit status is 0).

Each run also records the share of the CPU that other processes used meanwhile (/proc/stat): on a small machine
another job's threads slow a 2-thread PyTorch step by 20% to 10x, far more than the loop overhead being measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

import danlu
from danlu.engine.devices import cpu_model
from danlu.data.datasets import ImageSet, load_dataset
from danlu.engine.speed import reuse_freed_memory

TARGET = 0.97
WARMUP = 20  # danlu's Plan.warmup_iters: steps left out of RunResult.images_per_second
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
TRAIN_SIZE, TEST_SIZE = 4096, 64


@dataclass
class Spec:
    channels: int
    size: int
    batch: int
    steps: int  # default total steps per run (warm-up included)
    kwargs: dict = field(default_factory=dict)


# On 2 idle CPU cores a LeNet step (batch 64) takes ~13 ms and a ResNet-18 step (batch 32) ~0.6 s, so the defaults
# (3 rounds of danlu + plain per model, 20 warm-up steps each) take about 2.5 minutes.
SPECS = {
    "lenet": Spec(channels=1, size=28, batch=64, steps=320, kwargs={"input_size": 28}),
    "resnet18": Spec(channels=3, size=32, batch=32, steps=30),
}
BUSY = 0.05  # other processes' CPU share above which --wait-quiet runs a measurement again


def warmup_steps(steps: int) -> int:
    """The steps danlu's clock leaves out of images_per_second (engine/loop.py `_Clock(warm_from=...)`)."""
    return min(WARMUP, max(0, steps - 1))


def make_model(name: str, spec: Spec) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights for both loops
    return danlu.create_model(name, num_classes=10, in_channels=spec.channels, **spec.kwargs)


def run_danlu(name: str, spec: Spec, steps: int, train: ImageSet, test: ImageSet, out: Path) -> float:
    recipe = {
        "model": {"name": name},
        "data": {"batch_size": spec.batch, "test_batch_size": TEST_SIZE},
        "augment": "none",
        "optim": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                  "wd_exclude_norm_bias": False},  # as the plain loop: one group
        "schedule": {"policy": "fixed"},
        "run": {"max_iter": steps, "test_interval": 10 ** 9, "snapshot_every": 0, "display": steps,
                "tensorboard": False, "seed": 0},
        "devices": {"device": "cpu"},
    }
    try:
        result = danlu.train(recipe, model=make_model(name, spec), train_data=train, test_data=test, out=out,
                             quiet=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if result.iterations != steps:
        raise RuntimeError(f"danlu ran {result.iterations} iterations, expected {steps}")
    return result.images_per_second


def run_plain(name: str, spec: Spec, steps: int, train: ImageSet) -> float:
    model = make_model(name, spec)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    images, labels = train.images, train.labels  # (N, C, H, W) uint8, (N,) int64, in memory
    n, b = len(labels), spec.batch
    per_epoch = n // b
    warm = warmup_steps(steps)
    g = torch.Generator().manual_seed(0)
    it, t0 = 0, time.perf_counter()
    while it < steps:
        order = torch.randperm(n, generator=g)  # a fresh permutation each epoch
        for i in range(per_epoch):
            idx = order[i * b:(i + 1) * b]
            x = images[idx].float().mul_(1 / 255)  # (B, C, H, W) float32
            y = labels[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            if it == warm:
                t0 = time.perf_counter()
            if it >= steps:
                break
    seconds = time.perf_counter() - t0
    return (steps - warm) * b / seconds


class OtherLoad:
    """Share of the machine's CPU capacity that other processes used while the block ran: /proc/stat's busy time
    for all CPUs minus this process's own CPU time, over (cores x wall time). On a shared 2-core box, a round that
    ran beside someone else's job reads well above 0 and its figures are not to be trusted."""

    def __enter__(self) -> "OtherLoad":
        self.share = float("nan")
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return
        (busy0, own0, t0), (busy1, own1, t1) = self._start, end
        wall = t1 - t0
        if wall > 0:
            self.share = max(0.0, ((busy1 - busy0) - (own1 - own0)) / ((os.cpu_count() or 1) * wall))

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return (sum(v) - v[3] - v[4]) / hz, t.user + t.system, time.monotonic()


def wait_for_quiet(limit: float, threshold: float = BUSY) -> float:
    """Wait up to `limit` seconds until other processes use under `threshold` of the CPU over one second; returns
    the last reading."""
    deadline = time.monotonic() + limit
    while True:
        with OtherLoad() as load:
            time.sleep(1.0)
        if load.share < threshold or time.monotonic() >= deadline:
            return load.share


def measure(run, wait_quiet: float, tries: int = 3) -> tuple[float, float]:
    """(images per second, other processes' CPU share) of run(); with wait_quiet, wait for an idle CPU first and
    run again (up to `tries` times in all) when someone else's job shared the CPU."""
    for attempt in range(tries if wait_quiet else 1):
        if wait_quiet:
            wait_for_quiet(wait_quiet)
        with OtherLoad() as load:
            ips = run()
        if not wait_quiet or not load.share > BUSY:
            break
        if attempt + 1 < tries:
            print(f"  (other processes used {load.share:.0%} of the CPU: running it again)", file=sys.stderr,
                  flush=True)
    return ips, load.share


def environment() -> dict:
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "danlu": danlu.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "platform": platform.platform(),
    }


def parse_steps(text: str | None, models: list[str]) -> dict[str, int]:
    """'300' (every model) or 'lenet=300,resnet18=6' -> {model: steps}; unnamed models keep their defaults."""
    steps = {m: SPECS[m].steps for m in models}
    if not text:
        return steps
    if "=" not in text:
        return {m: int(text) for m in models}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in SPECS:
            raise SystemExit(f"--steps {text}: unknown model '{key}'; expected one of {', '.join(SPECS)}")
        if key.strip() in steps:
            steps[key.strip()] = int(value)
    return steps


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # as every danlu process does; the side it is compared with runs in this process too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet,resnet18", help="comma-separated, from: " + ", ".join(SPECS))
    ap.add_argument("--steps", default=None,
                    help="steps per run, warm-up included: one number for every model or 'lenet=N,resnet18=M' "
                         f"(defaults: {', '.join(f'{k}={v.steps}' for k, v in SPECS.items())})")
    ap.add_argument("--repeats", type=int, default=3, help="danlu/plain rounds per model (median taken; default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first (default: torch's own)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each run, wait up to this long for other processes to leave the CPU, and run "
                         "again (twice at most) a run that shared the CPU with them (default 0: off)")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the rows and the environment here")
    args = ap.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in SPECS:
            ap.error(f"--models: unknown model '{m}'; expected some of {', '.join(SPECS)}")
    steps = parse_steps(args.steps, models)
    if any(s < 2 for s in steps.values()):
        ap.error("--steps: at least 2 steps a run (one warm-up, one timed)")
    if args.repeats < 1:
        ap.error("--repeats: at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    # `timeout` sends SIGTERM: exit through the `with` below so the temporary run folders are removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory(prefix="danlu-bench-") as tmp:
        for name in models:
            spec, n_steps = SPECS[name], steps[name]
            train, test = load_dataset("synthetic", size=spec.size, channels=spec.channels, num_classes=10,
                                       train_size=TRAIN_SIZE, test_size=TEST_SIZE)
            danlu_ips, plain_ips, other = [], [], []
            for r in range(args.repeats):  # alternate a/b/a/b so drift hits both alike
                a, share_a = measure(lambda: run_danlu(name, spec, n_steps, train, test, Path(tmp) / f"{name}-{r}"),
                                     args.wait_quiet)
                b, share_b = measure(lambda: run_plain(name, spec, n_steps, train), args.wait_quiet)
                danlu_ips.append(a)
                plain_ips.append(b)
                other += [share_a, share_b]
                print(f"  {name} round {r + 1}/{args.repeats}: danlu {a:.1f} img/s, plain {b:.1f} img/s "
                      f"(other processes' CPU share {share_a:.0%} / {share_b:.0%})", file=sys.stderr, flush=True)
            d, p = statistics.median(danlu_ips), statistics.median(plain_ips)
            # the ratio of each round's pair (measured back to back), then the median: drift between rounds on a
            # shared or throttled machine hits both runs of a pair alike and cancels
            ratio = statistics.median(a / b for a, b in zip(danlu_ips, plain_ips))
            rows.append({"model": name, "batch": spec.batch, "steps": n_steps, "timed_steps": n_steps -
                         warmup_steps(n_steps), "danlu_ips": round(d, 1), "plain_ips": round(p, 1),
                         "ratio": round(ratio, 4), "meets_target": ratio >= TARGET,
                         "danlu_ips_runs": [round(v, 1) for v in danlu_ips],
                         "plain_ips_runs": [round(v, 1) for v in plain_ips],
                         "other_cpu_share_max": round(max(other), 3) if other else None,
                         "other_cpu_share_runs": [round(v, 3) for v in other]})

    print(f"\ndate {env['date']}  torch {env['torch']}  danlu {env['danlu']}  python {env['python']}")
    print(f"cpu {env['cpu']} ({env['cpu_count']} logical cores), torch threads {env['torch_threads']}, "
          f"CUDA {'available (not used)' if env['cuda_available'] else 'not available'}")
    print(f"medians of {args.repeats} alternating rounds (danlu/plain: the median of the rounds' ratios); "
          "warm-up steps left out of both timings\n")
    head = f"{'model':<10} {'batch':>5} {'steps':>7} {'danlu img/s':>12} {'plain img/s':>12} {'danlu/plain':>12}  target"
    print(head)
    print("-" * len(head))
    for row in rows:
        steps_txt = f"{row['steps']}({row['timed_steps']})"
        verdict = f"meets >= {TARGET}" if row["meets_target"] else f"MISSES {TARGET}"
        print(f"{row['model']:<10} {row['batch']:>5} {steps_txt:>7} {row['danlu_ips']:>12.1f} "
              f"{row['plain_ips']:>12.1f} {row['ratio']:>12.3f}  {verdict}")
    print("\nsteps: per run, (timed after warm-up)")
    worst = max((row["other_cpu_share_max"] for row in rows if row["other_cpu_share_max"] == row["other_cpu_share_max"]),
                default=0.0)
    print(f"other processes' CPU share during the runs: at most {worst:.0%}")
    if worst > BUSY:
        print(f"warning: other processes used over {BUSY:.0%} of the CPU during some runs; these figures are not "
              "reliable (rerun on a quiet machine, or with --wait-quiet 120)")

    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"environment": env, "target": TARGET, "repeats": args.repeats,
                                   "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                                   "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

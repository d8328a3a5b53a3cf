#!/usr/bin/env python
"""Time to accuracy: seconds of training until the test accuracy first reaches the target, over several seeds.

    python benchmarks/time_to_accuracy.py                         # mnist_fast on the CPU, 10 seeds (~10 min idle)
    python benchmarks/time_to_accuracy.py --seeds 3 --examples-seeds 1 --json tta.json
    python benchmarks/time_to_accuracy.py --recipe cifar10_fast   # on a CUDA machine

For each seed, in one process, three trainers run on the same data, each evaluated on the whole test set every
`run.test_interval` iterations' worth of images (evaluation untimed), each stopping at the first evaluation that
reaches the target; the time counted is training time only (as danlu's `seconds_to_target`):

- danlu: `danlu.train(RECIPE, overrides=["run.seed=S"])`, the figure `summary["seconds_to_target"]`;
- plain: a hand-written PyTorch loop with the same recipe (the recipe's model built by danlu.create_model with the
  same seed, SGD with Nesterov momentum and weight decay as optim.wd_exclude_norm_bias says, torch's OneCycleLR
  without momentum cycling, label smoothing, the same batch and the same per-epoch permutation as danlu's loader,
  batches gathered with numpy as danlu's CPU loader does, pixels / 255): the same arithmetic on the same samples, so the difference is what danlu's loop costs;
- examples/mnist (MNIST only): PyTorch's own example recipe (pytorch/examples mnist/main.py: two 3x3 convs (32, 64),
  dropout, fc 128, Adadelta lr 1.0, StepLR gamma 0.7 per epoch, batch 64, normalization 0.1307 / 0.3081), the
  figure most users would start from.

Prints a table (mean, min, max seconds; how many seeds reached the target within the budget) and writes it with the
machine, versions and the command (--json). MNIST comes from $DANLU_DATA/mnist (`danlu data get mnist`).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import danlu
from danlu.config import load_recipe
from danlu.engine.build import load_data
from danlu.io import write_json
from danlu.runs import environment
from danlu.engine.speed import reuse_freed_memory


def danlu_run(recipe: str, seed: int, device: str, out: Path) -> dict:
    r = danlu.train(recipe, overrides=[f"run.seed={seed}"], out=out, device=device, quiet=True)
    s = r.summary
    return {"seconds": s["seconds_to_target"], "images": s["images_to_target"], "final": r.test_accuracy,
            "precision": s["recipe"]["precision"], "images_per_second": s["images_per_second"]}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prep) -> float:
    model.eval()
    hits = sum(int((model(prep(x[i:i + 1000])).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(y), 1000))
    model.train()
    return hits / len(y)


def timed_loop(forward, model, opt, sched, loss_fn, prep, train, test, batch: int, epochs: float, every_images: int,
               target: float, seed: int) -> dict:
    """Train until the test accuracy, checked every `every_images` (untimed), reaches `target`. Each epoch is
    danlu's permutation for (seed, epoch) (data/loader.py: epoch_order), gathered with numpy on the CPU."""
    from danlu.data.loader import epoch_order

    (x, y), (tx, ty) = train, test
    n, steps = len(y), int(math.ceil(epochs * (len(y) // batch)))
    xn = x.numpy()
    seconds, seen, next_check, it, epoch = 0.0, 0, every_images, 0, 0
    while it < steps:
        order = epoch_order(n, seed, epoch).numpy()
        epoch += 1
        for lo in range(0, n - batch + 1, batch):
            t = time.perf_counter()
            idx = order[lo:lo + batch]
            xb = torch.from_numpy(np.take(xn, idx, axis=0))
            loss = loss_fn(forward(prep(xb)), y[torch.from_numpy(idx)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            seconds += time.perf_counter() - t
            it, seen = it + 1, seen + batch
            if seen >= next_check or it == steps:
                next_check += every_images
                acc = accuracy(model, tx, ty, prep)
                if acc >= target:
                    return {"seconds": seconds, "images": seen, "final": acc, "images_per_second": seen / seconds}
            if it == steps:
                break
    return {"seconds": None, "images": None, "final": acc, "images_per_second": seen / seconds}


def plain_run(recipe_name: str, seed: int, data, precision: str) -> dict:
    """The recipe's model, optimizer, schedule and loss written out as a plain loop (SGD + onecycle recipes), in
    the precision danlu's run resolved to (fp32, or bf16 autocast)."""
    r = load_recipe(recipe_name, [f"run.seed={seed}"])
    o, s = r.optim, r.schedule
    (x, y), test = data
    torch.manual_seed(seed)
    model = danlu.create_model(r.model.name, num_classes=10, in_channels=x.shape[1], input_size=x.shape[-1],
                               **r.model.kwargs)
    # optim.wd_exclude_norm_bias (timm's rule): no weight decay on biases and 1-d parameters
    named = list(model.named_parameters())
    plain = [p for n, p in named if not (o.wd_exclude_norm_bias and (p.ndim <= 1 or n.endswith(".bias")))]
    exempt = [p for n, p in named if o.wd_exclude_norm_bias and (p.ndim <= 1 or n.endswith(".bias"))]
    groups = [{"params": plain, "weight_decay": o.weight_decay}] + ([{"params": exempt, "weight_decay": 0.0}]
                                                                     if exempt else [])
    opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    steps = int(math.ceil(r.run.epochs * (len(y) // r.data.batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=steps, pct_start=s.pct_start,
                                                div_factor=s.div_factor, final_div_factor=s.final_div_factor,
                                                cycle_momentum=False)  # danlu's onecycle cycles the LR only
    import contextlib

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            return model(batch)

    return timed_loop(forward, model, opt, sched, lambda z, t: F.cross_entropy(z.float(), t,
                                                                               label_smoothing=o.label_smoothing),
                      lambda b: b.float().mul_(1 / 255), (x, y), test, r.data.batch_size, r.run.epochs,
                      r.run.test_interval * r.data.batch_size, r.run.target.value, seed)


class ExamplesNet(nn.Module):
    """pytorch/examples mnist/main.py's Net."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.relu(self.fc1(self.dropout1(x).flatten(1)))
        return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)


def examples_run(seed: int, data, every_images: int, target: float, max_epochs: float) -> dict:
    (x, y), test = data
    torch.manual_seed(seed)
    model = ExamplesNet()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    per_epoch = len(y) // 64

    class PerEpoch:  # StepLR(step_size=1, gamma=0.7), stepped once an epoch as the example does
        def __init__(self):
            self.it, self.s = 0, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)

        def step(self):
            self.it += 1
            if self.it % per_epoch == 0:
                self.s.step()

    return timed_loop(model, model, opt, PerEpoch(), F.nll_loss, lambda b: (b.float() / 255 - 0.1307) / 0.3081, (x, y),
                      test, 64, max_epochs, every_images, target, seed)


def summarize(runs: list[dict], budget: float) -> dict:
    secs = [r["seconds"] for r in runs if r["seconds"] is not None]
    return {"runs": len(runs), "reached": len(secs), "within_budget": sum(s <= budget for s in secs),
            "mean": statistics.fmean(secs) if secs else None, "min": min(secs, default=None),
            "max": max(secs, default=None), "images_mean": statistics.fmean([r["images"] for r in runs
                                                                             if r["images"]]) if secs else None,
            "images_per_second": statistics.median([r["images_per_second"] for r in runs])}


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # as every danlu process does; the side it is compared with runs in this process too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="mnist_fast")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--examples-seeds", type=int, default=3, help="seeds for PyTorch's examples/mnist recipe (slow)")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of training the target should take at most")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from danlu.engine.devices import resolve_device

    recipe = load_recipe(a.recipe)
    dev = resolve_device(a.device)
    train, test = load_data(recipe)
    data = ((train.images, train.labels), (test.images, test.labels))
    rows: dict[str, list[dict]] = {"danlu": [], "plain loop (same recipe)": []}
    if recipe.data.name == "mnist" and dev.type == "cpu":
        rows["PyTorch examples/mnist"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(a.seeds):
            rows["danlu"].append(danlu_run(a.recipe, seed, str(dev), Path(tmp) / f"s{seed}"))
            if dev.type == "cpu":  # the plain loops hold the data on the CPU
                rows["plain loop (same recipe)"].append(plain_run(a.recipe, seed, data,
                                                                  rows["danlu"][-1]["precision"]))
            if "PyTorch examples/mnist" in rows and seed < a.examples_seeds:
                rows["PyTorch examples/mnist"].append(
                    examples_run(seed, data, recipe.run.test_interval * recipe.data.batch_size,
                                 recipe.run.target.value, max_epochs=5))
            print(f"seed {seed}: " + "; ".join(f"{k} {v[-1]['seconds'] if v and v[-1]['seconds'] is not None else '-'}"
                                              for k, v in rows.items() if v), file=sys.stderr, flush=True)
    stats = {k: summarize(v, a.budget) for k, v in rows.items() if v}
    t = recipe.run.target
    print(f"{a.recipe}: seconds of training to test {t.metric} >= {t.value} on {environment(dev)['device']}")
    print(f"| trainer | seeds | reached | within {a.budget:g} s | mean s | min s | max s | images (mean) | img/s (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, s in stats.items():
        f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        print(f"| {k} | {s['runs']} | {s['reached']} | {s['within_budget']} | {f(s['mean'])} | {f(s['min'])} | "
              f"{f(s['max'])} | {f(s['images_mean'], 0)} | {f(s['images_per_second'], 0)} |")
    if a.json:
        write_json(Path(a.json), {"env": environment(dev), "recipe": a.recipe, "budget": a.budget,
                                  "command": " ".join(["python", "benchmarks/time_to_accuracy.py", *(argv or sys.argv[1:])]),
                                  "stats": stats, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

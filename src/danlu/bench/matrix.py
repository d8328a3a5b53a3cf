"""The speed matrix: every combination of precision x compile x CUDA graphs x processes the device supports, each
timed as danlu's real step against the plain loop, interleaved step by step (see the package's docstring)."""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from danlu.bench.flops import count_flops, peak_tflops, sig
from danlu.bench.plain import LR, MOMENTUM, WEIGHT_DECAY, Plain
from danlu.bench.timing import Paired, StepMarks, WaitTimer, free, peak_memory_mb, percentile, sync
from danlu.engine.precision import FORMATS
from danlu.engine.speed import COMPILE_WORDS
from danlu.errors import DanluError, nearest
from danlu.io import write_json
from danlu.runs import device_name, environment, load_average

SWITCH_WORDS = {"off": False, "on": True}
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
        from danlu.report import combo_label

        return combo_label(self.precision, self.compile, self.cuda_graphs, self.procs)


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




def bench_recipe(model: str, size: int, channels: int, classes: int, batch: int, combo: Combo, channels_last: Any,
            device: torch.device):
    from danlu.config import build_recipe

    return build_recipe({
        "model": {"name": model},
        "data": {"name": "synthetic", "batch_size": batch, "test_batch_size": batch, "size": size,
                 "channels": channels, "num_classes": classes},
        "augment": "none",
        "optim": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "lr_scaling": "none",
                  "wd_exclude_norm_bias": False},  # as the plain loop: one group
        "schedule": {"policy": "fixed"},
        "run": {"max_iter": 1, "tensorboard": False},
        "precision": combo.precision, "compile": COMPILE_WORDS[combo.compile], "channels_last": channels_last,
        "cuda_graphs": combo.cuda_graphs, "devices": {"device": str(device)},
    }, origin="danlu bench")


class DanluStep:
    """danlu's training step, exactly as `danlu.train` runs it: train_loop on the Parts that danlu.engine.build
    makes from the recipe (a DDP-wrapped model and this rank's slice of every batch where `dist` has several
    processes), with bench's own loader (timed for its waits) and a constant LR."""

    def __init__(self, recipe, train, device: torch.device, loader_kind: str, dist):
        from danlu.engine.build import build

        b = recipe.data.batch_size
        self.loader = WaitTimer(_make_loader(loader_kind, train, b, device, dist))
        test = train.subset(torch.arange(b * dist.world))
        built = build(recipe, train, test, device, dist, loader=self.loader, lr=recipe.optim.lr)
        self.parts, self.precision, self.speed = built.parts, built.parts.precision, built.speed
        self.channels_last = built.speed.channels_last
        self.it = 0

    def run(self, steps: int, marks: StepMarks) -> None:
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



def _synthetic(cfg: dict[str, Any], device: torch.device, world: int):
    """Seeded random uint8 images and labels on the device: 8 global batches (an epoch every 8 steps)."""
    from danlu.data.imageset import ImageSet

    g = torch.Generator().manual_seed(0)
    n, c, s, k = 8 * cfg["batch"] * world, cfg["channels"], cfg["size"], cfg["classes"]
    images = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)  # (N, C, H, W)
    labels = torch.randint(0, k, (n,), generator=g)
    return ImageSet(images.to(device), labels.to(device), [str(i) for i in range(k)])


def time_both(combo: Combo, cfg: dict[str, Any]) -> dict[str, Any]:
    """In this process (one of `combo.procs`): build danlu's step and the plain loop, warm both up, then time
    `steps` steps of each, interleaved step by step. Returns the step seconds of both and what else the row needs."""
    from danlu.engine import distributed
    from danlu.engine.devices import resolve_device

    device = resolve_device(cfg["device"])
    dist = distributed.setup(device) if combo.procs > 1 else distributed.Dist()
    if combo.procs > 1 and device.type == "cuda":
        device = dist.device  # this rank's GPU
    train = cfg.get("train") or _synthetic(cfg, device, dist.world)
    recipe = bench_recipe(cfg["model"], cfg["size"], cfg["channels"], cfg["classes"], cfg["batch"], combo,
                     cfg["channels_last"], device)
    if combo.compile != "off":
        torch.compiler.reset()  # a fresh compile cache for each combination (dynamo's recompile limit is per code)
    free(device)
    danlu = DanluStep(recipe, train, device, cfg["loader"], dist)
    danlu.run(cfg["warmup"], StepMarks(device))
    sync(device)
    peak_memory = peak_memory_mb(device)
    plain = Plain(recipe, train, device, danlu.channels_last, danlu.speed.compile_mode, dist)
    plain.run(cfg["warmup"])
    sync(device)

    wait0 = danlu.loader.wait
    paired = Paired(device, plain)  # one train_loop call; a plain step after each of its steps
    paired.mark()  # the start: danlu's first timed step is timed from here
    danlu.run(cfg["steps"], paired)
    d_times, p_times = paired.split()
    out = {"danlu": d_times, "plain": p_times, "wait": danlu.loader.wait - wait0, "peak_memory_mb": peak_memory,
           "channels_last": danlu.channels_last, "skipped_steps": danlu.precision.skipped_steps,
           "device": device_name(device)}
    del danlu, plain
    free(device)
    return out


def _worker(combo: Combo, cfg: dict[str, Any]) -> dict[str, Any]:
    """One process of a multi-process row (started by danlu.launch.run_workers)."""
    return time_both(combo, cfg)


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
    from danlu.engine.devices import resolve_device

    device = resolve_device(cfg["device"])
    if combo.procs == 1:
        t = time_both(combo, cfg)
    else:
        from danlu.launch import run_workers

        on_gpus = device.type == "cuda"
        t = run_workers(_worker, combo, {k: v for k, v in cfg.items() if k != "train"},
                        procs=None if on_gpus else combo.procs, gpus=str(combo.procs) if on_gpus else None)[0]
    d_times, p_times, batch, world = t["danlu"], t["plain"], cfg["batch"], combo.procs
    med, p90 = statistics.median(d_times), percentile(d_times, 90)
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
        "images_per_second": sig(batch * world / med, 6),
        "ms_per_step_median": round(med * 1e3, 3), "ms_per_step_p90": round(p90 * 1e3, 3),
        "ms_per_step_mean": round(statistics.fmean(d_times) * 1e3, 3),
        "data_wait_share": round(min(1.0, t["wait"] / sum(d_times)), 4),
        "peak_memory_mb": t["peak_memory_mb"],
        "flops_per_step": flops, "tflops": sig(tflops), "peak_tflops": sig(peak), "peak_source": peak_source,
        "mfu": sig(tflops / peak) if tflops is not None and peak else None,
        "skipped_steps": t["skipped_steps"],
        "speedup_vs_fp32_eager": None,  # filled in once the whole matrix is measured
        "plain_images_per_second": sig(batch * world / plain_med, 6),
        "plain_ms_per_step_median": round(plain_med * 1e3, 3),
        "plain_ms_per_step_p90": round(percentile(p_times, 90) * 1e3, 3),
        "vs_plain_loop": sig(plain_med / med),  # significant digits: a busy machine can make it 0.0230
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
    from danlu.engine.devices import resolve_device

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
        if p not in FORMATS:
            raise DanluError(f"--precision: '{p}' is not one of {', '.join(FORMATS)}")
    for c in compiles:
        if c not in COMPILE_WORDS:
            raise DanluError(f"--compile: '{c}' is not one of {', '.join(COMPILE_WORDS)}")
    from danlu.models import model_info

    try:
        model_info(model)
    except DanluError as e:
        raise DanluError(f"--model {model}: {str(e).removeprefix('model.name: ')}") from None
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
    flops = count_flops(bench_recipe(model, size, channels, classes, batch, combos[0], channels_last, dev), cfg["train"])

    rows = []
    for combo in combos:
        say(f"bench: {model} {combo.label} on {env['device']}: {warmup} warm-up + {steps} timed steps of batch "
            f"{batch} ...")
        rows.append(measure(combo, cfg, flops, say))
        _speedups(rows)
        if json_out:  # after every row: a run cut short (a time limit, Ctrl-C) keeps what it measured
            write_json(Path(json_out), {"env": env, "rows": rows, "skipped": skipped, "complete": False})
    env["load_average_end"] = load_average()
    result = {"env": env, "rows": rows, "skipped": skipped, "complete": True}
    if json_out:
        write_json(Path(json_out), result)
    if plot_out:
        from danlu.report import bench_chart

        bench_chart(result, Path(plot_out))
    return result


def _speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_fp32_eager: images/s over the fp32, compile off, no-graphs row of the same model, input, batch,
    process count and device (None where the matrix has no such row)."""
    same = ("device", "model", "size", "channels", "batch", "procs", "loader")
    for r in rows:
        base = next((b for b in rows if b["precision"] == "fp32" and b["compile"] == "off" and not b["cuda_graphs"]
                     and all(b[k] == r[k] for k in same)), None)
        r["speedup_vs_fp32_eager"] = sig(r["images_per_second"] / base["images_per_second"]) if base else None


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



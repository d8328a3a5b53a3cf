"""The Python API. The CLI is a thin client of these functions.

    import danlu
    result = danlu.train("lenet_mnist5k", overrides=["run.max_iter=200"], out="runs/quick")
    print(result.test_accuracy, result.run_dir)
    danlu.evaluate(result.run_dir)

Your own model on your own tensors:

    train = danlu.ImageSet(images_uint8, labels, classes)       # (N, C, H, W) uint8, (N,) int64
    result = danlu.train({"run": {"epochs": 5}, "optim": {"lr": 0.05}}, model=MyNet(), train_data=train,
                         test_data=test, out="runs/mine")
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from danlu.config import Recipe, build_recipe, load_recipe
from danlu.data.imageset import ImageSet
from danlu.data.loader import DataTimeout, DecodingLoader
from danlu.errors import DanluError
from danlu.runs import LoadedRun, load_run  # noqa: F401  (danlu.load_run; LoadedRun: its result)

RecipeLike = Union[Recipe, dict, str, Path, None]


@dataclass
class RunResult:
    run_dir: Optional[Path]
    test_accuracy: float
    test_loss: float
    iterations: int
    train_seconds: float
    images_per_second: float
    model: nn.Module = field(repr=False)
    summary: dict[str, Any] = field(repr=False, default_factory=dict)


def train(recipe: RecipeLike = None, *, overrides: Optional[list[str]] = None, out: Union[str, Path, None] = None,
          resume: Union[str, Path, None] = None, device: Optional[str] = None, model: Optional[nn.Module] = None,
          train_data: Optional[ImageSet] = None, test_data: Optional[ImageSet] = None,
          quiet: bool = False, force: bool = False) -> RunResult:
    """Train from a recipe (shipped name, YAML path, dict or Recipe) and return the result; with `resume`, continue
    the run in that folder from its newest snapshot (overrides apply on top of the run's recipe); a finished run is
    returned as it stands, nothing trained or written, unless the overrides make it longer (run.max_iter, run.epochs,
    run.min_images), and a run of your own `model` / `train_data` resumes only with them given again. An `out` folder
    that holds another run is refused, or with `force` moved aside to `<out>.old-<time>` (never overwritten)."""
    from danlu import runs
    from danlu.engine import faults
    from danlu.engine.build import build, build_plan, resolve_precision
    from danlu.engine.devices import resolve_device
    from danlu.engine.distributed import setup as setup_dist
    from danlu.engine.loop import train_loop
    from danlu.engine.metrics import RunLog

    recipe, state, where = _resolve(recipe, overrides, resume, device)  # where: the snapshot, or the folder's name
    own = _own_parts(model, train_data)  # what the API was given that no recipe describes (kept in snapshots)
    if state is not None:
        _check_own_parts(state, resume, model, train_data)
    # under a launcher (--procs/--gpus, torchrun, SLURM): join the process group; on CUDA, take cuda:LOCAL_RANK
    dist = setup_dist(resolve_device(recipe.devices.device), timeout=recipe.dist.timeout,
                      bucket_mb=recipe.dist.bucket_mb)
    finished = state is not None and _finished(Path(resume), state)
    if finished and not overrides:  # at once, without loading the data: nothing will change
        return _finished_result(Path(resume), recipe, state, model, device, say=not quiet and dist.is_main)
    recipe = _share_global_batch(recipe, dist.world, state)
    train_data, test_data = _data(recipe, train_data, test_data)
    recipe, auto = resolve_precision(recipe, dist.device, dist)  # auto -> a format, saved as that
    b = build(recipe, train_data, test_data, dist.device, dist, model=model, init=state is None)
    p = b.parts
    fits = _probe_batch(recipe, b, train_data, dist, quiet) if recipe.run.find_batch_size else None
    if state is not None:
        run_dir = Path(resume)
        start = _restore(state, where, recipe, b, own_model=model is not None, run_dir=run_dir)  # checks them too
        if finished and not _lengthens(overrides):  # overrides that do not ask for more training: nothing changes
            return _finished_result(run_dir, recipe, state, b.model, device, say=not quiet and dist.is_main)
        if start >= b.max_iter:  # nothing to train: write nothing either
            raise DanluError(_nothing_to_train(run_dir, start, b.max_iter))
    else:
        start, run_dir = 0, runs.new_run_dir(out, where, force) if dist.is_main else None
        run_dir = Path(dist.broadcast_object(str(run_dir) if run_dir else None))  # the folder rank 0 named
    if dist.is_main:
        _write_run_inputs(run_dir, recipe, train_data, p.augment, start)
    p.guard = faults.Guard(recipe.run.on_nan, b.model.named_parameters(), run_dir if dist.is_main else None,
                           dist.all_reduce_sum, dist.any_rank, world=dist.world)
    if state is not None:
        p.guard.load_state_dict(state.get("guard", {}))
    log = RunLog(run_dir, total=b.max_iter, start=start, tensorboard=recipe.run.tensorboard, quiet=quiet,
                 enabled=dist.is_main, test_line=b.task.test_line)
    if not quiet and dist.is_main:
        if auto is not None:
            print(f"danlu: {auto}", flush=True)
        if b.init is not None:
            from danlu.models.weights import describe

            print(f"danlu: {describe(b.init)}", flush=True)
        print(_start_line(recipe, train_data, test_data, b, start, run_dir), flush=True)
    curves = _CurveDrawer(run_dir, enabled=dist.is_main)
    try:
        with p.guard.signals():  # SIGTERM / SIGINT: finish the step, snapshot, raise faults.Stopped
            plan = build_plan(recipe, b.per_epoch, b.max_iter)
            stats = train_loop(p, plan, log,
                               p.guard.after(_snapshotter(recipe, b, run_dir, own), b.max_iter, run_dir),
                               on_test=_on_test(recipe, b, run_dir, curves), start=start,
                               loop_state=state.get("loop") if state else None)
        last = stats.last_test
        after = _keep_start(recipe, b, plan, stats, quiet or not dist.is_main)
        after.update(b.task.after_training(b.model, train_data, p, stats, quiet or not dist.is_main))  # whitening
        if stats.last_test is not last:  # the task changed the run's figures: they are its last test event
            log.event({"kind": "test", "iter": stats.iterations, "epoch": stats.iterations / b.per_epoch,
                       **stats.last_test})
    except torch.OutOfMemoryError:
        raise faults.out_of_memory(recipe.data.batch_size, dist.device, fits) from None
    except DataTimeout as e:  # a decoder or a read hung: the newest snapshot continues the run exactly
        raise DataTimeout(f"{e}; continue from the newest snapshot with: danlu train --resume {run_dir}") from None
    finally:
        log.close()
    _report_decode_skips(run_dir, train_data, p)
    summary = _summary(recipe, b, stats, train_data, run_dir, fits)
    summary.update(after)
    summary.update(own)
    if auto is not None:
        summary["precision_auto"] = auto
    if dist.is_main:
        _write_run_outputs(run_dir, b, summary, curves, stats.last_test, test_data, p.ema)
        if not quiet:
            if summary.get("early_stop"):
                print(f"danlu: run.early_stop: {summary['early_stop']}", flush=True)
            print(b.task.done_line(stats.last_test, stats, len(test_data.classes), dist.world, run_dir), flush=True)
    test = stats.last_test
    acc = test.get(b.task.headline)  # a classifier's accuracy, a face run's verification accuracy
    return RunResult(run_dir, float("nan") if acc is None else acc, test.get("loss", float("nan")), stats.iterations,
                     stats.train_seconds, stats.images_per_second, b.model, summary)


def _resolve(recipe: RecipeLike, overrides: Optional[list[str]], resume: Union[str, Path, None],
             device: Optional[str]) -> tuple[Recipe, Optional[dict[str, Any]], Any]:
    """(the recipe, the snapshot to resume or None, and where the run comes from: the snapshot ('--resume DIR:
    iter_N.pt'), or for a new run the name its folder takes (the recipe's file or shipped name))."""
    from danlu.engine import checkpoint
    from danlu.runs import recipe_name

    state = None
    if resume is not None:
        state, snap_path = checkpoint.load_latest(Path(resume))
        # runs from before optim.wd_exclude_norm_bias existed decayed every parameter: continue them that way
        state["recipe"].get("optim", {}).setdefault("wd_exclude_norm_bias", False)
        resolved, where = load_recipe(state["recipe"], overrides), f"--resume {resume}: {snap_path.name}"
    elif isinstance(recipe, Recipe):
        resolved, where = (load_recipe(recipe.to_dict(), overrides) if overrides else recipe), recipe_name(recipe)
    else:
        resolved, where = load_recipe(recipe, overrides), recipe_name(recipe)
    if device is not None:
        resolved = build_recipe({**resolved.to_dict(), "devices": {**resolved.devices.model_dump(), "device": device}},
                                source={"devices.device": f"--device {device}"})
    return resolved, state, where


_LENGTH_KEYS = ("run.max_iter", "run.epochs", "run.min_images")  # the overrides that can make a run longer


def _own_parts(model: Optional[nn.Module], train_data: Optional[ImageSet]) -> dict[str, Any]:
    """What a run was given through the API that its recipe cannot rebuild: {'own_model': 'mymodule.MyNet'} for an
    nn.Module, {'own_data': True} for ImageSets (kept in snapshots and summary.json)."""
    own: dict[str, Any] = {}
    if model is not None:
        own["own_model"] = f"{type(model).__module__}.{type(model).__qualname__}"
    if train_data is not None:
        own["own_data"] = True
    return own


def _check_own_parts(state: dict[str, Any], resume: Union[str, Path], model: Optional[nn.Module],
                     train_data: Optional[ImageSet]) -> None:
    """A run that trained the user's own module or tensors resumes only where they are given again (the CLI cannot
    rebuild them): otherwise one line saying how to resume it in Python."""
    cls = state.get("own_model")
    lacks = {"model": bool(cls) and model is None, "data": bool(state.get("own_data")) and train_data is None}
    if not any(lacks.values()):
        return
    what = " and ".join(w for w, k in ((f"your own nn.Module ({cls})", "model"),
                                       ("your own tensors (ImageSet)", "data")) if lacks[k])
    args = ", ".join(a for a, k in ((f"model={str(cls).rsplit('.', 1)[-1]}()", "model"),
                                    ("train_data=..., test_data=...", "data")) if lacks[k])
    raise DanluError(f"--resume {resume}: the run trained {what}, given to danlu.train in Python, which the command "
                     f"line cannot rebuild; expected a resume through the API: danlu.train(resume={str(resume)!r}, "
                     f"{args})")


def _finished(run_dir: Path, state: dict[str, Any]) -> bool:
    """Whether the run ended at this snapshot and wrote its result: summary.json counts the snapshot's iterations
    (its last snapshot is taken where the run ends: the last iteration, a target reached or an early stop)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("iterations") == int(state["iteration"])


def _lengthens(overrides: Optional[list[str]]) -> bool:
    """Whether the overrides set the run's length (run.max_iter, run.epochs, run.min_images): a finished run trains
    on only when asked to."""
    return any(o.partition("=")[0].strip() in _LENGTH_KEYS for o in overrides or [])


def _finished_result(run_dir: Path, recipe: Recipe, state: dict[str, Any], model: Optional[nn.Module],
                     device: Optional[str], say: bool) -> RunResult:
    """--resume of a finished run: its result as it stands (summary.json, the last test event, the final weights),
    one line saying so, and nothing written."""
    from danlu.engine import checkpoint
    from danlu.engine.metrics import as_clock
    from danlu.report import read_metrics
    from danlu.tasks.base import task_for

    summary = json.loads((run_dir / "summary.json").read_text())
    tests = [e for e in read_metrics(run_dir / "metrics.jsonl") if e.get("kind") == "test"]
    last, headline = tests[-1] if tests else {}, task_for(recipe, model).headline
    if model is not None:  # the user's own module (or the one just built): the run's last snapshot into it
        checkpoint.load_model_state(model, state["model"], f"--resume {run_dir}")
    else:
        model = load_run(run_dir, device=device).model
    done = int(summary["iterations"])
    if say:
        figure = f", test {headline} {last[headline]:.4f}" if isinstance(last.get(headline), float) else ""
        print(f"danlu: {run_dir} is finished ({done} iterations{figure}, {as_clock(summary.get('train_seconds', 0))} "
              f"of training, {summary.get('finished', 'at an unknown time')}); nothing changed. To train on: danlu "
              f"train --resume {run_dir} --set run.max_iter=N with N above {done}", flush=True)
    acc = last.get(headline)
    return RunResult(run_dir, float("nan") if acc is None else acc, last.get("loss", float("nan")), done,
                     float(summary.get("train_seconds", 0.0)), float(summary.get("images_per_second", 0.0)), model,
                     summary)


def _nothing_to_train(run_dir: Path, done: int, max_iter: int) -> str:
    """Why a resume that would train no step stops (before anything is written), and what to ask for instead."""
    if (run_dir / "summary.json").is_file():
        return (f"--resume {run_dir}: the run length asked for ({max_iter} iterations) is not more than the {done} "
                f"it has done; expected --set run.max_iter=N with N above {done} to train on (nothing was changed)")
    return (f"--resume {run_dir}: its newest snapshot is at iteration {done}, the run's last ({max_iter}), but it has "
            f"no summary.json (it stopped while writing its result); expected --set run.max_iter=N with N above "
            f"{done} to train on, or danlu eval {run_dir} for the snapshot's figures (nothing was changed)")


def _data(recipe: Recipe, train_data: Optional[ImageSet], test_data: Optional[ImageSet]) -> tuple[ImageSet, ImageSet]:
    from danlu.engine.build import load_data

    if train_data is None:
        train_data, test_data = load_data(recipe)
    elif test_data is None:
        raise DanluError("train(train_data=...) needs test_data too")
    if len(train_data.classes) < 2:
        raise DanluError(f"data: found {len(train_data.classes)} class; expected at least 2")
    return train_data, test_data


def _share_global_batch(recipe: Recipe, world: int, state: Optional[dict[str, Any]]) -> Recipe:
    """The recipe with optim.reference_batch pinned (the LR then follows the global batch, never the per-device
    one) and, on resume, data.batch_size re-divided so the snapshot's global batch, and with it the data position,
    the iteration count and the LR, stays the same on any number of processes: a run of 2 x 32 resumes as 1 x 64."""
    o, d = recipe.optim, recipe.data
    if state is None and o.reference_batch is not None:
        return recipe
    tree = recipe.to_dict()
    tree["optim"]["reference_batch"] = o.reference_batch or d.batch_size
    if state is not None:
        saved = int(state.get("global_batch", d.batch_size * o.accumulate))  # older snapshots: one process
        if saved % (world * o.accumulate):
            raise DanluError(f"--resume: the run's global batch {saved} cannot be shared by {world} process(es) x "
                             f"optim.accumulate={o.accumulate}; expected a number of processes (x accumulate) that "
                             f"divides {saved}")
        tree["data"]["batch_size"] = saved // (world * o.accumulate)
    return build_recipe(tree)


def _probe_batch(recipe: Recipe, b, train_data: ImageSet, dist, quiet: bool) -> int:
    """run.find_batch_size: the largest batch that fits, named by an out-of-memory error later."""
    from danlu.engine import faults

    p = b.parts
    return faults.probe_batch_size(b.model, train_data.images, dist.device, p.augment, p.precision.autocast,
                                   recipe.data.batch_size, len(train_data) // dist.world,
                                   say=lambda m: None if quiet or not dist.is_main else print(m, flush=True))


def _restore(state: dict[str, Any], where: str, recipe: Recipe, b, own_model: bool = False,
             run_dir: Optional[Path] = None) -> int:
    """Load a snapshot into the run's parts (model, optimizer, loss scaler, augmentation and global RNGs); returns
    the iteration to continue from. `own_model`: the module was given to train() (not built from the recipe)."""
    from danlu.engine import checkpoint

    p = b.parts
    try:
        checkpoint.load_model_state(b.model, state["model"], where)
    except DanluError as e:
        if own_model:
            raise
        # snapshots from before own_model was recorded: the weights may be of a module given to danlu.train
        raise DanluError(f"{e}; if the run trained your own nn.Module (danlu.train(model=...)), the command line "
                         f"cannot rebuild it: resume it in Python with danlu.train(model=MyNet(), "
                         f"resume={str(run_dir)!r}, ...)") from None
    saved = state["recipe"]["optim"]["name"]
    if saved != recipe.optim.name:
        raise DanluError(f"{where}: holds {saved} optimizer state; optim.name={recipe.optim.name} cannot continue it "
                         f"(expected {saved})")
    try:
        p.optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # another number or size of parameter groups
        raise DanluError(f"{where}: its optimizer state does not fit this recipe's parameter groups ({e}); expected "
                         f"the run's own optim.wd_exclude_norm_bias and optim.head_lr_mult") from None
    if p.ema is not None and "ema" in state:
        p.ema.load_state_dict(state["ema"])
    elif p.ema is not None:  # switched on at resume: the average starts from the snapshot's weights
        p.ema.reset()
    p.precision.load_state_dict(state.get("precision", {}))
    if p.generator is not None and "augment_rng" in state:
        p.generator.set_state(state["augment_rng"].to("cpu"))
    checkpoint.set_rng_state(state["rng"])
    return int(state["iteration"])


def _snapshotter(recipe: Recipe, b, run_dir: Path, own: dict[str, Any]):
    """snapshot(it, loop_state): rank 0 writes the run's state at iteration `it` (atomic, the last K kept); `own`:
    the parts given through the API (_own_parts), so a resume knows to ask for them."""
    from danlu.engine import checkpoint

    p, resolved = b.parts, recipe.to_dict()

    def snapshot(it: int, loop_state: dict[str, Any]) -> None:
        if not p.dist.is_main:
            return
        epoch, index = divmod(it, b.per_epoch)
        state = {"model": b.model.state_dict(), "optimizer": p.optimizer.state_dict(),
                 "precision": p.precision.state_dict(), "rng": checkpoint.rng_state(), "iteration": it,
                 "epoch": epoch, "index": index, "loop": loop_state, "recipe": resolved,
                 "global_batch": p.train_loader.global_batch, "world": p.dist.world,  # iteration counts global batches
                 "guard": p.guard.state_dict(), **own}
        if p.generator is not None:
            state["augment_rng"] = p.generator.get_state()
        if p.ema is not None:
            state["ema"] = p.ema.state_dict()
        checkpoint.save_snapshot(run_dir / "snapshots", state, it, recipe.run.keep_snapshots)

    return snapshot


# model.keep_start keeps the trained weights only where the monitored figure improved by more than this: a smaller
# difference can flip with the CPU's float rounding, and the run's weights must not depend on the machine
KEEP_MIN_GAIN = 1e-3


def _keep_start(recipe: Recipe, b, plan, stats, quiet: bool) -> dict[str, Any]:
    """model.keep_start: test the starting weights (model.init / model.pretrained) on the test set as the trained ones
    were, and where training did not improve the monitored figure, put them back: the run's weights and its last test
    event are then the start's. Every rank does the same (the figures are all-reduced)."""
    from danlu.engine.loop import test_figures

    if b.start is None or not stats.last_test:
        return {}
    metric = b.parts.best.metric
    trained = {k: v.detach().clone() for k, v in b.model.state_dict().items()}
    b.model.load_state_dict(b.start)
    start = test_figures(b.parts, b.parts.model, plan)
    before, after = start.get(metric), stats.last_test.get(metric)
    if before is None or after is None:
        b.model.load_state_dict(trained)
        return {}
    # a gain within KEEP_MIN_GAIN is rounding noise (another CPU's kernels may reverse it): the start stays
    improved = (before - after if metric.endswith("loss") else after - before) > KEEP_MIN_GAIN
    if improved:
        b.model.load_state_dict(trained)
    else:
        stats.last_test = {**start, "starting_weights": True}
    where = f"model.init={recipe.model.init}" if recipe.model.init else f"model.pretrained={recipe.model.pretrained}"
    if not quiet:
        verdict = "the trained weights stay" if improved else "not improved: the run keeps the starting weights"
        print(f"danlu: model.keep_start: {metric} {before:.4f} with the starting weights ({where}), {after:.4f} "
              f"trained; {verdict}", flush=True)
    return {"keep_start": {"metric": metric, "start": before, "trained": after, "kept_start": not improved}}


def _on_test(recipe: Recipe, b, run_dir: Path, curves) -> Any:
    """After each test event: redraw the curves; with run.keep_best, when the event is the best so far, keep its
    weights as best.safetensors and say which in best.json (rank 0)."""
    from safetensors.torch import save

    from danlu.io import write_bytes, write_json

    p = b.parts

    def on_test(test: dict[str, Any]) -> None:
        curves.draw()
        if recipe.run.keep_best and p.best.improved and p.dist.is_main:
            write_bytes(run_dir / "best.safetensors",
                        save({k: v.contiguous() for k, v in b.model.state_dict().items()}))
            write_json(run_dir / "best.json", {"iteration": p.best.iteration, "epoch": p.best.iteration / b.per_epoch,
                                               "metric": p.best.metric, "value": p.best.value,
                                               **{k: v for k, v in test.items() if isinstance(v, (int, float))}})

    return on_test


def _write_run_inputs(run_dir: Path, recipe: Recipe, train_data: ImageSet, augment, start: int) -> None:
    """What the run starts from: recipe.yaml, data_report.json (folder/list sources: read and skipped files) and
    preprocess.safetensors (the normalization statistics, so inference uses the training ones); on resume, the
    metrics logged after the snapshot are dropped (the resumed run logs them again)."""
    from danlu.io import write_bytes
    from danlu.runs import write_preprocess

    if start:
        _truncate_metrics(run_dir / "metrics.jsonl", start)
    write_bytes(run_dir / "recipe.yaml", recipe.to_yaml().encode())
    if train_data.report is not None:
        from danlu.data.folder import write_report

        write_report(run_dir, train_data.report)
    write_preprocess(run_dir, augment)


def _report_decode_skips(run_dir: Path, train_data: ImageSet, p) -> None:
    """Streamed shards: the images that did not decode while training or testing (found by each rank's loaders,
    gathered from every rank) join data_report.json's skipped list. Every rank calls this (a collective)."""
    loaders = [lo for lo in (p.train_loader, p.test_loader) if isinstance(lo, DecodingLoader)]
    report = train_data.report
    if not loaders or report is None:
        return
    every = p.dist.all_gather_object([e for lo in loaders for e in lo.skipped.values()])
    found = {(e["shard"], e["key"]): {**e, "when": "decoding"} for rank in every for e in rank}
    if p.dist.is_main and found:
        from danlu.data.folder import write_report

        report["skipped"] = report["skipped"] + sorted(found.values(), key=lambda e: (e["shard"], e["key"]))
        report["skipped_count"] = len(report["skipped"])
        write_report(run_dir, report)


def _start_line(recipe: Recipe, train_data: ImageSet, test_data: ImageSet, b, start: int, run_dir: Path) -> str:
    loader, world, micro = b.parts.train_loader, b.parts.dist.world, recipe.optim.accumulate
    return (f"danlu: {recipe.model.name} on {recipe.data.name} ({len(train_data)} train / {len(test_data)} test, "
            f"{len(train_data.classes)} classes), {b.parts.dist.device}, global batch {loader.global_batch} "
            f"({recipe.data.batch_size} x {world} process(es){f' x {micro} micro-batches' if micro > 1 else ''}), "
            f"{b.max_iter} iterations ({b.max_iter / b.per_epoch:.1f} epochs)"
            f"{f', resumed at {start}' if start else ''}; run folder {run_dir}")


def _summary(recipe: Recipe, b, stats, train_data: ImageSet, run_dir: Path, fits: Optional[int]) -> dict[str, Any]:
    """summary.json: the final test figures, how long and how fast, where, and the resolved recipe."""
    from danlu.runs import device_name, versions

    test, p = stats.last_test, b.parts
    return {
        **b.task.summary(test), "iterations": stats.iterations, "epochs": round(stats.iterations / b.per_epoch, 4),
        "train_seconds": round(stats.train_seconds, 3),
        "images_per_second": round(stats.images_per_second * p.dist.world, 1),  # all ranks together
        "global_batch": p.train_loader.global_batch, "world_size": p.dist.world, "device": device_name(p.dist.device),
        "classes": train_data.classes, "input_shape": list(train_data.shape), "run_dir": str(run_dir),
        "recipe": recipe.to_dict(), **p.guard.counts(), "skipped_steps": p.precision.skipped_steps,
        **({"largest_batch_that_fits": fits} if fits else {}),
        **({"init": b.init} if b.init is not None else {}), **_target_summary(recipe, stats),
        **_best_summary(recipe, p.best, stats), **_ema_summary(test),
        "versions": versions(), "finished": datetime.now().isoformat(timespec="seconds"),
    }


def _write_run_outputs(run_dir: Path, b, summary: dict[str, Any], curves, test: dict[str, Any], test_data: ImageSet,
                       ema=None) -> None:
    """The final weights (safetensors; with optim.ema their average too), the task's files (a classifier's
    confusion.json / .png, a face run's face.json), the curves and summary.json."""
    from safetensors.torch import save

    from danlu.io import write_bytes, write_json

    write_bytes(run_dir / "model.safetensors", save({k: v.contiguous() for k, v in b.model.state_dict().items()}))
    b.task.write_outputs(run_dir, b.model, test, test_data)
    if ema is not None:
        write_bytes(run_dir / "model_ema.safetensors", save({k: v.contiguous() for k, v in ema.state_dict().items()}))
    curves.draw(force=True)
    write_json(run_dir / "summary.json", summary)


def _target_summary(recipe: Recipe, stats) -> dict[str, Any]:
    """run.target: whether and where the run reached it (training time only, as train_seconds)."""
    t = recipe.run.target
    if t is None:
        return {}
    hit = stats.to_target or {}
    return {"target": {"metric": t.metric, "value": t.value}, "target_reached": bool(hit),
            "seconds_to_target": round(hit["seconds"], 3) if hit else None,
            "iterations_to_target": hit.get("iterations"), "images_to_target": hit.get("images")}


def _best_summary(recipe: Recipe, best, stats) -> dict[str, Any]:
    """run.keep_best / run.early_stop: the best test event and whether the run stopped early."""
    r = recipe.run
    if not r.keep_best and r.early_stop is None:
        return {}
    out = {"best": {"metric": best.metric, "value": best.value, "iteration": best.iteration}}
    if r.early_stop is not None:
        out["early_stopped"] = stats.early_stopped
        out["early_stop"] = (f"stopped at iteration {stats.iterations}: {r.early_stop} test events without a better "
                             f"{best.metric} than {best.value:.4f} (iteration {best.iteration})"
                             if stats.early_stopped else None)
    return out


def _ema_summary(test: dict[str, Any]) -> dict[str, Any]:
    """optim.ema: the average's final test figures (the task adds its own, e.g. ema_verification_acc)."""
    return {f"test_{k}": test[k] for k in ("ema_acc", "ema_loss") if k in test}


def evaluate(run_dir: Union[str, Path], *, data: Optional[str] = None, overrides: Optional[list[str]] = None,
             device: Optional[str] = None, test_data: Optional[ImageSet] = None,
             write_report: bool = False) -> dict[str, Any]:
    """Evaluate a run's final weights (or newest snapshot) on its test set, or on another dataset (`data`): the
    classification figures (acc, top5, loss, and per_class accuracy with the `worst` classes) or, for a face run
    split by identities, verification on pairs of its held-out identities (verification_acc, ...). `write_report`:
    also write eval_confusion.json / .png (eval_<data>_confusion with `data`) into the run folder (`danlu eval`)."""
    from danlu.data.loader import make_loader
    from danlu.engine.distributed import Dist
    from danlu.tasks.base import task_for
    from danlu.tasks.classification import class_report

    extra = list(overrides or []) + ([f"data.name={data}"] if data else [])
    run = load_run(run_dir, overrides=extra, device=device, load_data=test_data is None or bool(extra))
    recipe, dev = run.recipe, run.device
    test_data = test_data or run.test_data
    loader = make_loader(test_data.images, test_data.labels, recipe.data.test_batch_size or
                         4 * recipe.data.batch_size, device=dev, cache=recipe.data.device_cache, shuffle=False,
                         drop_last=False)
    result = task_for(recipe).evaluator(test_data)(run.model, loader, run.augment, run.precision, Dist(device=dev),
                                                   label_smoothing=recipe.optim.label_smoothing)
    out = {"run_dir": str(run.run_dir), "data": recipe.data.name, **result}
    report = class_report(result, test_data.classes)
    if report is not None:
        out.update(per_class=report["per_class"], worst=report["worst"])
    if report is not None and write_report:
        from danlu.report import write_class_report

        stem = f"eval_{data}_confusion" if data else "eval_confusion"
        try:
            out["report_files"] = [str(f) for f in write_class_report(report, run.run_dir, stem)]
        except (OSError, DanluError) as e:  # a read-only run folder: the figures are still shown
            warnings.warn(f"{run.run_dir}: cannot write {stem}.json ({e})")
    return out


def sample(name: str, out: Union[str, Path], *, index: int = 0, split: str = "test") -> dict[str, Any]:
    """One image of a named set as a PNG file (`danlu data sample mnist5k -o digit.png`), e.g. something to try
    `danlu predict` on: by default the first of the test split, which a run of that set never trained on. Returns
    {'file', 'name', 'split', 'index', 'images' (in the split), 'label', 'class', 'shape' (C, H, W)}."""
    import io

    from PIL import Image

    from danlu.data.datasets import DATASETS, load_dataset
    from danlu.errors import nearest
    from danlu.io import write_bytes

    named = [d for d in DATASETS if d not in ("folder", "list", "store", "wds")]  # the rest need data.root
    if name not in named:
        raise DanluError(f"data sample {name}: not a named set; expected one of {', '.join(named)}"
                         f"{nearest(name, named)}")
    if split not in ("train", "test"):
        raise DanluError(f"--split {split}: expected train or test")
    images = dict(zip(("train", "test"), load_dataset(name)))[split]
    if not 0 <= index < len(images):
        raise DanluError(f"--index {index}: {name}'s {split} split has {len(images)} images; expected 0 to "
                         f"{len(images) - 1}")
    pixels = images.images[index]  # (C, H, W) uint8
    hwc = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()  # (H, W) or (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG")
    write_bytes(Path(out), buf.getvalue())
    label = int(images.labels[index])
    return {"file": str(out), "name": name, "split": split, "index": index, "images": len(images), "label": label,
            "class": images.classes[label], "shape": list(pixels.shape)}


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop events after the snapshot being resumed (they are logged again by the resumed run) and a last line
    torn by a kill (SIGKILL while an event was being written)."""
    from danlu.io import write_bytes

    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if (e := _event(ln)) and e.get("iter", 0) <= iteration]
        write_bytes(path, "".join(ln + "\n" for ln in lines).encode())


def _event(line: str) -> Optional[dict[str, Any]]:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class _CurveDrawer:
    """Redraws curves.png from metrics.jsonl at test events, at most every 10 s (drawing costs ~0.3 s), and at the end."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled, self.last = run_dir, enabled, 0.0

    def draw(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.monotonic() - self.last < 10):
            return
        from danlu.report import draw_curves

        draw_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        self.last = time.monotonic()

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

import inspect
import json
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from danlu.config import Recipe, build_recipe, iters_per_epoch, load_recipe, total_iters
from danlu.data.datasets import ImageSet, load_dataset
from danlu.errors import DanluError

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


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first GPU when there is one, else the CPU; 'cuda' / 'cuda:N' only where CUDA works."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DanluError(f"--device {name}: CUDA is not available on this machine; expected cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DanluError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                             f"expected cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    return torch.device(name)


def _as_recipe(recipe: RecipeLike, overrides: Optional[list[str]]) -> Recipe:
    if isinstance(recipe, Recipe):
        return load_recipe(recipe.to_dict(), overrides) if overrides else recipe
    return load_recipe(recipe, overrides)


def _recipe_name(recipe: RecipeLike) -> str:
    """What the default run folder is named after: the recipe's file or shipped name ('run' for a dict)."""
    from danlu.config import DEFAULT_RECIPE

    if recipe is None:
        return DEFAULT_RECIPE
    if isinstance(recipe, (str, Path)):
        return Path(str(recipe)).stem
    return "run"


# what makes a folder a run's: any of these in --out means another run lives there
_RUN_FILES = ("snapshots", "recipe.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "diagnosis.json",
              "curves.png", "tensorboard", "preprocess.safetensors")


def _new_run_dir(out: Union[str, Path, None], name: str, force: bool = False) -> Path:
    """A folder for a new run. One that holds another run is refused; with `force` that folder is renamed to
    `<out>.old-<time>` first, so nothing of the old run is overwritten or deleted."""
    if out is None:
        out = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DanluError(f"--out {out}: exists and is not a folder")
    held = [f for f in _RUN_FILES if (out / f).exists()]
    if held and not force:
        raise DanluError(f"--out {out}: this folder already holds a run ({', '.join(held[:3])}); continue it with "
                         f"--resume {out}, choose another folder, or add --force to move the old run aside")
    if held:
        import warnings

        out = out.resolve()  # absolute: renaming the current folder must not leave `out` pointing into the old run
        aside = out.with_name(f"{out.name}.old-{datetime.now():%Y%m%d-%H%M%S}")
        n = 1
        while aside.exists():
            aside, n = out.with_name(f"{out.name}.old-{datetime.now():%Y%m%d-%H%M%S}-{n}"), n + 1
        try:
            out.rename(aside)
        except OSError as e:
            raise DanluError(f"--out {out} --force: cannot move the old run aside to {aside} ({e.strerror or e})") \
                from None
        warnings.warn(f"--force: moved the run that was in {out} to {aside}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DanluError(f"--out {out}: cannot create the run folder ({e.strerror or e})") from None
    return out


def _build_model(recipe: Recipe, train: ImageSet) -> nn.Module:
    return _model_for(recipe, train.shape, len(train.classes))


def _model_for(recipe: Recipe, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The recipe's model for inputs of `shape` (C, H, W) and `num_classes` outputs."""
    from danlu.models import create_model
    from danlu.models.registry import entry_point

    c, h, _ = shape
    m = recipe.model
    kw = dict(m.kwargs)
    entry = entry_point(m.name)
    params = inspect.signature(entry).parameters if entry is not None else {}
    if "input_size" in params:
        kw.setdefault("input_size", h)  # models with a fixed flatten size (LeNet) are built for the data's size
    if "head" in params:  # face models: the identity head (danlu.face.heads)
        kw.setdefault("head", m.head or "softmax")
        kw.setdefault("scale", m.scale)
        if m.embedding_dim is not None:
            kw.setdefault("embedding_dim", m.embedding_dim)
    elif m.head is not None or m.embedding_dim is not None:
        from danlu.models import list_models

        faces = [n for n in list_models() if "head" in inspect.signature(entry_point(n)).parameters]
        raise DanluError(f"model.head={m.head}: model '{m.name}' is not a face model; expected model.name one of "
                         f"{', '.join(faces)} (or no model.head / model.embedding_dim)")
    return create_model(recipe.model.name, num_classes=num_classes, in_channels=c, **kw)


def _build_criterion(recipe: Recipe) -> nn.Module:
    """Cross-entropy, or with model.head arcface / cosface the margin loss on the model's scaled-cosine logits."""
    from danlu.face.heads import build_criterion

    m = recipe.model
    return build_criterion(m.head or "softmax", m.scale, m.margin, recipe.optim.label_smoothing)


def _build_evaluator(recipe: Recipe, test: ImageSet):
    """Parts.evaluate: classification (engine.loop.evaluate), or for data.split=identities face verification on
    seeded pairs of the held-out identities (danlu.face.verify.VerificationEval)."""
    from danlu.engine.loop import evaluate as classification

    if recipe.data.split != "identities":
        return classification
    from danlu.face.verify import VerificationEval

    return VerificationEval(test.labels, recipe.data.test_pairs, recipe.data.split_seed)


def _build_optimizer(recipe: Recipe, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    o = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def _scaled_lr(recipe: Recipe, global_batch: int) -> float:
    """Goyal et al.'s linear rule (or sqrt): lr * global_batch / reference_batch."""
    o = recipe.optim
    ratio = global_batch / (o.reference_batch or recipe.data.batch_size)
    return o.lr * {"linear": ratio, "sqrt": ratio ** 0.5, "none": 1.0}[o.lr_scaling]


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


def _build_augment(recipe: Recipe, train: ImageSet):
    from danlu.data.augment import Augment
    from danlu.data.datasets import channel_stats, pixel_mean  # tensors or a store's memory-mapped shards

    d, a = recipe.data, recipe.augment
    mean, std = d.mean, d.std
    if mean is None and d.normalize == "pixel":
        mean = pixel_mean(train.images, d.scale)  # (C, H, W)
    elif mean is None and d.normalize == "channel":
        mean, std = channel_stats(train.images, d.scale)
    return Augment(shift=a.shift, flip=a.flip, crop=a.crop, mean=mean, std=std, scale=d.scale)


def _load_data(recipe: Recipe) -> tuple[ImageSet, ImageSet]:
    d = recipe.data
    return load_dataset(d.name, root=d.root, size=d.size, channels=d.channels, num_classes=d.num_classes,
                        train_size=d.train_size, test_size=d.test_size, val_fraction=d.val_fraction,
                        split_seed=d.split_seed, resize=d.resize, train_list=d.train_list, val_list=d.val_list,
                        split=d.split)


def train(recipe: RecipeLike = None, *, overrides: Optional[list[str]] = None, out: Union[str, Path, None] = None,
          resume: Union[str, Path, None] = None, device: Optional[str] = None, model: Optional[nn.Module] = None,
          train_data: Optional[ImageSet] = None, test_data: Optional[ImageSet] = None,
          quiet: bool = False, force: bool = False) -> RunResult:
    """Train from a recipe (shipped name, YAML path, dict or Recipe) and return the result; with `resume`, continue
    the run in that folder from its newest snapshot (overrides apply on top of the run's recipe). An `out` folder
    that holds another run is refused, or with `force` moved aside to `<out>.old-<time>` (never overwritten)."""
    from danlu.engine import checkpoint, faults
    from danlu.engine.distributed import setup as setup_dist
    from danlu.engine.loop import Parts, Plan, train_loop
    from danlu.engine.metrics import RunLog
    from danlu.engine.precision import Precision
    from danlu.engine.speed import Speed

    state = None
    if resume is not None:
        run_dir = Path(resume)
        state, snap_path = checkpoint.load_latest(run_dir)
        recipe = load_recipe(state["recipe"], overrides)
    else:
        name = _recipe_name(recipe)
        recipe = _as_recipe(recipe, overrides)
    if device is not None:
        recipe = build_recipe({**recipe.to_dict(), "devices": {**recipe.devices.model_dump(), "device": device}},
                              source={"devices.device": f"--device {device}"})
    dev = resolve_device(recipe.devices.device)
    # under a launcher (--procs/--gpus, torchrun, SLURM): join the process group; on CUDA, take cuda:LOCAL_RANK
    dist = setup_dist(dev, timeout=recipe.dist.timeout, bucket_mb=recipe.dist.bucket_mb)
    dev = dist.device
    recipe = _share_global_batch(recipe, dist.world, state)
    micro = recipe.optim.accumulate  # a step = `micro` micro-batches of data.batch_size on each of dist.world ranks
    speed = Speed(dev, compile=recipe.compile, channels_last=recipe.channels_last, cuda_graphs=recipe.cuda_graphs,
                  world=dist.world)
    torch.manual_seed(recipe.run.seed)

    if train_data is None:
        train_data, test_data = _load_data(recipe)
    elif test_data is None:
        raise DanluError("train(train_data=...) needs test_data too")
    if len(train_data.classes) < 2:
        raise DanluError(f"data: found {len(train_data.classes)} class; expected at least 2")
    if model is None:
        model = _build_model(recipe, train_data)
    model = speed.layout(model.to(dev))  # channels-last where it pays, before any DDP wrap

    loader, test_loader = _build_loaders(recipe, train_data, test_data, dev, dist)
    per_epoch = iters_per_epoch(len(train_data), loader.global_batch)
    max_iter = total_iters(recipe.run, per_epoch)
    base_lr = _scaled_lr(recipe, loader.global_batch)
    lr_fn = _build_schedule(recipe, base_lr, per_epoch, max_iter)
    optimizer = _build_optimizer(recipe, model, base_lr)
    precision = Precision(recipe.precision, dev, autocast_cache=not recipe.cuda_graphs)
    augment = _build_augment(recipe, train_data).for_rank(dist.rank, dist.world)  # draws for the global batch
    augment.memory_format = speed.memory_format  # batches reach the model in its weights' layout
    generator = None if augment.is_identity else torch.Generator(dev).manual_seed(recipe.run.seed + 1)
    fits = None  # run.find_batch_size: the largest batch that fits, named by an out-of-memory error
    if recipe.run.find_batch_size:
        fits = faults.probe_batch_size(model, train_data.images, dev, augment, precision.autocast,
                                       recipe.data.batch_size, len(train_data) // dist.world,
                                       say=lambda m: None if quiet or not dist.is_main else print(m, flush=True))

    start = 0
    if state is not None:
        start = _restore(state, f"--resume {run_dir}: {snap_path.name}", recipe, model, optimizer, precision,
                         generator)
        if dist.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", start)
    else:
        run_dir = _new_run_dir(out, name, force) if dist.is_main else None
        run_dir = Path(dist.broadcast_object(str(run_dir) if run_dir else None))  # the folder rank 0 named

    resolved = recipe.to_dict()
    if dist.is_main:
        _write_run_inputs(run_dir, recipe, train_data, augment)
    log = RunLog(run_dir, total=max_iter, start=start, tensorboard=recipe.run.tensorboard, quiet=quiet,
                 enabled=dist.is_main)
    if not quiet and dist.is_main:
        print(f"danlu: {recipe.model.name} on {recipe.data.name} ({len(train_data)} train / {len(test_data)} test, "
              f"{len(train_data.classes)} classes), {dev}, global batch {loader.global_batch} "
              f"({recipe.data.batch_size} x {dist.world} process(es){f' x {micro} micro-batches' if micro > 1 else ''}"
              f"), {max_iter} iterations ({max_iter / per_epoch:.1f} epochs)"
              f"{f', resumed at {start}' if start else ''}; run folder {run_dir}", flush=True)

    def snapshot(it: int, loop_state: dict[str, Any]) -> None:
        if not dist.is_main:
            return
        epoch, index = divmod(it, per_epoch)
        state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "precision": precision.state_dict(), "rng": checkpoint.rng_state(), "iteration": it,
                 "epoch": epoch, "index": index, "loop": loop_state, "recipe": resolved,
                 "global_batch": loader.global_batch, "world": dist.world}  # iteration counts global batches
        if generator is not None:
            state["augment_rng"] = generator.get_state()
        state["guard"] = guard.state_dict()
        checkpoint.save_snapshot(run_dir / "snapshots", state, it, recipe.run.keep_snapshots)

    curves = _CurveDrawer(run_dir, enabled=dist.is_main)
    criterion = _build_criterion(recipe)
    guard = faults.Guard(recipe.run.on_nan, _unwrap(model).named_parameters(), run_dir if dist.is_main else None,
                         dist.all_reduce_sum, dist.any_rank, world=dist.world)
    if state is not None:
        guard.load_state_dict(state.get("guard", {}))
    step_model = speed.wrap(dist.wrap(model, sync_bn=recipe.model.sync_bn),  # DDP, then compiled?
                            (recipe.data.batch_size, *train_data.shape), precision)
    parts = Parts(step_model, optimizer, criterion, augment, generator, loader, test_loader, precision, dist,
                  lr_fn, guard, evaluate=_build_evaluator(recipe, test_data))
    r = recipe.run
    plan = Plan(max_iter=max_iter, test_interval=r.test_interval or per_epoch, display=r.display,
                snapshot_every=r.snapshot_every, test_iter=r.test_iter, clip_grad_norm=recipe.optim.clip_grad_norm,
                label_smoothing=recipe.optim.label_smoothing, accumulate=micro)
    try:
        with guard.signals():  # SIGTERM / SIGINT: finish the step, snapshot, raise faults.Stopped
            stats = train_loop(parts, plan, log, guard.after(snapshot, max_iter, run_dir),
                               on_test=lambda _: curves.draw(), start=start,
                               loop_state=state.get("loop") if state else None)
    except torch.OutOfMemoryError:
        raise faults.out_of_memory(recipe.data.batch_size, dev, fits) from None
    finally:
        log.close()
    test = stats.last_test
    summary = {
        "test_accuracy": test.get("acc"), "test_loss": test.get("loss"), "test_top5": test.get("top5"),
        "iterations": stats.iterations, "epochs": round(stats.iterations / per_epoch, 4),
        "train_seconds": round(stats.train_seconds, 3),
        "images_per_second": round(stats.images_per_second * dist.world, 1),  # all ranks together
        "global_batch": loader.global_batch, "world_size": dist.world, "device": _device_name(dev),
        "classes": train_data.classes, "input_shape": list(train_data.shape), "run_dir": str(run_dir),
        "recipe": resolved, **guard.counts(), "skipped_steps": precision.skipped_steps, **_verification_summary(test),
        **({"largest_batch_that_fits": fits} if fits else {}),
        "versions": {"danlu": _version(), "torch": torch.__version__, "python": platform.python_version()},
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    if dist.is_main:
        _write_run_outputs(run_dir, _unwrap(model), summary, curves, recipe, test, test_data)
        if not quiet:
            print(_done_line(test, stats, len(test_data.classes), dist.world, run_dir), flush=True)
    acc = test.get("acc", test.get("verification_acc"))  # face runs: verification accuracy
    return RunResult(run_dir, float("nan") if acc is None else acc, test.get("loss", float("nan")), stats.iterations,
                     stats.train_seconds, stats.images_per_second, _unwrap(model), summary)


def _build_loaders(recipe: Recipe, train_data: ImageSet, test_data: ImageSet, dev: torch.device, dist):
    """The training loader (a global batch of data.batch_size x accumulate x world, this rank's share) and the test
    loader (sharded over ranks; whole on every rank for face verification, which pairs across the set)."""
    from danlu.data.loader import make_loader

    d, micro = recipe.data, recipe.optim.accumulate
    loader = make_loader(train_data.images, train_data.labels, d.batch_size * micro, device=dev,
                         cache=d.device_cache, seed=recipe.run.seed, rank=dist.rank, world=dist.world)
    if len(loader) == 0:
        raise DanluError(f"data.batch_size={d.batch_size}: x {dist.world} process(es) x optim.accumulate={micro} "
                         f"is more than the training set ({len(train_data)} images); expected at most "
                         f"{len(train_data) // (dist.world * micro)}")
    whole = d.split == "identities"
    test_loader = make_loader(test_data.images, test_data.labels, d.test_batch_size or 4 * d.batch_size, device=dev,
                              cache=d.device_cache, shuffle=False, drop_last=False, rank=0 if whole else dist.rank,
                              world=1 if whole else dist.world)
    return loader, test_loader


def _build_schedule(recipe: Recipe, base_lr: float, per_epoch: int, max_iter: int):
    """lr(iteration) from the recipe's schedule, checked now rather than at the first step."""
    from danlu.engine.schedule import lr_at

    s, lr = recipe.schedule, recipe.optim.lr
    warmup = s.warmup or round(s.warmup_epochs * per_epoch)

    def lr_fn(it: int) -> float:
        return lr_at(it, policy=s.policy, base_lr=base_lr, max_iter=max_iter, iters_per_epoch=per_epoch,
                     gamma=s.gamma, power=s.power, stepsize=s.stepsize, stepvalues=s.stepvalues, min_lr=s.min_lr,
                     warmup=warmup, warmup_start=lr if warmup and base_lr != lr else None, pct_start=s.pct_start,
                     div_factor=s.div_factor, final_div_factor=s.final_div_factor)

    lr_fn(0)
    return lr_fn


def _restore(state: dict[str, Any], where: str, recipe: Recipe, model: nn.Module, optimizer, precision,
             generator: Optional[torch.Generator]) -> int:
    """Load a snapshot into the run's parts (model, optimizer, loss scaler, augmentation and global RNGs); returns
    the iteration to continue from."""
    from danlu.engine import checkpoint

    checkpoint.load_model_state(_unwrap(model), state["model"], where)
    saved = state["recipe"]["optim"]["name"]
    if saved != recipe.optim.name:
        raise DanluError(f"{where}: holds {saved} optimizer state; optim.name={recipe.optim.name} cannot continue it "
                         f"(expected {saved})")
    optimizer.load_state_dict(state["optimizer"])
    precision.load_state_dict(state.get("precision", {}))
    if generator is not None and "augment_rng" in state:
        generator.set_state(state["augment_rng"].to("cpu"))
    checkpoint.set_rng_state(state["rng"])
    return int(state["iteration"])


def _write_run_inputs(run_dir: Path, recipe: Recipe, train_data: ImageSet, augment) -> None:
    """What the run starts from: recipe.yaml, data_report.json (folder/list sources: read and skipped files) and
    preprocess.safetensors (the normalization statistics, so inference uses the training ones)."""
    from danlu.engine.checkpoint import write_bytes

    write_bytes(run_dir / "recipe.yaml", recipe.to_yaml().encode())
    if getattr(train_data, "report", None) is not None:
        from danlu.data.folder import write_report

        write_report(run_dir, train_data.report)
    if augment.mean is not None or augment.std is not None:
        _save_preprocess(run_dir, augment)


def _write_run_outputs(run_dir: Path, model: nn.Module, summary: dict[str, Any], curves, recipe: Recipe,
                       test: dict[str, Any], test_data: ImageSet) -> None:
    """The final weights (safetensors), the curves, summary.json and, for a face model, face.json."""
    from safetensors.torch import save

    from danlu.engine.checkpoint import write_bytes

    write_bytes(run_dir / "model.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    curves.draw(force=True)
    write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    if hasattr(model, "embed"):  # a face model: what embedding new images needs (danlu.face)
        from danlu.face.api import write_face_info

        held_out = test_data.classes if recipe.data.split == "identities" else None
        write_face_info(run_dir, recipe, test, held_out=held_out)


def _verification_summary(test: dict[str, Any]) -> dict[str, Any]:
    """summary.json's face verification figures (nothing for a classifier)."""
    if "verification_acc" not in test:
        return {}
    return {"test_verification_accuracy": test["verification_acc"], "test_verification_std":
            test.get("verification_std"), "verification_threshold": test.get("threshold"),
            "test_tar_at_far_1e-3": test.get("tar_at_far_1e-3"), "test_pairs": test.get("pairs")}


def _done_line(test: dict[str, Any], stats, identities: int, world: int, run_dir: Path) -> str:
    if "verification_acc" in test:
        return (f"done: verification accuracy {test['verification_acc']:.4f} +- {test['verification_std']:.4f} on "
                f"{test['pairs']} pairs of {identities} held-out identities after {stats.iterations} iterations "
                f"({stats.train_seconds:.1f} s training); run folder {run_dir}")
    return (f"done: test accuracy {test.get('acc', float('nan')):.4f}, loss {test.get('loss', float('nan')):.4f} "
            f"after {stats.iterations} iterations ({stats.train_seconds:.1f} s training, "
            f"{stats.images_per_second * world:.0f} img/s); run folder {run_dir}")


def evaluate(run_dir: Union[str, Path], *, data: Optional[str] = None, overrides: Optional[list[str]] = None,
             device: Optional[str] = None, test_data: Optional[ImageSet] = None) -> dict[str, Any]:
    """Evaluate a run's final weights (or newest snapshot) on its test set, or on another dataset (`data`)."""
    from danlu.data.loader import make_loader
    from danlu.engine.distributed import Dist
    from danlu.engine.loop import evaluate as _evaluate
    from danlu.engine.precision import Precision

    extra = list(overrides or []) + ([f"data.name={data}"] if data else [])
    run = load_run(run_dir, overrides=extra, device=device, load_data=test_data is None or bool(extra))
    recipe, dev = run.recipe, run.device
    test_data = test_data or run.test_data
    loader = make_loader(test_data.images, test_data.labels, recipe.data.test_batch_size or
                         4 * recipe.data.batch_size, device=dev, cache=recipe.data.device_cache, shuffle=False,
                         drop_last=False)
    evaluator = _build_evaluator(recipe, test_data) if recipe.data.split == "identities" else _evaluate
    result = evaluator(run.model, loader, run.augment, Precision.for_inference(recipe.precision, dev), Dist(),
                       label_smoothing=recipe.optim.label_smoothing)
    return {"run_dir": str(run.run_dir), "data": recipe.data.name, **result}


@dataclass
class LoadedRun:
    """A finished (or snapshotted) run, ready for inference: what `evaluate`, `predict` and `export` start from."""
    run_dir: Path
    recipe: Recipe  # the resolved recipe the run trained with (plus any overrides)
    model: nn.Module  # eval mode, on `device`, the run's final weights (or its newest snapshot's)
    augment: Any  # danlu.data.augment.Augment: the run's preprocessing (scale, mean, std); call with train=False
    classes: list[str]
    shape: tuple[int, int, int]  # (C, H, W) of the images the model takes
    device: torch.device
    weights: Path  # the file the weights came from
    train_data: Optional[ImageSet] = None  # only with load_data=True
    test_data: Optional[ImageSet] = None


def load_run(run_dir: Union[str, Path], *, overrides: Optional[list[str]] = None, device: Optional[str] = None,
             load_data: bool = False) -> LoadedRun:
    """Load a run folder: its recipe, model with the final weights, and preprocessing (the statistics it trained
    with, from preprocess.safetensors). Classes and input shape come from summary.json, so the data set is only
    loaded when `load_data` is set or the run folder does not say them (a run stopped before its end).

        run = load_run("runs/lenet")                    # run.model(run.augment(x_uint8, train=False))
    """
    run_dir = Path(run_dir)
    recipe, model_state, weights = _load_run(run_dir)
    if overrides:
        recipe = load_recipe(recipe.to_dict(), overrides)
    dev = resolve_device(device or "auto")  # the best device here, not where the run trained
    summary_path = run_dir / "summary.json"
    info = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    d = recipe.data
    needs_stats = d.mean is None and d.normalize != "none" and not (run_dir / "preprocess.safetensors").is_file()
    train_data = test_data = None
    if load_data or needs_stats or not {"classes", "input_shape"} <= info.keys():
        train_data, test_data = _load_data(recipe)
    shape = train_data.shape if train_data is not None else tuple(info["input_shape"])
    classes = train_data.classes if train_data is not None else list(info["classes"])
    model = _model_for(recipe, shape, len(classes))
    _check_weights(model, model_state, weights, recipe.model.name)
    model.load_state_dict(model_state)
    if train_data is not None:
        augment = _build_augment(recipe, train_data)
    else:
        from danlu.data.augment import Augment

        augment = Augment(scale=d.scale, mean=d.mean, std=d.std)
    _load_preprocess(run_dir, augment)
    return LoadedRun(run_dir, recipe, model.to(dev).eval(), augment, classes, shape, dev, weights, train_data,
                     test_data)


def _check_weights(model: nn.Module, state: dict[str, torch.Tensor], weights: Path, name: str) -> None:
    """Refuse weights that are not the recipe's model, naming the keys that differ (one line)."""
    from danlu.engine.checkpoint import _few, weight_differences

    missing, unexpected, shapes = weight_differences(model, state)
    problems = []
    if missing:
        problems.append(f"missing {_few(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected {_few(sorted(unexpected))}")
    if shapes:
        problems.append("shape differs " + _few([f"{k} {list(have)} (model {list(want)})"
                                                 for k, have, want in sorted(shapes)]))
    if problems:
        raise DanluError(f"{weights}: weights do not match model '{name}' of the run's recipe: {'; '.join(problems)}")


def _load_run(run_dir: Path) -> tuple[Recipe, dict[str, torch.Tensor], Path]:
    from danlu.engine import checkpoint

    if not run_dir.is_dir():
        raise DanluError(f"{run_dir}: no such run folder")
    weights = run_dir / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        if not (run_dir / "recipe.yaml").is_file():
            raise DanluError(f"{run_dir}: no recipe.yaml beside model.safetensors")
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise DanluError(f"{weights}: cannot read the weights ({e})") from None
        return load_recipe(str(run_dir / "recipe.yaml")), state, weights
    state, snap = checkpoint.load_latest(run_dir)
    return load_recipe(state["recipe"]), state["model"], Path(snap)


def _save_preprocess(run_dir: Path, augment) -> None:
    from safetensors.torch import save_file

    t = {k: v.contiguous() for k, v in (("mean", augment.mean), ("std", augment.std)) if v is not None}
    save_file(t, str(run_dir / "preprocess.safetensors"))


def _load_preprocess(run_dir: Path, augment) -> None:
    """Use the statistics the run trained with, not ones recomputed from other data."""
    path = run_dir / "preprocess.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        stats = load_file(str(path))
        augment.set_stats(stats.get("mean"), stats.get("std"))


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop events after the snapshot being resumed (they are logged again by the resumed run) and a last line
    torn by a kill (SIGKILL while an event was being written)."""
    from danlu.engine.checkpoint import write_bytes

    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if (e := _event(ln)) and e.get("iter", 0) <= iteration]
        write_bytes(path, "".join(ln + "\n" for ln in lines).encode())


def _event(line: str) -> Optional[dict[str, Any]]:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _version() -> str:
    from danlu import __version__

    return __version__


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

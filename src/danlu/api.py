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
    if isinstance(recipe, (str, Path)):
        return Path(str(recipe)).stem
    return "run"


def _new_run_dir(out: Union[str, Path, None], name: str) -> Path:
    if out is None:
        out = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(out)
    if out.exists() and (out / "snapshots").exists():
        raise DanluError(f"--out {out}: this folder already holds a run; continue it with --resume {out} or "
                         f"choose another folder")
    if out.exists() and not out.is_dir():
        raise DanluError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _build_model(recipe: Recipe, train: ImageSet) -> nn.Module:
    from danlu.models import create_model
    from danlu.models.registry import entry_point

    c, h, _ = train.shape
    kw = dict(recipe.model.kwargs)
    entry = entry_point(recipe.model.name)
    if entry is not None and "input_size" in inspect.signature(entry).parameters:
        kw.setdefault("input_size", h)  # models with a fixed flatten size (LeNet) are built for the data's size
    return create_model(recipe.model.name, num_classes=len(train.classes), in_channels=c, **kw)


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


def _build_augment(recipe: Recipe, train: ImageSet):
    from danlu.data.augment import Augment, channel_mean_std, per_pixel_mean

    d, a = recipe.data, recipe.augment
    mean, std = d.mean, d.std
    if mean is None and d.normalize == "pixel":
        mean = per_pixel_mean(train.images, d.scale)  # (C, H, W)
    elif mean is None and d.normalize == "channel":
        mean, std = channel_mean_std(train.images, d.scale)
    return Augment(shift=a.shift, flip=a.flip, crop=a.crop, mean=mean, std=std, scale=d.scale)


def _load_data(recipe: Recipe) -> tuple[ImageSet, ImageSet]:
    d = recipe.data
    return load_dataset(d.name, root=d.root, size=d.size, channels=d.channels, num_classes=d.num_classes,
                        train_size=d.train_size, test_size=d.test_size, val_fraction=d.val_fraction,
                        split_seed=d.split_seed)


def train(recipe: RecipeLike = None, *, overrides: Optional[list[str]] = None, out: Union[str, Path, None] = None,
          resume: Union[str, Path, None] = None, device: Optional[str] = None, model: Optional[nn.Module] = None,
          train_data: Optional[ImageSet] = None, test_data: Optional[ImageSet] = None,
          quiet: bool = False) -> RunResult:
    """Train from a recipe (shipped name, YAML path, dict or Recipe) and return the result; with `resume`, continue
    the run in that folder from its newest snapshot (overrides apply on top of the run's recipe)."""
    from danlu.engine import checkpoint
    from danlu.engine.distributed import current
    from danlu.engine.loop import Parts, Plan, train_loop
    from danlu.engine.metrics import RunLog
    from danlu.engine.precision import Precision
    from danlu.engine.schedule import lr_at
    from danlu.data.loader import DeviceLoader

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
    dist = current()
    torch.manual_seed(recipe.run.seed)

    if train_data is None:
        train_data, test_data = _load_data(recipe)
    elif test_data is None:
        raise DanluError("train(train_data=...) needs test_data too")
    if len(train_data.classes) < 2:
        raise DanluError(f"data: found {len(train_data.classes)} class; expected at least 2")
    if model is None:
        model = _build_model(recipe, train_data)
    model = model.to(dev)

    loader = DeviceLoader(train_data.images, train_data.labels, recipe.data.batch_size, device=dev,
                          seed=recipe.run.seed, rank=dist.rank, world=dist.world)
    if len(loader) == 0:
        raise DanluError(f"data.batch_size={recipe.data.batch_size}: larger than the training set "
                         f"({len(train_data)} images x {dist.world} process(es)); expected at most "
                         f"{len(train_data) // dist.world}")
    test_loader = DeviceLoader(test_data.images, test_data.labels, recipe.data.test_batch_size or
                               4 * recipe.data.batch_size, device=dev, shuffle=False, drop_last=False,
                               rank=dist.rank, world=dist.world)
    per_epoch = iters_per_epoch(len(train_data), loader.global_batch)
    max_iter = total_iters(recipe.run, per_epoch)
    base_lr = _scaled_lr(recipe, loader.global_batch)
    s = recipe.schedule
    warmup = s.warmup or round(s.warmup_epochs * per_epoch)
    lr_fn = lambda it: lr_at(it, policy=s.policy, base_lr=base_lr, max_iter=max_iter,  # noqa: E731
                             iters_per_epoch=per_epoch, gamma=s.gamma, power=s.power, stepsize=s.stepsize,
                             stepvalues=s.stepvalues, min_lr=s.min_lr, warmup=warmup,
                             warmup_start=recipe.optim.lr if warmup and base_lr != recipe.optim.lr else None,
                             pct_start=s.pct_start, div_factor=s.div_factor, final_div_factor=s.final_div_factor)
    lr_fn(0)  # fail now, not at the first step, on a bad schedule
    optimizer = _build_optimizer(recipe, model, base_lr)
    precision = Precision(recipe.precision, dev)
    augment = _build_augment(recipe, train_data)
    generator = None if augment.is_identity else torch.Generator(dev).manual_seed(recipe.run.seed + 1)

    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        precision.load_state_dict(state.get("precision", {}))
        if generator is not None and "augment_rng" in state:
            generator.set_state(state["augment_rng"].to("cpu"))
        checkpoint.set_rng_state(state["rng"])
        start = int(state["iteration"])
        _truncate_metrics(run_dir / "metrics.jsonl", start)
    else:
        run_dir = _new_run_dir(out, name) if dist.is_main else Path(out or ".")

    resolved = recipe.to_dict()
    if dist.is_main:
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        if augment.mean is not None or augment.std is not None:
            _save_preprocess(run_dir, augment)
    log = RunLog(run_dir, total=max_iter, start=start, tensorboard=recipe.run.tensorboard, quiet=quiet,
                 enabled=dist.is_main)
    if not quiet and dist.is_main:
        print(f"danlu: {recipe.model.name} on {recipe.data.name} ({len(train_data)} train / {len(test_data)} test, "
              f"{len(train_data.classes)} classes), {dev}, global batch {loader.global_batch}, "
              f"{max_iter} iterations ({max_iter / per_epoch:.1f} epochs){f', resumed at {start}' if start else ''}; "
              f"run folder {run_dir}", flush=True)

    def snapshot(it: int, loop_state: dict[str, Any]) -> None:
        if not dist.is_main:
            return
        epoch, index = divmod(it, per_epoch)
        state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "precision": precision.state_dict(), "rng": checkpoint.rng_state(), "iteration": it,
                 "epoch": epoch, "index": index, "loop": loop_state, "recipe": resolved}
        if generator is not None:
            state["augment_rng"] = generator.get_state()
        checkpoint.save_snapshot(run_dir / "snapshots", state, it, recipe.run.keep_snapshots)

    curves = _CurveDrawer(run_dir, enabled=dist.is_main)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing)
    parts = Parts(dist.wrap(model), optimizer, criterion, augment, generator, loader, test_loader, precision, dist,
                  lr_fn)
    r = recipe.run
    plan = Plan(max_iter=max_iter, test_interval=r.test_interval or per_epoch, display=r.display,
                snapshot_every=r.snapshot_every, test_iter=r.test_iter, clip_grad_norm=recipe.optim.clip_grad_norm,
                label_smoothing=recipe.optim.label_smoothing)
    try:
        stats = train_loop(parts, plan, log, snapshot, on_test=lambda _: curves.draw(), start=start,
                           loop_state=state.get("loop") if state else None)
    finally:
        log.close()
    test = stats.last_test
    summary = {
        "test_accuracy": test.get("acc"), "test_loss": test.get("loss"), "test_top5": test.get("top5"),
        "iterations": stats.iterations, "epochs": round(stats.iterations / per_epoch, 4),
        "train_seconds": round(stats.train_seconds, 3), "images_per_second": round(stats.images_per_second, 1),
        "global_batch": loader.global_batch, "world_size": dist.world, "device": _device_name(dev),
        "classes": train_data.classes, "run_dir": str(run_dir), "recipe": resolved,
        "versions": {"danlu": _version(), "torch": torch.__version__, "python": platform.python_version()},
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    if dist.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _unwrap(model).state_dict().items()}, str(run_dir / "model.safetensors"))
        curves.draw(force=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not quiet:
            print(f"done: test accuracy {test.get('acc', float('nan')):.4f}, loss {test.get('loss', float('nan')):.4f}"
                  f" after {stats.iterations} iterations ({stats.train_seconds:.1f} s training, "
                  f"{stats.images_per_second:.0f} img/s); run folder {run_dir}", flush=True)
    return RunResult(run_dir, test.get("acc", float("nan")), test.get("loss", float("nan")), stats.iterations,
                     stats.train_seconds, stats.images_per_second, _unwrap(model), summary)


def evaluate(run_dir: Union[str, Path], *, data: Optional[str] = None, overrides: Optional[list[str]] = None,
             device: Optional[str] = None, test_data: Optional[ImageSet] = None) -> dict[str, Any]:
    """Evaluate a run's final weights (or newest snapshot) on its test set, or on another dataset (`data`)."""
    from danlu.data.loader import DeviceLoader
    from danlu.engine.distributed import Dist
    from danlu.engine.loop import evaluate as _evaluate
    from danlu.engine.precision import Precision

    run_dir = Path(run_dir)
    recipe, model_state = _load_run(run_dir)
    extra = list(overrides or []) + ([f"data.name={data}"] if data else [])
    if extra:
        recipe = load_recipe(recipe.to_dict(), extra)
    dev = resolve_device(device or recipe.devices.device)
    train_data, default_test = _load_data(recipe)
    test_data = test_data or default_test
    model = _build_model(recipe, train_data)
    try:
        model.load_state_dict(model_state)
    except RuntimeError as e:
        raise DanluError(f"{run_dir}: weights do not fit model '{recipe.model.name}' for this data "
                         f"({str(e).splitlines()[0]})") from None
    augment = _build_augment(recipe, train_data)
    _load_preprocess(run_dir, augment)
    loader = DeviceLoader(test_data.images, test_data.labels, recipe.data.test_batch_size or
                          4 * recipe.data.batch_size, device=dev, shuffle=False, drop_last=False)
    result = _evaluate(model.to(dev), loader, augment, Precision(recipe.precision, dev), Dist(),
                       label_smoothing=recipe.optim.label_smoothing)
    return {"run_dir": str(run_dir), "data": recipe.data.name, **result}


def _load_run(run_dir: Path) -> tuple[Recipe, dict[str, torch.Tensor]]:
    from danlu.engine import checkpoint

    if not run_dir.is_dir():
        raise DanluError(f"{run_dir}: no such run folder")
    weights = run_dir / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        if not (run_dir / "recipe.yaml").is_file():
            raise DanluError(f"{run_dir}: no recipe.yaml beside model.safetensors")
        return load_recipe(str(run_dir / "recipe.yaml")), load_file(str(weights))
    state, _ = checkpoint.load_latest(run_dir)
    return load_recipe(state["recipe"]), state["model"]


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
    """Drop events after the snapshot being resumed: they are logged again by the resumed run."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["iter"] <= iteration]
        path.write_text("".join(ln + "\n" for ln in lines))


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

"""The run folder: making one, reading one back, and the names a run records (device, versions, environment).
`api`, `face`, `predict`, `serve`, `launch` and `bench` all go through here.

    out = new_run_dir("runs/r1", recipe_name("lenet_mnist5k"))      # refuses a folder that holds another run
    run = load_run("runs/r1")             # recipe, model with the final weights, preprocessing, precision
    probs = run.model(run.augment(x_uint8, train=False))
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from danlu.config import DEFAULT_RECIPE, Recipe, load_recipe
from danlu.engine.devices import cpu_model
from danlu.data.imageset import ImageSet
from danlu.errors import DanluError, few

PathLike = Union[str, Path]

# what makes a folder a run's: any of these in --out means another run lives there
RUN_FILES = ("snapshots", "recipe.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "diagnosis.json",
             "curves.png", "tensorboard", "preprocess.safetensors")


# ---------------------------------------------------------------- a new run


def recipe_name(recipe: Any) -> str:
    """What the default run folder is named after: the recipe's file or shipped name ('run' for a dict)."""
    if recipe is None:
        return DEFAULT_RECIPE
    if isinstance(recipe, (str, Path)):
        return Path(str(recipe)).stem
    return "run"


def new_run_dir(out: Optional[PathLike], name: str, force: bool = False) -> Path:
    """A folder for a new run (default runs/<name>-<date>-<time>). One that holds another run is refused; with
    `force` that folder is renamed to `<out>.old-<time>` first, so nothing of the old run is overwritten or deleted."""
    if out is None:
        out = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DanluError(f"--out {out}: exists and is not a folder")
    held = held_run_files(out)
    if held and not force:
        raise DanluError(f"--out {out}: this folder already holds a run ({', '.join(held[:3])}); continue it with "
                         f"--resume {out}, choose another folder, or add --force to move the old run aside")
    if held:
        set_aside(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DanluError(f"--out {out}: cannot create the run folder ({e.strerror or e})") from None
    return out


def held_run_files(folder: Path) -> list[str]:
    """The run files (RUN_FILES) in `folder`: empty where no run lives there."""
    return [f for f in RUN_FILES if (folder / f).exists()]


def set_aside(out: Path) -> Path:
    """Rename the run folder `out` to `<out>.old-<time>` (never overwriting another) and say so; returns the new
    name."""
    out = out.resolve()  # absolute: renaming the current folder must not leave `out` pointing into the old run
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    aside, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while aside.exists():
        aside, n = out.with_name(f"{out.name}.old-{stamp}-{n}"), n + 1
    try:
        out.rename(aside)
    except OSError as e:
        raise DanluError(f"--out {out} --force: cannot move the old run aside to {aside} ({e.strerror or e})") \
            from None
    warnings.warn(f"--force: moved the run that was in {out} to {aside}")
    return aside


def write_preprocess(run_dir: Path, augment: Any) -> None:
    """preprocess.safetensors: the normalization statistics the run trained with (inference uses these)."""
    from safetensors.torch import save

    from danlu.io import write_bytes

    t = {k: v.contiguous() for k, v in (("mean", augment.mean), ("std", augment.std)) if v is not None}
    if t:
        write_bytes(run_dir / "preprocess.safetensors", save(t))


def _read_preprocess(run_dir: Path, augment: Any) -> None:
    """Use the statistics the run trained with, not ones recomputed from other data."""
    path = run_dir / "preprocess.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        stats = load_file(str(path))
        augment.set_stats(stats.get("mean"), stats.get("std"))


# ---------------------------------------------------------------- a finished run


@dataclass
class LoadedRun:
    """A finished (or snapshotted) run, ready for inference: what `evaluate`, `predict`, `export`, `serve` and the
    face commands start from."""
    run_dir: Path
    recipe: Recipe  # the resolved recipe the run trained with (plus any overrides)
    model: nn.Module  # eval mode, on `device`, the run's final weights (or its newest snapshot's)
    augment: Any  # danlu.data.augment.Augment: the run's preprocessing (scale, mean, std); call with train=False
    classes: list[str]
    shape: tuple[int, int, int]  # (C, H, W) of the images the model takes
    device: torch.device
    weights: Path  # the file the weights came from
    precision: Any  # danlu.engine.precision.Precision for inference: `with run.precision.autocast(): ...`
    train_data: Optional[ImageSet] = None  # only with load_data=True
    test_data: Optional[ImageSet] = None


def load_run(run_dir: PathLike, *, overrides: Optional[list[str]] = None, device: Optional[str] = None,
             load_data: bool = False) -> LoadedRun:
    """Load a run folder: its recipe, model with the final weights, preprocessing (the statistics it trained
    with, from preprocess.safetensors) and precision, on the best device here (`device` to choose), not the one it
    trained on. Classes and input shape come from summary.json, so the data set is only loaded when `load_data` is
    set or the run folder does not say them (a run stopped before its end).

        run = load_run("runs/lenet")                    # run.model(run.augment(x_uint8, train=False))
    """
    from danlu.engine.build import build_augment, build_model, input_shape, load_data as load_recipe_data
    from danlu.engine.devices import resolve_device
    from danlu.engine.precision import Precision
    from danlu.tasks.base import task_for

    run_dir = Path(run_dir)
    recipe, model_state, weights = _read_weights(run_dir)
    if overrides:
        recipe = load_recipe(recipe.to_dict(), overrides)
    dev = resolve_device(device or "auto")
    summary_path = run_dir / "summary.json"
    info = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    d = recipe.data
    needs_stats = d.mean is None and d.normalize != "none" and not (run_dir / "preprocess.safetensors").is_file()
    train_data = test_data = None
    if load_data or needs_stats or not {"classes", "input_shape"} <= info.keys():
        train_data, test_data = load_recipe_data(recipe)
    shape = train_data.shape if train_data is not None else tuple(info["input_shape"])
    classes = train_data.classes if train_data is not None else list(info["classes"])
    precision = Precision.for_inference(recipe.precision, dev)
    precision.configure_backends()
    model = build_model(recipe, input_shape(recipe, shape), len(classes))
    check_weights(model, model_state, weights, recipe.model.name)
    model.load_state_dict(model_state)
    task_for(recipe).restore(run_dir, model)  # what the task fitted after training (a face run's whitening)
    augment = build_augment(recipe, train_data)
    _read_preprocess(run_dir, augment)
    augment.dtype = precision.param_dtype
    return LoadedRun(run_dir, recipe, model.to(dev, precision.param_dtype).eval(), augment, classes, shape, dev,
                     weights, precision, train_data, test_data)


def check_weights(model: nn.Module, state: dict[str, torch.Tensor], weights: Path, name: str) -> None:
    """Refuse weights that are not the recipe's model, naming the keys that differ (one line)."""
    from danlu.engine.checkpoint import weight_differences

    missing, unexpected, shapes = weight_differences(model, state)
    problems = []
    if missing:
        problems.append(f"missing {few(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected {few(sorted(unexpected))}")
    if shapes:
        problems.append("shape differs " + few([f"{k} {list(have)} (model {list(want)})"
                                                for k, have, want in sorted(shapes)]))
    if problems:
        raise DanluError(f"{weights}: weights do not match model '{name}' of the run's recipe: {'; '.join(problems)}")


def _read_weights(run_dir: Path) -> tuple[Recipe, dict[str, torch.Tensor], Path]:
    """(recipe, weights, the file they came from): model.safetensors, else the newest snapshot."""
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


# ---------------------------------------------------------------- names a run records


def version() -> str:
    from danlu import __version__

    return __version__


def versions() -> dict[str, str]:
    """danlu's, torch's and Python's versions (summary.json)."""
    return {"danlu": version(), "torch": torch.__version__, "python": platform.python_version()}


def device_name(dev: torch.device) -> str:
    """What a person calls the device: 'cuda:0 (NVIDIA H100 80GB HBM3)', 'cpu (AMD EPYC, 2 threads)'."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    if dev.type == "mps":
        return f"mps (Apple {platform.machine()} GPU)"
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def environment(dev: torch.device) -> dict[str, Any]:
    """Everything a measured figure needs beside it: date, device, driver, CUDA, cuDNN, versions, danlu's commit,
    CPU, threads, platform, load average and the command."""
    from importlib.metadata import PackageNotFoundError, version as package_version

    try:
        torchvision = package_version("torchvision")  # the version only: importing torchvision costs seconds
    except PackageNotFoundError:
        torchvision = None
    cuda = dev.type == "cuda"
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(dev),
        "driver": _driver() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "torch": torch.__version__, "torchvision": torchvision,
        "danlu": version(), "danlu_commit": git_commit(),
        "python": platform.python_version(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "load_average_start": load_average(),
        "command": " ".join(["danlu", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("danlu", "__main__.py") else None,
    }


def load_average() -> Optional[list[float]]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def git_commit() -> Optional[str]:
    """danlu's commit (with -dirty for local changes): the source tree danlu runs from, else the current folder."""
    here = Path(__file__).resolve().parents[2]
    for root in (here, Path.cwd()):
        pyproject = root / "pyproject.toml"
        if not (root / ".git").exists() or not pyproject.is_file() or 'name = "danlu"' not in pyproject.read_text():
            continue
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return (head + ("-dirty" if dirty else "")) if head else None
    return None


def _driver() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None

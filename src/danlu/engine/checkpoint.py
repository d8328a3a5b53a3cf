"""Snapshots: plain dicts written atomically (temporary file, fsync, checksum, rename) and read with
weights_only=True, so a snapshot from a stranger can never run code and a cut-short one is never taken for whole.

    save_snapshot(run_dir / "snapshots", state, iteration=500, keep=3)
    state, path = load_latest(run_dir)        # newest snapshot that verifies and loads; older ones are the fallback

Each `iter_NNNNNNNN.pt` has a sidecar `iter_NNNNNNNN.pt.sha256` in `sha256sum` format (so `sha256sum -c` checks it
too), written before the snapshot is renamed into place: a snapshot under its final name always has its checksum.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danlu.errors import DanluError, few
from danlu.io import atomic_write, sha256, write_bytes

_NAME = re.compile(r"^iter_(\d+)\.pt$")
_TMP = re.compile(r"^\..+\.tmp(\d+)$")  # atomic_write's temporary files: .<name>.tmp<pid>
FORMAT = "danlu-snapshot/1"
# what a training snapshot holds; a file without these is not resumable (checked before anything is loaded)
RESUME_KEYS = ("model", "optimizer", "rng", "iteration", "recipe")


def sidecar(path: Path) -> Path:
    """iter_00000500.pt -> iter_00000500.pt.sha256"""
    return path.with_name(path.name + ".sha256")


def save_snapshot(folder: Path, state: dict[str, Any], iteration: int, keep: int) -> Path:
    """Write `state` as snapshots/iter_NNNNNNNN.pt (plus its .sha256) and keep the newest `keep` snapshots.
    Order: temporary file, fsync, checksum of the temporary file, checksum file (atomic), rename. A kill at any
    point leaves the previous snapshots whole; a full disk raises a one-line DanluError and changes nothing."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DanluError(f"{folder}: cannot create the snapshot folder ({e.strerror or e})") from e
    path = folder / f"iter_{iteration:08d}.pt"

    def write_checksum(tmp: Path) -> None:
        write_bytes(sidecar(path), f"{sha256(tmp)}  {path.name}\n".encode())

    try:
        atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f), before_rename=write_checksum)
    except DanluError as e:
        older = [p.name for p in snapshots(folder) if p != path]
        kept = f"snapshot {older[-1]} is intact" if older else "no earlier snapshot"
        raise DanluError(f"cannot save snapshot at iteration {iteration}: {e}; {kept}") from e.__cause__
    _prune(folder, keep)
    return path


def _prune(folder: Path, keep: int) -> None:
    """Drop snapshots beyond the newest `keep`, checksum files without their snapshot, and temporary files of
    writers that no longer run (left by a kill between write and rename)."""
    for old in snapshots(folder)[:-keep]:
        old.unlink(missing_ok=True)
        sidecar(old).unlink(missing_ok=True)
    for p in folder.iterdir():
        if p.name.endswith(".pt.sha256") and not p.with_name(p.name[:-len(".sha256")]).exists():
            p.unlink(missing_ok=True)
        elif (m := _TMP.match(p.name)) and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def snapshots(folder: Path) -> list[Path]:
    """Snapshot files in `folder`, oldest first (by iteration; other .pt files after them by modification time).
    Temporary files (`.iter_*.pt.tmp<pid>`) are never listed."""
    if not folder.is_dir():
        return []
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    others = sorted((p for p in folder.glob("*.pt") if not _NAME.match(p.name)), key=lambda p: p.stat().st_mtime)
    return others + [p for _, p in numbered]


def verify(path: Path) -> bool:
    """Check `path` against its .sha256 file. True: it matches; False: there is no checksum file (a snapshot from
    before checksums, or one copied without it). A mismatch raises DanluError."""
    check = sidecar(path)
    if not check.is_file():
        return False
    try:
        expected = check.read_text().split()[0].lower()
        actual = sha256(path)
    except (OSError, IndexError, UnicodeDecodeError) as e:
        raise DanluError(f"{path}: cannot verify against {check.name} ({e})") from None
    if actual != expected:
        raise DanluError(f"{path}: checksum mismatch against {check.name} (the file changed or was cut short "
                         f"after it was written)")
    return True


def load_snapshot(path: Path, map_location: Any = "cpu", require: Iterable[str] = ()) -> dict[str, Any]:
    """Verify (checksum, where there is one) and load one snapshot with weights_only=True."""
    path = Path(path)
    verified = verify(path)
    try:
        with warnings.catch_warnings():  # torch's own notes on pickle protocols: the error below says what matters
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding objects that would need code to load
        text = str(e).strip()
        if isinstance(e, pickle.UnpicklingError) and "weights only" in text.lower():
            # torch's message: boilerplate lines around the one that names what was refused
            detail = next((ln.strip().rstrip(".") for ln in text.splitlines()[1:] if ln.strip() and not
                           ln.strip().startswith(("Please file", "Check the documentation"))), "")
            why = (f"refused by torch.load(weights_only=True){': ' + detail if detail else ''}; a snapshot may hold "
                   f"only tensors and plain containers, since other pickled objects could run code when loaded")
        else:
            why = (text.splitlines()[0] if text else type(e).__name__)[:160]
        raise DanluError(f"{path}: not a loadable danlu snapshot ({why})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DanluError(f"{path}: not a danlu snapshot (no '{FORMAT}' marker)")
    missing = [k for k in require if k not in state]
    if missing:
        raise DanluError(f"{path}: not a resumable danlu snapshot (no {', '.join(missing)})")
    if not verified:
        warnings.warn(f"{path.name}: no checksum file ({sidecar(path).name}); loaded it unverified")
    return state


def load_latest(run_dir: Path, map_location: Any = "cpu", require: Iterable[str] = RESUME_KEYS
                ) -> tuple[dict[str, Any], Path]:
    """The newest snapshot of a run that verifies and loads; a broken newer one is skipped with a warning."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.parent.name == "snapshots":  # a snapshot named instead of its run
        raise DanluError(f"--resume {run_dir}: a snapshot file; expected its run folder: --resume "
                         f"{run_dir.parent.parent} (the newest snapshot that loads is taken)")
    if not run_dir.is_dir():
        raise DanluError(f"--resume {run_dir}: no such run folder")
    found = snapshots(run_dir / "snapshots")
    if not found:
        raise DanluError(f"--resume {run_dir}: {_not_a_run(run_dir)}")
    problems = []
    for path in reversed(found):
        try:
            state = load_snapshot(path, map_location, require)
        except DanluError as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"skipped {len(problems)} unloadable snapshot(s) (newest: {problems[0]}); resuming from "
                          f"{path.name}")
        return state, path
    raise DanluError(f"--resume {run_dir}: no snapshot loads; newest: {problems[0]}")


def _not_a_run(folder: Path) -> str:
    """Why `folder` is not a run to resume, and what to pass instead: the run folder above a snapshots/ folder, the
    run folders inside a folder of runs (newest first), or what a run folder holds."""
    if folder.name == "snapshots" and snapshots(folder):
        return f"the run's snapshots/ folder; expected the run folder: --resume {folder.parent}"
    runs = sorted((d for d in folder.iterdir() if d.is_dir() and snapshots(d / "snapshots")),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    if runs:
        return (f"not a run folder but a folder of {len(runs)} run(s); expected one of them: --resume "
                f"{few(str(d) for d in runs)}")
    imported = _imported(folder)
    if imported:
        return (f"an imported network ({imported}), never trained here: nothing to resume; to train from it, start a "
                f"new run with --set model.init={folder}")
    return f"no snapshot in {folder / 'snapshots'}; expected a danlu run folder (one holding snapshots/iter_*.pt)"


def _imported(folder: Path) -> str:
    """The network a run folder was imported from (summary.json's `imported`, written by an import such as
    `danlu face import`), or '' for any other folder."""
    try:
        imported = json.loads((folder / "summary.json").read_text()).get("imported")
    except (OSError, ValueError, AttributeError):
        return ""
    return str(imported.get("network", "")) if isinstance(imported, dict) else ""


def weight_differences(model: torch.nn.Module, weights: dict[str, Any]
                       ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """What keeps `weights` from loading into `model`: (missing keys, unexpected keys, [(key, shape in weights,
    shape in model)]), each in the model's (or the weights') order."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in weights and hasattr(weights[k], "shape") and tuple(weights[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def load_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """model.load_state_dict(weights), with a one-line error naming the keys and shapes that do not fit."""
    missing, unexpected, differ = weight_differences(model, weights)
    shapes = [f"{k} {have} vs {want}" for k, have, want in differ]
    if missing or unexpected or shapes:
        parts = [f"{label} {few(keys)}" for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                             ("shape mismatch", shapes)) if keys]
        raise DanluError(f"{where}: holds weights of another model ({'; '.join(parts)})")
    model.load_state_dict(weights)


# ---------------------------------------------------------------- random state, as tensors and plain values


def rng_state() -> dict[str, Any]:
    """Every random generator the run draws from (python, numpy, torch CPU and CUDA), in weights_only-safe types."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])

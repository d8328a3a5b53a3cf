"""Snapshots: plain dicts written atomically (temporary file, fsync, rename) and read with weights_only=True,
so a snapshot from a stranger can never run code.

    save_snapshot(run_dir / "snapshots", state, iteration=500, keep=3)
    state, path = load_latest(run_dir)        # newest snapshot that loads; older ones are the fallback
"""
from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danlu.errors import DanluError

_NAME = re.compile(r"^iter_(\d+)\.pt$")
FORMAT = "danlu-snapshot/1"


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`: readers see the old file or
    the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_snapshot(folder: Path, state: dict[str, Any], iteration: int, keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"iter_{iteration:08d}.pt"
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    for old in snapshots(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def snapshots(folder: Path) -> list[Path]:
    """Snapshot files in `folder`, oldest first (by iteration; other .pt files after them by modification time)."""
    if not folder.is_dir():
        return []
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    others = sorted((p for p in folder.glob("*.pt") if not _NAME.match(p.name)), key=lambda p: p.stat().st_mtime)
    return others + [p for _, p in numbered]


def load_snapshot(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding objects that would need code to load
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DanluError(f"{path}: not a loadable danlu snapshot ({first[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DanluError(f"{path}: not a danlu snapshot (no '{FORMAT}' marker)")
    return state


def load_latest(run_dir: Path, map_location: Any = "cpu") -> tuple[dict[str, Any], Path]:
    """The newest snapshot of a run that loads; a broken newest one is skipped with a warning."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DanluError(f"--resume {run_dir}: no such run folder")
    found = snapshots(run_dir / "snapshots")
    if not found:
        raise DanluError(f"--resume {run_dir}: no snapshot in {run_dir / 'snapshots'}; expected iter_*.pt from a "
                         f"danlu run")
    problems = []
    for path in reversed(found):
        try:
            state = load_snapshot(path, map_location)
        except DanluError as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"skipped {len(problems)} unloadable snapshot(s); resuming from {path.name}")
        return state, path
    raise DanluError(f"--resume {run_dir}: no snapshot loads; newest: {problems[0]}")


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

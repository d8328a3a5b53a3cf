"""Shared fixtures: the real CLI in a subprocess, and tiny recipes that train in seconds on a CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# a recipe that trains in about a second: LeNet on small synthetic digits
TINY = ["model.name=lenet", "data.name=synthetic", "data.train_size=512", "data.test_size=128",
        "data.batch_size=32", "run.display=10", "run.tensorboard=false"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run `python -m danlu ARGS` the way a user does; returns the CompletedProcess (text output)."""
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "danlu", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


def sets(*items: str) -> list[str]:
    """['a=1', 'b=2'] -> ['--set', 'a=1', '--set', 'b=2']."""
    out: list[str] = []
    for it in items:
        out += ["--set", it]
    return out


@pytest.fixture
def cli():
    return run_cli


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` (scripts/gpu_check.sh runs them on a GPU machine) are skipped where CUDA is missing."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)

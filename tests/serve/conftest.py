"""One tiny trained run for all serve tests (LeNet, 5 iterations on synthetic digits: about a second), and images."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

import danlu

TINY_RUN = ["model.name=lenet", "data.name=synthetic", "data.train_size=256", "data.test_size=64",
            "data.batch_size=32", "run.max_iter=5", "run.test_interval=5", "run.tensorboard=false"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    danlu.train(None, overrides=TINY_RUN, out=out, device="cpu", quiet=True)
    return out


@pytest.fixture(scope="session")
def test_client_cls():
    """FastAPI's TestClient (Starlette's), imported without its note about a newer httpx."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2")
        from fastapi.testclient import TestClient
    return TestClient


@pytest.fixture(scope="session")
def make_png():
    """make_png(seed, (w, h), channels) -> a noise image as PNG bytes."""
    def make(seed: int = 0, size: tuple[int, int] = (28, 28), channels: int = 1) -> bytes:
        rng = np.random.default_rng(seed)
        shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], channels)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()
    return make


@pytest.fixture(scope="session")
def served(tiny_run):
    """`danlu serve` on a free loopback port (--port 0), as a user starts it; yields its URL."""
    import os
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "danlu", "serve", str(tiny_run), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    watchdog = threading.Timer(120, proc.kill)  # a server that never says where it listens fails the test, not CI
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if " http://" in line:
                break
        url = next((w for w in lines[-1].split() if w.startswith("http://")), None) if lines else None
        if url is None:
            pytest.fail(f"danlu serve did not start: {''.join(lines)[-2000:]}")
        yield url
    finally:
        watchdog.cancel()
        proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

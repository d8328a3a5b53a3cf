"""Helpers for the data tests: a local HTTP server fixture (Range requests, responses cut short on demand) and small
files in each native format (IDX, CIFAR's pickled batches in a tar.gz, image folders). Test modules import from here
(a second conftest.py would make `from conftest import ...` ambiguous)."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest


@dataclass
class FileServer:
    """Serves `files` ({name: bytes}) at `url`; `cut[name] = n` makes the next response for `name` announce the full
    length but stop after n bytes and drop the connection (once). `requests` records (name, Range header)."""
    url: str
    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)


@pytest.fixture
def file_server():
    state = FileServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):  # noqa: N802
            name = self.path.lstrip("/")
            rng = self.headers.get("Range")
            state.requests.append((name, rng))
            data = state.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            n = state.cut.pop(name, None)
            if n is not None:
                self.wfile.write(body[:n])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """LeCun's IDX format: 0 0 0x08 NDIM, big-endian int32 sizes, uint8 data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def mnist_like(n_train: int = 40, n_test: int = 12, seed: int = 0) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Four gzipped IDX files named as MNIST's, and the arrays they hold."""
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": (np.arange(n_test) % 10).astype(np.uint8)}
    names = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
             "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
    files = {names[k]: gzip.compress(idx_bytes(v), mtime=0) for k, v in arrays.items()}
    return files, arrays


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def cifar_like(n_per_batch: int = 6, seed: int = 0) -> tuple[bytes, dict[str, np.ndarray]]:
    """cifar-10-python.tar.gz in miniature: 5 training batches, a test batch and batches.meta, pickled as CIFAR's
    are (dicts of bytes keys; 'data' uint8 (N, 3072) rows of R, G, B planes; 'labels' a list)."""
    rng = np.random.default_rng(seed)
    members, xs, ys = {}, [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps({b"data": x, b"labels": y, b"batch_label": b"x"},
                                                              protocol=2)
        xs.append(x), ys.append(y)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": names}, protocol=2)
    arrays = {"train_images": np.concatenate(xs[:5]).reshape(-1, 3, 32, 32),
              "train_labels": np.array(sum(ys[:5], []), np.int64),
              "test_images": xs[5].reshape(-1, 3, 32, 32), "test_labels": np.array(ys[5], np.int64)}
    return tar_gz(members), arrays


def write_image(path: Path, array: np.ndarray, **save_kw) -> Path:
    """Save an (H, W, 3) or (H, W) uint8 array with Pillow (format from the suffix)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kw)
    return path


def class_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 6, size=(40, 30), ext: str = ".png",
                 seed: int = 0) -> Path:
    """root/CLASS/i.ext images, each class a distinct flat colour plus noise (learnable, decodable)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for i in range(per_class):
            base = np.full((*size, 3), (60 + 80 * c) % 256, np.uint8)
            img = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
            write_image(root / name / f"{i:03d}{ext}", img)
    return root

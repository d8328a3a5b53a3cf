"""Helpers for the WebDataset tests (test_wds_*.py): shards of tiny images whose pixels say which sample they are,
and the loader's batches read back as sample ids. Test modules import from here, as from datafiles."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import webdataset

from danlu.data.datasets import load_dataset
from danlu.data.loader import make_loader


def png(value: int, label: int, size=(10, 12)) -> bytes:
    """A flat image whose pixels say which sample it is: (id % 256, id // 256, 40 * label); any resize keeps them."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), (value % 256, value // 256, 40 * label), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def gradient_png(value: int, label: int, size=(30, 40)) -> bytes:
    """A sample whose every pixel says where it is: (column, row, id), so a batch shows each row's crop box."""
    from PIL import Image

    y, x = np.mgrid[0:size[0], 0:size[1]]
    arr = np.stack([x * 6, y * 8, np.full(size, value % 256)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def webp(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (i % 256, i // 256, 0), np.uint8)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def sample_ids(x: torch.Tensor) -> list[int]:
    """Sample ids of a batch of png images (B, 3, H, W)."""
    x = x.long()
    return (x[:, 0, 0, 0] + 256 * x[:, 1, 0, 0]).tolist()


def write_shards(folder, counts, classes: int = 3, name: str = "train", start: int = 0, extra=None) -> list[int]:
    """Shards folder/{name}-00000k.tar of `counts[k]` samples each ({key}.png + {key}.cls); sample ids are consecutive
    from `start` and label = id % classes. `extra(id) -> dict` replaces or adds a sample's files. Returns the ids."""
    folder.mkdir(parents=True, exist_ok=True)
    i = start
    for k, n in enumerate(counts):
        with webdataset.TarWriter(str(folder / f"{name}-{k:06d}.tar"), encoder=False) as w:
            for _ in range(n):
                sample = {"__key__": f"s{i:06d}", "png": png(i, i % classes), "cls": str(i % classes).encode()}
                if extra is not None:
                    sample.update(extra(i))
                w.write({k2: v for k2, v in sample.items() if v is not None})
                i += 1
    return list(range(start, i))


@pytest.fixture
def shards(tmp_path):
    """7 training shards of uneven sizes (65 samples) and 2 test shards, no index (scanned)."""
    root = tmp_path / "shards"
    write_shards(root, [9, 13, 5, 11, 8, 12, 7])
    write_shards(root, [6, 5], name="val", start=1000)
    return root


def load(root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-index notice
        return load_dataset("wds", root=str(root), size=(10, 12), **kw)


def batches(train, batch, epoch=0, start=0, **kw):
    """The batches of one epoch of a training set's loader (seed 5) on the CPU, as a list."""
    loader = make_loader(train.images, train.labels, batch, device="cpu", seed=5, **kw)
    return [(x, y) for x, y in loader.epoch(epoch, start=start)]

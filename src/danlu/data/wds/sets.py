"""What `load_dataset("wds", ...)` returns: a (train, test) pair of ShardSets, whose ShardImages probe their first
images on demand and build the ShardLoader that streams the rest.

    train, test = load_shards("shards", size=224)             # danlu prepare's output (index.json)
    train.images[:8]                                           # (8, 3, 224, 224) uint8: the first images, decoded
    loader = train.images.make_loader(64, device="cuda")       # a ShardLoader (wds.loader)
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from danlu.data.decode import as_size, decode_rows, default_workers
from danlu.data.wds.loader import ShardLoader
from danlu.data.wds.samples import Labels, read_shard
from danlu.data.wds.shards import Shard, hold_out, open_source
from danlu.data.wds.urls import short_name
from danlu.errors import DanluError

STATS_SAMPLES = 2048  # normalization statistics of a shard set come from its first samples


@dataclass
class ShardSet:
    """One split of a shard source: enough of an ImageSet for the engine (`classes`, `shape`, `len()`, `images`,
    `report`); its images are read and decoded by the loader that `make_loader` builds from them."""
    images: "ShardImages"
    classes: list[str]
    labels: None = None  # read with the images, by the loader
    report: Optional[dict[str, Any]] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index) -> "ShardSet":  # noqa: ANN001
        raise DanluError("data.name=wds: a shard set streams in its own order and cannot be subset; expected "
                         "data.split=images with val/ shards or data.val_fraction")


class ShardImages:
    """The images of one split of shards, at (C, H, W) = (channels, *size), for the engine's probes: `.shape`,
    `.dtype`, `len()`, `[:n]` / `gather(rows)` (the first rows only: decoded on demand), `stats_sample()`;
    `make_loader(batch_size, ...)` builds the ShardLoader that streams them (`timeout`: seconds its batches may take,
    None for no limit)."""

    dtype = torch.uint8

    def __init__(self, shards: list[Shard], labels: Labels, size: tuple[int, int], channels: int, resize: str,
                 streams: int = 8, decode: str = "auto", workers: Optional[int] = None,
                 timeout: Optional[float] = None):
        self.shards, self.labels, self.size, self.channels, self.resize = shards, labels, size, channels, resize
        self.streams, self.decode, self.workers, self.timeout = streams, decode, workers, timeout
        self._head: Optional[np.ndarray] = None  # the first decoded rows (probes, statistics)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.channels, *self.size))

    @property
    def nbytes(self) -> int:
        return len(self) * self.channels * self.size[0] * self.size[1]

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def head(self, n: int) -> np.ndarray:
        """The first n images (N, C, H, W) uint8 in the shards' own order, decoded on the CPU in threads (an image
        that does not decode: zeros). Up to 256 are kept for the probes that ask again."""
        n = min(n, len(self))
        if self._head is not None and len(self._head) >= n:
            return self._head[:n]
        data: list[bytes] = []
        for shard in self.shards:
            data += [d for _, d, _ in read_shard(shard.url, self.labels)[0][:n - len(data)]]
            if len(data) >= n:
                break
        out = np.zeros((len(data), self.channels, *self.size), np.uint8)
        step = max(1, math.ceil(len(data) / (4 * (self.workers or default_workers()))))
        with ThreadPoolExecutor(max_workers=self.workers or default_workers()) as pool:
            list(pool.map(lambda lo: decode_rows(data, out, lo, min(len(data), lo + step), self.size, self.channels,
                                                 self.resize),
                          range(0, len(data), step)))
        if n <= 256:
            self._head = out
        return out

    def gather(self, rows, out: Optional[np.ndarray] = None) -> np.ndarray:  # noqa: ANN001
        rows = np.asarray(rows, dtype=np.int64)
        got = self.head(int(rows.max()) + 1 if len(rows) else 0)[rows]
        if out is not None:
            out[...] = got
            return out
        return got

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            rows = np.arange(len(self))[key]
            if len(rows) and rows.max() >= STATS_SAMPLES:
                raise DanluError(f"a shard set streams: only its first {STATS_SAMPLES} images can be read directly "
                                 f"(asked for rows up to {rows.max()}); expected its loader (make_loader)")
            return torch.from_numpy(self.gather(rows))
        if isinstance(key, (int, np.integer)):
            return torch.from_numpy(self.gather(np.array([key]))[0])
        return torch.from_numpy(self.gather(np.asarray(key)))

    def stats_sample(self) -> torch.Tensor:
        """The first STATS_SAMPLES images: what data.normalize's statistics are computed from."""
        return torch.from_numpy(self.head(STATS_SAMPLES))

    def make_loader(self, batch_size: int, *, device, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                    rank: int = 0, world: int = 1, **_: Any) -> ShardLoader:  # noqa: ANN001
        return ShardLoader(self, batch_size, device=device, shuffle=shuffle, drop_last=drop_last, seed=seed,
                           rank=rank, world=world, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"ShardImages({tuple(self.shape)}, {len(self.shards)} shards)"


def load_shards(root: Optional[str], *, size=None, channels: Optional[int] = None, resize: str = "crop",  # noqa: ANN001
                val_fraction: float = 0.2, split_seed: int = 0, label_key: str = "cls", streams: int = 8,
                decode: str = "auto", workers: Optional[int] = None,
                timeout: Optional[float] = None) -> tuple[ShardSet, ShardSet]:
    """(train, test) ShardSets of data.root; the train set carries the report (data_report.json). `timeout`: seconds
    their loaders' batches may take to come (data.timeout; None: no limit)."""
    if timeout is not None and not timeout > 0:
        raise DanluError(f"data.timeout={timeout}: expected a positive number of seconds")
    src = open_source(root, label_key)
    hw, c = as_size(size), channels or 3
    train_shards = src.splits["train"]
    if "test" in src.splits:
        test_shards, test_from = src.splits["test"], "the val (or test) shards"
    else:
        train_shards, test_shards = hold_out(train_shards, val_fraction, split_seed, root)
        test_from = (f"held-out shards: data.val_fraction={val_fraction} of {len(src.splits['train'])} shards, "
                     f"data.split_seed={split_seed}")
    for name, shards in (("train", train_shards), ("test", test_shards)):
        if sum(s.count for s in shards) == 0:
            raise DanluError(f"data.root={root}: the {name} shards hold no readable sample (first problem: "
                             f"{src.skipped[0]['reason'] if src.skipped else 'empty shards'}); expected "
                             f"{{key}}.jpg with {{key}}.{label_key}")
    if len(src.labels.classes) < 2:
        raise DanluError(f"data.root={root}: the training shards hold 1 class; expected at least 2")

    def images(shards: list[Shard]) -> ShardImages:
        return ShardImages(shards, src.labels, hw, c, resize, streams, decode, workers, timeout)

    train = ShardSet(images(train_shards), list(src.labels.classes))
    test = ShardSet(images(test_shards), list(src.labels.classes))
    train.report = {"source": "wds", "root": str(root), "counts_from": src.indexed, "size": list(hw),
                    "channels": c, "resize": resize, "label_key": label_key, "classes": list(src.labels.classes),
                    "train_images": len(train), "test_images": len(test), "test_from": test_from,
                    "train_shards": len(train_shards), "test_shards": len(test_shards), "streams": streams,
                    "skipped_count": len(src.skipped), "skipped": src.skipped}
    if src.per_class.get("train") and "test" in src.splits:
        train.report["train_per_class"] = dict(zip(src.labels.classes, src.per_class["train"]))
        train.report["test_per_class"] = dict(zip(src.labels.classes, src.per_class.get("test", [])))
    warn_skipped(src.skipped)
    return train, test


def warn_skipped(skipped: list[dict[str, Any]], when: str = "") -> None:
    """One line: how many samples of the shards were skipped, the first and why, where the full list is (files that
    prepare skipped were said then, and stay listed in the report)."""
    skipped = [e for e in skipped if "shard" in e]
    if skipped:
        first = skipped[0]
        where = short_name(first["shard"]) + (f" {first['key']}" if first.get("key") else "")
        warnings.warn(f"data: skipped {len(skipped)} sample(s) of the shards{when} (first: {where}: {first['reason']});"
                      f" all are listed in data_report.json in the run folder", stacklevel=3)

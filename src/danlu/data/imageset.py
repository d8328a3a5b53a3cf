"""ImageSet: uint8 images (N, C, H, W), int64 labels (N,) and class names, the one form every data source takes; and
the seeded splits of a set that has no test split of its own. A leaf of the data package: every source builds these.

    train, test = identity_split(faces, fraction=0.2, seed=0)     # whole identities held back
    keep, held = stratified_split(labels, fraction=0.2, seed=0)   # indices; the same share of every class
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Union

import torch

from danlu.errors import DanluError


class ImageSource(Protocol):
    """Images that are not one tensor in memory (a store's memory-mapped shards, tar shards): an ImageSet holds
    them as it holds a tensor, and reads rows on demand."""
    dtype: torch.dtype  # torch.uint8

    def dim(self) -> int:
        """4."""

    @property
    def shape(self) -> torch.Size:
        """(N, C, H, W)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the whole set as uint8."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any) -> torch.Tensor:
        """Rows as a uint8 tensor (N, C, H, W)."""

    def gather(self, rows: Any, out: Any = None) -> Any:
        """Rows as a uint8 numpy array (len(rows), C, H, W), into `out` when given."""

    def subset(self, index: Any) -> "ImageSource":
        """These rows only, in this order, read on demand as before."""


@dataclass
class ImageSet:
    images: Union[torch.Tensor, ImageSource]  # (N, C, H, W) uint8, or rows read on demand (ImageSource)
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
        images = self.images[index] if isinstance(self.images, torch.Tensor) else self.images.subset(index)
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

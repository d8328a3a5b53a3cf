"""Your own images: a folder with one subfolder of images per class (or list files, see lists.py) -> ImageSets.

    files = scan_folder("photos")                    # photos/{cat,dog}/*.jpg, or photos/{train,val}/{cat,dog}/*.jpg
    train, test = load_files(files, size=224, channels=3)

`scan_folder` only looks (which classes, which files); `load_files` decodes every file in parallel, resizes to one
size, skips what is not a readable image (each skipped file is listed with its reason in the report that ends up as
`data_report.json` in the run folder, with a one-line warning), and splits train/test: the `val/` (or `test/`) folder
when there is one, else a seeded stratified split by `val_fraction`. Problems that leave nothing to train on (no
folder, an empty folder, one class, a class without a readable image) raise DanluError before anything is written.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from danlu.data.decode import as_size, decode_many
from danlu.errors import DanluError

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Item:
    path: Path  # the image file
    label: int
    where: str  # how the user names it: the path relative to the root, or the list file it is listed in
    line: Optional[int] = None  # its line in that list file

    def skipped(self, reason: str) -> dict[str, Any]:
        """Its entry in data_report.json's `skipped`."""
        if self.line is None:
            return {"file": self.where, "reason": reason}
        return {"list": self.where, "line": self.line, "file": str(self.path), "reason": reason}


@dataclass
class FileSet:
    """What to decode: class names, and the items of the train split and (where the source has one) the test
    split; `skipped` holds problems already found while scanning (bad list lines)."""
    kind: str  # folder | list
    root: Path
    classes: list[str]
    train: list[Item]
    test: Optional[list[Item]] = None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # data.* values that describe the source, for the report


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    """Every visible regular file below `folder` (recursing, following links), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        out += [Path(dirpath) / f for f in sorted(filenames) if _visible(f)]
    return out


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def scan_folder(root: Union[str, Path, None], key: str = "data.root") -> FileSet:
    """Classes and image files of a class-folder tree: ROOT/CLASS/**/FILE, or ROOT/{train,val}/CLASS/**/FILE."""
    if root is None:
        raise DanluError(f"{key}: not set; expected a folder with a subfolder of images per class "
                         f"(--set {key}=path/to/images)")
    root = Path(root).expanduser()
    if not root.exists():
        raise DanluError(f"{key}={root}: no such folder; expected a folder with a subfolder of images per class")
    if not root.is_dir():
        raise DanluError(f"{key}={root}: a file, not a folder; expected a folder with a subfolder of images per class")
    subdirs = _class_dirs(root)
    names = {p.name for p in subdirs}
    split_layout = "train" in names and names <= set(SPLIT_NAMES)
    train_root = root / "train" if split_layout else root
    test_root = next((root / n for n in ("val", "test") if n in names), None) if split_layout else None
    class_dirs = _class_dirs(train_root)
    if not class_dirs:
        loose = [p for p in train_root.iterdir() if p.is_file() and _visible(p.name)]
        what = (f"holds {len(loose)} file(s) but no class folders" if loose else "is empty")
        raise DanluError(f"{key}={train_root}: {what}; expected one subfolder of images per class "
                         f"({train_root}/CLASS/IMAGE)")
    classes = [p.name for p in class_dirs]
    if len(classes) < 2:
        raise DanluError(f"{key}={train_root}: found 1 class folder ('{classes[0]}'); expected at least 2 "
                         f"(one subfolder of images per class)")
    train = []
    for label, d in enumerate(class_dirs):
        files = _files_under(d)
        if not files:
            raise DanluError(f"{key}={train_root}: class folder '{d.name}' holds no files; expected images of "
                             f"class '{d.name}' (or remove the folder)")
        train += [Item(f, label, str(f.relative_to(root))) for f in files]
    test = None
    if test_root is not None:
        test = []
        index = {c: i for i, c in enumerate(classes)}
        for d in _class_dirs(test_root):
            if d.name not in index:
                raise DanluError(f"{key}={root}: {test_root.name}/{d.name} is a class that {train_root.name}/ does "
                                 f"not have; expected {test_root.name}/ classes among {', '.join(classes)}")
            test += [Item(f, index[d.name], str(f.relative_to(root))) for f in _files_under(d)]
        if not test:
            raise DanluError(f"{key}={test_root}: holds no images; expected {test_root.name}/CLASS/IMAGE "
                             f"(or remove it to split {train_root.name}/ by data.val_fraction)")
    return FileSet("folder", root, classes, train, test, source={"root": str(root.resolve())})


def load_files(files: FileSet, *, size: Union[int, tuple[int, int], None] = None, channels: Optional[int] = None,
               resize: str = "crop", val_fraction: float = 0.2, split_seed: int = 0, workers: Optional[int] = None,
               split: str = "images"):
    """Decode a FileSet into (train, test) ImageSets; the train set carries the report (`train.report`).
    `split="identities"`: every readable image, with `val_fraction` of the classes held back (identity_split)."""
    from danlu.data.imageset import ImageSet, identity_split, stratified_split

    hw, c = as_size(size), channels or 3
    items = files.train + (files.test or [])
    t0 = time.perf_counter()
    images, bad = decode_many([it.path for it in items], hw, c, resize, workers=workers)
    seconds = time.perf_counter() - t0
    skipped = list(files.skipped) + [items[i].skipped(r) for i, r in sorted(bad.items())]
    skipped.sort(key=lambda e: (e.get("list", ""), e.get("line", 0), e.get("file", "")))  # list order, line order
    ok = np.ones(len(items), bool)
    ok[list(bad)] = False
    labels = np.array([it.label for it in items], np.int64)
    n_train = len(files.train)
    train_ok = ok[:n_train]
    counts = np.bincount(labels[:n_train][train_ok], minlength=len(files.classes))
    empty = [files.classes[i] for i in np.flatnonzero(counts == 0)]
    if files.kind == "folder" and empty:
        cls = files.classes.index(empty[0])
        first = next(i for i in sorted(bad) if items[i].label == cls)
        raise DanluError(f"data.root={files.root}: class '{empty[0]}' has no readable image (e.g. {items[first].where}:"
                         f" {bad[first]}); expected at least one image per class")
    if (counts > 0).sum() < 2:
        raise DanluError(f"data: {files.kind} {files.root} has readable training images of "
                         f"{int((counts > 0).sum())} class(es); expected at least 2")
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    keep = torch.from_numpy(np.flatnonzero(ok))
    if split == "identities":
        train, test = identity_split(ImageSet(x[keep], y[keep], list(files.classes)), val_fraction, split_seed)
    elif files.test is not None:
        train_idx = keep[keep < n_train]
        test_idx = keep[keep >= n_train]
        if len(test_idx) == 0:
            raise DanluError(f"data: the test split of {files.root} has no readable image; expected at least one")
        train = ImageSet(x[train_idx], y[train_idx], list(files.classes))
        test = ImageSet(x[test_idx], y[test_idx], list(files.classes))
    else:
        full = ImageSet(x[keep], y[keep], list(files.classes))
        k, held = stratified_split(full.labels, val_fraction, split_seed)
        if len(held) == 0 or len(k) == 0:
            raise DanluError(f"data.val_fraction={val_fraction}: {len(full)} readable images leave "
                             f"{len(k)} to train on and {len(held)} to test on; expected at least one of each "
                             f"(add images or a val/ folder)")
        train, test = full.subset(k), full.subset(held)
    test_from = (f"held-back identities: data.val_fraction={val_fraction}, data.split_seed={split_seed}"
                 if split == "identities" else
                 f"split: data.val_fraction={val_fraction}, data.split_seed={split_seed}" if files.test is None
                 else "the val/ (or test/) folder" if files.kind == "folder" else "data.val_list")
    train.report = make_report(files, hw, c, resize, len(items), skipped, train, test, seconds, test_from)
    warn_skipped(train.report)
    return train, test


def make_report(files: FileSet, hw: tuple[int, int], channels: int, resize: str, scanned: int,
                skipped: list[dict[str, Any]], train, test, seconds: float, test_from: str) -> dict[str, Any]:
    per_class = lambda s: {c: int(n) for c, n in zip(s.classes, torch.bincount(s.labels, minlength=len(s.classes)))}  # noqa: E731
    return {"source": files.kind, **files.source, "size": list(hw), "channels": channels, "resize": resize,
            "classes": list(files.classes), "files_scanned": scanned, "train_images": len(train),
            "test_images": len(test), "test_from": test_from,
            "train_per_class": per_class(train), "test_per_class": per_class(test),
            "skipped_count": len(skipped), "skipped": skipped, "decode_seconds": round(seconds, 2)}


def warn_skipped(report: dict[str, Any]) -> None:
    """One line: how many entries were skipped, the first one and why, and where the full list is."""
    if report["skipped_count"]:
        first = report["skipped"][0]
        where = f"{first['list']}:{first['line']}" if "line" in first else first["file"]
        what = "file(s) that are not readable images" if report["source"] == "folder" else "line(s) or file(s)"
        warnings.warn(f"data: skipped {report['skipped_count']} {what} (first: {where}: {first['reason']}); all are "
                      f"listed in data_report.json in the run folder", stacklevel=2)


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    """data_report.json in the run folder (written to a temporary file and renamed)."""
    from danlu.io import write_bytes

    path = Path(run_dir) / "data_report.json"
    write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())
    return path

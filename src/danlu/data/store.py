"""Prepared stores: a set decoded once into memory-mapped uint8 shards, the way Caffe converts to LMDB first.

    prepare("photos/", "photos.store", size=224)         # `danlu prepare photos -o photos.store --size 224`
    train, test = load_store("photos.store")             # ImageSets whose images are ShardedImages (read on demand)

Layout of a store folder:

    meta.json              format, shape (C, H, W), classes, source, and per split: count, shard files with their
                           image count, byte size and SHA-256, and the labels file with its SHA-256
    train-00000.npy ...    uint8 (n, C, H, W) .npy shards of about shard_mb MiB, memory-mapped when read
    train-labels.npy       int64 (N,)
    test-*.npy             the same for the test split, when the source has one (val/ or test/, or a catalog set)
    .verified.json         (size, mtime) of shards whose checksum was verified, so a big store is hashed once

`prepare` is resumable: each finished shard is written to a temporary file, renamed, and recorded in
`progress.json`; run the same command again after an interruption and it keeps the finished shards. `meta.json` is
written last: a store without it is unfinished. Opening a store checks every shard's size (a truncated shard is named)
and its SHA-256 unless that exact file (size and mtime) was verified before (an altered shard is named).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional, Union

import numpy as np
import torch

from danlu.io import sha256, write_bytes
from danlu.errors import DanluError

FORMAT, VERSION = "danlu-store", 1


class ShardedImages:
    """uint8 images (N, C, H, W) spread over memory-mapped shards, read on demand. Enough of a tensor for ImageSet
    and the loaders: `.shape`, `.dtype`, `.dim()`, `len()`, `[index]` -> tensor, `.to(device)` -> tensor (the whole
    set, materialized), `.subset(index)` -> a lazy view, `.gather(rows, out)` -> numpy."""

    dtype = torch.uint8

    def __init__(self, shards: list[np.ndarray], index: Optional[np.ndarray] = None):
        if not shards:
            raise DanluError("a store split with no shards")
        self._shards = shards  # each (n_i, C, H, W) uint8, memory-mapped
        self._starts = np.cumsum([0] + [len(s) for s in shards])  # (S + 1,) first global row of each shard
        self._index = index  # optional (M,) int64 global rows of this view
        self._item = tuple(shards[0].shape[1:])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._item))

    @property
    def nbytes(self) -> int:
        return len(self) * int(np.prod(self._item))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return int(self._starts[-1]) if self._index is None else len(self._index)

    def subset(self, index: Union[torch.Tensor, np.ndarray]) -> "ShardedImages":
        rows = np.asarray(index, dtype=np.int64)
        return ShardedImages(self._shards, rows if self._index is None else self._index[rows])

    def gather(self, rows: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Images at `rows` (M,) of this view, in that order, into `out` (M, C, H, W) uint8 (allocated if None).
        Each shard is read once, in ascending row order (sequential-ish reads of the memory map)."""
        rows = np.asarray(rows, dtype=np.int64)
        g = rows if self._index is None else self._index[rows]
        if out is None:
            out = np.empty((len(g), *self._item), np.uint8)
        shard = np.searchsorted(self._starts, g, side="right") - 1  # (M,) shard of each row
        for s in np.unique(shard):
            pos = np.flatnonzero(shard == s)
            local = g[pos] - self._starts[s]
            order = np.argsort(local, kind="stable")
            out[pos[order]] = self._shards[s][local[order]]
        return out

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            key = np.arange(len(self))[key]
        elif isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        elif isinstance(key, (int, np.integer)):
            return torch.from_numpy(self.gather(np.array([key]))[0])
        return torch.from_numpy(self.gather(np.asarray(key)))

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> torch.Tensor:
        """The whole view as one tensor on `device`, copied shard by shard (no second full copy in host memory)."""
        device = torch.device(device)
        out = torch.empty(tuple(self.shape), dtype=torch.uint8, device=device)
        step = max(1, (64 << 20) // max(1, int(np.prod(self._item))))  # ~64 MiB host chunks
        for lo in range(0, len(self), step):
            hi = min(len(self), lo + step)
            chunk = torch.from_numpy(self.gather(np.arange(lo, hi)))
            out[lo:hi].copy_(chunk.pin_memory() if device.type == "cuda" else chunk, non_blocking=non_blocking)
        return out

    def __repr__(self) -> str:
        return f"ShardedImages({tuple(self.shape)}, {len(self._shards)} shards)"


# ---------------------------------------------------------------- checksums


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _write_json(path: Path, data: Any) -> None:
    write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


# ---------------------------------------------------------------- prepare


@dataclass
class StorePlan:
    """What a store is written from: per split, (image sources, labels, where-strings) or in-memory uint8 arrays.
    `decode(items, progress) -> (images (n, C, H, W) uint8, {index: reason} of dropped items, notes)` turns a shard's
    files into images (default: `decode_many`, resized by `source['resize']`); `notes` are entries about images that
    were kept (face prepare: 'no face found, kept as a centre crop'), gathered into meta.json's `notes`."""
    classes: list[str]
    splits: dict[str, Any]  # split -> list[Item] (files) or (images (N, C, H, W) uint8 array, labels)
    source: dict[str, Any]
    shape: tuple[int, int, int]
    skipped: list[dict[str, Any]]
    decode: Optional[Callable[..., tuple[np.ndarray, dict[int, str], list[dict[str, Any]]]]] = None


def _fingerprint(plan: StorePlan, per_shard: int) -> str:
    from danlu.data.folder import Item

    h = hashlib.sha256(json.dumps([plan.classes, list(plan.shape), plan.source, per_shard]).encode())
    for name, s in plan.splits.items():
        h.update(name.encode())
        if isinstance(s, list):
            for it in s:
                assert isinstance(it, Item)
                h.update(f"{it.path}\0{it.label}\0{it.path.stat().st_size if it.path.exists() else -1}\n".encode())
        else:
            h.update(hashlib.sha256(s[0].tobytes()).digest() + s[1].tobytes())
    return h.hexdigest()


class _Progress:
    """A rich progress bar on a terminal, else a line every 10%."""

    def __init__(self, total: int, title: str, quiet: bool):
        self.total, self.done, self.t0, self.quiet, self.next_pct = total, 0, time.perf_counter(), quiet, 10
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                transient=False)
            self.bar.start()
            self.task = self.bar.add_task(title, total=total)

    def add(self, k: int) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif not self.quiet and self.total and 100 * self.done / self.total >= self.next_pct:
            rate = self.done / max(1e-9, time.perf_counter() - self.t0)
            print(f"prepare: {self.done}/{self.total} images ({100 * self.done // self.total}%), {rate:.0f} images/s",
                  flush=True)
            self.next_pct = 100 * self.done // self.total // 10 * 10 + 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def write_store(plan: StorePlan, out: Union[str, Path], *, shard_mb: float = 256, workers: Optional[int] = None,
                quiet: bool = False) -> dict[str, Any]:
    """Write `plan` as a store at `out`, shard by shard (resumable: finished shards are kept). Returns the meta."""
    from danlu.data.decode import decode_many

    if shard_mb <= 0:
        raise DanluError(f"shard_mb={shard_mb}: expected a positive size in MiB")
    out = Path(out)
    per_image = int(np.prod(plan.shape))
    per_shard = max(1, int(shard_mb * 2**20) // per_image)
    fp = _fingerprint(plan, per_shard)
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("fingerprint") == fp:
            if not quiet:
                print(f"prepare: {out} is already prepared from this source with these settings")
            return meta
        raise DanluError(f"-o {out}: already holds a store of another source or size; expected a new folder "
                         f"(nothing is overwritten)")
    if out.exists() and not (out / "progress.json").is_file() and any(out.iterdir()):
        raise DanluError(f"-o {out}: folder exists and is not an unfinished store; expected a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / "progress.json"
    state = json.loads(progress_path.read_text()) if progress_path.is_file() else None
    if state is not None and state.get("fingerprint") != fp:
        raise DanluError(f"-o {out}: holds an unfinished store of another source or size; remove it or expected "
                         f"the same SRC and options as the interrupted run")
    state = state or {"fingerprint": fp, "splits": {}}
    skipped, notes = list(plan.skipped), []
    total = sum(len(s) if isinstance(s, list) else len(s[1]) for s in plan.splits.values())
    done_before = sum(r["planned"] for sp in state["splits"].values() for r in sp)
    bar = _Progress(total, f"prepare {out.name}", quiet)
    bar.add(done_before)
    t0, decoded = time.perf_counter(), 0
    try:
        for split, s in plan.splits.items():
            records = state["splits"].setdefault(split, [])
            n = len(s) if isinstance(s, list) else len(s[1])
            for k, lo in enumerate(range(0, n, per_shard)):
                hi = min(n, lo + per_shard)
                if k < len(records) and _shard_intact(out, records[k]):
                    skipped += records[k].get("skipped", [])
                    notes += records[k].get("notes", [])
                    continue
                del records[k:]
                shard_notes: list[dict[str, Any]] = []
                if isinstance(s, list):  # files: decode this shard's images on every core
                    items = s[lo:hi]
                    if plan.decode is not None:
                        buf, bad, shard_notes = plan.decode(items, bar.add)
                    else:
                        buf, bad = decode_many([it.path for it in items], plan.shape[1:], plan.shape[0],
                                               plan.source.get("resize", "crop"), workers=workers, progress=bar.add)
                    ok = np.array([i not in bad for i in range(len(items))], bool)
                    images, labels = buf[ok], np.array([it.label for it in items], np.int64)[ok]
                    bad_list = [items[i].skipped(r) for i, r in sorted(bad.items())]
                else:
                    images, labels, bad_list = s[0][lo:hi], s[1][lo:hi].astype(np.int64), []
                    bar.add(hi - lo)
                decoded += hi - lo
                records.append(_write_shard(out, f"{split}-{k:05d}.npy", images, labels, hi - lo, bad_list,
                                            shard_notes))
                skipped += bad_list
                notes += shard_notes
                _write_json(progress_path, state)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    meta = _finish(out, plan, state, fp, skipped, notes)
    meta["images_per_second"] = round(decoded / seconds, 1) if decoded and seconds > 0 else None
    if not quiet:
        size_mb = sum(sh["bytes"] for sp in meta["splits"].values() for sh in sp["shards"]) / 2**20
        print(f"prepare: {out}: {sum(sp['count'] for sp in meta['splits'].values())} images "
              f"{'x'.join(map(str, plan.shape))} in {sum(len(sp['shards']) for sp in meta['splits'].values())} "
              f"shard(s), {size_mb:.1f} MiB" + (f", {len(skipped)} skipped (listed in {out}/meta.json)"
                                                if skipped else "")
              + (f"; {decoded} images in {seconds:.1f} s ({decoded / seconds:.0f} images/s)" if decoded else ""))
    return meta


def _write_shard(out: Path, name: str, images: np.ndarray, labels: np.ndarray, planned: int,
                 bad: list[dict[str, Any]], notes: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """One shard (temporary file, then renamed); its record for progress.json."""
    record = {"file": None, "count": int(len(labels)), "planned": planned, "labels": labels.tolist(),
              "skipped": bad, **({"notes": notes} if notes else {})}
    if len(labels):
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(images), allow_pickle=False)
        os.replace(tmp, out / name)
        record.update(file=name, bytes=(out / name).stat().st_size, sha256=sha256(out / name))
    return record


def _shard_intact(out: Path, record: dict[str, Any]) -> bool:
    if record["file"] is None:
        return True
    p = out / record["file"]
    return p.is_file() and p.stat().st_size == record["bytes"] and sha256(p) == record["sha256"]


def _finish(out: Path, plan: StorePlan, state: dict[str, Any], fp: str, skipped: list[dict[str, Any]],
            notes: list[dict[str, Any]]) -> dict[str, Any]:
    from danlu import __version__

    splits, stamps = {}, {}
    for split, records in state["splits"].items():
        labels = np.array([lab for r in records for lab in r["labels"]], np.int64)
        lab_name = f"{split}-labels.npy"
        with open(out / (lab_name + ".tmp"), "wb") as f:
            np.save(f, labels, allow_pickle=False)
        os.replace(out / (lab_name + ".tmp"), out / lab_name)
        shards = [{k: r[k] for k in ("file", "count", "bytes", "sha256")} for r in records if r["file"]]
        if not shards:
            raise DanluError(f"prepare: the {split} split of {plan.source} has no readable image")
        splits[split] = {"count": int(len(labels)), "shards": shards,
                         "labels": {"file": lab_name, "sha256": sha256(out / lab_name)}}
        for sh in shards:
            stamps[sh["file"]] = _stamp(out / sh["file"]) + [sh["sha256"]]
    meta = {"format": FORMAT, "version": VERSION, "shape": list(plan.shape), "classes": plan.classes,
            "source": plan.source, "splits": splits, "skipped": skipped, **({"notes": notes} if notes else {}),
            "fingerprint": fp,
            "created": datetime.now().isoformat(timespec="seconds"), "danlu": __version__}
    _write_json(out / ".verified.json", stamps)
    _write_json(out / "meta.json", meta)
    (out / "progress.json").unlink(missing_ok=True)
    return meta


# ---------------------------------------------------------------- open


def store_source(root: Union[str, Path, None]) -> Optional[dict[str, Any]]:
    """What a store was made from (meta.json `source`: kind, folder, and for a face store `face`, how faces were
    cut), without checking its shards; None where `root` is not a finished store."""
    if root is None:
        return None
    try:
        meta = json.loads((Path(root) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    source = meta.get("source") if isinstance(meta, dict) else None
    return dict(source) if isinstance(source, dict) else None


def open_store(path: Union[str, Path], key: str = "data.root") -> dict[str, Any]:
    """Check a store and map its shards: {'meta': ..., 'classes': [...], 'splits': {name: (ShardedImages, labels)}}.
    A missing, truncated or altered shard raises DanluError naming the file."""
    root = Path(path).expanduser() if path is not None else None
    if root is None:
        raise DanluError(f"{key}: not set; expected a store folder made by `danlu prepare SRC -o STORE`")
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        if (root / "progress.json").is_file():
            raise DanluError(f"{key}={root}: an unfinished store (prepare was interrupted); run the same "
                             f"`danlu prepare` command again to finish it")
        raise DanluError(f"{key}={root}: not a store (no meta.json); expected a folder made by "
                         f"`danlu prepare SRC -o {root}`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DanluError(f"{meta_path}: unreadable ({e}); prepare the store again") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DanluError(f"{meta_path}: format {meta.get('format')} v{meta.get('version')}; expected {FORMAT} "
                         f"v{VERSION}")
    try:
        stamps = json.loads((root / ".verified.json").read_text())
    except (OSError, ValueError):
        stamps = {}
    fresh = dict(stamps)
    shape = tuple(meta["shape"])
    splits = {}
    for name, sp in meta["splits"].items():
        shards = []
        for sh in sp["shards"]:
            p = root / sh["file"]
            _verify(p, sh["bytes"], sh["sha256"], stamps, fresh)
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            if arr.dtype != np.uint8 or tuple(arr.shape) != (sh["count"], *shape):
                raise DanluError(f"{p}: holds {arr.dtype} {tuple(arr.shape)}; expected uint8 "
                                 f"{(sh['count'], *shape)} (the store is damaged: prepare it again)")
            shards.append(arr)
        lab = root / sp["labels"]["file"]
        if not lab.is_file() or sha256(lab) != sp["labels"]["sha256"]:
            raise DanluError(f"{lab}: missing or altered (SHA-256 differs from meta.json); prepare the store again")
        labels = np.load(lab, allow_pickle=False)
        if len(labels) != sp["count"] or (len(labels) and (labels.min() < 0 or labels.max() >= len(meta["classes"]))):
            raise DanluError(f"{lab}: {len(labels)} labels in 0..{len(meta['classes']) - 1} expected, for "
                             f"{sp['count']} images")
        splits[name] = (ShardedImages(shards), torch.from_numpy(labels.astype(np.int64)))
    if fresh != stamps:
        try:
            _write_json(root / ".verified.json", fresh)
        except (OSError, DanluError):  # write_bytes turns OSError into DanluError
            pass  # a read-only store is verified again next time
    return {"meta": meta, "classes": list(meta["classes"]), "splits": splits}


def _verify(p: Path, size: int, sha: str, stamps: dict[str, Any], fresh: dict[str, Any]) -> None:
    if not p.is_file():
        raise DanluError(f"{p}: shard missing from the store; prepare the store again")
    actual = p.stat().st_size
    if actual != size:
        raise DanluError(f"{p}: truncated or altered shard ({actual} bytes, expected {size}); prepare the store "
                         f"again")
    if stamps.get(p.name) == _stamp(p) + [sha]:
        return
    got = sha256(p)
    if got != sha:
        raise DanluError(f"{p}: altered shard (SHA-256 {got[:16]}..., expected {sha[:16]}...); prepare the store "
                         f"again")
    fresh[p.name] = _stamp(p) + [sha]


def load_store(root: Union[str, Path, None], *, val_fraction: float = 0.2, split_seed: int = 0,
               split: str = "images"):
    """(train, test) ImageSets from a store; without a test split, a seeded stratified split by `val_fraction`.
    `split="identities"`: every image of the store, with `val_fraction` of the classes held back (identity_split)."""
    from danlu.data.imageset import ImageSet, identity_split, stratified_split

    store = open_store(root)
    classes = store["classes"]
    x, y = store["splits"]["train"]
    if split == "identities":
        parts = list(store["splits"].values())  # all splits' shards, one view
        pooled = ShardedImages([sh for images, _ in parts for sh in images._shards])
        return identity_split(ImageSet(pooled, torch.cat([lab for _, lab in parts]), classes),  # type: ignore
                              val_fraction, split_seed)
    train = ImageSet(x, y, classes)  # type: ignore[arg-type]
    if "test" in store["splits"]:
        tx, ty = store["splits"]["test"]
        return train, ImageSet(tx, ty, classes)  # type: ignore[arg-type]
    keep, held = stratified_split(train.labels, val_fraction, split_seed)
    return train.subset(keep), train.subset(held)

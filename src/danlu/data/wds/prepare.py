"""Writing WebDataset shards (`prepare_shards`; the CLI's `danlu prepare` in its wds format) and looking into any
(`inspect_shards`; `danlu data inspect`).

    prepare_shards("photos", "shards", size=256, quality=90)     # photos/{train,val}/CLASS/IMAGE or photos/CLASS/IMAGE
    info = inspect_shards("shards", out_png="shards.png")         # counts, classes, shard sizes, a contact sheet

Layout written (readable by the `webdataset` library and by any tar tool):

    out/train-000000.tar ...         {key}.jpg (re-encoded at `quality` with the shorter side at most `size`, or the
                                     file's own bytes with `keep_original`), {key}.cls (the class index as text),
                                     {key}.json ({"path": the source file, "class": its class name})
    out/val-000000.tar ...           when src has val/ (or test/) folders, or a `val_list`
    out/index.json                   classes, per split the shards with their sample count, bytes and SHA-256, the
                                     per-class counts, the skipped files with their reason, and the options

Samples are written in a seeded random order (never class by class): the reader shuffles whole shards and the
samples within a shard, so a batch mixes classes only if the shards do. Shards are written by webdataset's
ShardWriter, about `shard_mb` each. `index.json` is written last: a folder without it is unfinished, and prepare
refuses to write into a folder that holds anything else.
"""
from __future__ import annotations

import io
import json
import os
import textwrap
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from danlu.data.wds.samples import read_shard
from danlu.data.wds.shards import INDEX_FORMAT, INDEX_NAME, INDEX_VERSION, find_shards, open_source
from danlu.data.wds.urls import is_url
from danlu.errors import DanluError

SHARD_PATTERN = "%s-%%06d.tar"  # train-000000.tar, val-000000.tar: `train-{000000..000127}.tar` as a pattern
KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats the reader takes as they are


def encode(path: Union[str, Path], size: Optional[int], quality: int, keep_original: bool,
           channels: int = 3) -> tuple[bytes, str]:
    """(bytes, extension) of one image for a shard: its own bytes (`keep_original`, when JPEG/PNG/WebP), else decoded
    (at a reduced JPEG scale when that covers `size`), its shorter side brought down to `size` (never up), and
    encoded as JPEG at `quality` (PNG for `keep_original` of other formats, losslessly). BadImage if unreadable."""
    from PIL import Image

    from danlu.data.decode import BadImage, to_mode

    try:
        with Image.open(path) as im:
            fmt, (W, H) = im.format, im.size
            if keep_original and fmt in KEEP:
                im.load()  # a truncated file fails here
                return Path(path).read_bytes(), KEEP[fmt]
            if size is not None and min(W, H) > size:
                s = size / min(W, H)
                target = (max(1, round(W * s)), max(1, round(H * s)))
                im.draft("L" if channels == 1 else "RGB", target)
            else:
                target = None
            im = to_mode(im, channels)
            im.load()
            if target is not None and im.size != target:
                im = im.resize(target, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            if keep_original:  # a GIF, BMP, TIFF...: lossless
                im.save(buf, format="PNG")
                return buf.getvalue(), "png"
            im.save(buf, format="JPEG", quality=quality)
            return buf.getvalue(), "jpg"
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)") from None
        msg = str(e).split("\n")[0].replace(str(path), "").strip(" '\"") or type(e).__name__
        raise BadImage(f"not a readable image ({type(e).__name__}: {msg})") from None


def prepare_shards(src: Union[str, Path], out: Union[str, Path], *, size: Optional[int] = None, quality: int = 90,
                   keep_original: bool = False, shard_mb: float = 64, channels: int = 3,
                   train_list: Optional[str] = None, val_list: Optional[str] = None, seed: int = 0,
                   workers: Optional[int] = None, quiet: bool = False) -> dict[str, Any]:
    """Write `src` (a class-folder tree, or list files with `train_list`) as WebDataset shards at `out`; returns the
    index (also written as out/index.json), plus `images_per_second` of this call."""
    from danlu.errors import require

    require("webdataset", "wds", "danlu prepare --format wds")  # one line naming `pip install 'danlu[wds]'`
    from webdataset import ShardWriter

    from danlu.data.decode import default_workers
    from danlu.data.folder import scan_folder
    from danlu.data.lists import scan_lists
    from danlu.io import write_json

    if size is not None and size < 1:
        raise DanluError(f"size={size}: expected a positive shorter side in pixels")
    if not 1 <= quality <= 100:
        raise DanluError(f"quality={quality}: expected 1..100 (JPEG quality)")
    if shard_mb <= 0:
        raise DanluError(f"shard_mb={shard_mb}: expected a positive size in MiB")
    out = Path(out)
    options = {"size": size, "quality": quality, "keep_original": keep_original, "shard_mb": shard_mb,
               "channels": channels, "seed": seed}
    files = scan_lists(train_list, val_list, str(src)) if train_list else scan_folder(src, key="src")
    if (out / INDEX_NAME).is_file():
        index = json.loads((out / INDEX_NAME).read_text())
        if index.get("options") == options and index.get("source", {}).get("root") == files.source.get("root"):
            if not quiet:
                print(f"prepare: {out} already holds these shards ({INDEX_NAME}); nothing to do")
            return index
        raise DanluError(f"out={out}: already holds shards of another source or options; expected a new folder "
                         f"(nothing is overwritten)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DanluError(f"out={out}: exists and is not empty; expected a new or empty folder (an interrupted prepare "
                         f"leaves no {INDEX_NAME}: remove the folder and run it again)")
    splits = {"train": files.train, **({"val": files.test} if files.test is not None else {})}
    skipped = list(files.skipped)
    index_splits: dict[str, Any] = {}
    t0, done = time.perf_counter(), 0
    total = sum(len(items) for items in splits.values())
    next_report = max(1, total // 10)
    workers = workers or default_workers()
    mtime = int(time.time())  # whole seconds: a float mtime costs every member a pax header, two headers to parse
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="danlu-encode") as pool:
        for split, items in splits.items():
            order = np.random.default_rng([seed, len(items)]).permutation(len(items))  # classes mixed in every shard
            out.mkdir(parents=True, exist_ok=True)
            shards: list[dict[str, Any]] = []
            per_class = [0] * len(files.classes)

            done_shards = _Finished(shards)
            writer = ShardWriter(str(out / (SHARD_PATTERN % split)), maxsize=int(shard_mb * 2**20), maxcount=10**9,
                                 verbose=0, encoder=False, mtime=mtime, post=done_shards)
            done_shards.writer = writer
            chunk = max(64, workers * 16)
            try:
                for lo in range(0, len(order), chunk):
                    batch = [items[i] for i in order[lo:lo + chunk]]
                    results = list(pool.map(lambda it: _try(encode, it.path, size, quality, keep_original,
                                                            channels), batch))
                    for it, (res, err) in zip(batch, results):
                        done += 1
                        if err is not None:
                            skipped.append(it.skipped(err))
                            continue
                        data, ext = res
                        key = f"{split}_{done:09d}"
                        writer.write({"__key__": key, ext: data, "cls": str(it.label).encode(),
                                      "json": json.dumps({"path": it.where, "class": files.classes[it.label]}).encode()})
                        per_class[it.label] += 1
                    if not quiet and done >= next_report:  # a line every 10% of the images
                        next_report = done + max(1, total // 10)
                        print(f"prepare: {done}/{total} images ({100 * done // total}%), "
                              f"{done / (time.perf_counter() - t0):.0f} images/s", flush=True)
            finally:
                writer.close()
            shards = [s for s in shards if s["count"] > 0]
            for p in out.glob(f"{split}-*.tar"):  # ShardWriter opens a shard before its first sample: drop empty ones
                if p.name not in {s['file'] for s in shards}:
                    p.unlink()
            if not shards:
                raise DanluError(f"prepare: the {split} split of {src} has no readable image")
            index_splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards, "per_class": per_class}
    seconds = time.perf_counter() - t0
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "classes": list(files.classes), "label_key": "cls",
             "by_name": False, "splits": index_splits, "skipped": skipped, "options": options,
             "source": {"kind": files.kind, **files.source}, "written_by": "danlu prepare --format wds"}
    write_json(out / INDEX_NAME, index)
    index["images_per_second"] = round(done / seconds, 1) if seconds > 0 else None
    if not quiet:
        mb = sum(s["bytes"] for sp in index_splits.values() for s in sp["shards"]) / 2**20
        print(f"prepare: {out}: " + ", ".join(f"{sp['count']} {name} images in {len(sp['shards'])} shard(s)"
                                              for name, sp in index_splits.items())
              + f", {mb:.1f} MiB" + (f", {len(skipped)} skipped (listed in {out}/{INDEX_NAME})" if skipped else "")
              + f"; {done} images in {seconds:.1f} s")
    return index


class _Finished:
    """ShardWriter's `post`: called as each shard is closed, while its writer's count is still that shard's."""

    def __init__(self, records: list[dict[str, Any]]):
        self.records, self.writer = records, None

    def __call__(self, fname: str) -> None:
        from danlu.io import sha256

        p = Path(fname)
        self.records.append({"file": p.name, "count": self.writer.count, "bytes": p.stat().st_size,
                             "sha256": sha256(p)})


def _try(fn, *args):  # noqa: ANN001, ANN202
    from danlu.data.decode import BadImage

    try:
        return fn(*args), None
    except BadImage as e:
        return None, str(e)


# ---------------------------------------------------------------- danlu data inspect


def inspect_shards(root: str, *, out_png: Optional[str] = "auto", samples: int = 16, label_key: str = "cls",
                   write_index: bool = False) -> dict[str, Any]:
    """What a shard source holds: classes, per split the samples and shards (sizes, counts), the skipped samples, and
    a contact sheet of the first `samples` images with their class and whole key (PNG): `out_png` 'auto' writes it
    beside the data (contact_sheet_path), None writes none. `write_index`: save the counts as ROOT/index.json (a
    local folder without one), so training need not scan the shards."""
    from danlu.data.decode import BadImage, decode_image

    src = open_source(root, label_key, quiet=True)
    out_png = contact_sheet_path(root) if out_png == "auto" else out_png
    info: dict[str, Any] = {"root": root, "counts_from": src.indexed, "classes": src.labels.classes, "splits": {},
                            "skipped_count": len(src.skipped), "skipped": src.skipped[:20]}
    for split, shards in src.splits.items():
        sizes = [s.bytes for s in shards if s.bytes is not None]
        counts = [s.count for s in shards]
        info["splits"][split] = {
            "samples": sum(counts), "shards": len(shards),
            "samples_per_shard": [min(counts), int(np.median(counts)), max(counts)],
            "shard_mb": [round(v / 2**20, 2) for v in (min(sizes), float(np.median(sizes)), max(sizes))] if sizes else None,
            **({"per_class": dict(zip(src.labels.classes, src.per_class[split]))} if split in src.per_class else {})}
    if write_index:
        info["index"] = _write_index(root, src)
    if out_png and samples > 0:
        shown: list[tuple[np.ndarray, str]] = []
        for shard in src.splits["train"]:
            for key, data, label in read_shard(shard.url, src.labels)[0]:
                try:
                    img = decode_image(io.BytesIO(data), (96, 96), 3, "crop")
                except BadImage as e:
                    img = np.zeros((3, 96, 96), np.uint8)
                    key = f"{key} ({str(e)[:20]})"
                # the whole key, a line per 18 characters (a column's width), so keys that differ only at the
                # start (train_000000001, val_000000001) read as themselves
                shown.append((img, "\n".join([src.labels.classes[label], *textwrap.wrap(key, 18)])))
                if len(shown) >= samples:
                    break
            if len(shown) >= samples:
                break
        _contact_sheet(shown, out_png, f"{root}: {sum(s['samples'] for s in info['splits'].values())} samples, "
                                       f"{len(src.labels.classes)} classes")
        info["contact_sheet"] = str(out_png)
    return info


def contact_sheet_path(root: str) -> Path:
    """Where `danlu data inspect` puts its contact sheet unless told: inspect.png in a local folder of shards, beside
    a local .tar (or a brace pattern's shards), and in the current folder for a URL (there is nowhere beside it)."""
    if is_url(root):
        return Path("inspect.png")
    local = Path(os.path.expanduser(root))
    if local.is_dir():
        return local / "inspect.png"
    return Path(os.path.expanduser(root.split("{", 1)[0])).parent / "inspect.png"


def _write_index(root: str, src) -> str:  # noqa: ANN001
    from danlu.io import write_json

    kind, _, index_url = find_shards(root)
    if is_url(root) or kind != "folder" or index_url is not None:
        raise DanluError(f"write_index: {root} is not a local folder of shards without {INDEX_NAME}; expected one")
    base = Path(root)
    splits = {}
    for split, shards in src.splits.items():
        name = "train" if split == "train" else "val"
        splits[name] = {"count": sum(s.count for s in shards), "per_class": src.per_class.get(split),
                        "shards": [{"file": os.path.relpath(s.url, base), "count": s.count, "bytes": s.bytes}
                                   for s in shards]}
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "classes": src.labels.classes,
             "label_key": src.labels.key, "by_name": src.labels.by_name, "splits": splits, "skipped": src.skipped,
             "written_by": "danlu data inspect --write-index"}
    write_json(base / INDEX_NAME, index)
    return str(base / INDEX_NAME)


def _contact_sheet(shown: list[tuple[np.ndarray, str]], out_png: str, title: str) -> None:
    """A grid of (C, H, W) uint8 images with their captions, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from danlu.io import atomic_write

    n = max(1, len(shown))
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, caption) in zip(axes.flat, shown):
        ax.imshow(img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0], cmap=None if img.shape[0] == 3 else "gray")
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atomic_write(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)

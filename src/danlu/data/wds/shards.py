"""Where a source's shards are and how many samples each holds: `data.root` resolved into splits of shards with their
counts and the classes; the stage webdataset calls `shardlists`.

    kind, found, index_url = find_shards("shards")          # {split: [shard url]}, or index.json's url
    src = open_source("shards")                              # Source: splits of Shard(url, count), Labels, skipped
    train, test = hold_out(src.splits["train"], 0.2, seed=0, root="shards")   # whole shards held out for testing

Where the counts come from: `index.json` beside the shards (written by danlu prepare's wds format or by inspect_shards
with write_index: classes, per-split per-shard sample counts, bytes, SHA-256), or, without one, a scan that reads
every shard once for its labels and counts (said in a one-line warning: a big set should get an index).

Splits: the index's splits, `train-*.tar` and `val-*.tar` (or `test-*`) shards, or `train/` and `val/` (or `test/`)
folders of shards. Other shards (a folder of them, one shard, a brace pattern) are all training data: a seeded
`val_fraction` of its whole shards (at least one, `split_seed`) is held out for testing, so that testing reads only the
test shards.
"""
from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from danlu.data.wds.samples import Labels, class_index, read_samples, read_shard
from danlu.data.wds.urls import is_url, join_url, read_bytes
from danlu.errors import DanluError

INDEX_NAME, INDEX_FORMAT, INDEX_VERSION = "index.json", "danlu-wds", 1
TEST_SPLITS = ("val", "test")
_PREPARED = "danlu prepare's wds format"  # what makes a folder of shards with an index, in messages


@dataclass
class Shard:
    url: str  # a path or a URL
    count: int  # valid samples
    bytes: Optional[int] = None
    sha256: Optional[str] = None


@dataclass
class Source:
    """What `data.root` points to, resolved: shards per split with their counts, the classes and how labels read."""
    root: str
    labels: Labels
    splits: dict[str, list[Shard]]  # train, and test when the source has one
    indexed: str  # 'index.json' or how many shards were scanned
    skipped: list[dict[str, Any]] = field(default_factory=list)
    per_class: dict[str, list[int]] = field(default_factory=dict)  # split -> samples per class (when known)


def _expand(pattern: str) -> list[str]:
    import braceexpand  # webdataset's dependency; only brace patterns need it

    return list(braceexpand.braceexpand(pattern))


def _shard_files(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.glob("*.tar"))]


def find_shards(root: Optional[str]) -> tuple[str, dict[str, list[str]], Optional[str]]:
    """(kind, {split: [shard url]}, the index.json url or None) for data.root: a folder (with index.json, train/ val/,
    or flat), one .tar, a brace pattern, or a URL (a folder with index.json, a .tar, a brace pattern)."""
    if not root:
        raise DanluError(f"data.root: not set; expected a folder of .tar shards ({_PREPARED}), a brace pattern such as "
                         f"shards/train-{{000000..000127}}.tar, or a URL")
    if is_url(root):
        if "{" in root or root.endswith((".tar", ".tgz", ".tar.gz")) or root.startswith("pipe:"):
            return "urls", {"train": _expand(root)}, None
        return "url-folder", {}, join_url(root, INDEX_NAME)
    if "{" in root:
        urls = _expand(os.path.expanduser(root))
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise DanluError(f"data.root={root}: {len(missing)} of {len(urls)} shards not found (first: {missing[0]}); "
                             f"expected every shard the pattern names")
        return "pattern", {"train": urls}, None
    p = Path(root).expanduser()
    if p.is_file():
        return "file", {"train": [str(p)]}, None
    if not p.is_dir():
        raise DanluError(f"data.root={root}: no such folder or file; expected a folder of .tar shards ({_PREPARED}) "
                         f"or a brace pattern of .tar files")
    if (p / INDEX_NAME).is_file():
        return "folder", {}, str(p / INDEX_NAME)
    splits = {"train": _shard_files(p / "train")} if (p / "train").is_dir() else {}
    for name in TEST_SPLITS:
        if splits and (p / name).is_dir():
            splits["test"] = _shard_files(p / name)
            break
    if not splits.get("train"):  # flat: train-*.tar and val-*.tar (or test-*), else every .tar is training data
        flat = _shard_files(p)
        named = {n: [u for u in flat if Path(u).name.startswith(n)] for n in ("train", *TEST_SPLITS)}
        test = next((named[n] for n in TEST_SPLITS if named[n]), [])
        splits = {"train": named["train"], "test": test} if named["train"] and test else {"train": flat}
    if not splits["train"]:
        raise DanluError(f"data.root={root}: no .tar shards in it{' or in train/' if (p / 'train').is_dir() else ''}; "
                         f"expected shards ({_PREPARED})")
    if "test" in splits and not splits["test"]:
        raise DanluError(f"data.root={root}: {next(n for n in TEST_SPLITS if (p / n).is_dir())}/ holds no .tar "
                         f"shards; expected test shards there (or remove it to hold out data.val_fraction of train/)")
    return "folder", splits, None


def read_index(index_url: str) -> dict[str, Any]:
    """The parsed index.json at `index_url`, checked to be a danlu shard index of this version."""
    data = read_bytes(index_url, "index")
    try:
        index = json.loads(data)
    except ValueError:
        raise DanluError(f"{index_url}: not JSON; expected the index.json of {_PREPARED}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DanluError(f"{index_url}: not a danlu shard index (format {index.get('format') if isinstance(index, dict) else None}"
                         f"); expected format {INDEX_FORMAT}")
    if index.get("version") != INDEX_VERSION:
        raise DanluError(f"{index_url}: index version {index.get('version')}; expected {INDEX_VERSION}")
    return index


def open_source(root: Optional[str], label_key: str = "cls", quiet: bool = False) -> Source:
    """The shards of data.root with their counts: from index.json, or by scanning every shard once."""
    kind, found, index_url = find_shards(root)
    if index_url is not None:
        try:
            index = read_index(index_url)
        except DanluError as e:
            if kind != "url-folder":
                raise
            raise DanluError(f"{e}; expected a URL folder with the index.json of {_PREPARED}, or a brace pattern of "
                             f"its .tar shards (https://host/train-{{000000..000127}}.tar)") from None
        return _from_index(root, index_url, index, label_key)
    return scan(root, found, label_key, quiet=quiet)


def _from_index(root: str, index_url: str, index: dict[str, Any], label_key: str) -> Source:
    base = index_url.rsplit("/", 1)[0] if is_url(index_url) else str(Path(index_url).parent)
    saved_key = index.get("label_key", "cls")
    if label_key != saved_key:
        raise DanluError(f"data.label_key={label_key}: {index_url} was written with label key '{saved_key}'; expected "
                         f"data.label_key={saved_key}")
    labels = Labels(saved_key, list(index["classes"]), bool(index.get("by_name", False)))
    splits, skipped, per_class, rescanned = {}, list(index.get("skipped", [])), {}, []
    for name, sp in index["splits"].items():
        split = "train" if name == "train" else "test"
        shards = []
        for sh in sp["shards"]:
            url = join_url(base, sh["file"])
            shard = Shard(url, int(sh["count"]), sh.get("bytes"), sh.get("sha256"))
            if not is_url(url):
                if not os.path.isfile(url):
                    raise DanluError(f"data.root={root}: shard {sh['file']} named in index.json is missing; expected "
                                     f"the folder that danlu prepare wrote, whole")
                size = os.path.getsize(url)
                if shard.bytes is not None and size != shard.bytes:  # changed since indexed: count it again
                    good, bad = read_shard(url, labels)
                    shard.count, shard.bytes = len(good), size
                    skipped += bad
                    rescanned.append(f"{sh['file']} ({size} bytes, index.json says {sh['bytes']})")
            shards.append(shard)
        splits[split] = shards
        if sp.get("per_class") is not None and not rescanned:
            per_class[split] = list(sp["per_class"])
    if rescanned:
        warnings.warn(f"data: {len(rescanned)} shard(s) differ from {index_url} ({rescanned[0]}): counted again; "
                      f"prepare again if they were damaged", stacklevel=2)
    return Source(root, labels, splits, INDEX_NAME, skipped, per_class)


def scan(root: str, found: dict[str, list[str]], label_key: str, quiet: bool = False, workers: int = 8) -> Source:
    """Read every shard once for its labels and counts (no decoding): classes are the sorted class names found in the
    training shards, or 0..max when every label is an integer."""
    names = [(split, u) for split, urls in found.items() for u in urls]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names)))) as pool:
        results = list(pool.map(lambda su: read_samples(su[1], label_key), names))
    texts = [r.label for (split, _), (raw, _) in zip(names, results) if split == "train" for r in raw
             if r.image is not None and r.label is not None]
    if not texts:
        problems = [r.reason if r.image is not None else "no image" for raw, _ in results for r in raw]
        first = problems[0] if problems else next((b for _, b in results if b), "no samples")
        raise DanluError(f"data.root={root}: no training sample has an image and a label (data.label_key="
                         f"{label_key}; first problem: {first}); expected {{key}}.jpg with {{key}}.{label_key}")
    if all(t.isdigit() for t in texts):
        labels = Labels(label_key, [str(i) for i in range(max(int(t) for t in texts) + 1)], False)
    else:
        labels = Labels(label_key, sorted(set(texts)), True)
    splits: dict[str, list[Shard]] = {}
    skipped: list[dict[str, Any]] = []
    per_class: dict[str, list[int]] = {}
    for (split, url), (raw, broken) in zip(names, results):
        n = 0
        counts = per_class.setdefault(split, [0] * len(labels.classes))
        for r in raw:
            v = class_index(r, labels)
            if isinstance(v, int):
                n += 1
                counts[v] += 1
            else:
                skipped.append({"shard": url, "key": r.key, "reason": v})
        if broken:
            skipped.append({"shard": url, "reason": broken})
        size = os.path.getsize(url) if not is_url(url) else None
        splits.setdefault(split, []).append(Shard(url, n, size))
    if not quiet:
        warnings.warn(f"data: no {INDEX_NAME} at {root}: read all {len(names)} shards once for labels and counts "
                      f"(inspect_shards with write_index, danlu data inspect, saves them)", stacklevel=2)
    return Source(root, labels, splits, f"scanned {len(names)} shards (no {INDEX_NAME})", skipped, per_class)


def hold_out(shards: list[Shard], fraction: float, seed: int, root: str) -> tuple[list[Shard], list[Shard]]:
    """(train, test) shards: a seeded `fraction` of the shards (at least one) held out for testing."""
    if len(shards) < 2:
        raise DanluError(f"data.root={root}: one training shard and no val/ shards; expected at least 2 shards to hold "
                         f"out data.val_fraction of them for testing (prepare with a smaller shard_mb, or give the "
                         f"source a val/ folder)")
    k = min(len(shards) - 1, max(1, round(len(shards) * fraction)))
    held = set(np.random.default_rng([seed, 17]).permutation(len(shards))[:k].tolist())
    return [s for i, s in enumerate(shards) if i not in held], [s for i, s in enumerate(shards) if i in held]

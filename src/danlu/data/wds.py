"""WebDataset tar shards: compressed images and labels streamed from a folder or a URL, decoded as they arrive.

    train, test = load_dataset("wds", root="shards", size=224)              # danlu prepare's output (index.json)
    train, test = load_dataset("wds", root="https://host/shards/")          # the same folder served over HTTP
    train, test = load_dataset("wds", root="data/train-{000000..000127}.tar", label_key="json:label")
    loader = make_loader(train.images, train.labels, 64, device="cuda", seed=0, rank=r, world=w)   # a ShardLoader

Reading tar files is the `webdataset` library's job (its tar iterator and sample grouping; its `gopen` opens http(s)
with curl and `pipe:` commands; s3:// gs:// ... go through fsspec where installed). A sample is `{key}.jpg` (or
.jpeg, .png, .webp) with its label in `{key}.{label_key}` (`cls` by default; `txt`; `json:FIELD` reads a field of
`{key}.json`): an integer class index or a class name. A sample without an image or a label is skipped and counted.

Where the counts come from: `index.json` beside the shards (written by `danlu prepare --format wds` or by `danlu data
inspect --write-index`: classes, per-split per-shard sample counts, bytes, SHA-256), or, without one, a scan that
reads every shard once for its labels and counts (said in a one-line warning: a big set should get an index).

Splits: the index's splits, `train-*.tar` and `val-*.tar` (or `test-*`) shards, or `train/` and `val/` (or `test/`)
folders of shards. Other shards (a folder of them, one shard, a brace pattern) are all training data: a seeded `val_fraction` of its whole shards (at least one, `split_seed`) is held
out for testing, so that testing reads only the test shards.

The order of an epoch (ShardLoader) depends on (seed, epoch) only, never on the number of processes, and each rank
reads its own shards:
  1. the shards are permuted by (seed, epoch), and each shard's samples are shuffled by (seed, epoch, shard), giving
     one sequence of all N samples (a shard's samples are read whole, as bytes, and shuffled in memory);
  2. the sequence is cut into K = `data.streams` equal streams (contiguous, N // K samples each; the last N mod K
     samples of the epoch are left out);
  3. global batch i (G = batch x processes samples, G a multiple of K) takes G / K samples from each stream, in
     stream order: rows [s G/K, (s + 1) G/K) come from stream s, samples [i G/K, (i + 1) G/K) of it;
  4. rank r of W (W divides K) takes streams [r K/W, (r + 1) K/W): its rows are the r-th contiguous B of the global
     batch (what `Augment.for_rank` expects), and it reads only the shards under its streams, a contiguous 1/W of the
     epoch's shard sequence (a shard cut by a stream boundary is read by both sides; at most W - 1 an epoch).
Batches per epoch: N // G, the same every epoch. `epoch(e, start=i)` resumes at batch i without decoding anything
before it: shards that lie wholly before batch i are not even opened.

Decoding: `decode="cpu"` for training in `data.workers` worker processes (torch's DataLoader, started at the first
epoch and kept, going on into the next epoch while this one's last batches train; each one reads the shards of, and
decodes, its own contiguous share of this rank's streams into shared-memory slots, so a batch is their parts one after
the other, the same as one thread's), else (testing, one worker, or streams that do not split) in a thread pool; a
JPEG at least twice the target is decoded at a reduced DCT scale (`decode.decode_crop`: simplejpeg, the size from the
header alone; `decode.decode_image`: Pillow's draft).
`"cuda"`: batched with `torchvision.io.decode_jpeg(..., device="cuda")` (nvJPEG; PNG/WebP and what nvJPEG refuses
fall back to the CPU); `"auto"`: cuda on a CUDA device. Shards are read ahead (two reader threads, in each decode
process) and the next batches are decoded while the step runs. `take_crop(augment)` (training
loaders; `danlu train` calls it): each image is decoded straight into augment's random resized crop, a box of the
source's own pixels drawn from (seed, epoch, position in the epoch's sequence), at the smallest JPEG scale that covers
it (nvJPEG: cropped and resized on the GPU), and mirrored there by a draw of the same stream where augment flips.
An image that does not decode is
replaced by another image of its stream's share of the batch (the same on any number of processes; where that share
holds no other good image, of this process's batch), counted, and listed in data_report.json at the end of the run.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import queue
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from danlu.data.decode import ResizedCrop
from danlu.data.loader import END, prefetched
from danlu.errors import DanluError, few

INDEX_NAME, INDEX_FORMAT, INDEX_VERSION = "index.json", "danlu-wds", 1
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEST_SPLITS = ("val", "test")
STATS_SAMPLES = 2048  # normalization statistics of a shard set come from its first samples
DECODES = ("auto", "cpu", "cuda")
_CROP_WORD = 0x52524331  # "RRC1": keeps the crop draws' random streams apart from the order's
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # scheme: http://, s3://, pipe:, file://
_FSSPEC = ("s3", "gs", "gcs", "az", "abfs", "abfss", "hdfs", "webhdfs")  # opened through fsspec


# ---------------------------------------------------------------- where shards are, how they open


def is_url(path: str) -> bool:
    return bool(_URL.match(path)) and not re.match(r"^[a-zA-Z]:[\\/]", path)  # not a Windows drive


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel if is_url(base) else str(Path(base) / rel)


def _short(url: str) -> str:
    """A shard's name in messages: the last two path parts (train/shard-000003.tar)."""
    return "/".join(url.rstrip("/").split("/")[-2:])


def open_stream(url: str, what: str = "shard"):
    """A readable binary stream of a local path, an http(s) / pipe: URL (webdataset's gopen: curl, a shell command)
    or an object-store URL (fsspec: s3://, gs://, ...). A missing file or an unknown scheme: DanluError."""
    scheme = url.split(":", 1)[0].lower() if is_url(url) else ""
    if scheme in ("", "file"):
        path = re.sub(r"^file://", "", url)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise DanluError(f"data.root: {what} {path} not found; expected a readable file") from None
        except OSError as e:
            raise DanluError(f"data.root: {what} {path}: cannot read it ({e.strerror})") from None
    if scheme in _FSSPEC:
        try:
            import fsspec
        except ImportError:
            raise DanluError(f"data.root={url}: {scheme}:// needs fsspec (pip install 'danlu[cloud]'); expected a "
                             f"folder, an http(s) URL or an installed fsspec") from None
        try:
            return fsspec.open(url, "rb").open()
        except ImportError as e:  # fsspec is there, its s3fs / gcsfs is not
            raise DanluError(f"data.root={url}: {scheme}:// needs another package ({e}); pip install "
                             f"'danlu[cloud]'") from None
        except FileNotFoundError:
            raise DanluError(f"data.root: {what} {url} not found") from None
        except Exception as e:  # noqa: BLE001 - credentials, network: the store's own words, one line
            raise DanluError(f"data.root: {what} {url}: cannot open it ({type(e).__name__}: {e})") from None
    from webdataset.gopen import gopen, gopen_schemes

    if scheme not in gopen_schemes:
        raise DanluError(f"data.root={url}: unknown scheme '{scheme}:'; expected a folder, http(s)://, pipe:, or "
                         f"with fsspec installed {', '.join(s + '://' for s in _FSSPEC[:3])}")
    try:
        return gopen(url, "rb")
    except Exception as e:  # noqa: BLE001
        raise DanluError(f"data.root: {what} {url}: cannot open it ({e})") from None


def _close(stream, url: str, what: str) -> None:
    """Close a stream; a curl or pipe: command that failed (HTTP 404: curl's exit 22) becomes a DanluError."""
    try:
        stream.close()
    except Exception as e:  # noqa: BLE001 - webdataset's Pipe raises IOError with the exit status
        status = getattr(stream, "status", None)
        hint = " (curl's exit 22: the server answered with an error such as 404)" if status == 22 else ""
        raise DanluError(f"data.root: {what} {url} could not be read: exit status {status}{hint}" if status is not None
                         else f"data.root: {what} {url} could not be read ({e})") from None


def read_bytes(url: str, what: str) -> bytes:
    """The whole content of a (small) file or URL: index.json."""
    stream = open_stream(url, what)
    try:
        data = stream.read()
    except Exception as e:  # noqa: BLE001
        _close(stream, url, what)
        raise DanluError(f"data.root: {what} {url} could not be read ({e})") from None
    _close(stream, url, what)
    return data


# ---------------------------------------------------------------- samples and labels


@dataclass
class Labels:
    """How a sample's label is read: the key (`cls`, `txt`, `json:FIELD`, or any extension) and whether the labels
    are class indices (`by_name=False`: an integer 0..len(classes)-1) or class names."""
    key: str
    classes: list[str]
    by_name: bool = False

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.classes)}

    @property
    def ext(self) -> str:
        return "json" if self.key.startswith("json:") else self.key

    def lookup(self, text: str) -> Union[int, str]:
        """The class index of a raw label, or the reason it is not one."""
        if self.by_name:
            return self._index.get(text, f"label '{text[:40]}' is not one of the classes ({few(self.classes, 3)})")
        if text.isdigit() and int(text) < len(self.classes):
            return int(text)
        return f"label '{text[:40]}' is not a class index 0..{len(self.classes) - 1}"


def raw_label(sample: dict[str, Any], key: str) -> tuple[Optional[str], str]:
    """(the label as text, '') or (None, why there is none) of a grouped sample."""
    ext = "json" if key.startswith("json:") else key
    if ext not in sample:
        return None, f"no label (.{ext})"
    try:
        text = bytes(sample[ext]).decode("utf-8").strip()
        if key.startswith("json:"):
            value: Any = json.loads(text)
            for part in key[5:].split("."):
                value = value[part] if isinstance(value, dict) else None
            if value is None or isinstance(value, (dict, list, bool, float)):
                return None, f"no label ('{key[5:]}' in .json)"
            text = str(value).strip()
    except (UnicodeDecodeError, ValueError):
        return None, f"unreadable label (.{ext} is not UTF-8 text{' or JSON' if ext == 'json' else ''})"
    return (text, "") if text else (None, f"empty label (.{ext})")


@dataclass
class _Raw:
    key: str
    image: Optional[bytes]  # None: no image in the sample
    ext: str  # the image's extension ('' without one)
    label: Optional[str]  # the label as text, None without one
    reason: str  # why there is no label ('' with one)


class _Tail:
    """A read-only stream that remembers its last 1024 bytes: a whole tar ends with two zero blocks, a tar cut at a
    member boundary does not (Python's tarfile reads both as a normal end)."""

    def __init__(self, f):  # noqa: ANN001
        self.f, self.tail = f, b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.tail = (self.tail + data[-1024:])[-1024:]
        return data

    def whole(self) -> bool:
        while self.read(1 << 16):  # what tarfile left unread after the first zero block
            pass
        return self.tail == bytes(1024)

    def __getattr__(self, name: str) -> Any:  # close(), status, ...: the wrapped stream's
        return getattr(self.f, name)


def _samples(url: str, label_key: str) -> tuple[list[_Raw], Optional[str]]:
    """Every sample of one shard in file order (webdataset's tar iterator and key grouping), and the error that ended
    the shard early (a truncated or corrupt tar), if one did."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors: list[BaseException] = []

    def stop(exn: BaseException) -> bool:  # webdataset's handler: record, end this shard
        errors.append(exn)
        return False

    stream = _Tail(open_stream(url))
    out = []
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=stop)
        for s in group_by_keys(files, handler=stop):
            ext = next((k for k in IMAGE_KEYS if k in s), "")
            text, reason = raw_label(s, label_key)
            out.append(_Raw(s["__key__"], bytes(s[ext]) if ext else None, ext, text, reason))
        whole = not errors and stream.whole()
    finally:
        _close(stream, url, "shard")
    if not errors:
        return out, None if whole else (f"shard ends early (no end-of-archive blocks: truncated); {len(out)} "
                                         f"samples read before")
    e = errors[0]
    msg = str(e.args[0] if e.args else e).split(" @ ")[0].strip() or type(e).__name__
    return out, f"shard ends early ({type(e).__name__}: {msg[:120]}); {len(out)} samples read before"


def _valid(r: _Raw, labels: Labels) -> Union[int, str]:
    """A raw sample's class index, or why it is skipped."""
    if r.image is None:
        return "no image (.jpg, .jpeg, .png or .webp)"
    if r.label is None:
        return r.reason
    return labels.lookup(r.label)


def read_shard(url: str, labels: Labels) -> tuple[list[tuple[str, bytes, int]], list[dict[str, Any]]]:
    """The valid samples of one shard in file order, (key, image bytes, class index), and the skipped ones
    ({shard, key, reason}; a shard that ends early adds one entry without a key)."""
    raw, broken = _samples(url, labels.key)
    good, skipped = [], []
    for r in raw:
        v = _valid(r, labels)
        if isinstance(v, int):
            good.append((r.key, r.image, v))
        else:
            skipped.append({"shard": url, "key": r.key, "reason": v})
    if broken:
        skipped.append({"shard": url, "reason": broken})
    return good, skipped


# ---------------------------------------------------------------- a source: its shards, splits, classes, counts


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
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _shard_files(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.glob("*.tar"))]


def find_shards(root: Optional[str]) -> tuple[str, dict[str, list[str]], Optional[str]]:
    """(kind, {split: [shard url]}, the index.json url or None) for data.root: a folder (with index.json, train/ val/,
    or flat), one .tar, a brace pattern, or a URL (a folder with index.json, a .tar, a brace pattern)."""
    if not root:
        raise DanluError("data.root: not set; expected a folder of .tar shards (danlu prepare --format wds), a brace "
                         "pattern such as shards/train-{000000..000127}.tar, or a URL")
    if is_url(root):
        if "{" in root or root.endswith((".tar", ".tgz", ".tar.gz")) or root.startswith("pipe:"):
            return "urls", {"train": _expand(root)}, None
        return "url-folder", {}, _join(root, INDEX_NAME)
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
        raise DanluError(f"data.root={root}: no such folder or file; expected a folder of .tar shards "
                         f"(danlu prepare SRC -o {root} --format wds) or a brace pattern of .tar files")
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
                         f"expected shards (danlu prepare SRC -o {root} --format wds)")
    if "test" in splits and not splits["test"]:
        raise DanluError(f"data.root={root}: {next(n for n in TEST_SPLITS if (p / n).is_dir())}/ holds no .tar "
                         f"shards; expected test shards there (or remove it to hold out data.val_fraction of train/)")
    return "folder", splits, None


def read_index(index_url: str) -> dict[str, Any]:
    data = read_bytes(index_url, "index")
    try:
        index = json.loads(data)
    except ValueError:
        raise DanluError(f"{index_url}: not JSON; expected the index.json that danlu prepare --format wds "
                         f"writes") from None
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
            raise DanluError(f"{e}; expected a URL folder with the index.json that danlu prepare --format wds writes, "
                             f"or a brace pattern of its .tar shards (https://host/train-{{000000..000127}}.tar)") from None
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
            url = _join(base, sh["file"])
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
        results = list(pool.map(lambda su: _samples(su[1], label_key), names))
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
            v = _valid(r, labels)
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
                      f"(danlu data inspect {root} --write-index saves them)", stacklevel=2)
    return Source(root, labels, splits, f"scanned {len(names)} shards (no {INDEX_NAME})", skipped, per_class)


def hold_out(shards: list[Shard], fraction: float, seed: int, root: str) -> tuple[list[Shard], list[Shard]]:
    """(train, test) shards: a seeded `fraction` of the shards (at least one) held out for testing."""
    if len(shards) < 2:
        raise DanluError(f"data.root={root}: one training shard and no val/ shards; expected at least 2 shards to hold "
                         f"out data.val_fraction of them for testing (prepare with a smaller --shard-mb, or give the "
                         f"source a val/ folder)")
    k = min(len(shards) - 1, max(1, round(len(shards) * fraction)))
    held = set(np.random.default_rng([seed, 17]).permutation(len(shards))[:k].tolist())
    return [s for i, s in enumerate(shards) if i not in held], [s for i, s in enumerate(shards) if i in held]


# ---------------------------------------------------------------- the set: what load_dataset returns


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
    `make_loader(batch_size, ...)` builds the ShardLoader that streams them."""

    dtype = torch.uint8

    def __init__(self, shards: list[Shard], labels: Labels, size: tuple[int, int], channels: int, resize: str,
                 streams: int = 8, decode: str = "auto", workers: Optional[int] = None):
        self.shards, self.labels, self.size, self.channels, self.resize = shards, labels, size, channels, resize
        self.streams, self.decode, self.workers = streams, decode, workers
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
        from danlu.data.decode import default_workers

        n = min(n, len(self))
        if self._head is not None and len(self._head) >= n:
            return self._head[:n]
        data: list[bytes] = []
        for shard in self.shards:
            data += [d for _, d, _ in read_shard(shard.url, self.labels)[0][:n - len(data)]]
            if len(data) >= n:
                break
        out = np.zeros((len(data), self.channels, *self.size), np.uint8)
        picked = [(None, None, d, 0) for d in data]
        step = max(1, math.ceil(len(data) / (4 * (self.workers or default_workers()))))
        with ThreadPoolExecutor(max_workers=self.workers or default_workers()) as pool:
            list(pool.map(lambda lo: _decode_rows(picked, out, lo, min(len(data), lo + step), self),
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
                    rank: int = 0, world: int = 1, **_: Any) -> "ShardLoader":
        return ShardLoader(self, batch_size, device=device, shuffle=shuffle, drop_last=drop_last, seed=seed,
                           rank=rank, world=world)

    def __repr__(self) -> str:
        return f"ShardImages({tuple(self.shape)}, {len(self.shards)} shards)"


def load_shards(root: Optional[str], *, size=None, channels: Optional[int] = None, resize: str = "crop",  # noqa: ANN001
                val_fraction: float = 0.2, split_seed: int = 0, label_key: str = "cls", streams: int = 8,
                decode: str = "auto", workers: Optional[int] = None) -> tuple[ShardSet, ShardSet]:
    """(train, test) ShardSets of data.root; the train set carries the report (data_report.json)."""
    from danlu.data.decode import as_size

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
        return ShardImages(shards, src.labels, hw, c, resize, streams, decode, workers)

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
        where = _short(first["shard"]) + (f" {first['key']}" if first.get("key") else "")
        warnings.warn(f"data: skipped {len(skipped)} sample(s) of the shards{when} (first: {where}: {first['reason']});"
                      f" all are listed in data_report.json in the run folder", stacklevel=3)


# ---------------------------------------------------------------- the loader


def _seeded(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) & 0xFFFFFFFF for w in words])


class ShardLoader:
    """Batches of decoded shard samples on the device, in an order that depends on (seed, epoch) only (the module
    docstring). The same interface as DeviceLoader: `len()`, `epoch(e, start=i)` -> (uint8 (B, C, H, W) on the
    device, int64 (B,)), `global_batch`, `device`.

    drop_last=True (training): K = `streams` streams, len = N // G, each rank its own streams' shards.
    drop_last=False (testing): every sample once, in the shards' own order; rank r takes the r-th contiguous share
    (N / W samples), in batches of `batch_size` (the last one short; none past the share's end)."""

    def __init__(self, images: ShardImages, batch_size: int, *, device, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, rank: int = 0, world: int = 1, prefetch: int = 3):
        from danlu.data.decode import default_workers

        self.images, self.batch_size, self.shuffle, self.drop_last = images, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world, self.prefetch = seed, rank, world, max(1, prefetch)
        self.device = torch.device(device)
        self.counts = np.array([s.count for s in images.shards], np.int64)  # (S,) valid samples per shard
        self.n = int(self.counts.sum())
        self.workers = images.workers or default_workers()
        decode = images.decode
        if decode not in DECODES:
            raise DanluError(f"data.decode={decode}: expected one of {', '.join(DECODES)}")
        if decode == "cuda" and self.device.type != "cuda":
            raise DanluError(f"data.decode=cuda: the run's device is {self.device}; expected data.decode=auto or cpu "
                             f"(nvJPEG decodes on a CUDA device)")
        self.decode = "cuda" if decode == "auto" and self.device.type == "cuda" else ("cpu" if decode == "auto"
                                                                                       else decode)
        self.skipped: dict[tuple[str, str], dict[str, Any]] = {}  # (shard, key) -> entry: images that did not decode
        self.crop: Optional[ResizedCrop] = None  # training: each image's random resized crop, done by the decoder
        K = self.streams = images.streams
        if drop_last:
            G = self.global_batch
            if K % world:
                raise DanluError(f"data.streams={K}: {world} processes do not divide it; expected data.streams a "
                                 f"multiple of the number of processes (e.g. --set data.streams={world * max(1, K // world)})")
            if G % K:
                step = K // math.gcd(K, world)  # per-process batches b with b * world a multiple of K
                below = batch_size // step * step
                near = [b for b in (below, below + step, below + 2 * step) if b >= step][:2]
                raise DanluError(f"data.batch_size={batch_size}: the global batch {G} ({batch_size} x {world} "
                                 f"process(es), x optim.accumulate where set) is not a multiple of data.streams={K}; "
                                 f"expected a per-process batch that is a multiple of {step}, e.g. "
                                 f"{near[0]} or {near[1]}")
            self.per_stream = self.n // K  # samples each stream holds in an epoch
        local = K // world if drop_last else 0  # decode processes split this rank's streams between them
        self.procs = max((d for d in range(1, min(self.workers, local) + 1) if local % d == 0), default=1)
        if self.procs < 2 or self.decode != "cpu":
            self.procs = 0  # decoded in threads of this process (testing, one worker, nvJPEG)
        self._decoders: Optional[tuple[_DecodeShare, Any]] = None  # (its dataset, the DataLoader) once started
        self._next: Optional[tuple[Iterator, tuple[int, int]]] = None  # (their running iterator, where it is)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def take_crop(self, augment) -> list[str]:  # noqa: ANN001 - an Augment
        """Training: decode each image straight into `augment`'s random resized crop, a box of the source's own
        pixels (at the smallest JPEG scale that covers it), as DALI's and FFCV's decoders do, mirrored there too
        where `augment.flip` is on, and take those ops off `augment` (its device warp keeps rotation, zoom and
        translation; flipping a batch on the trainer's CPU had cost a fifth of the shard pipeline's speed on 2 cores,
        its threads waking beside the decode processes). Returns the augmentation's ops it took over."""
        if not self.drop_last or augment.resized_crop is None:
            return []
        self.crop = ResizedCrop(augment.resized_crop, augment.ratio, flip=bool(augment.flip))
        took = ["resized_crop"] + (["flip"] if augment.flip else [])
        augment.resized_crop, augment.flip = None, False
        return took

    def __len__(self) -> int:
        """Batches per epoch (for each rank): N // G in training; in testing, enough for the largest rank's share."""
        if self.drop_last:
            return self.n // self.global_batch
        return math.ceil(math.ceil(self.n / self.world) / self.batch_size)

    def _share(self) -> tuple[int, int]:
        """Test mode: (first position, count) of this rank's contiguous share of the N samples."""
        lo, hi = self.rank * self.n // self.world, (self.rank + 1) * self.n // self.world
        return lo, hi - lo

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's sequence of all N samples: (shard index, index among the shard's valid samples) per position,
        shards permuted by (seed, epoch), each shard's samples by (seed, epoch, shard)."""
        S = len(self.counts)
        shards = _seeded(self.seed, epoch, S).permutation(S) if self.shuffle else np.arange(S)
        within = [(_seeded(self.seed, epoch, k, self.counts[k]).permutation(int(self.counts[k])) if self.shuffle
                   else np.arange(self.counts[k])) for k in shards]
        return np.repeat(shards, self.counts[shards]), (np.concatenate(within) if within else np.zeros(0, np.int64))

    def positions(self, i: int) -> np.ndarray:
        """This rank's rows of global batch i, as positions of the epoch's sequence (stream-major)."""
        if self.drop_last:
            b, K, W = self.global_batch // self.streams, self.streams, self.world
            mine = np.arange(self.rank * K // W, (self.rank + 1) * K // W)  # this rank's streams
            return (mine[:, None] * self.per_stream + i * b + np.arange(b)[None, :]).ravel()
        lo, count = self._share()
        return lo + np.arange(i * self.batch_size, min(count, (i + 1) * self.batch_size))

    def stream_of(self, positions: np.ndarray) -> np.ndarray:
        """The stream each row belongs to (bad images are replaced within their stream's share of the batch)."""
        return positions // self.per_stream if self.drop_last else np.zeros(len(positions), np.int64)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch` for this rank."""
        if self.procs:
            yield from self._epoch_in_processes(epoch, start)
            return
        decoder = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="danlu-wds-decode")
        try:
            for item in prefetched(lambda q, stop: self._produce(epoch, start, q, stop, decoder), self.prefetch,
                                   "danlu-wds"):
                yield self._finish(item)
        finally:
            decoder.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    # -- the producer thread: read shards ahead, queue each batch's decoding

    def _produce(self, epoch: int, start: int, q: queue.Queue, stop: threading.Event, decoder) -> None:  # noqa: ANN001
        def put(item) -> bool:  # noqa: ANN001
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            ahead = self.streams // self.world + 2 if self.drop_last else 2  # shards read ahead of the batch's own
            with closing(self._picked(epoch, start, self.positions, ahead)) as batches:
                for rws, picked in batches:
                    if stop.is_set() or not put(self._submit(picked, self.stream_of(rws), self._draws(epoch, rws),
                                                             decoder)):
                        return
            put(END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)

    def _picked(self, epoch: int, start: int, rows_of, ahead: int) -> Iterator[tuple[np.ndarray, list]]:  # noqa: ANN001
        """(positions, samples) of batches start, start + 1, ... of `epoch`, `rows_of(i)` the positions wanted of
        batch i: the shards they lie in are read in the order needed (two reader threads, `ahead` shards beyond the
        batch's own in flight), each dropped after the last batch that needs it."""
        n_batches = len(self)
        if start >= n_batches:
            return
        shard_at, within = self.order(epoch)
        rows = [rows_of(i) for i in range(start, n_batches)]
        need = [shard_at[r] for r in rows]  # shard of every row, per batch
        first = list(dict.fromkeys(int(k) for nd in need for k in nd))  # shards in the order they are needed
        last = {int(k): j for j, nd in enumerate(need) for k in np.unique(nd)}
        reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="danlu-wds-read")
        try:
            live: dict[int, Future] = {}
            nxt = 0
            for j, rws in enumerate(rows):
                for k in np.unique(need[j]).tolist():
                    if k not in live:
                        live[k] = reader.submit(self._read, k)
                while nxt < len(first) and len(live) < len(np.unique(need[j])) + ahead:
                    if first[nxt] not in live and last.get(first[nxt], -1) >= j:
                        live[first[nxt]] = reader.submit(self._read, first[nxt])
                    nxt += 1
                picked = [live[int(k)].result()[int(w)] for k, w in zip(need[j], within[rws])]
                for k in [k for k in live if last[k] == j]:  # no later batch needs these shards
                    del live[k]
                yield rws, picked
        finally:  # leaving early (a break, an error): the reads not started yet are dropped
            reader.shutdown(wait=True, cancel_futures=True)

    def _read(self, k: int) -> list[tuple[str, str, bytes, int]]:
        """Shard k's valid samples as (shard url, key, image bytes, label); its count must be the index's."""
        url = self.images.shards[k].url
        good, _ = read_shard(url, self.images.labels)
        if len(good) != self.counts[k]:
            raise DanluError(f"data.root: shard {url} holds {len(good)} readable samples, its index {self.counts[k]} "
                             f"(the shard changed or was damaged after it was indexed); expected the shards as "
                             f"indexed: prepare again, or delete index.json to count them anew")
        return [(url, key, data, label) for key, data, label in good]

    def _draws(self, epoch: int, positions: np.ndarray) -> Optional[np.ndarray]:
        """(B, 5) uniforms choosing each row's crop box and whether it is mirrored (`crop` set, training only), from
        (seed, epoch, position in the epoch's sequence): the same on any number of processes, and when resumed
        mid-epoch."""
        if self.crop is None or not self.drop_last:
            return None
        return np.stack([_seeded(self.seed, epoch, int(q), _CROP_WORD).random(5) for q in positions])

    def _submit(self, picked: list, streams: np.ndarray, draws: Optional[np.ndarray], decoder) -> tuple:  # noqa: ANN001
        """Queue the decoding of one batch: (samples, streams, labels, crop draws, images buffer, futures of bad
        rows); on CUDA no buffer nor futures: the batch is decoded when it is taken."""
        B, (h, w), c = len(picked), self.images.size, self.images.channels
        labels = np.array([p[3] for p in picked], np.int64)
        if self.decode == "cuda":
            return picked, streams, labels, draws, None, []
        out = torch.empty((B, c, h, w), dtype=torch.uint8, pin_memory=self.device.type == "cuda")  # pinned: copied
        # to the device without blocking
        arr = out.numpy()
        step = max(1, math.ceil(B / (self.workers * 2)))
        futures = [decoder.submit(_decode_rows, picked, arr, lo, min(B, lo + step), self.images, self.crop, draws)
                   for lo in range(0, B, step)]
        return picked, streams, labels, draws, out, futures

    # -- decode processes: each one reads and decodes the rows of its own streams of every batch

    def _epoch_in_processes(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches decoded by `procs` worker processes (torch's DataLoader: started at the first epoch and kept,
        their parts handed over in shared memory, in turn), process j taking the j-th contiguous share of this rank's
        streams: their rows of each batch are contiguous too, so a batch is its parts one after the other. The
        processes go on into the next epoch without waiting: an epoch taken whole leaves them decoding the next one's
        first batches, which `epoch(e + 1)` then takes; any other start (a resume, an epoch left early) restarts them
        there."""
        from torch.utils.data import DataLoader

        W = self.procs
        if self._decoders is None:  # started at the first epoch, kept for the next ones
            share = _DecodeShare(self)
            self._decoders = share, DataLoader(share, batch_size=None, num_workers=W, prefetch_factor=self.prefetch,
                                               pin_memory=self.device.type == "cuda", persistent_workers=True)
        share, decoders = self._decoders
        if self._next is None or self._next[1] != (epoch, start):
            self._next = None  # (the DataLoader's reset drops what the processes decoded ahead)
            share.at[0], share.at[1] = epoch, start  # read by each process as it starts there
            it = iter(decoders)
        else:
            it = self._next[0]
        self._next = None  # until this epoch is taken whole
        held: list = []  # the last parts' shared memory, kept mapped: a slot sent again maps no new pages (CUDA:
        # the DataLoader's pinned copies, nothing to keep)
        for _ in range(start, len(self)):
            parts = [next(it) for _ in range(W)]
            for part in parts:
                if isinstance(part, _Failed):
                    part.throw()
            if self.device.type != "cuda":
                held = [p[0] for p in parts] + held[:W * (self.prefetch + 2)]
            x = (torch.from_numpy(np.concatenate([p[0].numpy() for p in parts])) if self.device.type == "cpu"
                 else torch.cat([p[0].to(self.device, non_blocking=p[0].is_pinned()) for p in parts]))  # numpy:
            # one thread's copy, no intra-op team to wake and spin beside the decode processes; a slot (unpinned) is
            # copied before the next part is asked for
            labels, streams = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
            bad = {i + k * len(parts[0][1]): b for k, p in enumerate(parts) for i, b in p[3].items()}
            if bad:
                self._mend(x, labels, streams, bad)
            yield x, torch.from_numpy(labels).to(self.device, non_blocking=True)
        self._next = it, (epoch + 1, 0)

    # -- the consumer: wait for the batch, mend bad rows, hand it to the device

    def _finish(self, item: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        picked, streams, labels, draws, out, futures = item
        if self.decode == "cuda":
            x, bad = _decode_cuda(picked, self.images, self.device, self.crop, draws)
        else:
            bad = {i: r for f in futures for i, r in f.result().items()}
            x = out
        bad = {i: (picked[i][0], picked[i][1], reason) for i, reason in bad.items()}
        if bad:
            self._mend(x, labels, streams, bad)
        y = torch.from_numpy(labels)
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        return x, y.to(self.device, non_blocking=True)

    def _mend(self, x: torch.Tensor, labels: np.ndarray, streams: np.ndarray,
              bad: dict[int, tuple[str, str, str]]) -> None:
        """Replace each row that did not decode ({row: (shard, key, reason)}) by the next good row of its stream's
        share of the batch (cyclically; the same on any number of processes), else by the next good row of this
        rank's batch, else by zeros."""
        for i, (url, key, reason) in sorted(bad.items()):
            entry = {"shard": url, "key": key, "reason": reason}
            if not self.skipped:
                warnings.warn(f"data: {_short(url)} {key}: {reason}; replaced by another image of its batch (every "
                              f"such sample is listed in data_report.json in the run folder)", stacklevel=4)
            self.skipped.setdefault((url, key), entry)
            good = []
            for rows in (np.flatnonzero(streams == streams[i]), np.arange(len(streams))):
                good = good or [j for j in np.roll(rows, -int(np.searchsorted(rows, i))) if j not in bad]
            if good:
                x[i] = x[good[0]]
                labels[i] = labels[good[0]]
            else:
                x[i] = 0


class _Failed:
    """An error in a decode process, handed to the training process to raise there as itself (a DanluError keeps
    its one line), rather than as the DataLoader's multi-line report of a worker's traceback."""

    def __init__(self, e: BaseException):
        self.error = e if isinstance(e, DanluError) else \
            RuntimeError(f"shard decoding process: {type(e).__name__}: {e}")

    def throw(self) -> None:
        raise self.error


class _DecodeShare(torch.utils.data.IterableDataset):
    """What decode process j of a ShardLoader's `procs` yields for an epoch: for each batch from `start`, the rows of
    its streams (the j-th contiguous share of this rank's), read and decoded here, as (uint8 (b, C, H, W), labels,
    streams, {row: (shard, key, reason)} of rows that did not decode)."""

    def __init__(self, loader: ShardLoader):
        self.loader = copy.copy(loader)  # without the processes: no reference cycle keeps them alive, and a process
        self.loader._decoders = None  # forked later (another loader's) inherits no DataLoader of this one's to collect
        self.at = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, start), set by the training process

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        j, W = (info.id, info.num_workers) if info is not None else (0, 1)
        L, (epoch, start) = self.loader, self.at.tolist()
        b = L.batch_size // W  # rows of a batch this process decodes
        (h, w), c = L.images.size, L.images.channels
        # Each part is decoded straight into one of a ring of shared-memory slots, sent without a copy. A slot is
        # written again prefetch + 3 parts later: by then the training process has copied it out (it holds at most
        # the `prefetch` parts it asked for ahead, and the one it is copying).
        sent = 0
        try:
            slots = [torch.empty((b, c, h, w), dtype=torch.uint8).share_memory_() for _ in range(L.prefetch + 3)] \
                if info is not None else []
            while len(L):  # epoch after epoch, until the training process stops asking (or restarts this elsewhere)
                with closing(L._picked(epoch, start, lambda i: L.positions(i)[j * b:(j + 1) * b],
                                       L.streams // L.world // W + 2)) as batches:
                    for rws, picked in batches:
                        out = slots[sent % len(slots)] if slots else torch.empty((b, c, h, w), dtype=torch.uint8)
                        sent += 1
                        bad = _decode_rows(picked, out.numpy(), 0, len(picked), L.images, L.crop,
                                           L._draws(epoch, rws))
                        yield (out, np.array([p[3] for p in picked], np.int64), L.stream_of(rws),
                               {i: (picked[i][0], picked[i][1], reason) for i, reason in bad.items()})
                if info is None:  # in this process (tests): one epoch
                    return
                epoch, start = epoch + 1, 0
        except Exception as e:  # noqa: BLE001 - raised in the training process
            yield _Failed(e)


def _decode_rows(picked: list, out: np.ndarray, lo: int, hi: int, images: ShardImages,
                 crop: Optional[ResizedCrop] = None, draws: Optional[np.ndarray] = None) -> dict[int, str]:
    """Decode rows lo..hi of a batch into `out` (CPU, Pillow), each a random resized crop where `crop` and its
    `draws` are given; {row: reason} of those that are not images."""
    from danlu.data.decode import BadImage, decode_crop, decode_image

    bad = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.")
        for i in range(lo, hi):
            try:
                if draws is not None:
                    decode_crop(picked[i][2], images.size, images.channels, crop, draws[i], out[i])
                else:
                    out[i] = decode_image(io.BytesIO(picked[i][2]), images.size, images.channels, images.resize)
            except BadImage as e:
                out[i] = 0
                bad[i] = str(e)
    return bad


def _decode_cuda(picked: list, images: ShardImages, device: torch.device, crop: Optional[ResizedCrop] = None,
                 draws: Optional[np.ndarray] = None) -> tuple[torch.Tensor, dict[int, str]]:
    """One batch decoded on the GPU: JPEGs batched through nvJPEG (torchvision.io.decode_jpeg), each resized to the
    target (shorter side + centre crop, or stretched; or the random resized crop of `crop` and its `draws`;
    antialiased) on the device; other formats, and JPEGs that nvJPEG refuses, decoded on the CPU. (B, C, H, W) uint8
    on `device`, {row: reason} of rows that are not images."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from danlu.data.decode import BadImage, decode_image

    (h, w), c = images.size, images.channels
    out = torch.empty((len(picked), c, h, w), dtype=torch.uint8, device=device)
    mode = ImageReadMode.GRAY if c == 1 else ImageReadMode.RGB
    jpeg = [i for i, p in enumerate(picked) if p[2][:3] == b"\xff\xd8\xff"]
    cpu = [i for i in range(len(picked)) if i not in set(jpeg)]
    bad: dict[int, str] = {}
    if jpeg:
        data = [torch.frombuffer(bytearray(picked[i][2]), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = decode_jpeg(data, mode=mode, device=device)  # list of (C, H0, W0) uint8 on the device
        except RuntimeError:  # one bad JPEG fails the batch: decode them one by one to find it
            decoded = []
            for i, d in zip(jpeg, data):
                try:
                    decoded.append(decode_jpeg(d, mode=mode, device=device))
                except RuntimeError:
                    decoded.append(None)
                    cpu.append(i)
        for i, im in zip(jpeg, decoded):
            if im is not None:
                box = None if draws is None else crop.box(im.shape[-1], im.shape[-2], draws[i])
                r = _resize_on_device(im, h, w, images.resize, box)
                out[i] = r.flip(-1) if box is not None and crop.mirrored(draws[i]) else r
    for i in sorted(cpu):
        try:
            out[i] = torch.from_numpy(decode_image(io.BytesIO(picked[i][2]), (h, w), c, images.resize,
                                                   crop=None if draws is None else (crop, draws[i]))).to(device)
        except BadImage as e:
            out[i] = 0
            bad[i] = str(e)
    return out, bad


def _resize_on_device(im: torch.Tensor, h: int, w: int, resize: str,
                      box: Optional[tuple[int, int, int, int]] = None) -> torch.Tensor:
    """(C, H0, W0) uint8 -> (C, h, w) uint8: decode.decode_image's geometry (crop: cover then centre; or the crop box
    (left, top, width, height) resized to (h, w)), on the device."""
    from danlu.data.decode import cover_size

    if box is not None:
        x = im[None, :, box[1]:box[1] + box[3], box[0]:box[0] + box[2]].float()
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        return x.round_().clamp_(0, 255).to(torch.uint8)
    H0, W0 = im.shape[-2:]
    rw, rh = cover_size(W0, H0, h, w) if resize == "crop" else (w, h)
    x = torch.nn.functional.interpolate(im[None].float(), size=(rh, rw), mode="bilinear", antialias=True,
                                        align_corners=False)[0]
    top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
    return x[:, top:top + h, left:left + w].round_().clamp_(0, 255).to(torch.uint8)

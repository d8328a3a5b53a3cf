"""Named datasets: MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100, fetched from their official hosts and cached as uint8.

    train, test = load_catalog("mnist")        # downloads once (or uses files you placed), then reads the cache
    fetch("cifar10")                           # `danlu data get cifar10`: download and verify ahead of time
    for row in catalog_status(): print(row)    # `danlu data list`

Files live in `$DANLU_DATA/<name>/` (default `~/.cache/danlu/<name>/`). URLs, mirrors and MD5s are torchvision's
(torchvision/datasets/mnist.py and cifar.py). A placed file is accepted when its MD5 is the published one or, for a
gzip file, when its decompressed content has the published content MD5 (a recompressed copy of the same bytes).
Native formats are parsed here: IDX for MNIST / Fashion-MNIST, and CIFAR's pickled batches through an unpickler that
only rebuilds numpy arrays (no code from the file ever runs). The parsed arrays are cached beside the files as .npy
(images (N, C, H, W) uint8, labels (N,) int64) so the next load is a plain read.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from danlu.data.download import NetworkError, download, extract_tar, file_md5
from danlu.errors import DanluError, nearest

Arrays = dict[str, Any]  # train_images, train_labels, test_images, test_labels (numpy), classes (list[str])
CACHE_FORMAT = 1


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name as published (also its name in the folder)
    md5: str  # published MD5 of the file as downloaded
    content_md5: Optional[str] = None  # MD5 of the decompressed content, where known
    size: Optional[int] = None  # bytes, for `danlu data list`


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    about: str
    mirrors: tuple[str, ...]  # base URLs: file URL = mirror + file name, tried in order
    files: tuple[RemoteFile, ...]
    parse: Callable[[Path, tuple[RemoteFile, ...]], Arrays] = field(repr=False)
    shape: tuple[int, int, int] = (1, 28, 28)
    counts: tuple[int, int] = (60000, 10000)
    num_classes: int = 10


# ---------------------------------------------------------------- native formats

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gz(path: Path) -> bytes:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DanluError(f"{path}: damaged gzip file ({e})") from None
    return raw


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzip or not) as a numpy array: magic 0 0 TYPE NDIM, NDIM big-endian
    int32 sizes, then the data."""
    raw = _read_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DanluError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; expected 0000TTNN)")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4) if len(raw) >= 4 + 4 * ndim else None
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    if dims is None or len(raw) != 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize:
        raise DanluError(f"{path}: IDX file of {len(raw)} bytes does not match its header (sizes "
                         f"{None if dims is None else dims.tolist()}); the file is truncated or damaged")
    data = np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims.tolist())
    return data.astype(dtype.newbyteorder("="))  # a writable, native-order copy


def _idx_path(folder: Path, f: RemoteFile) -> Path:
    """The verified copy of `f` in folder: the file as published, or its decompressed twin."""
    p = folder / f.name
    return p if p.exists() else folder / f.name.removesuffix(".gz")


def _parse_idx_set(classes: list[str]) -> Callable[[Path, tuple[RemoteFile, ...]], Arrays]:
    def parse(folder: Path, files: tuple[RemoteFile, ...]) -> Arrays:
        train_x, train_y, test_x, test_y = (read_idx(_idx_path(folder, f)) for f in files)
        out: Arrays = {"classes": list(classes)}
        for split, x, y, f in (("train", train_x, train_y, files[0]), ("test", test_x, test_y, files[2])):
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
                raise DanluError(f"{folder / f.name}: expected uint8 images (N, H, W) and N labels, got "
                                 f"{x.dtype} {x.shape} and {y.shape}")
            out[f"{split}_images"] = np.ascontiguousarray(x[:, None])  # (N, 1, H, W)
            out[f"{split}_labels"] = y.astype(np.int64)
        return out

    return parse


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's ndarray rebuilder (numpy.core / numpy._core .multiarray)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global (os.system, builtins.eval, ...) is refused,
    so a tampered CIFAR batch cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
                ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
                ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                ("_codecs", "encode"): __import__("codecs").encode}  # protocol-2 bytes from Python 3

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global '{module}.{name}' (only numpy arrays are allowed)") from None


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """One CIFAR python batch (a pickled dict) with str keys, read without executing anything from the file."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DanluError(f"{path}: not a CIFAR batch ({e})") from None
    if not isinstance(d, dict):
        raise DanluError(f"{path}: not a CIFAR batch (a {type(d).__name__}, expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _names(values: Any) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def _parse_cifar(base: str, train: list[str], test: list[str], meta: str, names_key: str,
                 labels_key: str) -> Callable[[Path, tuple[RemoteFile, ...]], Arrays]:
    def read(root: Path, member: str) -> tuple[np.ndarray, np.ndarray]:
        path = root / base / member
        if not path.is_file():
            raise DanluError(f"{path}: missing from the archive; expected {base}/{member}")
        d = read_cifar_batch(path)
        x, y = d.get("data"), d.get(labels_key)
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 \
                or y is None or len(y) != len(x):
            raise DanluError(f"{path}: expected 'data' uint8 (N, 3072) and N '{labels_key}', got "
                             f"{type(x).__name__} {getattr(x, 'shape', '')}")
        return x.reshape(-1, 3, 32, 32), np.asarray(y, dtype=np.int64)  # rows are R(1024) G(1024) B(1024): CHW

    def parse(folder: Path, files: tuple[RemoteFile, ...]) -> Arrays:
        with tempfile.TemporaryDirectory(prefix=".extract-", dir=_writable(folder)) as tmp:
            root = extract_tar(folder / files[0].name, Path(tmp) / "x")
            classes = _names(read_cifar_batch(root / base / meta).get(names_key) or [])
            out: Arrays = {"classes": classes}
            for split, members in (("train", train), ("test", test)):
                xs, ys = zip(*(read(root, m) for m in members))
                out[f"{split}_images"], out[f"{split}_labels"] = np.concatenate(xs), np.concatenate(ys)
            return out

    return parse


def _writable(folder: Path) -> Optional[str]:
    """`folder` when we may write there, else None. A folder whose mode says read-only (a shared data folder) counts
    as read-only even for root, who could write anyway."""
    try:
        ok = os.access(folder, os.W_OK) and folder.stat().st_mode & 0o222
    except OSError:
        return None
    return str(folder) if ok else None


# ---------------------------------------------------------------- the catalog

_MNIST_CLASSES = [str(d) for d in range(10)]
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"]

ENTRIES: dict[str, CatalogEntry] = {
    "mnist": CatalogEntry(
        "mnist", "LeCun & Cortes' handwritten digits",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        (RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "6bbc9ace898e44ae57da46a324031adb", 9912422),
         RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432",
                    "a25bea736e30d166cdddb491f175f624", 28881),
         RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3",
                    "2646ac647ad5339dbf082846283269ea", 1648877),
         RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c",
                    "27ae3e4e09519cfbb04c329615203637", 4542)),
        _parse_idx_set(_MNIST_CLASSES)),
    "fashion-mnist": CatalogEntry(
        "fashion-mnist", "Zalando's clothing images, MNIST's format",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        (RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", None, 26421880),
         RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", None, 29515),
         RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", None, 4422102),
         RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", None, 5148)),
        _parse_idx_set(_FASHION_CLASSES)),
    "cifar10": CatalogEntry(
        "cifar10", "Krizhevsky's 32x32 colour images, 10 classes",
        ("https://www.cs.toronto.edu/~kriz/",),
        (RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", None, 170498071),),
        _parse_cifar("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                     "batches.meta", "label_names", "labels"),
        shape=(3, 32, 32), counts=(50000, 10000)),
    "cifar100": CatalogEntry(
        "cifar100", "Krizhevsky's 32x32 colour images, 100 fine classes",
        ("https://www.cs.toronto.edu/~kriz/",),
        (RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", None, 169001437),),
        _parse_cifar("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
        shape=(3, 32, 32), counts=(50000, 10000), num_classes=100),
}
CATALOG = tuple(ENTRIES)  # the sets downloaded from their official hosts
# the sets that need no download (danlu.data.datasets builds them)
BUILTIN = {"mnist5k": "5,000 real MNIST digits shipped with danlu (4,000 / 1,000)",
           "synthetic": "seeded noise images carrying a learnable class signal"}


def data_home() -> Path:
    """$DANLU_DATA, or ~/.cache/danlu."""
    return Path(os.environ.get("DANLU_DATA") or Path.home() / ".cache" / "danlu").expanduser()


def entry(name: str) -> CatalogEntry:
    if name not in ENTRIES:
        raise DanluError(f"data.name: '{name}' is not a downloadable set; expected one of {', '.join(ENTRIES)}"
                         f"{nearest(name, ENTRIES)}")
    return ENTRIES[name]


def _md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check(path: Path, f: RemoteFile) -> Optional[str]:
    """None when `path` holds `f` (published MD5, or published content MD5 once decompressed); else its MD5."""
    got = file_md5(path)
    if got == f.md5:
        return None
    if f.content_md5 and _md5_bytes(_read_maybe_gz(path) if path.suffix == ".gz" else path.read_bytes()) \
            == f.content_md5:
        return None
    return got


def _local(folder: Path, f: RemoteFile) -> tuple[bool, Optional[str]]:
    """(verified, md5 of a bad copy) for `f` in folder; the decompressed twin counts where a content MD5 is known."""
    bad = None
    candidates = [folder / f.name]
    if f.content_md5 and f.name.endswith(".gz"):
        candidates.append(folder / f.name.removesuffix(".gz"))
    for p in candidates:
        if p.is_file():
            bad = _check(p, f)
            if bad is None:
                return True, None
    return False, bad


def _placement_help(e: CatalogEntry, folder: Path, missing: list[tuple[RemoteFile, Optional[str]]]) -> str:
    files = ", ".join(f"{f.name} (md5 {f.md5}{f' or content md5 {f.content_md5}' if f.content_md5 else ''}"
                      f"{f'; the copy there has md5 {bad}' if bad else ''})" for f, bad in missing)
    return (f"place {files} in {folder} (from {e.mirrors[0]}; or set DANLU_DATA to a folder holding {e.name}/), "
            f"then run again")


def fetch(name: str, progress: bool = True) -> Path:
    """Make sure every file of `name` is in $DANLU_DATA/<name>/ and verified: download what is missing or bad.
    Offline or blocked: one DanluError naming the files to place, their checksums and the folder."""
    e = entry(name)
    folder = data_home() / name
    missing = [(f, bad) for f in e.files for ok, bad in [_local(folder, f)] if not ok]
    if not missing:
        return folder
    net_errors, other = [], []
    for f, _ in missing:
        try:
            download([m + f.name for m in e.mirrors], folder / f.name, md5=f.md5, progress=progress)
        except NetworkError as err:
            net_errors.append(str(err))
        except OSError as err:  # e.g. the folder is read-only
            other.append(f"{folder / f.name}: cannot write ({err.strerror or err})")
    if other:
        raise DanluError(f"{name}: " + "; ".join(other) + "; " + _placement_help(e, folder, missing))
    if net_errors:
        still = [(f, bad) for f, bad in missing if not (folder / f.name).is_file()]
        raise DanluError(f"{name}: cannot download ({net_errors[0]}); " + _placement_help(e, folder, still))
    return folder


def _cache_dir(name: str) -> Path:
    return data_home() / name / "danlu-arrays"


def _read_cache(name: str) -> Optional[Arrays]:
    d = _cache_dir(name)
    try:
        meta = json.loads((d / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("files") != [f.md5 for f in entry(name).files]:
            return None
        out: Arrays = {"classes": meta["classes"]}
        for k in ("train_images", "train_labels", "test_images", "test_labels"):
            out[k] = np.load(d / f"{k}.npy", allow_pickle=False)
        return out
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(name: str, arrays: Arrays) -> None:
    """Best effort (a read-only $DANLU_DATA just means parsing again next time); written whole or not at all."""
    d = _cache_dir(name)
    if _writable(d.parent) is None:
        return
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".danlu-arrays.", dir=d.parent))
        tmp.chmod(0o755)
    except OSError:
        return
    try:
        for k in ("train_images", "train_labels", "test_images", "test_labels"):
            np.save(tmp / f"{k}.npy", arrays[k], allow_pickle=False)
        meta = {"format": CACHE_FORMAT, "files": [f.md5 for f in entry(name).files], "classes": arrays["classes"],
                "train": list(arrays["train_images"].shape), "test": list(arrays["test_images"].shape)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp, d)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def load_arrays(name: str, progress: bool = True) -> Arrays:
    """The parsed set as numpy arrays (from the cache when there is one)."""
    cached = _read_cache(name)
    if cached is not None:
        return cached
    e = entry(name)
    folder = fetch(name, progress=progress)
    arrays = e.parse(folder, e.files)
    if not arrays["classes"]:
        arrays["classes"] = [str(i) for i in range(int(arrays["train_labels"].max()) + 1)]
    _write_cache(name, arrays)
    return arrays


def load_catalog(name: str, progress: bool = True):
    """(train, test) ImageSets of a named set: uint8 (N, C, H, W) images, int64 labels, class names."""
    import torch

    from danlu.data.imageset import ImageSet

    a = load_arrays(name, progress)
    sets = []
    for split in ("train", "test"):
        x, y = a[f"{split}_images"], a[f"{split}_labels"]
        if len(y) and (y.min() < 0 or y.max() >= len(a["classes"])):
            raise DanluError(f"{name}: {split} labels span {y.min()}..{y.max()}, expected 0..{len(a['classes']) - 1}")
        sets.append(ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), list(a["classes"])))
    return sets[0], sets[1]


def catalog_status() -> list[dict[str, Any]]:
    """One row per known set: name, about, images, shape, classes, download size, state, folder."""
    rows = []
    for name, about in BUILTIN.items():
        rows.append({"name": name, "about": about, "state": "built in", "folder": None})
    for name, e in ENTRIES.items():
        folder = data_home() / name
        if (_cache_dir(name) / "meta.json").is_file():
            state = "ready"
        elif folder.is_dir() and all((folder / f.name).is_file() or (folder / f.name.removesuffix(".gz")).is_file()
                                     for f in e.files):
            state = "files present (not yet verified)"
        elif folder.is_dir() and any(folder.iterdir()):
            state = "partly downloaded"
        else:
            state = "not downloaded"
        size = sum(f.size or 0 for f in e.files)
        rows.append({"name": name, "about": e.about, "train": e.counts[0], "test": e.counts[1],
                     "shape": "x".join(map(str, e.shape)), "classes": e.num_classes,
                     "download_mb": round(size / 2**20, 1), "state": state, "folder": str(folder)})
    return rows

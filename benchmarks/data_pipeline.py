#!/usr/bin/env python
"""Data pipeline: images per second delivered to the training step, augmented (random crop + flip) and normalized.

    python benchmarks/data_pipeline.py                        # 2,000 JPEGs 256x256, 10 classes, batch 64 (~3 min)
    python benchmarks/data_pipeline.py --images 500 --epochs 2 --json out.json

On a generated folder of JPEGs (smooth random shapes, quality 90), in one process and one run:

  (a) danlu from a prepared store: `danlu prepare` at --size (timed: prepare images/s, store size vs the folder's),
      then epochs from the store, resident (`data.device_cache: true`) and streamed (`false`: memory-mapped shards
      through the prefetch thread), each batch through danlu's Augment (pad-and-crop 16 px + flip, normalize).
  (b) danlu straight from the folder: `load_dataset("folder")` (parallel decode on every core) then the same epochs;
      reported for the first epoch with the decode included, and for the epochs after it.
  (c) torchvision: `ImageFolder` + `transforms.v2` (decode, Resize(size), RandomCrop(size, padding=16),
      RandomHorizontalFlip, ToDtype, Normalize) + `DataLoader(num_workers=2, pin_memory=True, persistent_workers=True)`.

Every figure is the median over --repeats of the images per second over --epochs epochs after a warm-up epoch
(for (c): the workers are started and have run one epoch). Nothing trains: the step is the batch arriving on the
device as normalized float32, which is what a training step consumes (the `*_uint8_only` rows: the loader's uint8
batches without the augmentation, to show where the time goes). The target is (a) >= 5x (c); a miss is
reported, not an error.

Compressed shards, in the same run, at --size with random resized crop + flip:
  (d) danlu from WebDataset shards: `danlu prepare --format wds --keep-original` (the same JPEG bytes, in tar shards),
      then epochs of the streamed ShardLoader with Augment(resized_crop=(0.08, 1), flip, normalize), as `danlu
      train` runs them: every image decoded again each epoch, in `data.workers` decode processes (kept across
      epochs, going on into the next), straight into its random resized crop (the box of the source, decoded by
      simplejpeg at the smallest JPEG scale that still covers --size, and mirrored there: ShardLoader.take_crop),
      then normalized on the device; `d_wds_uint8_only`: the loader alone, decoding whole images (shorter
      side to --size, centre crop). On CUDA also `d_wds_nvjpeg` (data.decode=cuda: nvJPEG, the crop on the GPU).
  (e) torchvision: `ImageFolder` + `transforms.v2` (decode, RandomResizedCrop(size), RandomHorizontalFlip, ToDtype,
      Normalize) + `DataLoader(num_workers=2, ...)`, the same transforms on the CPU workers.
Target: (d) >= 2x (e) on 2 CPU cores; on a GPU, d_wds_nvjpeg >= 3,000 images/s at 224 px. The share of the CPU used by other processes during each measurement is printed beside it:
on a shared machine, figures measured beside someone else's job are not to be trusted.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import danlu
from danlu.data.augment import Augment
from danlu.data.datasets import channel_stats, load_dataset
from danlu.data.loader import make_loader
from danlu.data.datasets import prepare
from danlu.data.wds.prepare import prepare_shards
from danlu.engine.speed import reuse_freed_memory

TARGET = 5.0
TARGET_WDS = 2.0
PAD = 16


def make_folder(root: Path, n: int, size: int, classes: int, seed: int = 0) -> Path:
    """n JPEGs (size x size, quality 90) in `classes` class folders: smooth colour fields with a few ellipses."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = i % classes
        f = rng.uniform(1, 4, 3)
        img = np.stack([127 + 100 * np.sin(2 * np.pi * (f[k] * x + (c + k) * y) + k) for k in range(3)], -1)
        im = Image.fromarray(img.astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = rng.integers(0, size - 40, 2)
            d.ellipse([x0, y0, x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)],
                      fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        im.save(root / f"class_{c}" / f"{i:05d}.jpg", quality=90)
    return root


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class OtherLoad:
    """Share of the machine's CPU used by other processes while the block ran (/proc/stat busy time minus this
    process's and its children's CPU time, over cores x wall time)."""

    def __enter__(self):
        self.share, self._a = float("nan"), self._sample()
        return self

    def __exit__(self, *exc):
        b = self._sample()
        if self._a and b and b[2] > self._a[2]:
            self.share = max(0.0, ((b[0] - self._a[0]) - (b[1] - self._a[1])) / ((os.cpu_count() or 1) *
                                                                                 (b[2] - self._a[2])))

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system + _live_children_cpu()
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), own, time.monotonic()


def _live_children_cpu() -> float:
    """CPU seconds of this process's running children (DataLoader workers), which os.times() does not count."""
    total, me = 0.0, os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()  # after 'pid (comm)': state ppid ...
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def danlu_epochs(images, labels, batch: int, device: torch.device, cache, augment: Augment | None, epochs: int,
                 warmup: int = 1) -> float:
    """Images per second over `epochs` epochs (after `warmup`), uint8 batches -> augmented float32 on the device
    (augment None: the uint8 batches only, to show what the loader alone delivers)."""
    loader = make_loader(images, labels, batch, device=device, cache=cache, seed=0)
    if augment is not None and hasattr(loader, "take_crop"):  # shards: the decoder does the random resized crop, as
        augment = copy.copy(augment)  # in `danlu train`
        loader.take_crop(augment)
    g = torch.Generator(device).manual_seed(1)
    n, t0 = 0, None
    for e in range(warmup + epochs):
        if e == warmup:
            sync(device)
            t0 = time.perf_counter()
        for x, y in loader.epoch(e):
            if augment is not None:
                x = augment(x, g, train=True)  # (B, C, H, W) float32, normalized
            n += len(y) if e >= warmup else 0
    sync(device)
    return n / (time.perf_counter() - t0)


def torchvision_loader(root: Path, size: int, batch: int, mean, std, device: torch.device):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                     v2.RandomCrop(size, padding=PAD), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32,
                                                                                           scale=True),
                     v2.Normalize(mean, std)])
    ds = ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=2,
                                       pin_memory=device.type == "cuda", persistent_workers=True)


def torchvision_rrc_loader(root: Path, size: int, batch: int, mean, std, device: torch.device):
    """(e): ImageFolder + RandomResizedCrop + flip on the CPU workers, as the wds rows do on the device."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                     v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    ds = ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=2,
                                       pin_memory=device.type == "cuda", persistent_workers=True)


def torchvision_epochs(loader, device: torch.device, epochs: int, warmup: int = 1) -> float:
    n, t0 = 0, None
    for e in range(warmup + epochs):
        if e == warmup:
            sync(device)
            t0 = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            n += len(y) if e >= warmup else 0
    sync(device)
    return n / (time.perf_counter() - t0)


def main() -> int:
    reuse_freed_memory()  # as every danlu process does; the side it is compared with runs in this process too
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--jpeg-size", type=int, default=256)
    p.add_argument("--size", type=int, default=224, help="training size (prepare --size, Resize for torchvision)")
    p.add_argument("--batch", type=int, default=64, help="a multiple of 8 (data.streams) for the wds rows")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement (after one warm-up epoch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", help="keep the generated folder and store here (default: a temporary folder)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    device = torch.device(a.device)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="danlu-bench-data-"))
    folder, store, shards = work / "jpegs", work / "store", work / "shards"
    try:
        if not folder.is_dir():
            print(f"generating {a.images} JPEGs {a.jpeg_size}x{a.jpeg_size} in {folder} ...", flush=True)
            make_folder(folder, a.images, a.jpeg_size, a.classes)
        shutil.rmtree(store, ignore_errors=True)
        with OtherLoad() as load:
            t0 = time.perf_counter()
            prepare(folder, store, size=a.size, quiet=True)
            prep_seconds = time.perf_counter() - t0
        prep = {"images_per_second": round(a.images / prep_seconds, 1), "seconds": round(prep_seconds, 2),
                "store_mb": round(folder_bytes(store) / 2**20, 1), "jpeg_mb": round(folder_bytes(folder) / 2**20, 1),
                "other_load": round(load.share, 3)}
        print(f"prepare: {prep['images_per_second']} images/s; store {prep['store_mb']} MiB vs JPEG folder "
              f"{prep['jpeg_mb']} MiB ({prep['store_mb'] / prep['jpeg_mb']:.1f}x); other load {load.share:.0%}",
              flush=True)

        shutil.rmtree(shards, ignore_errors=True)
        with OtherLoad() as load:
            t0 = time.perf_counter()
            prepare_shards(folder, shards, keep_original=True, shard_mb=max(0.05, folder_bytes(folder) / 2**20 / 16),
                           quiet=True)  # about 16 shards: one is held out for testing
            wds_seconds = time.perf_counter() - t0
        prep["wds"] = {"images_per_second": round(a.images / wds_seconds, 1), "shards_mb": round(folder_bytes(shards) / 2**20, 1),
                       "other_load": round(load.share, 3)}
        print(f"prepare --format wds: {prep['wds']['images_per_second']} images/s; shards {prep['wds']['shards_mb']} MiB",
              flush=True)

        train, _ = load_dataset("store", root=str(store), val_fraction=0.01)  # 99% of it: the epochs below
        mean, std = channel_stats(train.images)
        augment = Augment(flip=True, crop=PAD, mean=mean, std=std)
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in (
            "a_store_resident", "a_store_streamed", "b_folder_first_epoch", "b_folder_later_epochs", "c_torchvision",
            "a_resident_uint8_only", "a_streamed_uint8_only")}
        wtrain, _ = load_dataset("wds", root=str(shards), size=a.size, val_fraction=0.01)  # 1 shard held out
        rrc = Augment(flip=True, resized_crop=(0.08, 1.0), mean=mean, std=std)
        results.update({k: [] for k in ("d_wds_rrc_flip", "e_torchvision_rrc_flip", "d_wds_uint8_only",
                                        *(["d_wds_nvjpeg"] if device.type == "cuda" else []))})
        tv = torchvision_loader(folder, a.size, a.batch, mean, std, device)
        tv_rrc = torchvision_rrc_loader(folder, a.size, a.batch, mean, std, device)
        for r in range(a.repeats):
            with OtherLoad() as load:
                ips = danlu_epochs(train.images, train.labels, a.batch, device, True, augment, a.epochs)
            results["a_store_resident"].append((ips, load.share))
            with OtherLoad() as load:
                ips = danlu_epochs(train.images, train.labels, a.batch, device, False, augment, a.epochs)
            results["a_store_streamed"].append((ips, load.share))
            with OtherLoad() as load:
                t0 = time.perf_counter()
                ftrain, _ = load_dataset("folder", root=str(folder), size=a.size, val_fraction=0.01)
                decode = time.perf_counter() - t0
                first = danlu_epochs(ftrain.images, ftrain.labels, a.batch, device, True, augment, 1, warmup=0)
                per_image = len(ftrain) // a.batch * a.batch
            results["b_folder_first_epoch"].append((per_image / (decode + per_image / first), load.share))
            with OtherLoad() as load:
                ips = danlu_epochs(ftrain.images, ftrain.labels, a.batch, device, True, augment, a.epochs)
            results["b_folder_later_epochs"].append((ips, load.share))
            del ftrain
            with OtherLoad() as load:
                ips = torchvision_epochs(tv, device, a.epochs, warmup=1 if r == 0 else 0)
            results["c_torchvision"].append((ips, load.share))
            for key, cache in (("a_resident_uint8_only", True), ("a_streamed_uint8_only", False)):
                with OtherLoad() as load:
                    ips = danlu_epochs(train.images, train.labels, a.batch, device, cache, None, a.epochs)
                results[key].append((ips, load.share))
            for key, aug, decode in (("d_wds_rrc_flip", rrc, "auto"), ("d_wds_uint8_only", None, "auto"),
                                     *([("d_wds_nvjpeg", rrc, "cuda")] if device.type == "cuda" else [])):
                wtrain.images.decode = decode if device.type == "cuda" else "cpu"
                with OtherLoad() as load:
                    ips = danlu_epochs(wtrain.images, None, a.batch, device, False, aug, a.epochs)
                results[key].append((ips, load.share))
            with OtherLoad() as load:
                ips = torchvision_epochs(tv_rrc, device, a.epochs, warmup=1 if r == 0 else 0)
            results["e_torchvision_rrc_flip"].append((ips, load.share))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.0f} img/s (other load {v[-1][1]:.0%})"
                                                 for k, v in results.items()), flush=True)
        med = {k: round(statistics.median(x for x, _ in v), 1) for k, v in results.items()}
        ratio = med["a_store_resident"] / med["c_torchvision"]
        wds_ratio = med["d_wds_rrc_flip"] / med["e_torchvision_rrc_flip"]
        out = {
            "benchmark": "data_pipeline", "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                                                 if device.type == "cuda" else ""),
            "config": {k: getattr(a, k) for k in ("images", "classes", "jpeg_size", "size", "batch", "epochs",
                                                  "repeats")},
            "images_per_second": med, "a_over_c": round(ratio, 2),
            "a_streamed_over_c": round(med["a_store_streamed"] / med["c_torchvision"], 2),
            "target_a_over_c": TARGET, "d_over_e": round(wds_ratio, 2), "target_d_over_e": TARGET_WDS,
            "prepare": prep,
            "other_load_max": round(max(s for v in results.values() for _, s in v), 3),
            "rounds": {k: [[round(x, 1), round(s, 3)] for x, s in v] for k, v in results.items()},
            "environment": {"date": datetime.now().astimezone().isoformat(timespec="seconds"),
                            "danlu": danlu.__version__, "torch": torch.__version__,
                            "torchvision": __import__("torchvision").__version__,
                            "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                            "command": " ".join([Path(sys.executable).name, *sys.argv])},
        }
        print(json.dumps({k: out[k] for k in ("images_per_second", "a_over_c", "a_streamed_over_c", "d_over_e",
                                              "prepare", "other_load_max")}, indent=1))
        verdict = "met" if ratio >= TARGET else "MISSED"
        print(f"(a) store / (c) torchvision = {ratio:.2f}x (target >= {TARGET:.0f}x: {verdict})")
        verdict = "met" if wds_ratio >= TARGET_WDS else "MISSED"
        print(f"(d) wds shards / (e) torchvision, random resized crop + flip = {wds_ratio:.2f}x (target >= "
              f"{TARGET_WDS:.0f}x: {verdict})")
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

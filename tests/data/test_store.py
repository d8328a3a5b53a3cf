"""Prepared stores (prepare, resume, damage detection) and the streaming loader (same batches as DeviceLoader)."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

import danlu
from conftest import run_cli
from danlu.data import store as store_mod
from danlu.data.datasets import channel_stats, load_dataset, pixel_mean
from danlu.data.loader import DeviceLoader, StreamLoader, make_loader
from danlu.data.datasets import prepare
from danlu.data.store import ShardedImages, open_store
from danlu.errors import DanluError
from datafiles import class_folder


@pytest.fixture
def folder(tmp_path):
    root = class_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=9, ext=".jpg")
    (root / "b" / "junk.jpg").write_text("not a jpeg")
    return root


def test_prepare_decodes_once_into_shards_equal_to_the_folder(folder, tmp_path):
    meta = prepare(folder, tmp_path / "s", size=12, shard_mb=12 * 12 * 3 * 5 / 2**20, quiet=True)  # 5 a shard
    assert meta["shape"] == [3, 12, 12] and meta["classes"] == ["a", "b", "c"]
    sp = meta["splits"]["train"]
    assert sp["count"] == 27 and [s["count"] for s in sp["shards"]] == [5, 5, 5, 4, 5, 3]  # b/junk.jpg (item 18) skipped
    assert [s["file"] for s in meta["skipped"]] == ["b/junk.jpg"]
    assert "test" not in meta["splits"] and not (tmp_path / "s" / "progress.json").exists()
    raw = open_store(tmp_path / "s")["splits"]["train"]
    ref, _ = load_dataset("folder", root=str(folder), size=12, val_fraction=0.5)
    full_x = raw[0][:]  # the store holds every image; the folder loader splits them
    assert full_x.shape == (27, 3, 12, 12) and raw[1].tolist() == [0] * 9 + [1] * 9 + [2] * 9
    train, test = load_dataset("store", root=str(tmp_path / "s"), val_fraction=0.5)
    assert isinstance(train.images, ShardedImages) and len(train) + len(test) == 27
    assert torch.equal(train.images[:], ref.images) and torch.equal(train.labels, ref.labels)  # same decode, split


def test_train_and_val_folders_become_store_splits(tmp_path):
    class_folder(tmp_path / "d" / "train", per_class=4)
    class_folder(tmp_path / "d" / "val", per_class=2, seed=1)
    prepare(tmp_path / "d", tmp_path / "s", size=8, quiet=True)
    train, test = load_dataset("store", root=str(tmp_path / "s"))
    ref_train, ref_test = load_dataset("folder", root=str(tmp_path / "d"), size=8)
    assert torch.equal(test.images.to("cpu"), ref_test.images) and torch.equal(test.labels, ref_test.labels)
    assert torch.equal(train.images.to("cpu"), ref_train.images)


def test_prepare_a_named_set(tmp_path):
    prepare("synthetic", tmp_path / "s", quiet=True)
    train, test = load_dataset("store", root=str(tmp_path / "s"))
    ref_train, ref_test = load_dataset("synthetic")
    assert torch.equal(train.images[:], ref_train.images) and torch.equal(test.labels, ref_test.labels)


def test_an_interrupted_prepare_resumes_and_keeps_finished_shards(folder, tmp_path, monkeypatch):
    out = tmp_path / "s"
    real_write, calls = store_mod._write_shard, []

    def dies_after_two(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real_write(*args, **kw)

    monkeypatch.setattr(store_mod, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare(folder, out, size=12, shard_mb=12 * 12 * 3 * 5 / 2**20, quiet=True)
    assert sorted(p.name for p in out.glob("train-0*.npy")) == ["train-00000.npy", "train-00001.npy"]
    with pytest.raises(DanluError, match="unfinished store"):
        open_store(out)
    first = (out / "train-00000.npy").stat().st_mtime_ns
    monkeypatch.setattr(store_mod, "_write_shard", real_write)
    written = []
    monkeypatch.setattr(store_mod, "_write_shard", lambda *a, **k: written.append(a[1]) or real_write(*a, **k))
    prepare(folder, out, size=12, shard_mb=12 * 12 * 3 * 5 / 2**20, quiet=True)
    assert written[0] == "train-00002.npy" and (out / "train-00000.npy").stat().st_mtime_ns == first
    fresh = tmp_path / "fresh"
    prepare(folder, fresh, size=12, shard_mb=12 * 12 * 3 * 5 / 2**20, quiet=True)
    for f in sorted(fresh.glob("train-*.npy")):
        assert (out / f.name).read_bytes() == f.read_bytes()
    # a different source or size never overwrites a store
    with pytest.raises(DanluError, match="already holds a store"):
        prepare(folder, out, size=16, quiet=True)


def test_truncated_or_altered_shards_are_named_at_open(folder, tmp_path):
    out = tmp_path / "s"
    prepare(folder, out, size=12, shard_mb=12 * 12 * 3 * 10 / 2**20, quiet=True)
    open_store(out)  # fine
    shard = out / "train-00001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(DanluError, match=r"train-00001.npy: truncated or altered shard \(\d+ bytes, expected"):
        open_store(out)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DanluError, match=r"train-00001.npy: altered shard \(SHA-256"):
        open_store(out)
    shard.write_bytes(data)
    open_store(out)
    with pytest.raises(DanluError, match="not a store"):
        open_store(folder)


def test_prepare_refuses_a_folder_that_is_not_a_store(folder, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("keep me")
    with pytest.raises(DanluError, match="not an unfinished store"):
        prepare(folder, tmp_path / "busy", size=8, quiet=True)
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "keep me"


def _store_images(tmp_path, n=50):
    """ShardedImages of n images whose pixels carry their own index (image i is all i), in 4 uneven shards."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 3, 3).contiguous()
    shards = []
    for k, (lo, hi) in enumerate([(0, 7), (7, 30), (30, 31), (31, n)]):
        np.save(tmp_path / f"{k}.npy", x[lo:hi].numpy())
        shards.append(np.load(tmp_path / f"{k}.npy", mmap_mode="r"))
    return ShardedImages(shards), x


def test_sharded_images_gather_and_subset(tmp_path):
    imgs, x = _store_images(tmp_path)
    rows = torch.tensor([49, 0, 30, 7, 6, 31, 30])
    assert torch.equal(imgs[rows], x[rows]) and torch.equal(imgs[5:40:3], x[5:40:3])
    sub = imgs.subset(torch.tensor([40, 2, 33]))
    assert sub.shape == (3, 2, 3, 3) and torch.equal(sub.to("cpu"), x[[40, 2, 33]])
    assert torch.equal(sub[torch.tensor([2, 0])], x[[33, 40]])
    assert torch.allclose(pixel_mean(imgs), pixel_mean(x)) and np.allclose(channel_stats(imgs), channel_stats(x))


@pytest.mark.parametrize("epoch, start", [(0, 0), (3, 2)])
def test_stream_loader_gives_device_loader_batches(tmp_path, epoch, start):
    imgs, x = _store_images(tmp_path)
    labels = torch.arange(50)
    stream = StreamLoader(imgs, labels, 8, device="cpu", seed=4, prefetch=2)
    ref = DeviceLoader(x, labels, 8, device="cpu", seed=4)
    assert len(stream) == len(ref) == 6 and stream.global_batch == 8 and stream.device == torch.device("cpu")
    got, want = list(stream.epoch(epoch, start)), list(ref.epoch(epoch, start))
    assert len(got) == len(want) == 6 - start
    for (a, ya), (b, yb) in zip(got, want, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb) and torch.equal(a[:, 0, 0, 0].long(), ya)


def test_stream_ranks_split_one_global_order_and_eval_counts_each_sample_once(tmp_path):
    imgs, _ = _store_images(tmp_path)
    labels = torch.arange(50)
    one = StreamLoader(imgs, labels, 8, device="cpu", seed=1)
    ranks = [StreamLoader(imgs, labels, 4, device="cpu", seed=1, rank=r, world=2) for r in (0, 1)]
    for (_, y), (_, a), (_, b) in zip(one.epoch(2), ranks[0].epoch(2), ranks[1].epoch(2), strict=True):
        assert torch.equal(y, torch.cat([a, b]))
    evals = [StreamLoader(imgs, labels, 6, device="cpu", shuffle=False, drop_last=False, rank=r, world=2)
             for r in (0, 1)]
    seen = torch.cat([y for ev in evals for _, y in ev.epoch(0)])
    assert sorted(seen.tolist()) == list(range(50))


def test_leaving_an_epoch_early_stops_the_prefetch_thread(tmp_path):
    imgs, _ = _store_images(tmp_path)
    loader = StreamLoader(imgs, torch.arange(50), 4, device="cpu", prefetch=1)
    for i, _ in enumerate(loader.epoch(0)):
        if i == 1:
            break
    assert not [t for t in threading.enumerate() if t.name == "danlu-prefetch"]


def test_a_read_error_in_the_prefetch_thread_reaches_the_training_loop(tmp_path):
    imgs, _ = _store_images(tmp_path)

    class Broken(ShardedImages):
        def gather(self, rows, out=None):
            raise OSError("disk gone")

    broken = Broken(imgs._shards)
    with pytest.raises(OSError, match="disk gone"):
        next(iter(StreamLoader(broken, torch.arange(50), 4, device="cpu")))


def test_make_loader_picks_resident_or_streamed(tmp_path, monkeypatch):
    imgs, x = _store_images(tmp_path)
    y = torch.arange(50)
    assert isinstance(make_loader(imgs, y, 4, device="cpu", cache=True), DeviceLoader)
    assert isinstance(make_loader(imgs, y, 4, device="cpu", cache=False), StreamLoader)
    assert isinstance(make_loader(x, y, 4, device="cpu", cache=False), DeviceLoader)  # already in memory
    assert isinstance(make_loader(imgs, y, 4, device="cpu"), DeviceLoader)  # fits
    monkeypatch.setattr("danlu.data.loader.memory_budget", lambda dev: 100)
    assert isinstance(make_loader(imgs, y, 4, device="cpu"), StreamLoader)  # 900 bytes > 100


def test_training_from_a_streamed_store_equals_training_from_memory(folder, tmp_path):
    prepare(folder, tmp_path / "s", size=16, shard_mb=16 * 16 * 3 * 4 / 2**20, quiet=True)
    recipe = {"model": {"name": "lenet"}, "data": {"name": "store", "root": str(tmp_path / "s"), "batch_size": 4,
                                                   "normalize": "channel", "val_fraction": 0.25},
              "augment": {"flip": True}, "run": {"max_iter": 8, "display": 4, "tensorboard": False}}
    results = {}
    for cache in (False, True):
        recipe["data"]["device_cache"] = cache
        r = danlu.train(recipe, out=tmp_path / f"run-{cache}", device="cpu", quiet=True)
        results[cache] = [json.loads(ln) for ln in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    strip = lambda evs: [{k: v for k, v in e.items() if k not in ("time", "images_per_second")} for e in evs]  # noqa
    assert strip(results[False]) == strip(results[True])


def test_cli_prepare_then_train_from_the_store(folder, tmp_path):
    r = run_cli("prepare", str(folder), "-o", str(tmp_path / "s"), "--size", "16", "--shard-mb", "0.004")
    assert r.returncode == 0, r.stderr
    assert "27 images 3x16x16" in r.stdout and "1 skipped" in r.stdout
    r = run_cli("train", "--device", "cpu", "--out", str(tmp_path / "run"), "--set", "data.name=store",
                "--set", f"data.root={tmp_path / 's'}", "--set", "data.device_cache=false", "--set",
                "run.max_iter=4", "--set", "data.batch_size=4", "--set", "run.tensorboard=false")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["iterations"] == 4


@pytest.mark.cuda  # the pinned-buffer, side-stream copy path; run by scripts/gpu_check.sh, skipped without CUDA
def test_stream_loader_on_cuda_gives_device_loader_batches(tmp_path):
    imgs, x = _store_images(tmp_path)
    labels = torch.arange(50)
    stream = StreamLoader(imgs, labels, 8, device="cuda", seed=2, prefetch=2)
    resident = make_loader(imgs, labels, 8, device="cuda", cache=True, seed=2)  # ShardedImages.to("cuda")
    assert isinstance(resident, DeviceLoader) and resident.images.is_cuda
    for e in range(3):
        for (a, ya), (b, yb) in zip(stream.epoch(e), resident.epoch(e), strict=True):
            a.float().mul_(2)  # use it on the consumer's stream right away
            assert a.is_cuda and ya.is_cuda and torch.equal(a, b) and torch.equal(ya, yb)


def test_prepare_from_a_list_file(tmp_path):
    root = class_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    (tmp_path / "train.txt").write_text("a/000.png 0\nb/001.png 1\nb/002.png 1\nb/nope.png 1\n")
    (tmp_path / "val.txt").write_text("a/001.png 0\nb/000.png 1\n")
    meta = prepare(root, tmp_path / "s", size=8, train_list=tmp_path / "train.txt", val_list=tmp_path / "val.txt",
                   quiet=True)
    assert meta["splits"]["train"]["count"] == 3 and meta["splits"]["test"]["count"] == 2
    assert [(s["line"], "file not found" in s["reason"]) for s in meta["skipped"]] == [(4, True)]
    train, test = load_dataset("store", root=str(tmp_path / "s"))
    assert train.labels.tolist() == [0, 1, 1] and test.labels.tolist() == [0, 1]

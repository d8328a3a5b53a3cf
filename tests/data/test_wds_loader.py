"""The streamed ShardLoader (wds.loader): an epoch's order depends on seed and epoch only, ranks read their own
shards, a resume decodes nothing before its batch, the decoder's crops, decode processes == a decode thread, and
a decoder or a read that hangs stops with one line naming the shard and the position (data.timeout)."""
from __future__ import annotations

import multiprocessing
import os
import threading
import warnings

import pytest
import torch

from danlu.data.datasets import load_dataset
from danlu.data.loader import DataTimeout, make_loader
from danlu.data.wds import loader as wds_loader
from danlu.data.wds.prepare import prepare_shards
from danlu.errors import DanluError
from datafiles import class_folder
import shardfiles
from shardfiles import batches, gradient_png, load, png, sample_ids, write_shards

shards = shardfiles.shards  # the shared fixture, found by pytest under this name


def test_an_epoch_is_every_sample_once_in_an_order_of_seed_and_epoch(shards):
    train, test = load(shards, streams=4)
    assert (len(train), len(test), train.classes) == (65, 11, ["0", "1", "2"])
    e0 = batches(train, 8)
    assert len(e0) == 65 // 8 == len(make_loader(train.images, None, 8, device="cpu"))
    ids = [i for x, _ in e0 for i in sample_ids(x)]
    assert len(ids) == len(set(ids)) == 64 and set(ids) <= set(range(65))
    assert all(torch.equal(y, torch.tensor(sample_ids(x)) % 3) for x, y in e0)  # labels travel with their images
    again = [i for x, _ in batches(train, 8) for i in sample_ids(x)]
    e1 = [i for x, _ in batches(train, 8, epoch=1) for i in sample_ids(x)]
    assert again == ids and e1 != ids and len(e1) == 64  # the same order for (seed, epoch), another for epoch 1
    # mixed: the first batch draws from 4 streams, so from more than one shard
    shard_of = {i: k for k, (lo, hi) in enumerate(zip([0, 9, 22, 27, 38, 46, 58], [9, 22, 27, 38, 46, 58, 65]))
                for i in range(lo, hi)}
    assert len({shard_of[i] for i in ids[:8]}) >= 2
    # both parts of the order change with the epoch: the shards' order, and each shard's samples' order (one
    # stream: batches are the epoch's sequence itself)
    one, _ = load(shards, streams=1)
    seqs = [[i for x, _ in batches(one, 8, epoch=e) for i in sample_ids(x)] for e in range(3)]
    assert len({tuple(dict.fromkeys(shard_of[i] for i in s)) for s in seqs}) == 3
    for k in range(7):
        full = [[i for i in s if shard_of[i] == k] for s in seqs]
        full = [f for f in full if len(f) == max(map(len, full))]
        if len(full) > 1:
            assert len({tuple(f) for f in full}) == len(full), k  # not in the same order twice


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_each_global_batch_as_one_process_sees_it(shards, world):
    train, _ = load(shards, streams=4)
    one = batches(train, 8)
    per_rank = [batches(train, 8 // world, rank=r, world=world) for r in range(world)]
    assert all(len(b) == len(one) for b in per_rank)
    for i, (x, y) in enumerate(one):  # rank r's batch is the r-th contiguous share of the 1-process batch
        assert torch.equal(torch.cat([per_rank[r][i][0] for r in range(world)]), x)
        assert torch.equal(torch.cat([per_rank[r][i][1] for r in range(world)]), y)


def _log_reads(monkeypatch, log):
    """Record, from whichever process does it, each shard read and each decoded row count with the epoch it is for:
    a process asks for an epoch's order before reading its shards, and finishes an epoch before the next (the decode
    processes go on into the next epoch when one is taken whole). Returns a function: epoch -> (urls, rows)."""
    real_read, real_decode, real_order = wds_loader.read_shard, wds_loader.decode_rows, wds_loader.ShardLoader.order

    def write(*words):
        with open(log, "a") as f:
            f.write(" ".join(map(str, (os.getpid(), *words))) + "\n")

    def read_shard(url, labels):
        write("read", url)
        return real_read(url, labels)

    def decode_rows(data, out, lo, hi, *rest):
        write("rows", hi - lo)
        return real_decode(data, out, lo, hi, *rest)

    def order(self, epoch):
        write("epoch", epoch)
        return real_order(self, epoch)

    monkeypatch.setattr(wds_loader, "read_shard", read_shard)
    monkeypatch.setattr(wds_loader, "decode_rows", decode_rows)
    monkeypatch.setattr(wds_loader.ShardLoader, "order", order)
    log.write_text("")

    def of(epoch):
        at, urls, rows = {}, [], 0
        for pid, kind, value in (line.split() for line in log.read_text().splitlines()):
            if kind == "epoch":
                at[pid] = int(value)
            elif at.get(pid) == epoch:
                urls, rows = (urls + [value], rows) if kind == "read" else (urls, rows + int(value))
        return urls, rows

    return of


@pytest.mark.parametrize("workers", [1, 2])  # decoded in a thread; in 2 decode processes (each its own streams)
def test_each_rank_reads_a_contiguous_share_of_the_epochs_shards(shards, monkeypatch, tmp_path, workers):
    train, _ = load(shards, streams=4, workers=workers)
    opened = []
    for r in range(2):
        of = _log_reads(monkeypatch, tmp_path / "log.txt")
        loader = make_loader(train.images, None, 4, device="cpu", seed=5, rank=r, world=2)
        assert loader.procs == (2 if workers == 2 else 0)
        list(loader.epoch(0))
        opened.append(set(of(0)[0]))
    assert len(opened[0] & opened[1]) <= 1  # at most the one shard cut by the boundary between the ranks' streams
    assert len(opened[0]) < 7 and len(opened[1]) < 7 and len(opened[0] | opened[1]) == 7


@pytest.mark.parametrize("workers", [1, 2])  # decoded in a thread; in 2 decode processes
def test_resume_mid_epoch_gives_the_same_batches_without_reading_what_came_before(shards, monkeypatch, tmp_path,
                                                                                   workers):
    train, _ = load(shards, streams=2, workers=workers)
    full = batches(train, 4, epoch=3)
    of = _log_reads(monkeypatch, tmp_path / "log.txt")
    rest = batches(train, 4, epoch=3, start=11)
    assert len(rest) == len(full) - 11
    for (a, b), (c, d) in zip(full[11:], rest, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    urls, rows = of(3)
    assert rows == 4 * len(rest)  # nothing before batch 11 was decoded
    assert len(urls) < 7  # ... and the shards wholly before it were not opened
    assert batches(train, 4, epoch=3, start=len(full)) == []


def test_the_decoder_crops_each_training_image_by_seed_epoch_and_position(tmp_path):
    """take_crop: each training image is decoded into its random resized crop, the box drawn from (seed, epoch,
    position in the epoch's sequence): the same crops on 1 or 2 processes and when resumed mid-epoch, others in the
    next epoch, about half of them mirrored; the Augment loses its resized crop and its flip; test loaders never
    crop."""
    from danlu.data.augment import Augment

    root = tmp_path / "s"
    write_shards(root, [9, 13, 5, 11, 8, 12, 7], extra=lambda i: {"png": gradient_png(i, i % 3)})
    write_shards(root, [6, 5], name="val", start=1000, extra=lambda i: {"png": gradient_png(i, i % 3)})
    train, test = load_dataset("wds", root=str(root), size=(12, 16), streams=2)

    def epoch(e, start=0, rank=0, world=1):
        loader = make_loader(train.images, None, 8 // world, device="cpu", seed=5, rank=rank, world=world)
        aug = Augment(flip=True, resized_crop=(0.1, 0.5))
        assert loader.take_crop(aug) and aug.resized_crop is None and not aug.flip and loader.crop.flip
        return [x for x, _ in loader.epoch(e, start=start)]

    one = epoch(0)
    x = torch.cat(one).float()
    width = x[:, 0, 0, -1] - x[:, 0, 0, 0]  # columns x 6 spanned by each crop: at most half the area, so less
    assert (width.abs() < 6 * 39 * 0.95).all() and len(set(width.tolist())) > 10  # than the whole width, and all kinds
    assert 0.2 < (width < 0).float().mean() < 0.8  # mirrored (the gradient runs right to left) and not
    two = [torch.cat(b) for b in zip(epoch(0, rank=0, world=2), epoch(0, rank=1, world=2))]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(one[3:], epoch(0, start=3), strict=True))
    assert not torch.equal(torch.cat(epoch(1)), x.to(torch.uint8))
    plain = list(make_loader(train.images, None, 8, device="cpu", seed=5).epoch(0))  # no take_crop: whole images
    assert all(int(b[i, 0, 0, -1]) - int(b[i, 0, 0, 0]) > 6 * 39 * 0.9 for b, _ in plain for i in range(len(b)))
    tl = make_loader(test.images, None, 4, device="cpu", shuffle=False, drop_last=False)
    assert not tl.take_crop(Augment(resized_crop=(0.1, 0.5)))


def test_a_test_loader_counts_every_sample_once_over_ranks(shards):
    _, test = load(shards)
    seen = []
    for r in range(3):
        loader = make_loader(test.images, None, 2, device="cpu", shuffle=False, drop_last=False, rank=r, world=3)
        batches = list(loader.epoch(0))
        assert len(batches) <= len(loader)
        seen += [i for x, _ in batches for i in sample_ids(x)]
    assert sorted(seen) == list(range(1000, 1011))


def test_batch_streams_and_processes_that_do_not_fit_are_one_line_errors(shards):
    train, _ = load(shards, streams=8)
    with pytest.raises(DanluError, match=r"data.batch_size=6: the global batch 12 .* not a multiple of "
                                         r"data.streams=8; .*multiple of 4, e.g. 4 or 8"):
        make_loader(train.images, None, 6, device="cpu", world=2)
    with pytest.raises(DanluError, match=r"data.batch_size=2: .* multiple of 8, e.g. 8 or 16$"):
        make_loader(train.images, None, 2, device="cpu")
    with pytest.raises(DanluError, match="data.streams=8: 3 processes do not divide it"):
        make_loader(train.images, None, 8, device="cpu", world=3)
    with pytest.raises(DanluError, match="data.decode=cuda: the run's device is cpu"):
        train.images.decode = "cuda"
        make_loader(train.images, None, 8, device="cpu")
    from danlu.config import load_recipe

    with pytest.raises(DanluError, match="data.label_key"):
        load_recipe(None, ["data.name=wds", "data.label_key=json:"])
    with pytest.raises(DanluError, match="data.split=identities"):
        load_recipe(None, ["data.name=wds", "data.split=identities"])
    with pytest.raises(DanluError, match="data.decode"):
        load_recipe(None, ["data.decode=gpu"])
    with pytest.raises(DanluError, match="data.timeout"):
        load_recipe(None, ["data.timeout=0"])
    with pytest.raises(DanluError, match="^data.timeout=0: expected a value greater than 0$"):  # WdsOptions
        load(shards, timeout=0)


def test_decode_processes_give_the_batches_of_a_decode_thread(tmp_path):
    """data.workers >= 2 on a CPU: training batches are decoded by worker processes, each its own streams; the
    same pixels, labels, crops, stand-ins for bad images and skip list as one thread, on 1 and 2 ranks, for every
    epoch and from a mid-epoch start."""
    from danlu.data.augment import Augment

    root = tmp_path / "s"
    write_shards(root, [9, 13, 5, 11, 8, 12, 7], extra=lambda i: {"png": b"\x89PNG not really"} if i == 17 else
                 {"png": gradient_png(i, i % 3)})
    write_shards(root, [6], name="val", start=1000)
    got = {}
    for workers in (1, 2, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train, _ = load_dataset("wds", root=str(root), size=(12, 16), streams=4, workers=workers)
            runs = []
            for world, start in ((1, 0), (1, 3), (2, 0)):
                loaders = [make_loader(train.images, None, 8 // world, device="cpu", seed=5, rank=r, world=world)
                           for r in range(world)]
                for ld in loaders:
                    ld.take_crop(Augment(resized_crop=(0.1, 0.5)))
                assert loaders[0].procs == (0 if workers == 1 else min(workers, 4 // world))
                for e in range(2):
                    batches = [list(ld.epoch(e, start=start)) for ld in loaders]
                    runs += [(torch.cat([b[i][0] for b in batches]), torch.cat([b[i][1] for b in batches]))
                             for i in range(len(batches[0]))]
                runs.append(sorted({k for ld in loaders for k in ld.skipped}))
        got[workers] = runs
    assert got[1][-1] == [(str(root / "train-000001.tar"), "s000017")]  # the bad image, replaced and listed
    for workers in (2, 4):
        assert len(got[workers]) == len(got[1])
        for a, b in zip(got[1], got[workers]):
            assert a == b if isinstance(a, list) else (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))


# ---------------------------------------------------------------- hangs: data.timeout

HANG = 3.0  # data.timeout in these tests (s): far more than a batch of tiny PNGs takes even on a loaded machine; the
# hang itself lasts until the test releases it (a thread) or the loader ends the decode process


def _collect() -> None:
    """Collect the decode processes that earlier loaders left to the garbage collector now, not while a test times a
    batch: torch's finalizer joins them (up to seconds) in whichever thread the collection happens to run."""
    import gc

    gc.collect()


@pytest.mark.parametrize("workers", [1, 2])  # decoded in a thread; in 2 decode processes
def test_a_decoder_that_hangs_stops_the_epoch_with_one_line_naming_the_shard_and_the_batch(shards, monkeypatch,
                                                                                          workers):
    """A decoder that never returns (as one did inside OpenCV in a decode process) is a DataTimeout after
    data.timeout seconds, naming the shard (and, in threads, the samples) and the batch, after every batch before
    it; the loader then starts again."""
    train, _ = load(shards, streams=2, workers=workers, timeout=HANG)
    reference = make_loader(train.images, None, 4, device="cpu", seed=5)
    whole = [sample_ids(x) for x, _ in reference.epoch(0)]
    reference.close()
    at = next(i for i, b in enumerate(whole) if 17 in b)  # sample 17: shard 1 (ids 9..21)
    _collect()
    before = set(multiprocessing.active_children())
    real, released, hanging = wds_loader.decode_rows, threading.Event(), png(17, 17 % 3)

    def decode_rows(data, out, lo, hi, *rest):
        if hanging in data[lo:hi]:
            released.wait(60)  # a thread: until the test ends; a process: until the loader terminates it
        return real(data, out, lo, hi, *rest)

    monkeypatch.setattr(wds_loader, "decode_rows", decode_rows)
    loader = make_loader(train.images, None, 4, device="cpu", seed=5)  # its decode processes start patched
    assert loader.procs == (2 if workers == 2 else 0) and loader.timeout == HANG
    got = []
    try:
        with pytest.raises(DataTimeout) as e:
            for x, _ in loader.epoch(0):
                got.append(sample_ids(x))
    finally:
        released.set()
    msg = str(e.value)
    assert isinstance(e.value, DanluError) and "\n" not in msg
    assert msg.startswith(f"data.timeout=3: no batch for 3 s at epoch 0, batch {at} of {len(whole)}: ")
    assert str(shards / "train-000001.tar") in msg and ("s000017" in msg) == (workers == 1)
    assert got == whole[:at] and not set(multiprocessing.active_children()) - before  # the hung process ended
    monkeypatch.undo()
    _collect()
    assert [sample_ids(x) for x, _ in loader.epoch(0, start=at)] == whole[at:]  # (new decode processes)
    loader.close()


def test_a_shard_read_that_stalls_stops_the_epoch_with_one_line_naming_the_shard(shards, monkeypatch):
    """A read that never ends (a remote shard whose connection stalls) is a DataTimeout naming that shard, at the
    first batch that needs it: the other reader thread reads on, so every batch before it comes."""
    train, _ = load(shards, streams=2, workers=1, timeout=HANG)
    whole = [sample_ids(x) for x, _ in make_loader(train.images, None, 4, device="cpu", seed=5).epoch(1)]
    at = next(i for i, b in enumerate(whole) if any(27 <= s < 38 for s in b))  # the first batch needing shard 3
    _collect()
    real, released = wds_loader.read_shard, threading.Event()

    def read_shard(url, labels):
        if url.endswith("train-000003.tar"):
            released.wait(60)
        return real(url, labels)

    monkeypatch.setattr(wds_loader, "read_shard", read_shard)
    got = []
    try:
        with pytest.raises(DataTimeout) as e:
            for x, _ in make_loader(train.images, None, 4, device="cpu", seed=5).epoch(1):
                got.append(sample_ids(x))
        # a test loader reads the shards in their order: shard 3 from sample 27, in batch 27 // 4 of 17
        with pytest.raises(DataTimeout, match="^data.timeout=3: no batch for 3 s at test batch 6 of 17: reading "):
            list(make_loader(train.images, None, 4, device="cpu", shuffle=False, drop_last=False).epoch(0))
    finally:
        released.set()
    assert str(e.value).startswith(f"data.timeout=3: no batch for 3 s at epoch 1, batch {at} of {len(whole)}: "
                                   f"reading shard {shards / 'train-000003.tar'}")
    assert got == whole[:at]


def test_a_process_whose_decode_thread_hangs_for_good_still_exits_after_the_error(shards):
    """The decode thread that hangs is never released here: the process still prints the error and exits (a
    ThreadPoolExecutor's threads would be joined at exit, and it would wait forever)."""
    import subprocess
    import sys

    code = f"""
import threading, warnings
warnings.simplefilter("ignore")
from danlu.data.datasets import load_dataset
from danlu.data.loader import DataTimeout, make_loader
from danlu.data.wds import loader as wds_loader
train, _ = load_dataset("wds", root={str(shards)!r}, size=(10, 12), streams=2, workers=1, timeout={HANG})
real = wds_loader.decode_rows
def decode_rows(data, out, lo, hi, *rest):
    if lo == 0:
        threading.Event().wait()  # for good
    return real(data, out, lo, hi, *rest)
wds_loader.decode_rows = decode_rows
try:
    list(make_loader(train.images, None, 4, device="cpu").epoch(0))
except DataTimeout as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("data.timeout=3: no batch for 3 s at epoch 0, batch 0 of 16: decoding samples ")


@pytest.mark.cuda
def test_cuda_decode_matches_the_cpu_decode_to_a_few_levels(tmp_path):
    src = class_folder(tmp_path / "p", classes=("a", "b"), per_class=16, ext=".jpg", size=(48, 64))
    prepare_shards(src, tmp_path / "o", shard_mb=0.01, quiet=True)
    train, _ = load_dataset("wds", root=str(tmp_path / "o"), size=32, decode="cuda", streams=2)
    gpu = list(make_loader(train.images, None, 8, device="cuda").epoch(0))
    train.images.decode = "cpu"
    cpu = list(make_loader(train.images, None, 8, device="cuda").epoch(0))
    assert all(x.device.type == "cuda" for x, _ in gpu)
    for (a, la), (b, lb) in zip(gpu, cpu, strict=True):
        assert torch.equal(la, lb)
        assert (a.float() - b.float()).abs().mean() < 4  # nvJPEG + torch resize vs Pillow draft + resize


@pytest.mark.cuda
def test_cuda_decode_crops_as_the_cpu_decode_to_a_few_levels(tmp_path):
    """take_crop on nvJPEG: the same boxes (drawn on the host from seed, epoch and position) cut on the GPU."""
    from danlu.data.augment import Augment

    src = class_folder(tmp_path / "p", classes=("a", "b"), per_class=16, ext=".jpg", size=(48, 64))
    prepare_shards(src, tmp_path / "o", shard_mb=0.01, quiet=True)
    train, _ = load_dataset("wds", root=str(tmp_path / "o"), size=32, decode="cuda", streams=2)

    def epoch():
        loader = make_loader(train.images, None, 8, device="cuda", seed=1)
        assert loader.take_crop(Augment(resized_crop=(0.2, 0.6)))
        return list(loader.epoch(0))

    gpu = epoch()
    train.images.decode = "cpu"
    for (a, la), (b, lb) in zip(gpu, epoch(), strict=True):
        assert torch.equal(la, lb)
        assert (a.float() - b.float()).abs().mean() < 4  # nvJPEG + torch resize vs libjpeg-turbo + torch resize

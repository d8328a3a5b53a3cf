"""WebDataset shards: prepare --format wds, reading any shards (index or scan), the streamed loader's order (seed and
epoch only, ranks read their own shards, resume without decoding), bad shards, URLs."""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
import webdataset

from danlu.data import wds
from danlu.data.datasets import channel_stats, load_dataset
from danlu.data.loader import make_loader
from danlu.data.wds_prepare import inspect_shards, prepare_shards
from danlu.errors import DanluError
import datafiles
from datafiles import class_folder

file_server = datafiles.file_server  # the shared fixture, found by pytest under this name


def _png(value: int, label: int, size=(10, 12)) -> bytes:
    """A flat image whose pixels say which sample it is: (id % 256, id // 256, 40 * label); any resize keeps them."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), (value % 256, value // 256, 40 * label), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _ids(x: torch.Tensor) -> list[int]:
    """Sample ids of a batch of _png images (B, 3, H, W)."""
    x = x.long()
    return (x[:, 0, 0, 0] + 256 * x[:, 1, 0, 0]).tolist()


def write_shards(folder, counts, classes: int = 3, name: str = "train", start: int = 0, extra=None) -> list[int]:
    """Shards folder/{name}-00000k.tar of `counts[k]` samples each ({key}.png + {key}.cls); sample ids are consecutive
    from `start` and label = id % classes. `extra(id) -> dict` replaces or adds a sample's files. Returns the ids."""
    folder.mkdir(parents=True, exist_ok=True)
    i = start
    for k, n in enumerate(counts):
        with webdataset.TarWriter(str(folder / f"{name}-{k:06d}.tar"), encoder=False) as w:
            for _ in range(n):
                sample = {"__key__": f"s{i:06d}", "png": _png(i, i % classes), "cls": str(i % classes).encode()}
                if extra is not None:
                    sample.update(extra(i))
                w.write({k2: v for k2, v in sample.items() if v is not None})
                i += 1
    return list(range(start, i))


@pytest.fixture
def shards(tmp_path):
    """7 training shards of uneven sizes (65 samples) and 2 test shards, no index (scanned)."""
    root = tmp_path / "shards"
    write_shards(root, [9, 13, 5, 11, 8, 12, 7])
    write_shards(root, [6, 5], name="val", start=1000)
    return root


def _load(root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-index notice
        return load_dataset("wds", root=str(root), size=(10, 12), **kw)


def _epoch(train, batch, epoch=0, start=0, **kw):
    loader = make_loader(train.images, train.labels, batch, device="cpu", seed=5, **kw)
    return [(x, y) for x, y in loader.epoch(epoch, start=start)]


# ---------------------------------------------------------------- prepare --format wds


def test_prepare_writes_shards_that_webdataset_and_tar_read_with_an_index(tmp_path):
    src = tmp_path / "photos"
    class_folder(src / "train", classes=("ant", "bee", "cat"), per_class=10, ext=".jpg")
    class_folder(src / "val", classes=("ant", "bee", "cat"), per_class=3, ext=".png", seed=1)
    (src / "train" / "bee" / "junk.jpg").write_text("not a jpeg")
    index = prepare_shards(src, tmp_path / "out", size=20, shard_mb=0.01, quiet=True)  # ~10 KiB a shard
    out = tmp_path / "out"
    assert index["classes"] == ["ant", "bee", "cat"] and (out / "index.json").is_file()
    train = index["splits"]["train"]
    assert train["count"] == 30 and train["per_class"] == [10, 10, 10] and len(train["shards"]) > 2
    assert [s["file"] for s in index["skipped"]] == ["train/bee/junk.jpg"]
    assert index["splits"]["val"]["count"] == 9
    from danlu.io import sha256

    for sp in index["splits"].values():
        for sh in sp["shards"]:
            assert sha256(out / sh["file"]) == sh["sha256"] and (out / sh["file"]).stat().st_size == sh["bytes"]
    # the webdataset library reads every sample back; any tar tool sees {key}.jpg/.cls/.json members
    urls = sorted(str(p) for p in out.glob("train-*.tar"))
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 30 and all({"jpg", "cls", "json"} <= s.keys() for s in samples)
    meta = [json.loads(s["json"]) for s in samples]
    assert all(int(s["cls"]) == ["ant", "bee", "cat"].index(m["class"]) for s, m in zip(samples, meta))
    assert sorted(m["path"] for m in meta)[0] == "train/ant/000.jpg"
    assert [m["class"] for m in meta] != sorted(m["class"] for m in meta)  # written in a seeded random order
    from PIL import Image

    assert min(Image.open(io.BytesIO(samples[0]["jpg"])).size) == 20  # shorter side brought to --size
    with tarfile.open(urls[0]) as t:
        assert any(n.endswith(".cls") for n in t.getnames())
        assert all(m.pax_headers == {} for m in t.getmembers())  # one header a member (a float mtime adds a pax one)
    # read back through danlu: the index's counts, the val/ split for testing
    tr, te = load_dataset("wds", root=str(out), size=16)
    assert (len(tr), len(te), tr.classes, tr.shape) == (30, 9, ["ant", "bee", "cat"], (3, 16, 16))
    assert tr.report["counts_from"] == "index.json" and tr.report["skipped_count"] == 1


def test_prepare_refuses_a_used_folder_and_keep_original_keeps_the_bytes(tmp_path):
    src = class_folder(tmp_path / "p", classes=("a", "b"), per_class=3, ext=".jpg")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("mine")
    with pytest.raises(DanluError, match="not empty"):
        prepare_shards(src, tmp_path / "used", quiet=True)
    prepare_shards(src, tmp_path / "o", keep_original=True, quiet=True)
    got = {json.loads(s["json"])["path"]: s for s in webdataset.WebDataset(str(tmp_path / "o" / "train-000000.tar"),
                                                                           shardshuffle=False)}
    assert got["a/000.jpg"]["jpg"] == (src / "a" / "000.jpg").read_bytes()
    again = prepare_shards(src, tmp_path / "o", keep_original=True, quiet=True)  # the same: nothing to do
    assert again["splits"]["train"]["count"] == 6


def test_a_flat_source_holds_out_whole_shards_for_testing(tmp_path):
    src = class_folder(tmp_path / "p", classes=("a", "b"), per_class=20, ext=".png", size=(24, 24))
    index = prepare_shards(src, tmp_path / "o", shard_mb=0.01, quiet=True)
    n_shards = len(index["splits"]["train"]["shards"])
    tr, te = load_dataset("wds", root=str(tmp_path / "o"), size=8, val_fraction=0.25, split_seed=3)
    assert len(tr) + len(te) == 40 and len(te) > 0
    urls_tr, urls_te = {s.url for s in tr.images.shards}, {s.url for s in te.images.shards}
    assert not urls_tr & urls_te and len(urls_te) == max(1, round(n_shards * 0.25))
    other, _ = load_dataset("wds", root=str(tmp_path / "o"), size=8, val_fraction=0.25, split_seed=4)
    assert {s.url for s in other.images.shards} != urls_tr  # the seed picks the shards
    one = tmp_path / "one"
    write_shards(one, [10])
    with pytest.raises(DanluError, match="at least 2 shards"):
        _load(one)


# ---------------------------------------------------------------- the order of an epoch


def test_an_epoch_is_every_sample_once_in_an_order_of_seed_and_epoch(shards):
    train, test = _load(shards, streams=4)
    assert (len(train), len(test), train.classes) == (65, 11, ["0", "1", "2"])
    e0 = _epoch(train, 8)
    assert len(e0) == 65 // 8 == len(make_loader(train.images, None, 8, device="cpu"))
    ids = [i for x, _ in e0 for i in _ids(x)]
    assert len(ids) == len(set(ids)) == 64 and set(ids) <= set(range(65))
    assert all(torch.equal(y, torch.tensor(_ids(x)) % 3) for x, y in e0)  # labels travel with their images
    again = [i for x, _ in _epoch(train, 8) for i in _ids(x)]
    e1 = [i for x, _ in _epoch(train, 8, epoch=1) for i in _ids(x)]
    assert again == ids and e1 != ids and len(e1) == 64  # the same order for (seed, epoch), another for epoch 1
    # mixed: the first batch draws from 4 streams, so from more than one shard
    shard_of = {i: k for k, (lo, hi) in enumerate(zip([0, 9, 22, 27, 38, 46, 58], [9, 22, 27, 38, 46, 58, 65]))
                for i in range(lo, hi)}
    assert len({shard_of[i] for i in ids[:8]}) >= 2
    # both parts of the order change with the epoch: the shards' order, and each shard's samples' order (one
    # stream: batches are the epoch's sequence itself)
    one, _ = _load(shards, streams=1)
    seqs = [[i for x, _ in _epoch(one, 8, epoch=e) for i in _ids(x)] for e in range(3)]
    assert len({tuple(dict.fromkeys(shard_of[i] for i in s)) for s in seqs}) == 3
    for k in range(7):
        full = [[i for i in s if shard_of[i] == k] for s in seqs]
        full = [f for f in full if len(f) == max(map(len, full))]
        if len(full) > 1:
            assert len({tuple(f) for f in full}) == len(full), k  # not in the same order twice


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_each_global_batch_as_one_process_sees_it(shards, world):
    train, _ = _load(shards, streams=4)
    one = _epoch(train, 8)
    per_rank = [_epoch(train, 8 // world, rank=r, world=world) for r in range(world)]
    assert all(len(b) == len(one) for b in per_rank)
    for i, (x, y) in enumerate(one):  # rank r's batch is the r-th contiguous share of the 1-process batch
        assert torch.equal(torch.cat([per_rank[r][i][0] for r in range(world)]), x)
        assert torch.equal(torch.cat([per_rank[r][i][1] for r in range(world)]), y)


def _log_reads(monkeypatch, log):
    """Record, from whichever process does it, each shard read and each decoded row count with the epoch it is for:
    a process asks for an epoch's order before reading its shards, and finishes an epoch before the next (the decode
    processes go on into the next epoch when one is taken whole). Returns a function: epoch -> (urls, rows)."""
    real_read, real_decode, real_order = wds.read_shard, wds._decode_rows, wds.ShardLoader.order

    def write(*words):
        with open(log, "a") as f:
            f.write(" ".join(map(str, (os.getpid(), *words))) + "\n")

    def read_shard(url, labels):
        write("read", url)
        return real_read(url, labels)

    def decode_rows(picked, out, lo, hi, *rest):
        write("rows", hi - lo)
        return real_decode(picked, out, lo, hi, *rest)

    def order(self, epoch):
        write("epoch", epoch)
        return real_order(self, epoch)

    monkeypatch.setattr(wds, "read_shard", read_shard)
    monkeypatch.setattr(wds, "_decode_rows", decode_rows)
    monkeypatch.setattr(wds.ShardLoader, "order", order)
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
    train, _ = _load(shards, streams=4, workers=workers)
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
    train, _ = _load(shards, streams=2, workers=workers)
    full = _epoch(train, 4, epoch=3)
    of = _log_reads(monkeypatch, tmp_path / "log.txt")
    rest = _epoch(train, 4, epoch=3, start=11)
    assert len(rest) == len(full) - 11
    for (a, b), (c, d) in zip(full[11:], rest, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    urls, rows = of(3)
    assert rows == 4 * len(rest)  # nothing before batch 11 was decoded
    assert len(urls) < 7  # ... and the shards wholly before it were not opened
    assert _epoch(train, 4, epoch=3, start=len(full)) == []


def _gradient_png(value: int, label: int, size=(30, 40)) -> bytes:
    """A sample whose every pixel says where it is: (column, row, id), so a batch shows each row's crop box."""
    from PIL import Image

    y, x = np.mgrid[0:size[0], 0:size[1]]
    arr = np.stack([x * 6, y * 8, np.full(size, value % 256)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_the_decoder_crops_each_training_image_by_seed_epoch_and_position(tmp_path):
    """take_crop: each training image is decoded into its random resized crop, the box drawn from (seed, epoch,
    position in the epoch's sequence): the same crops on 1 or 2 processes and when resumed mid-epoch, others in the
    next epoch, about half of them mirrored; the Augment loses its resized crop and its flip; test loaders never
    crop."""
    from danlu.data.augment import Augment

    root = tmp_path / "s"
    write_shards(root, [9, 13, 5, 11, 8, 12, 7], extra=lambda i: {"png": _gradient_png(i, i % 3)})
    write_shards(root, [6, 5], name="val", start=1000, extra=lambda i: {"png": _gradient_png(i, i % 3)})
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
    _, test = _load(shards)
    seen = []
    for r in range(3):
        loader = make_loader(test.images, None, 2, device="cpu", shuffle=False, drop_last=False, rank=r, world=3)
        batches = list(loader.epoch(0))
        assert len(batches) <= len(loader)
        seen += [i for x, _ in batches for i in _ids(x)]
    assert sorted(seen) == list(range(1000, 1011))


def test_batch_streams_and_processes_that_do_not_fit_are_one_line_errors(shards):
    train, _ = _load(shards, streams=8)
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


def test_statistics_and_probes_read_only_the_first_images(shards):
    train, _ = _load(shards, streams=4)
    first = train.images[:5]
    assert first.shape == (5, 3, 10, 12) and _ids(first) == [0, 1, 2, 3, 4]
    mean, std = channel_stats(train.images)
    assert len(mean) == 3 and mean[2] == pytest.approx(np.mean([40 * (i % 3) for i in range(65)]) / 255, rel=1e-6)


# ---------------------------------------------------------------- shards danlu did not write


def test_foreign_shards_with_class_names_in_json_are_scanned_once_and_say_so(tmp_path):
    names = ["zebra", "ant", "moth"]
    root = tmp_path / "img2dataset"
    write_shards(root, [6, 6, 6], extra=lambda i: {"cls": None, "png": None, "webp": _webp(i),
                                                   "json": json.dumps({"label": names[i % 3], "w": 1}).encode()})
    with pytest.warns(UserWarning, match="no index.json .* read all 3 shards once"):
        train, test = load_dataset("wds", root=str(root / "train-{000000..000002}.tar"), size=8,
                                   label_key="json:label", val_fraction=0.3)
    assert train.classes == ["ant", "moth", "zebra"] and len(train) + len(test) == 18
    x, y = next(iter(make_loader(train.images, None, 8, device="cpu")))
    assert y.tolist() == [train.classes.index(names[i % 3]) for i in _ids(x)]
    # an index written by `data inspect --write-index`: no scan, no notice
    info = inspect_shards(str(root), out_png=str(tmp_path / "sheet.png"), samples=5, label_key="json:label",
                          write_index=True)
    assert info["splits"]["train"]["samples"] == 18 and (tmp_path / "sheet.png").stat().st_size > 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = load_dataset("wds", root=str(root), size=8, label_key="json:label", val_fraction=0.3)
    assert again.classes == train.classes and again.report["counts_from"] == "index.json"
    with pytest.raises(DanluError, match="data.label_key=cls: .* label key 'json:label'"):
        load_dataset("wds", root=str(root), size=8)


def _webp(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (i % 256, i // 256, 0), np.uint8)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def test_txt_labels_and_integer_labels(tmp_path):
    root = tmp_path / "t"
    write_shards(root, [4, 4], extra=lambda i: {"cls": None, "txt": f" {i % 3}\n".encode()})
    train, test = _load(root, label_key="txt")
    assert train.classes == ["0", "1", "2"] and len(train) + len(test) == 8


# ---------------------------------------------------------------- bad input


def test_bad_samples_and_a_truncated_shard_are_counted_skips_never_a_hang(tmp_path):
    root = tmp_path / "bad"
    write_shards(root, [8, 8, 8], extra=lambda i: {"cls": None} if i == 3 else
                 {"png": b"\x89PNG but not really"} if i == 10 else {"png": None, "txt": b"0"} if i == 5 else {})
    write_shards(root, [8], name="val", start=100)
    whole = (root / "train-000002.tar").read_bytes()
    (root / "train-000002.tar").write_bytes(whole[:len(whole) // 2])  # cut in the middle of a member
    with pytest.warns(UserWarning, match=r"skipped 3 sample\(s\)"):
        train, test = load_dataset("wds", root=str(root), size=(10, 12))
    reasons = {(e.get("key"), e["reason"].split(" (")[0]) for e in train.report["skipped"]}
    assert ("s000003", "no label") in reasons and ("s000005", "no image") in reasons
    assert any(k is None and r.startswith("shard ends early") for k, r in reasons)
    n_truncated = train.images.shards[2].count
    assert 0 < n_truncated < 8 and len(train) == 6 + 8 + n_truncated  # s3, s5 skipped; s10 only fails to decode
    loader = make_loader(train.images, None, 8, device="cpu")
    with pytest.warns(UserWarning, match="s000010: not a readable image"):
        batches = list(loader.epoch(0))
    ids = [i for x, _ in batches for i in _ids(x)]
    assert 10 not in ids and len(ids) == len(train) // 8 * 8  # the bad image replaced by a good one of its stream
    assert all(torch.equal(x[:, 2, 0, 0].long(), 40 * y) for x, y in batches)  # ... with its label, not zeros
    # with 4 streams the stand-in comes from the bad image's own stream: 1 and 4 processes still see the same batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train4, _ = load_dataset("wds", root=str(root), size=(10, 12), streams=4)
        for epoch in range(3):
            one = list(make_loader(train4.images, None, 8, device="cpu").epoch(epoch))
            four = [list(make_loader(train4.images, None, 2, device="cpu", rank=r, world=4).epoch(epoch))
                    for r in range(4)]
            for i, (x, y) in enumerate(one):
                assert torch.equal(torch.cat([four[r][i][0] for r in range(4)]), x)
                assert torch.equal(torch.cat([four[r][i][1] for r in range(4)]), y)
    assert list(loader.skipped) == [(str(root / "train-000001.tar"), "s000010")]


def test_missing_folders_urls_and_shards_are_one_line_errors(tmp_path, file_server):
    with pytest.raises(DanluError, match="no such folder or file"):
        load_dataset("wds", root=str(tmp_path / "nowhere"))
    with pytest.raises(DanluError, match="not set"):
        load_dataset("wds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DanluError, match="no .tar shards"):
        load_dataset("wds", root=str(tmp_path / "empty"))
    with pytest.raises(DanluError, match=r"1 of 2 shards not found"):
        write_shards(tmp_path / "p", [3])
        load_dataset("wds", root=str(tmp_path / "p" / "train-{000000..000001}.tar"))
    with pytest.raises(DanluError, match=r"index .*index.json could not be read: exit status 22 .*404") as e:
        load_dataset("wds", root=file_server.url + "missing/")
    assert "\n" not in str(e.value)
    file_server.files["s/train-000000.tar"] = (tmp_path / "p" / "train-000000.tar").read_bytes()
    with pytest.raises(DanluError, match=r"shard .*train-000001.tar could not be read: exit status 22"):
        load_dataset("wds", root=file_server.url + "s/train-{000000..000001}.tar")
    with pytest.raises(DanluError, match=r"unknown scheme 'nope:'"):
        load_dataset("wds", root="nope://x/train-000000.tar")


def test_decode_processes_give_the_batches_of_a_decode_thread(tmp_path):
    """data.workers >= 2 on a CPU: training batches are decoded by worker processes, each its own streams; the
    same pixels, labels, crops, stand-ins for bad images and skip list as one thread, on 1 and 2 ranks, for every
    epoch and from a mid-epoch start."""
    from danlu.data.augment import Augment

    root = tmp_path / "s"
    write_shards(root, [9, 13, 5, 11, 8, 12, 7], extra=lambda i: {"png": b"\x89PNG not really"} if i == 17 else
                 {"png": _gradient_png(i, i % 3)})
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


@pytest.mark.parametrize("workers", [1, 2])
def test_a_shard_changed_after_indexing_is_counted_again_or_named(tmp_path, file_server, workers):
    src = class_folder(tmp_path / "p" / "train", classes=("a", "b"), per_class=10, ext=".png", size=(16, 16))
    class_folder(tmp_path / "p" / "val", classes=("a", "b"), per_class=2, ext=".png", size=(16, 16))
    src = src.parent
    prepare_shards(src, tmp_path / "o", shard_mb=0.01, quiet=True)
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    first = tmp_path / "o" / index["splits"]["train"]["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:3000])  # truncated after prepare
    with pytest.warns(UserWarning, match="differ from .*index.json .*counted again"):
        train, _ = load_dataset("wds", root=str(tmp_path / "o"), size=8)
    assert len(train) < 20
    for p in (tmp_path / "o").iterdir():
        file_server.files[f"o/{p.name}"] = p.read_bytes()
    remote, test = load_dataset("wds", root=file_server.url + "o/", size=8, streams=2, workers=workers)  # over HTTP
    loader = make_loader(remote.images, None, 2, device="cpu")  # the index is trusted...
    with pytest.raises(DanluError, match=r"holds \d+ readable samples, its index \d+ .* prepare again"):
        list(loader.epoch(0))  # ... until the shard is read: one line, no hang


# ---------------------------------------------------------------- URLs


def test_shards_over_http_give_the_same_batches_as_on_disk(tmp_path, file_server):
    src = class_folder(tmp_path / "p", classes=("a", "b", "c"), per_class=8, ext=".png", size=(16, 16))
    prepare_shards(src, tmp_path / "o", shard_mb=0.01, quiet=True)
    for p in (tmp_path / "o").iterdir():
        file_server.files[f"data/{p.name}"] = p.read_bytes()
    local, _ = load_dataset("wds", root=str(tmp_path / "o"), size=8, val_fraction=0.3, streams=4)
    remote, _ = load_dataset("wds", root=file_server.url + "data", size=8, val_fraction=0.3, streams=4)
    a = list(make_loader(local.images, None, 4, device="cpu", seed=2).epoch(1))
    b = list(make_loader(remote.images, None, 4, device="cpu", seed=2).epoch(1))
    assert len(a) == len(b) > 0 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert any(name.endswith(".tar") for name, _ in file_server.requests)


def test_s3_urls_need_fsspec_and_read_through_it(tmp_path, monkeypatch):
    """Without s3fs the error names the extra to install; with a moto server the same shards read as on disk."""
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(DanluError, match=r"s3:// needs .*danlu\[cloud\]"):
            load_dataset("wds", root="s3://bucket/train-{000000..000001}.tar")
        pytest.skip("s3fs (danlu[cloud]) and moto[server] are not installed: the S3 path is untested here")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        import fsspec

        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})  # every s3:// open
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bucket")
        write_shards(tmp_path / "s", [5, 5])
        for p in (tmp_path / "s").iterdir():
            fs.put(str(p), f"bucket/{p.name}")
        remote, _ = _load("s3://bucket/train-{000000..000001}.tar", streams=2)
        local, _ = _load(tmp_path / "s" / "train-{000000..000001}.tar", streams=2)
        a = list(make_loader(local.images, None, 2, device="cpu", seed=2).epoch(1))
        b = list(make_loader(remote.images, None, 2, device="cpu", seed=2).epoch(1))
        assert len(a) == len(b) > 0 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    finally:
        server.stop()


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

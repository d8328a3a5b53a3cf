"""Training from WebDataset shards through the real CLI: 2 processes x B == 1 process x 2B (float64), a snapshot
resumes mid-epoch exactly on 1 and on 2 processes, bad samples end in data_report.json, shards over HTTP, inspect."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, sets
import datafiles
from datafiles import class_folder

file_server = datafiles.file_server  # the shared fixture, found by pytest under this name

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# LeNet on 16 px colour images, flip on and a random resized crop (both done by the decoder: its draws must follow the
# epoch's sequence), 4 streams; 72 training samples in batches of 16: 4
# iterations an epoch, 10 iterations, a snapshot at 6 (epoch 1, batch 2: mid-epoch)
COMMON = ["model.name=lenet", "data.name=wds", "data.size=16", "data.streams=4", "augment.flip=true",
          "augment.resized_crop=[0.3,1.0]",
          "optim.lr_scaling=none", "run.max_iter=10", "run.snapshot_every=6", "run.test_interval=5",
          "run.display=5", "run.seed=3", "run.tensorboard=false", "run.keep_snapshots=10", "precision=fp64"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    src = class_folder(root / "photos" / "train", classes=("a", "b", "c"), per_class=24, ext=".jpg", size=(20, 24))
    class_folder(root / "photos" / "val", classes=("a", "b", "c"), per_class=4, ext=".jpg", size=(20, 24), seed=1)
    r = run_cli("prepare", str(src.parent), "-o", str(root / "shards"), "--format", "wds", "--shard-mb", "0.01",
                "--quiet")
    assert r.returncode == 0, r.stderr
    assert len(list((root / "shards").glob("train-*.tar"))) >= 6
    return root


def _weights(run) -> dict:
    return load_file(str(run / "model.safetensors"))


def _cut(run, at: int, name: str):
    """A copy of `run` as if it had died right after its snapshot at iteration `at`."""
    cut = run.parent / name
    shutil.copytree(run, cut)
    for p in (cut / "snapshots").glob("iter_*"):
        if int(p.name.split("_")[1].split(".")[0]) > at:
            p.unlink()
    for f in ("model.safetensors", "summary.json"):
        (cut / f).unlink()
    shutil.rmtree(cut / "logs", ignore_errors=True)
    return cut


@pytest.fixture(scope="module")
def runs(shards):
    root = shards
    data = f"data.root={root / 'shards'}"
    two = run_cli("train", "--procs", "2", "--out", str(root / "two"), *sets(*COMMON, data, "data.batch_size=8"),
                  cwd=root, timeout=600)
    assert two.returncode == 0, two.stderr
    one = run_cli("train", "--device", "cpu", "--out", str(root / "one"), *sets(*COMMON, data, "data.batch_size=16"),
                  cwd=root, timeout=600, env=ONE_THREAD)
    assert one.returncode == 0, one.stderr
    return root


def test_two_processes_train_as_one_with_the_double_batch(runs):
    a, b = _weights(runs / "one"), _weights(runs / "two")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-10, diff  # float64: the same samples, the same flips, gradients averaged
    summary = json.loads((runs / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 16 and summary["iterations"] == 10
    report = json.loads((runs / "two" / "data_report.json").read_text())
    assert report["source"] == "wds" and report["train_images"] == 72 and report["test_images"] == 12
    assert report["resized_crop"] == "decoder" and report["flip"] == "decoder"
    tests = [json.loads(ln) for ln in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [e["samples"] for e in tests if e["kind"] == "test"] == [12, 12]  # every test sample once over 2 ranks


@pytest.mark.parametrize("procs", [1, 2])
def test_a_mid_epoch_snapshot_resumes_exactly(runs, procs):
    full = runs / ("one" if procs == 1 else "two")
    cut = _cut(full, 6, f"cut{procs}")
    args = ["--procs", "2"] if procs == 2 else ["--device", "cpu"]
    r = run_cli("train", "--resume", str(cut), *args, cwd=runs, timeout=600, env=ONE_THREAD if procs == 1 else None)
    assert r.returncode == 0, r.stderr
    assert "resumed at 6" in r.stdout
    a, b = _weights(full), _weights(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit


def test_a_decode_process_that_hangs_stops_training_in_one_line_and_the_run_resumes(shards, tmp_path, monkeypatch):
    """data.timeout: a decode process that hangs (a patched decoder that never returns, on one sample in epoch 2:
    iteration 8, after the snapshot at 6) stops the run with a DanluError (the CLI's one line and exit 2) naming the
    shard and the batch, instead of waiting forever; resumed from its snapshot, the run ends as an uninterrupted one
    does, bit for bit. In this process (the API): the patch reaches the decode processes, forked from it."""
    import gc
    import multiprocessing
    import time

    import danlu
    from danlu.data.datasets import load_dataset
    from danlu.data.loader import DataTimeout, make_loader
    from danlu.data.wds import loader as wds_loader
    from danlu.data.wds.samples import read_shard
    from danlu.errors import DanluError

    root = shards / "shards"
    overrides = [*COMMON, f"data.root={root}", "data.batch_size=16", "data.workers=2", "data.timeout=3"]
    full = danlu.train(overrides=overrides, device="cpu", out=tmp_path / "full", quiet=True)
    # the sample to hang on: the first of epoch 2's first batch (4 batches an epoch), in the run's order (run.seed=3)
    train, _ = load_dataset("wds", root=str(root), size=16, streams=4)
    order = make_loader(train.images, None, 16, device="cpu", seed=3)

    def taken(epoch):  # (shard, index among its samples) of each sample the epoch's batches take, in batch order
        shard_at, within = order.order(epoch)
        rows = np.concatenate([order.positions(i) for i in range(len(order))])
        return list(zip(shard_at[rows].tolist(), within[rows].tolist()))

    k, w = taken(2)[0]
    before = taken(0).count((k, w)) + taken(1).count((k, w))  # (an epoch leaves N mod 16 samples out)
    shard = train.images.shards[k].url
    hanging = read_shard(shard, train.images.labels)[0][w][1]  # its image's bytes
    seen = multiprocessing.Value("i", 0)  # decodes of that sample, in whichever decode process (shared memory)
    real = wds_loader.decode_rows

    def decode_rows(data, out, lo, hi, *rest):
        if hanging in data[lo:hi]:
            with seen.get_lock():
                seen.value += 1
                n = seen.value
            if n == before + 1:  # in epoch 2 it hangs, until the loader ends the process
                time.sleep(60)
        return real(data, out, lo, hi, *rest)

    monkeypatch.setattr(wds_loader, "decode_rows", decode_rows)
    gc.collect()  # the full run's decode processes now, not mid-run: torch's finalizer joins them, in any thread
    with pytest.raises(DataTimeout) as e:
        danlu.train(overrides=overrides, device="cpu", out=tmp_path / "hung", quiet=True)
    msg = str(e.value)
    assert isinstance(e.value, DanluError) and "\n" not in msg
    assert msg.startswith("data.timeout=3: no batch for 3 s at epoch 2, batch 0 of 4: decode process ") and shard in msg
    assert sorted(p.name for p in (tmp_path / "hung" / "snapshots").glob("iter_*.pt")) == ["iter_00000006.pt"]
    monkeypatch.undo()
    gc.collect()
    resumed = danlu.train(resume=tmp_path / "hung", device="cpu", quiet=True)
    assert resumed.iterations == full.iterations == 10
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "hung")
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit


def test_bad_samples_are_skipped_counted_and_reported_and_training_goes_on(tmp_path):
    import io

    import numpy as np
    import webdataset
    from PIL import Image

    def jpg(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((18, 18, 3), 40 * (i % 3) + 20, np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    for split, n_shards in (("train", 4), ("val", 1)):
        for k in range(n_shards):
            with webdataset.TarWriter(str(tmp_path / f"{split}-{k:06d}.tar"), encoder=False) as w:
                for j in range(10):
                    i = 100 * k + j
                    sample = {"__key__": f"{split}{i:04d}", "jpg": jpg(i), "cls": str(i % 3).encode()}
                    if split == "train" and i == 3:
                        del sample["cls"]  # a sample without a label
                    if split == "train" and i == 105:
                        sample["jpg"] = b"\xff\xd8\xff\xe0 truncated jpeg"  # an image that does not decode
                    w.write(sample)
    cut = tmp_path / "train-000003.tar"
    cut.write_bytes(cut.read_bytes()[:6000])  # a truncated shard
    r = run_cli("train", "--device", "cpu", "--out", str(tmp_path / "run"),
                *sets("model.name=lenet", "data.name=wds", f"data.root={tmp_path}", "data.size=16",
                      "data.batch_size=8", "data.streams=2", "run.max_iter=6", "run.tensorboard=false"),
                cwd=tmp_path, timeout=300, env={"PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("danlu: warning: data:")]
    assert any("no index.json" in ln for ln in warned) and any("skipped 2 sample(s)" in ln for ln in warned)
    assert any("train0105: not a readable image" in ln for ln in warned)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    reasons = {e.get("key"): e["reason"] for e in report["skipped"]}
    assert reasons["train0003"] == "no label (.cls)" and reasons["train0105"].startswith("not a readable image")
    assert reasons[None].startswith("shard ends early") and report["skipped_count"] == 3


def test_train_from_shards_served_over_http(shards, file_server, tmp_path):
    for p in (shards / "shards").iterdir():
        file_server.files[f"wds/{p.name}"] = p.read_bytes()
    r = run_cli("train", "--device", "cpu", "--out", str(tmp_path / "run"),
                *sets(*COMMON[:-1], f"data.root={file_server.url}wds/", "data.batch_size=16", "run.max_iter=3",
                      "run.snapshot_every=0"), cwd=tmp_path, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["iterations"] == 3
    assert any(name.startswith("wds/train-") for name, _ in file_server.requests)
    bad = run_cli("train", "--device", "cpu", *sets(*COMMON, f"data.root={file_server.url}nothing/"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "exit status 22" in bad.stderr


def test_inspect_prints_counts_classes_shard_sizes_and_draws_samples(shards, tmp_path):
    r = run_cli("data", "inspect", str(shards / "shards"), "-o", str(tmp_path / "sheet.png"), "--samples", "6")
    assert r.returncode == 0, r.stderr
    assert "3 classes: a, b, c" in r.stdout and "train: 72 samples in" in r.stdout and "test: 12 samples" in r.stdout
    assert "MiB a shard" in r.stdout and "per class: a 24, b 24, c 24" in r.stdout
    from PIL import Image

    assert Image.open(tmp_path / "sheet.png").size[0] > 300
    missing = run_cli("data", "inspect", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr


def test_prepare_options_that_do_not_fit_the_format_are_one_line_errors(shards, tmp_path):
    src = str(shards / "photos")
    for args, words in ((["--quality", "80"], "only for --format wds"),
                        (["--format", "wds", "--size", "8", "9"], "takes one number"),
                        (["--format", "wds", "--quality", "0"], "--quality 0: expected 1..100")):
        r = run_cli("prepare", src, "-o", str(tmp_path / "x"), *args)
        assert r.returncode == 2 and words in r.stderr, r.stderr

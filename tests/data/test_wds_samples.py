"""A shard's samples (wds.samples): labels in .cls, .txt or a JSON field; samples without an image or a label, images
that do not decode and a truncated shard are counted skips, never a hang."""
from __future__ import annotations

import warnings

import pytest
import torch

from danlu.data.datasets import load_dataset
from danlu.data.loader import make_loader
from shardfiles import load, sample_ids, write_shards


def test_txt_labels_and_integer_labels(tmp_path):
    root = tmp_path / "t"
    write_shards(root, [4, 4], extra=lambda i: {"cls": None, "txt": f" {i % 3}\n".encode()})
    train, test = load(root, label_key="txt")
    assert train.classes == ["0", "1", "2"] and len(train) + len(test) == 8


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
    ids = [i for x, _ in batches for i in sample_ids(x)]
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

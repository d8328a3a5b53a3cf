"""Where a shard source's shards and counts come from (wds.shards): index.json, or a scan of shards danlu did not
write; splits, held-out shards, shards changed after indexing, and missing folders or shards as one-line errors."""
from __future__ import annotations

import json
import warnings

import pytest

from danlu.data.datasets import load_dataset
from danlu.data.loader import make_loader
from danlu.data.wds.prepare import inspect_shards, prepare_shards
from danlu.errors import DanluError
import datafiles
from datafiles import class_folder
from shardfiles import load, sample_ids, webp, write_shards

file_server = datafiles.file_server  # the shared fixture, found by pytest under this name


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
        load(one)


def test_foreign_shards_with_class_names_in_json_are_scanned_once_and_say_so(tmp_path):
    names = ["zebra", "ant", "moth"]
    root = tmp_path / "img2dataset"
    write_shards(root, [6, 6, 6], extra=lambda i: {"cls": None, "png": None, "webp": webp(i),
                                                   "json": json.dumps({"label": names[i % 3], "w": 1}).encode()})
    with pytest.warns(UserWarning, match="no index.json .* read all 3 shards once"):
        train, test = load_dataset("wds", root=str(root / "train-{000000..000002}.tar"), size=8,
                                   label_key="json:label", val_fraction=0.3)
    assert train.classes == ["ant", "moth", "zebra"] and len(train) + len(test) == 18
    x, y = next(iter(make_loader(train.images, None, 8, device="cpu")))
    assert y.tolist() == [train.classes.index(names[i % 3]) for i in sample_ids(x)]
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

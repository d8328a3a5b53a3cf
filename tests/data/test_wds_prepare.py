"""Writing WebDataset shards (prepare_shards: what `danlu prepare --format wds` runs) that the webdataset library and
any tar tool read, with an index; a used folder refused; errors that name the function's arguments; inspect_shards."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset

from danlu.data.datasets import load_dataset
from danlu.data.wds.prepare import inspect_shards, prepare_shards
from danlu.errors import DanluError
from datafiles import class_folder
from shardfiles import write_shards


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


def test_bad_arguments_are_one_line_errors_naming_the_argument_not_a_cli_flag(tmp_path):
    """prepare_shards and inspect_shards are the Python API: their errors name their own arguments (size=, quality=,
    shard_mb=, out=, src=, write_index); the CLI words its flags itself. Nothing is written."""
    src = class_folder(tmp_path / "p", classes=("a", "b"), per_class=2, ext=".png", size=(16, 16))
    for kw, words in (({"size": 0}, "size=0: expected a positive shorter side in pixels"),
                      ({"quality": 0}, "quality=0: expected 1..100 (JPEG quality)"),
                      ({"quality": 101}, "quality=101: expected 1..100"),
                      ({"shard_mb": 0}, "shard_mb=0: expected a positive size in MiB")):
        with pytest.raises(DanluError) as e:
            prepare_shards(src, tmp_path / "o", quiet=True, **kw)
        assert str(e.value).startswith(words) and "--" not in str(e.value), str(e.value)
    assert not (tmp_path / "o").exists()
    with pytest.raises(DanluError, match=r"^src=.*nowhere: no such folder"):
        prepare_shards(tmp_path / "nowhere", tmp_path / "o", quiet=True)
    prepare_shards(src, tmp_path / "o", quiet=True)
    with pytest.raises(DanluError, match=r"^out=.*o: already holds shards of another source or options") as e:
        prepare_shards(src, tmp_path / "o", quality=80, quiet=True)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("mine")
    with pytest.raises(DanluError, match=r"^out=.*used: exists and is not empty") as e:
        prepare_shards(src, tmp_path / "used", quiet=True)
    assert (tmp_path / "used" / "x").read_text() == "mine" and "--" not in str(e.value)
    with pytest.raises(DanluError, match=r"^write_index: .*o is not a local folder of shards without index.json"):
        inspect_shards(str(tmp_path / "o"), out_png=None, write_index=True)  # it has one


def test_inspect_counts_shards_and_samples_and_draws_a_contact_sheet(tmp_path):
    root = tmp_path / "s"
    write_shards(root, [5, 7, 6])
    write_shards(root, [4], name="val", start=100)
    info = inspect_shards(str(root), out_png=str(tmp_path / "sheet.png"), samples=4)
    assert info["counts_from"] == "scanned 4 shards (no index.json)" and info["classes"] == ["0", "1", "2"]
    assert info["splits"]["train"]["samples"] == 18 and info["splits"]["test"]["samples"] == 4
    assert info["splits"]["train"]["samples_per_shard"] == [5, 6, 7] and info["splits"]["train"]["shards"] == 3
    assert info["splits"]["train"]["per_class"] == {"0": 6, "1": 6, "2": 6}
    from PIL import Image

    assert Image.open(tmp_path / "sheet.png").size[0] > 300 and not (root / "index.json").exists()

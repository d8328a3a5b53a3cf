"""List files: Caffe's ImageData format and CSV with a header; labels.txt; bad lines reported by line number."""
from __future__ import annotations

import pytest
import torch

from danlu.data.datasets import load_dataset
from danlu.data.lists import scan_lists
from danlu.errors import DanluError
from datafiles import class_folder


@pytest.fixture
def pets(tmp_path):
    return class_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=5)


def test_caffe_list_with_bad_lines_reported_by_number(pets, tmp_path):
    (pets / "cat" / "broken.png").write_text("not a png")
    lines = [f"cat/{i:03d}.png 0" for i in range(5)] + [f"dog/{i:03d}.png 1" for i in range(5)]
    lines[3:3] = ["cat/missing.png 0", "dog/000.png seven", "just_a_path.png", "# a comment", "",
                  "cat/broken.png 0", "dog/001.png -1"]
    lst = tmp_path / "train.txt"
    lst.write_text("\n".join(lines) + "\n")
    train, test = load_dataset("list", train_list=str(lst), root=str(pets), size=8, val_fraction=0.2)
    assert len(train) + len(test) == 10 and train.classes == ["0", "1"]
    skipped = {s["line"]: s["reason"] for s in train.report["skipped"]}
    assert set(skipped) == {4, 5, 6, 9, 10}
    assert "file not found" in skipped[4]
    assert "bad label 'seven'" in skipped[5] and "expected 0..1" in skipped[5]
    assert "expected 'relative/path.jpg label'" in skipped[6]
    assert "not a readable image" in skipped[9]
    assert "bad label '-1'" in skipped[10]
    assert [s["line"] for s in train.report["skipped"]] == [4, 5, 6, 9, 10]  # in line order
    assert all(s["list"] == str(lst) for s in train.report["skipped"])
    # labels follow the list: colour of class 1 is brighter
    assert train.images[train.labels == 1].float().mean() > train.images[train.labels == 0].float().mean() + 40


def test_pandas_csv_with_names_and_a_val_list(pets, tmp_path):
    # DataFrame({'images': [...], 'label': [...]}).to_csv(path) writes an unnamed index column first
    rows = [f"{i},{c}/{j:03d}.png,{c}" for i, (c, j) in enumerate((c, j) for c in ("cat", "dog") for j in range(4))]
    (tmp_path / "train.csv").write_text(",images,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text("path,label\ncat/004.png,cat\ndog/004.png,dog\ndog/003.png,horse\n")
    train, test = load_dataset("list", train_list=str(tmp_path / "train.csv"), val_list=str(tmp_path / "val.csv"),
                               root=str(pets), size=8)
    assert train.classes == ["cat", "dog"] and len(train) == 8 and len(test) == 2
    assert train.report["skipped"] == [{"list": str(tmp_path / "val.csv"), "line": 4, "text": "dog/003.png horse",
                                        "reason": "bad label 'horse'; expected one of cat, dog"}]


def test_labels_txt_names_integer_labels(pets, tmp_path):
    (pets / "list.txt").write_text("".join(f"{c}/{j:03d}.png {k}\n" for k, c in enumerate(("cat", "dog"))
                                           for j in range(5)))
    (pets / "labels.txt").write_text("tabby\nbeagle\nunused\n")
    files = scan_lists(pets / "list.txt")  # root defaults to the list's folder
    assert files.classes == ["tabby", "beagle", "unused"] and len(files.train) == 10
    train, _ = load_dataset("list", train_list=str(pets / "list.txt"), size=8)
    assert train.classes == ["tabby", "beagle", "unused"] and set(train.labels.tolist()) <= {0, 1}
    assert torch.bincount(train.labels, minlength=3)[2] == 0  # a class named but unused is allowed in a list


def test_list_errors_are_one_line_and_name_the_file(pets, tmp_path):
    with pytest.raises(DanluError, match="no such list file"):
        scan_lists(tmp_path / "nope.txt", root=pets)
    (tmp_path / "bad.csv").write_text("filename,score\na.png,1\n")
    with pytest.raises(DanluError, match=r"has no label column"):
        scan_lists(tmp_path / "bad.csv", root=pets)
    (tmp_path / "none.txt").write_text("cat/zzz.png 0\ndog/yyy.png 1\n")
    with pytest.raises(DanluError, match=r"none.txt: no usable line .*line 1: file not found"):
        scan_lists(tmp_path / "none.txt", root=pets)
    (tmp_path / "one.txt").write_text("cat/000.png 0\ncat/001.png 0\n")
    with pytest.raises(DanluError, match="expected at least 2"):
        load_dataset("list", train_list=str(tmp_path / "one.txt"), root=str(pets), size=8)
    with pytest.raises(DanluError, match="data.train_list: not set"):
        load_dataset("list", root=str(pets))

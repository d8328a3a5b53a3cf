"""Evaluation a person reads: per-class accuracy and the confusion matrix (counted beside the test figures), the
JSON and PNG in the run folder, and `danlu eval` naming the worst classes."""
import json

import pytest
import torch

import danlu
from conftest import TINY
from danlu.data.augment import Augment
from danlu.data.loader import make_loader
from danlu.engine.distributed import Dist
from danlu.tasks import classification as loop
from danlu.tasks.classification import class_report
from danlu.engine.precision import Precision
from danlu.report import worst_lines, write_class_report


def _evaluate(num_classes=4, n=50, batch=16):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, num_classes))
    aug = Augment(scale=1 / 255)
    loader = make_loader(images, labels, batch, device="cpu", shuffle=False, drop_last=False)
    figures = loop.evaluate(model, loader, aug, Precision("fp32", "cpu"), Dist())
    with torch.no_grad():
        pred = model(aug(images, train=False)).argmax(1)
    return figures, labels, pred


def test_the_confusion_matrix_counts_every_test_image_once():
    figures, labels, pred = _evaluate()
    want = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(labels.tolist(), pred.tolist()):
        want[t, p] += 1
    assert torch.equal(figures.confusion, want)
    assert figures.per_class.tolist() == [[int((labels == c).sum()), int(want[c, c])] for c in range(4)]
    assert figures["acc"] == pytest.approx(want.diag().sum().item() / 50)
    assert "per_class" not in figures and "confusion" not in figures  # beside the logged figures, not in them


def test_above_the_limit_only_the_per_class_counts(monkeypatch, tmp_path):
    monkeypatch.setattr(loop, "CONFUSION_MAX_CLASSES", 3)
    figures, labels, pred = _evaluate()
    assert figures.confusion is None
    assert figures.per_class[:, 1].tolist() == [int(((labels == c) & (pred == c)).sum()) for c in range(4)]
    report = class_report(figures, list("abcd"))
    assert report["confusion"] is None and report["per_class"][0]["confused_with"] is None
    assert [p.name for p in write_class_report(report, tmp_path)] == ["confusion.json"]


def test_the_report_ranks_the_worst_classes_and_names_their_confusions():
    class F(dict):
        pass

    f = F(acc=0.5, samples=20)
    f.confusion = torch.tensor([[5, 0, 0], [4, 1, 0], [1, 3, 6]])
    f.per_class = torch.tensor([[5, 5], [5, 1], [10, 6]])
    r = class_report(f, ["cat", "dog", "owl"], worst=2)
    assert r["worst"] == ["dog", "owl"]
    dog = r["per_class"][1]
    assert (dog["accuracy"], dog["confused_with"], dog["confused"]) == (0.2, "cat", 4)
    assert r["per_class"][0]["confused_with"] is None  # nothing taken for another class
    assert worst_lines(r)[0] == "  dog  0.2000 of 5 images, most often taken for cat (4 of them)"
    assert class_report({"verification_acc": 0.9}, ["a"]) is None  # face verification: no classes to report


def test_a_run_writes_it_and_eval_prints_the_worst_classes(tmp_path, capsys):
    from danlu.cli import main

    out = tmp_path / "run"
    r = danlu.train("lenet_mnist5k", overrides=TINY + ["run.max_iter=16", "precision=fp32"], out=out, device="cpu",
                    quiet=True)
    report = json.loads((out / "confusion.json").read_text())
    assert report["accuracy"] == r.test_accuracy and len(report["confusion"]) == 10
    assert sum(map(sum, report["confusion"])) == 128 == sum(c["images"] for c in report["per_class"])
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    assert "worst classes (of 10):" in shown
    first = sorted(report["per_class"], key=lambda c: (c["accuracy"], -c["images"], c["class"]))[0]
    assert f"  {first['class']}  {first['accuracy']:.4f} of {first['images']} images" in shown
    assert json.loads((out / "eval_confusion.json").read_text())["confusion"] == report["confusion"]
    assert (out / "eval_confusion.png").is_file()
    assert main(["eval", str(out), "--device", "cpu", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["worst"] == report["worst"] and len(j["per_class"]) == 10

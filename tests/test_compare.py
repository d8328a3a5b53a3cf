"""`danlu compare`: one table, curves overlaid, labels from what differs between the recipes."""
import json

import pytest

import danlu
from conftest import TINY
from danlu.compare import compare, differing
from danlu.errors import DanluError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for name, lr in (("slow", 0.005), ("fast", 0.05)):
        danlu.train(None, overrides=TINY + ["run.max_iter=20", "run.test_interval=10", f"optim.lr={lr}"],
                    out=root / name, device="cpu", quiet=True)
    return root / "slow", root / "fast"


def test_table_and_picture_labelled_by_the_difference(runs, cli, tmp_path):
    png = tmp_path / "cmp.png"
    r = cli("compare", *map(str, runs), "-o", str(png))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "differs", "test accuracy", "test loss", "iterations", "train time (s)", "images/s",
                      "device", "precision", "world size"]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:4]]
    assert [row[:2] for row in rows] == [["slow", "optim.lr=0.005"], ["fast", "optim.lr=0.05"]]
    for row, run in zip(rows, runs):
        s = json.loads((run / "summary.json").read_text())
        assert row[2] == f"{s['test_accuracy']:.4f}" and row[4] == "20" and row[8] == "fp32" and row[9] == "1"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"curves: {png}" in r.stdout


def test_labels_fall_back_to_folder_names_and_ignore_bookkeeping(runs, tmp_path):
    slow, _ = runs
    r = compare([slow, slow], None)
    assert r.labels == ["slow", "slow"] and r.picture is None and "differs" not in r.table.splitlines()[0]
    a = {"optim": {"lr": 0.1}, "run": {"display": 10, "seed": 1}, "precision": "fp32"}
    b = {"optim": {"lr": 0.1}, "run": {"display": 50, "seed": 2}, "precision": "bf16"}
    assert differing([a, b]) == ["run.seed", "precision"]
    assert differing([a, a], [{"world size": 1}, {"world size": 4}]) == ["world size"]


def test_unfinished_or_missing_runs_are_named(runs, tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(DanluError, match="half: no summary.json"):
        compare([runs[0], tmp_path / "half"], None)
    with pytest.raises(DanluError, match="nope: no such run folder"):
        compare([tmp_path / "nope"], None)

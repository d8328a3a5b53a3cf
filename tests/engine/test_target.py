"""run.target / --until: the run stops at the first evaluation that reaches the target, says where (training time,
iterations, images), and a resumed run keeps the target and the clock."""
import json
import shutil

import torch
from safetensors.torch import load_file

import danlu
from conftest import TINY, run_cli, sets

# synthetic LeNet that passes acc 0.5 after a few dozen iterations, evaluated every 5
RECIPE = {"model": {"name": "lenet"}, "devices": {"device": "cpu"}, "data": {"batch_size": 16},
          "optim": {"lr": 0.02}, "run": {"max_iter": 400, "test_interval": 5, "display": 5, "snapshot_every": 5,
                                         "keep_snapshots": 100, "tensorboard": False, "target": {"value": 0.5}}}


def _sets():
    return danlu.load_dataset("synthetic", train_size=512, test_size=128)


def _tests(run):
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["kind"] == "test"]


def test_the_run_stops_at_the_first_evaluation_reaching_the_target(tmp_path):
    train, test = _sets()
    r = danlu.train(RECIPE, train_data=train, test_data=test, out=tmp_path / "run", quiet=True)
    tests = _tests(tmp_path / "run")
    assert tests[-1]["acc"] >= 0.5 and all(e["acc"] < 0.5 for e in tests[:-1])  # the first one that reached it
    s = r.summary
    assert 5 < s["iterations_to_target"] == r.iterations == tests[-1]["iter"] < 400  # stopped there
    assert s["target"] == {"metric": "acc", "value": 0.5} and s["target_reached"] is True
    assert s["images_to_target"] == 16 * r.iterations
    assert s["seconds_to_target"] == s["train_seconds"] > 0  # training time only, as train_seconds
    assert (tmp_path / "run" / "snapshots" / f"iter_{r.iterations:08d}.pt").is_file()  # a final snapshot


def test_a_target_never_reached_runs_to_the_end_and_says_so(tmp_path):
    train, test = _sets()
    recipe = {**RECIPE, "run": {**RECIPE["run"], "max_iter": 10, "target": {"metric": "loss", "value": 1e-9}}}
    r = danlu.train(recipe, train_data=train, test_data=test, out=tmp_path / "run", quiet=True)
    assert r.iterations == 10 and r.summary["target_reached"] is False
    assert r.summary["seconds_to_target"] is None and r.summary["images_to_target"] is None


def test_a_resumed_run_keeps_the_target_and_the_clock(tmp_path):
    train, test = _sets()
    full = danlu.train(RECIPE, train_data=train, test_data=test, out=tmp_path / "full", quiet=True)
    stop = full.iterations
    # the same run as if it had been killed after its snapshot 10 iterations before the target
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for f in ("model.safetensors", "summary.json"):
        (cut / f).unlink()
    for snap in (cut / "snapshots").glob("iter_*"):
        if int(snap.name[5:13]) > stop - 10:
            snap.unlink()
    saved = torch.load(cut / "snapshots" / f"iter_{stop - 10:08d}.pt", weights_only=True)["loop"]["clock"]
    r = danlu.train(resume=cut, train_data=train, test_data=test, quiet=True)
    assert r.summary["iterations_to_target"] == stop and r.summary["images_to_target"] == 16 * stop
    assert r.summary["seconds_to_target"] > saved["train_seconds"] > 0  # the time before the snapshot counts
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_until_on_the_command_line(tmp_path):
    r = run_cli("train", "--until", "acc=0.3", "--out", str(tmp_path / "run"),
                *sets(*TINY, "run.max_iter=300", "run.test_interval=5"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["target"] == {"metric": "acc", "value": 0.3} and s["iterations_to_target"] == s["iterations"] < 300
    assert "target reached in" in r.stdout
    bad = run_cli("train", "--until", "acc", "--out", str(tmp_path / "bad"), *sets(*TINY))
    assert bad.returncode == 2 and "--until acc: expected METRIC=VALUE" in bad.stderr

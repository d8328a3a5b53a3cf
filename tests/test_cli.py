"""The real CLI, as a user types it, on tiny data."""
import json

import pytest
from safetensors.torch import load_file

from conftest import TINY, sets


def test_sixty_iterations_on_mnist5k_learn(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--out", str(out), "--device", "cpu",
            *sets("run.max_iter=60", "run.test_interval=30", "run.display=20", "run.tensorboard=false"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.6  # chance is 0.1
    assert summary["iterations"] == 60
    for key in ("test_accuracy", "test_loss", "iterations", "epochs", "train_seconds", "images_per_second", "device",
                "recipe"):
        assert key in summary
    assert summary["recipe"]["model"]["name"] == "lenet"
    for name in ("recipe.yaml", "metrics.jsonl", "curves.png", "model.safetensors"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "snapshots").glob("iter_*.pt"))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tests = [e for e in events if e["kind"] == "test"]
    trains = [e for e in events if e["kind"] == "train"]
    assert [e["iter"] for e in tests] == [30, 60]
    assert [e["iter"] for e in trains] == [20, 40, 60]
    assert {"iter", "epoch", "lr", "loss", "acc", "images_per_second", "time"} <= set(trains[0])
    assert trains[-1]["loss"] < trains[0]["loss"]
    assert "test accuracy" in r.stdout and str(out) in r.stdout


def test_tensorboard_events_are_written(cli, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    r = cli("train", "--out", str(out), "--device", "cpu", *sets(*TINY, "run.max_iter=10", "run.tensorboard=true"))
    assert r.returncode == 0, r.stderr
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("args", [
    ["--set", "optim.lr=-1"],
    ["--set", "optim.lrr=0.1"],
    ["--set", "run.max_iter=abc"],
    ["no_such_recipe.yaml"],
    ["--set", "model.name=nosuchnet"],
    ["--set", "data.name=nosuchdata"],
    ["--device", "tpu"],
    ["--set", "optim.lr=-0.5"],
    ["--set", "data.batch_size=0"],
    ["--set", "data.batch_size=-8"],
    ["--set", "run.max_iter=0"],
    ["--set", "run.max_iter=-5"],
    ["--set", "run.epochs=0"],
    ["--set", "optim.lr=.inf"],
    ["--set", "run.on_nan=ignore"],
    ["--set", "model.name=inception_resnet_v1", "--set", "data.size=64"],  # below its 75 px: no traceback at step 1
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(cli, tmp_path, args):
    r = cli("train", *args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run" / "snapshots").exists()


def test_out_folder_holding_a_run_is_not_overwritten(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--out", str(out), *sets(*TINY, "run.max_iter=4")).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    r = cli("train", "--out", str(out), *sets(*TINY, "run.max_iter=8"))
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (out / "model.safetensors").read_bytes() == before


def test_eval_reproduces_the_final_test_accuracy(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--out", str(out), *sets(*TINY, "run.max_iter=20", "data.normalize=pixel")).returncode == 0
    r = cli("eval", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert result["acc"] == pytest.approx(summary["test_accuracy"])
    assert result["samples"] == 128


def test_recipes_and_models_are_listed(cli):
    r = cli("recipes")
    assert r.returncode == 0 and "lenet_mnist5k" in r.stdout
    r = cli("models")
    assert r.returncode == 0 and "minigooglenet" in r.stdout.split()


def test_weights_file_holds_the_model(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--out", str(out), *sets(*TINY, "run.max_iter=3")).returncode == 0
    w = load_file(str(out / "model.safetensors"))
    assert w["conv1.weight"].shape == (20, 1, 5, 5) and w["fc2.weight"].shape == (10, 500)


def test_a_diverging_loss_stops_the_run_with_the_reason(cli, tmp_path):
    r = cli("train", "--out", str(tmp_path / "run"), *sets(*TINY, "optim.lr=50", "run.max_iter=200"))
    assert r.returncode == 2 and "diverged" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_eval_of_a_face_run_prints_its_verification_figures(tmp_path, capsys):
    """`danlu eval RUN` without --json on a face run: one line with the verification figures (it used to look for
    a classifier's 'acc' and fail with KeyError), the same figures --json gives."""
    import re

    from danlu.cli import main
    from tests.face.synth import train_tiny_face_run

    out = tmp_path / "face"
    train_tiny_face_run(out)
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith(f"{out} on synthetic ({figures['samples']} images): ")
    m = re.search(r"verification accuracy ([\d.]+) \+- ([\d.]+) on (\d+) pairs of held-out identities, "
                  r"threshold (-?[\d.]+); TAR ", line)
    assert m, line
    assert m.groups() == (f"{figures['verification_acc']:.4f}", f"{figures['verification_std']:.4f}",
                          str(figures["pairs"]), f"{figures['threshold']:.4f}")

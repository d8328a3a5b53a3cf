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


def test_recipes_print_each_recipes_first_sentence_whole_in_readable_lines(cli):
    """`danlu recipes` used to print the first comment line, cut mid-sentence ('... with an')."""
    import re

    r = cli("recipes", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(ln) <= 80 for ln in lines), [ln for ln in lines if len(ln) > 80]
    entries = re.split(r"\n(?=\S)", r.stdout.strip())  # a recipe's line, then its description's lines (indented)
    about = {e.split()[0]: " ".join(e.splitlines()[1:]).split() for e in entries}
    assert " ".join(about["face_arcface_light"]).endswith("between two photos of one person (pose, framing, light, "
                                                          "focus, occlusion).")
    assert " ".join(about["lenet_mnist5k"]) == ("The default: Caffe's LeNet on 5,000 real MNIST digits shipped with "
                                                "danlu (4,000 train / 1,000 held back)")
    assert " ".join(about["mnist_fast"]).endswith("one-cycle SGD over 1.5 epochs, label smoothing; stops at the first "
                                                  "test on the full 10,000 digits that reaches 0.99 and records "
                                                  "seconds_to_target (training time only) in summary.json.")
    assert " ".join(about["resnet18_finetune"]).endswith("(hymenoptera_data: 244 train / 153 val photos)")


def test_data_inspect_writes_beside_the_shards_with_whole_keys(tmp_path, monkeypatch, capsys):
    """The contact sheet used to land in the current folder as inspect.png, its captions cut to a key's last 14
    characters ('train_000000001' read 'rain_000000001'): now inspect.png is written in the shard folder (-o
    elsewhere) and every caption holds its whole key."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from danlu.cli import main
    from danlu.data.wds.prepare import prepare_shards

    for c in ("ants", "bees"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(tmp_path / "photos" / c / f"{c}_{i}.png")
    prepare_shards(tmp_path / "photos", tmp_path / "shards", quiet=True)
    import tarfile

    keys = [m.name.rsplit(".", 1)[0] for tar in sorted((tmp_path / "shards").glob("*.tar")) for m in tarfile.open(tar)
            if m.name.endswith(".cls")]
    assert min(len(k) for k in keys) > 14  # 'train_000000001': longer than the old captions kept
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    monkeypatch.chdir(tmp_path / "photos")  # the current folder: nothing may be written here
    assert main(["data", "inspect", str(tmp_path / "shards"), "--samples", "4"]) == 0
    assert f"contact sheet: {tmp_path / 'shards' / 'inspect.png'}" in capsys.readouterr().out
    assert (tmp_path / "shards" / "inspect.png").is_file() and not (tmp_path / "photos" / "inspect.png").exists()
    captions = [ax.get_title() for ax in figures[0].axes if ax.get_title()]
    assert len(captions) == 4
    for caption in captions:
        label, *key = caption.split("\n")
        assert label in ("ants", "bees") and "".join(key) in keys, caption
    assert main(["data", "inspect", str(tmp_path / "shards"), "-o", str(tmp_path / "sheet.png")]) == 0
    assert (tmp_path / "sheet.png").is_file()


def test_data_sample_writes_one_image_of_a_named_set_with_its_label_for_predict(cli, tmp_path):
    """`danlu data sample mnist5k -o digit.png`: the README's predict line needs a digit.png; this makes one (the
    test split's image I, its pixels exactly) and says its label; predict then reads it as the run's own data."""
    import numpy as np
    from PIL import Image

    from danlu.data.datasets import load_dataset

    r = cli("data", "sample", "mnist5k", "-o", str(tmp_path / "digit.png"), "--index", "7")
    assert r.returncode == 0, r.stderr
    _, test = load_dataset("mnist5k")
    label = int(test.labels[7])
    assert r.stdout.strip() == (f"{tmp_path / 'digit.png'}: mnist5k test image 7 of 1000 (1x28x28), label {label}, "
                                f"class {test.classes[label]}")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "digit.png")), test.images[7, 0].numpy())
    bad = cli("data", "sample", "mnist5k", "-o", str(tmp_path / "x.png"), "--index", "1000")
    assert bad.returncode == 2 and "expected 0 to 999" in bad.stderr and not (tmp_path / "x.png").exists()

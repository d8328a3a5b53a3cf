"""`danlu predict` on the run `make train` leaves (the default recipe, shortened): real digits as PNG files."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import danlu
from conftest import TINY
from danlu.runs import load_run
from danlu.data.datasets import load_dataset
from danlu.errors import DanluError
from danlu.predict import predict


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    """The default recipe (what `make train` runs), 80 iterations: about 0.9 test accuracy."""
    out = tmp_path_factory.mktemp("predict") / "run"
    danlu.train(None, overrides=["run.max_iter=80", "run.test_interval=80", "run.tensorboard=false"], out=out,
                device="cpu", quiet=True)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """30 held-back digits of the run's own test split as PNG files in digits/<i>.png, and their labels."""
    folder = tmp_path_factory.mktemp("digits")
    _, test = load_dataset("mnist5k")
    for i in range(30):
        Image.fromarray(test.images[i, 0].numpy()).save(folder / f"{i:02d}.png")
    return folder, test.images[:30], test.labels[:30]


def test_predictions_are_the_models_own_on_the_decoded_files(lenet_run, digits, cli, tmp_path):
    folder, images, labels = digits
    r = cli("predict", str(lenet_run), str(folder), "--top", "3", "--json", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "p.json").read_text())
    got = result["images"]
    assert [g["file"] for g in got] == [str(folder / f"{i:02d}.png") for i in range(30)]  # sorted, all of them
    # the reference: the run's model, preprocessing and precision on the original tensors (PNG is lossless)
    run = load_run(lenet_run, device="cpu")
    with torch.no_grad(), run.precision.autocast():
        probs = run.model(run.augment(images, train=False)).float().softmax(1)  # (30, 10)
    top = probs.topk(3, dim=1)
    for g, p, idx in zip(got, top.values.tolist(), top.indices.tolist()):
        assert [t["class"] for t in g["top"]] == [run.classes[i] for i in idx]
        assert [t["prob"] for t in g["top"]] == pytest.approx(p, abs=1e-5)
        assert g["ms"] > 0
    accuracy = np.mean([int(g["top"][0]["class"]) == y for g, y in zip(got, labels.tolist())])
    assert accuracy >= 0.8  # chance is 0.1
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 31 and lines[-1].startswith("30 images in") and "ms per image" in lines[-1]
    assert lines[0].startswith(str(folder / "00.png")) and lines[0].endswith(" ms)")


def test_unreadable_files_are_reported_and_the_rest_go_on(lenet_run, digits, cli, tmp_path):
    folder, _, _ = digits
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    r = cli("predict", str(lenet_run), str(folder / "00.png"), str(tmp_path / "broken.png"),
            str(tmp_path / "empty.jpg"), str(tmp_path / "missing.png"), "--csv", str(tmp_path / "p.csv"))
    assert r.returncode == 1  # some inputs were not classified
    assert "Traceback" not in r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("danlu: warning:")]
    assert len(warned) == 3 and all(any(n in w for w in warned) for n in ("broken.png", "empty.jpg", "missing.png"))
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [row["file"].rsplit("/", 1)[-1] for row in rows] == ["00.png", "missing.png", "broken.png", "empty.jpg"]
    assert rows[0]["class_1"] and float(rows[0]["prob_1"]) > float(rows[0]["prob_5"])
    assert sum(1 for row in rows if row["error"]) == 3


def test_photos_are_converted_to_the_runs_channels_and_size(lenet_run, tmp_path):
    big = np.zeros((140, 100, 3), np.uint8)
    big[20:120, 45:55] = 255  # a white vertical bar on black, RGB, 100 x 140: a "1"
    Image.fromarray(big).save(tmp_path / "one.jpg")
    r = predict(lenet_run, [tmp_path / "one.jpg"], top=20)
    assert not r.errors and len(r.predictions[0].top) == 10  # top clamped to the run's 10 classes
    assert sum(p for _, p in r.predictions[0].top) == pytest.approx(1, abs=1e-4)


def test_rgb_run_with_pixel_mean(tmp_path):
    out = tmp_path / "rgb"
    danlu.train(None, overrides=TINY + ["data.channels=3", "data.size=20", "data.normalize=pixel", "run.max_iter=5"],
                out=out, device="cpu", quiet=True)
    _, test = load_dataset("synthetic", size=20, channels=3, train_size=512, test_size=128)
    Image.fromarray(test.images[0].permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    Image.fromarray(test.images[0, 0].numpy()).save(tmp_path / "gray.png")  # a gray file for an RGB run
    r = predict(out, [tmp_path / "x.png", tmp_path / "gray.png"], top=2)
    run = load_run(out, device="cpu")
    assert run.augment.mean.shape == (3, 20, 20)  # the per-pixel mean the run trained with, from the run folder
    with torch.no_grad():
        p = run.model(run.augment(test.images[:1], train=False)).softmax(1)[0]
    assert r.predictions[0].top[0][1] == pytest.approx(p.max().item(), abs=1e-5)
    assert len(r.predictions) == 2


def test_nothing_to_classify_is_an_error(lenet_run, tmp_path):
    with pytest.raises(DanluError, match="no images to classify"):
        predict(lenet_run, [tmp_path / "nope.png"])
    with pytest.raises(DanluError, match="no such run folder"):
        predict(tmp_path / "norun", [tmp_path])


def test_only_a_text_file_is_no_images_with_the_file_named_and_exit_2(lenet_run, cli, tmp_path):
    """It used to print '0 images in 0.03 s (32.9 ms per image)'."""
    (tmp_path / "notes.txt").write_text("not an image\n")
    r = cli("predict", str(lenet_run), str(tmp_path / "notes.txt"))
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"danlu: error: no images to classify: {tmp_path / 'notes.txt'}: not a readable image")


def test_a_file_named_and_inside_a_named_folder_is_classified_once(lenet_run, digits):
    folder, _, _ = digits
    r = predict(lenet_run, [folder / "07.png", folder, f"{folder}/../{folder.name}/07.png"])
    files = [p.file for p in r.predictions]
    assert len(files) == 30 and files[0] == str(folder / "07.png") and str(folder / "07.png") not in files[1:]


def test_label_smoothing_is_named_as_the_reason_probabilities_stop_below_one(lenet_run, digits, cli, tmp_path):
    """The default recipe trains with optim.label_smoothing 0.1: clearly right digits get 0.77-0.93, and the user is
    told why (the ceiling 1 - 0.1 + 0.1/10 = 0.91); a run without smoothing gets no note."""
    folder, _, _ = digits
    r = cli("predict", str(lenet_run), str(folder / "00.png"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        "danlu: note: the run trained with optim.label_smoothing=0.1, which aims the true class at 0.91 "
        "(1 - 0.1 + 0.1/10): a probability near that is as sure as it gets; compare them with each other, not with 1"]
    assert len(r.stdout.strip().splitlines()) == 2  # the image and the summary: the note stays off standard output
    plain = tmp_path / "plain"
    danlu.train(None, overrides=TINY + ["optim.label_smoothing=0", "run.max_iter=3"], out=plain, device="cpu",
                quiet=True)
    assert predict(plain, [folder / "00.png"]).notes == []
    from danlu.predict import smoothing_note

    assert smoothing_note(0.1, 2, [0.62, 0.95]) is not None  # the target 0.95: nothing shown goes past it
    assert smoothing_note(0.1, 2, [0.62, 1.0]) is None  # a run sure past its target: the note would contradict it

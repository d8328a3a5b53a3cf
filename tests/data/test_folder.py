"""Class folders: scanning, parallel decode and resize, bad files skipped and reported, clear errors, the CLI."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import run_cli, sets
from danlu.data.datasets import load_dataset
from danlu.data.decode import BadImage, decode_image, decode_many
from danlu.errors import DanluError
from datafiles import class_folder, write_image


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (H, W, 3) uint8 with structure, so resampling differences stay small and meaningful."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    f = rng.uniform(2, 6, 3) * 2 * np.pi / max(h, w)  # 2 to 6 waves across the image
    return np.stack([127 + 120 * np.sin(f[c] * (x + 2 * y) + c) for c in range(3)], -1).astype(np.uint8)


def test_a_class_folder_loads_split_and_labelled(tmp_path):
    class_folder(tmp_path / "pets", per_class=10)
    train, test = load_dataset("folder", root=str(tmp_path / "pets"), size=16, val_fraction=0.2)
    assert train.classes == ["cat", "dog", "owl"]
    assert train.images.shape == (24, 3, 16, 16) and test.images.shape == (6, 3, 16, 16)
    assert torch.bincount(test.labels).tolist() == [2, 2, 2]  # stratified
    # each class has its own flat colour: the label can be read back from the pixels
    for s in (train, test):
        means = s.images.float().mean((1, 2, 3))
        assert torch.equal(((means - 60) / 80).round().long(), s.labels)
    again, _ = load_dataset("folder", root=str(tmp_path / "pets"), size=16, val_fraction=0.2)
    assert torch.equal(again.images, train.images)  # seeded split, deterministic decode
    assert train.report["skipped_count"] == 0 and train.report["train_images"] == 24


def test_train_and_val_subfolders_are_used_as_the_split(tmp_path):
    class_folder(tmp_path / "d" / "train", per_class=4)
    class_folder(tmp_path / "d" / "val", classes=("cat", "owl"), per_class=2, seed=1)
    train, test = load_dataset("folder", root=str(tmp_path / "d"), size=(8, 12))
    assert train.images.shape == (12, 3, 8, 12) and test.images.shape == (4, 3, 8, 12)
    assert train.classes == ["cat", "dog", "owl"] and sorted(test.labels.tolist()) == [0, 0, 2, 2]


def test_bad_files_are_skipped_counted_and_reported(tmp_path):
    root = class_folder(tmp_path / "d", per_class=5, ext=".jpg")
    good = (root / "cat" / "000.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "dog" / "notes.txt").write_text("not an image\n")
    (root / "owl" / "empty.png").write_bytes(b"")
    (root / "owl" / ".DS_Store").write_bytes(b"\0\1")  # hidden files are not candidates
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test = load_dataset("folder", root=str(root), size=16, val_fraction=0.2)
    assert len(train) + len(test) == 15
    r = train.report
    assert r["skipped_count"] == 3 and r["files_scanned"] == 18
    reasons = {s["file"]: s["reason"] for s in r["skipped"]}
    assert set(reasons) == {"cat/truncated.jpg", "dog/notes.txt", "owl/empty.png"}
    assert "truncated" in reasons["cat/truncated.jpg"].lower()
    assert reasons["owl/empty.png"] == "empty file (0 bytes)"
    assert "not a readable image" in reasons["dog/notes.txt"]
    msgs = [str(w.message) for w in caught]
    assert any("skipped 3" in m and "data_report.json" in m for m in msgs)


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "no such folder"),
    (lambda p: p.mkdir(), "is empty"),
    (lambda p: (p / "only").mkdir(parents=True) or (p / "only" / "x.png").write_bytes(b""), "found 1 class folder"),
    (lambda p: class_folder(p, per_class=2) and (p / "empty_class").mkdir(), "'empty_class' holds no files"),
    (lambda p: class_folder(p, per_class=2) and (p / "bad").mkdir() or (p / "bad" / "x.jpg").write_text("no"),
     "class 'bad' has no readable image"),
    (lambda p: p.mkdir() or (p / "a.jpg").write_text("x"), "no class folders"),
])
def test_folders_with_nothing_to_train_on_are_clear_errors(tmp_path, make, match):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(DanluError, match=match) as e:
        load_dataset("folder", root=str(root), size=8)
    assert "\n" not in str(e.value) and str(root) in str(e.value)


def test_crop_matches_torchvision_resize_and_center_crop(tmp_path):
    from torchvision.transforms import v2

    img = _photo(90, 150)
    path = write_image(tmp_path / "a.png", img)
    ours = torch.from_numpy(decode_image(path, (48, 48), 3, "crop")).float()
    ref = v2.Compose([v2.Resize(48, antialias=True), v2.CenterCrop(48)])(torch.from_numpy(img).permute(2, 0, 1))
    assert ours.shape == (3, 48, 48)
    assert (ours - ref.float()).abs().mean() < 0.1  # the same geometry and filter: equal up to rounding
    exact = decode_image(path, (20, 30), 3, "exact")
    ref = v2.Resize((20, 30), antialias=True)(torch.from_numpy(img).permute(2, 0, 1))
    assert exact.shape == (3, 20, 30) and (torch.from_numpy(exact).float() - ref.float()).abs().mean() < 0.1


def test_big_jpegs_decode_at_reduced_scale_without_visible_change(tmp_path):
    from PIL import Image
    from torchvision.transforms import v2

    img = _photo(960, 1280)
    path = write_image(tmp_path / "big.jpg", img, quality=95)
    full = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # decoded at full size
    ref = v2.Compose([v2.Resize(64, antialias=True), v2.CenterCrop(64)])(full).float()
    ours = torch.from_numpy(decode_image(path, (64, 64), 3, "crop")).float()  # decoded at 1/8 scale, then resized
    assert (ours - ref).abs().mean() < 1.5


def test_formats_and_grayscale(tmp_path):
    rgb = _photo(20, 24)
    paths = [write_image(tmp_path / f"a{ext}", rgb) for ext in (".png", ".bmp", ".webp", ".gif", ".ppm", ".tif")]
    paths.append(write_image(tmp_path / "g.pgm", rgb[..., 0]))
    from PIL import Image

    deep = Image.fromarray(rgb[..., 1].astype(np.uint16) * 257)  # 16-bit gray
    assert deep.mode.startswith("I;16")
    deep.save(tmp_path / "deep.png")
    paths.append(tmp_path / "deep.png")
    out, bad = decode_many(paths, (10, 12), 1, "exact", workers=2)
    assert bad == {} and out.shape == (len(paths), 1, 10, 12)
    assert abs(out[-1].astype(float).mean() - out[0].astype(float).mean()) < 40  # 16-bit scaled, not clipped white
    assert out[-1].max() < 255


def test_parallel_decode_equals_serial_and_reports_by_index(tmp_path):
    root = class_folder(tmp_path / "d", per_class=8, ext=".jpg")
    paths = sorted(root.rglob("*.jpg"))
    paths.insert(5, tmp_path / "missing.jpg")
    a, bad_a = decode_many(paths, (12, 12), 3, "crop", workers=1)
    b, bad_b = decode_many(paths, (12, 12), 3, "crop", workers=2)
    assert np.array_equal(a, b) and bad_a == bad_b == {5: "file not found"}
    with pytest.raises(BadImage):
        decode_image(tmp_path / "missing.jpg", (4, 4))


def test_cli_trains_on_a_folder_with_a_corrupt_jpeg_and_a_text_file(tmp_path):
    root = class_folder(tmp_path / "imgs", classes=("a", "b"), per_class=12, ext=".jpg")
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(_photo(64, 64)).save(buf, "JPEG")
    (root / "a" / "corrupt.jpg").write_bytes(buf.getvalue()[:300] + b"\xff\xd9")  # header, then nothing
    (root / "b" / "readme.txt").write_text("these are my photos\n")
    out = tmp_path / "run"
    r = run_cli("train", "--out", str(out), "--device", "cpu",
                *sets("model.name=lenet", "data.name=folder", f"data.root={root}", "data.size=16",
                      "data.batch_size=8", "run.max_iter=6", "run.display=3", "run.tensorboard=false"),
                env={"PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert {s["file"] for s in report["skipped"]} == {"a/corrupt.jpg", "b/readme.txt"}
    assert report["train_images"] + report["test_images"] == 24
    warning = [ln for ln in r.stderr.splitlines() if "skipped 2" in ln]
    assert len(warning) == 1 and warning[0].startswith("danlu: warning:")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 6 and summary["classes"] == ["a", "b"]


def test_cli_one_class_folder_exits_2_with_a_short_message(tmp_path):
    """The acceptance check's case: one/only/x.png, an empty file. (The other folder errors: the test above.)"""
    (tmp_path / "one" / "only").mkdir(parents=True)
    (tmp_path / "one" / "only" / "x.png").write_bytes(b"")
    r = run_cli("train", "--device", "cpu", "--out", str(tmp_path / "run"),
                *sets("run.max_iter=5", "data.name=folder", f"data.root={tmp_path / 'one'}"))
    assert r.returncode == 2 and "found 1 class folder ('only')" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_recipe_data_keys_are_validated():
    from danlu.config import load_recipe

    d = load_recipe(None, ["data.name=folder", "data.root=x", "data.resize=exact", "data.device_cache=false",
                           "data.size=[32,48]", "data.channels=1"]).data
    assert (d.resize, d.device_cache, tuple(d.size), d.channels) == ("exact", False, (32, 48), 1)
    assert load_recipe(None, ["data.device_cache=auto"]).data.device_cache == "auto"
    for bad in ("data.resize=stretch", "data.device_cache=sometimes", "data.channels=2"):
        with pytest.raises(DanluError, match=bad.split("=")[0]):
            load_recipe(None, [bad])
    with pytest.raises(DanluError, match="did you mean 'cifar10'"):
        load_dataset("cifar-10")


def test_the_folder_recipe_trains_on_a_class_folder(tmp_path):
    import danlu

    root = class_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=6, ext=".jpg")
    r = danlu.train("resnet18_folder", overrides=[f"data.root={root}", "data.size=32", "data.batch_size=4",
                                                  "augment.crop=4", "run.max_iter=3", "run.tensorboard=false"],
                    out=tmp_path / "run", device="cpu", quiet=True)
    assert r.iterations == 3 and r.summary["classes"] == ["a", "b", "c"]
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["size"] == [32, 32]

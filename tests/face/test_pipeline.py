"""The whole face path on a synthetic identity set, through the CLI's entry point: prepare -> train -> verify ->
pairs -> embed -> enroll -> identify."""
import json
import shutil

import pytest
import torch

import danlu
from danlu.cli import main
from danlu.face import Gallery, load_face_run
from danlu.models.heads import COLLAPSED

from .synth import make_identities

# the recipe's strong augmentation needs more than 200 steps to separate 18 identities; its data.size (64) would
# upsample the 32 px store
TRAIN = ["data.batch_size=32", "run.max_iter=400", "run.test_interval=200", "run.display=50", "data.size=32",
         "run.tensorboard=false", "run.snapshot_every=0", "model.kwargs={width_mult: 0.25}", "data.val_fraction=0.25",
         "data.test_pairs=300", "schedule.warmup=10"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """A raw identity folder (24 identities x 16 images, 64 px, plus one unreadable file), its store (32 px), and a
    run of the light ArcFace recipe trained on 18 identities for 400 iterations (6 held out). Equalized with hist:
    the synthetic faces are flat-shaded and 32 px small, so Tan-Triggs' difference of Gaussians (1 and 2 px) keeps
    little of what tells them apart."""
    root = tmp_path_factory.mktemp("faces")
    raw = make_identities(root / "raw", identities=24, per_identity=16, size=64)
    (raw / "id_05" / "broken.png").write_bytes(b"\x89PNG not really")
    assert main(["face", "prepare", str(raw), "-o", str(root / "store"), "--size", "32", "--quiet",
                 "--equalize", "hist"]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is steadier than two fighting other processes
    try:
        result = danlu.train("face_arcface_light", overrides=[f"data.root={root / 'store'}", *TRAIN],
                             out=root / "run", device="cpu", quiet=True)
    finally:
        torch.set_num_threads(threads)
    return root, raw, result


def test_prepare_reports_what_it_did_not_crop(faces):
    root, raw, _ = faces
    report = json.loads((root / "store" / "prepare_report.json").read_text())
    assert report["images"] == 24 * 16 + 1 and report["kept"] == 24 * 16 and report["skipped_count"] == 1
    assert report["skipped"][0]["file"] == "id_05/broken.png" and "not a readable image" in report["skipped"][0]["reason"]
    # the synthetic faces are face-like enough for OpenCV's Haar cascade: it found 365 of the 384 (measured on CPU,
    # OpenCV 4.14); the rest are kept as centre squares, each listed
    assert report["face_found"] >= 0.9 * 24 * 16, report["face_found"]
    assert report["face_found"] + report["centre_squares"] == 24 * 16
    assert len(report["centre_square_images"]) == report["centre_squares"]
    assert all(n["reason"] == "no face found" and n["kept"] == "centre square" for n in report["centre_square_images"])
    meta = json.loads((root / "store" / "meta.json").read_text())
    assert meta["shape"] == [3, 32, 32] and meta["source"]["face"]["size"] == 32 and len(meta["classes"]) == 24


def test_prepare_finds_the_faces_in_photos_that_have_one(tmp_path):
    """Photos with a face (scikit-image's astronaut, moved, mirrored, shrunk, grayed) are cut at the face; photos
    without one (a cat, a coffee cup, a rocket, noise) are kept as centre squares and listed by name."""
    import cv2
    import numpy as np
    from PIL import Image

    skimage_data = pytest.importorskip("skimage.data")
    a = skimage_data.astronaut()  # (512, 512, 3), one face
    gray = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    with_face = {"full": a, "mirrored": a[:, ::-1], "moved": a[0:400, 60:460], "shrunk": cv2.resize(a, (256, 256)),
                 "gray": gray}
    noise = (np.random.default_rng(0).random((200, 200, 3)) * 255).astype(np.uint8)
    without = {"cat": skimage_data.chelsea(), "cup": skimage_data.coffee(), "rocket": skimage_data.rocket(),
               "noise": noise}
    raw = tmp_path / "raw"
    for who, images in (("eileen", with_face), ("things", without)):
        (raw / who).mkdir(parents=True)
        for name, img in images.items():
            Image.fromarray(np.ascontiguousarray(img)).save(raw / who / f"{name}.png")
    assert main(["face", "prepare", str(raw), "-o", str(tmp_path / "store"), "--size", "32", "--quiet"]) == 0
    report = json.loads((tmp_path / "store" / "prepare_report.json").read_text())
    assert (report["images"], report["kept"], report["skipped_count"]) == (9, 9, 0)
    assert (report["face_found"], report["centre_squares"]) == (5, 4)  # 5 photos with a face, 4 without
    listed = sorted(n["file"] for n in report["centre_square_images"])
    assert listed == sorted(f"things/{name}.png" for name in without)
    assert all(n["reason"] == "no face found" for n in report["centre_square_images"])


def test_training_reaches_verification_well_above_chance(faces):
    root, _, result = faces
    s = result.summary
    assert s["classes"] == sorted(s["classes"]) and len(s["classes"]) == 18  # 6 identities held out
    assert s["test_verification_accuracy"] > 0.75, s["test_verification_accuracy"]
    assert result.test_accuracy == s["test_verification_accuracy"]
    tests = [json.loads(ln) for ln in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    tests = [e for e in tests if e["kind"] == "test"]
    assert [e["iter"] for e in tests if not e.get("whitened")] == [200, 400]
    assert all(0 <= e["verification_acc"] <= 1 for e in tests)
    assert tests[-1]["verification_acc"] == pytest.approx(s["test_verification_accuracy"], abs=1e-6)  # the last event
    assert all(-1 <= e["head_cosine"] < COLLAPSED for e in tests)  # the ArcFace head's identities spread
    face = json.loads((root / "run" / "face.json").read_text())
    assert face["preprocess"]["size"] == 32 and -1 <= face["threshold"] <= 1
    assert (root / "run" / "curves.png").stat().st_size > 0


def test_the_embeddings_are_whitened_where_the_held_out_people_do_not_lose(faces):
    """model.whiten (the recipe's 1.0): fitted on the training people's images after training, then kept only where
    the area under the held-out people's ROC does not shrink; a kept one is saved beside the weights and applied by
    every face command (load_face_run), and the run's figures and threshold are the whitened ones."""
    from safetensors.torch import load_file

    root, _, result = faces
    s, run = result.summary, root / "run"
    w = s["whitening"]
    assert w["images"] == 18 * 16 and w["people"] == 18 and w["shrink"] == 1.0
    # the ROC area decides, by more than rounding noise; a kept whitening is the run's last test event
    assert w["kept"] == (w["verification_auc"] > w["verification_auc_before"] + w["min_gain"])
    last = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last.get("whitened", False) == w["kept"]
    assert s["test_verification_accuracy"] == (w["verification_acc"] if w["kept"] else w["verification_acc_before"])
    assert (run / "whiten.safetensors").is_file() == w["kept"]
    face_run = load_face_run(run, device="cpu")
    net = face_run.run.model
    assert net.whitened == w["kept"]
    if w["kept"]:
        saved = load_file(str(run / "whiten.safetensors"))
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            want = torch.nn.functional.normalize((net.unit_embed(x) - saved["mean"]) @ saved["matrix"], dim=1)
            assert torch.allclose(net.embed(x), want, atol=1e-5)


def test_verify_embed_enroll_identify_from_the_cli(faces, tmp_path, capsys):
    root, raw, result = faces
    run = root / "run"
    held = tmp_path / "held"  # LFW-style: verify on identities the run never trained on
    for d in sorted(raw.iterdir()):
        if d.name not in result.summary["classes"]:
            shutil.copytree(d, held / d.name, ignore=shutil.ignore_patterns("broken.png"))
    assert len(list(held.iterdir())) == 6
    assert main(["face", "pairs", str(held), "-o", str(tmp_path / "pairs.txt"), "--n", "20"]) == 0
    assert main(["face", "verify", str(run), "--pairs", str(tmp_path / "pairs.txt"), "--root", str(held), "--json",
                 str(tmp_path / "v.json"), "--device", "cpu"]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["pairs"] == 400 and len(v["fold_accuracies"]) == 10 and v["accuracy_mean"] > 0.75, v["accuracy_mean"]
    assert {"accuracy_std", "tar_at_far_1e-3", "tar_at_far_1e-2"} <= v.keys()
    assert (tmp_path / "v_roc.png").stat().st_size > 0
    assert load_face_run(run).threshold == pytest.approx(v["threshold"])  # verify saved the threshold in the run

    capsys.readouterr()
    assert main(["face", "embed", str(run), str(raw / "id_00" / "img_00.png"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    emb = torch.tensor(rows[0]["embedding"])
    assert emb.shape == (128,) and emb.norm().item() == pytest.approx(1.0, abs=1e-3)

    gallery = tmp_path / "g.sqlite"
    first = sorted(held.iterdir())[0]
    (first / "broken.jpg").write_bytes(b"")
    for _ in range(2):  # enrolling again updates, never duplicates
        assert main(["face", "enroll", str(run), str(held), "--gallery", str(gallery)]) == 0
    assert "0 added, 96 updated, 1 unreadable skipped" in capsys.readouterr().out
    assert sum(n for _, n in Gallery(gallery).identities()) == 96
    probe = str(first / "img_03.png")
    assert main(["face", "identify", str(run), probe, "--gallery", str(gallery), "--json", "--top", "3"]) == 0
    (hit,) = json.loads(capsys.readouterr().out)
    assert hit["identity"] == first.name and len(hit["matches"]) == 3 and hit["similarity"] > 0.99
    assert main(["face", "identify", str(run), probe, "--gallery", str(gallery), "--threshold", "1.5"]) == 0
    assert ": unknown (similarity" in capsys.readouterr().out

    other = tmp_path / "other.sqlite"
    Gallery(other, fingerprint="f" * 64, create=True, info={"run": "runs/elsewhere"})
    assert main(["face", "identify", str(run), probe, "--gallery", str(other)]) == 2
    err = capsys.readouterr().err
    assert "made with another model" in err and "runs/elsewhere" in err and err.count("\n") == 1


def test_the_python_interface_for_servers(faces):
    root, raw, _ = faces
    run = load_face_run(root / "run", device="cpu")
    data = (raw / "id_02" / "img_01.png").read_bytes()
    from PIL import Image
    import numpy as np

    arr = np.asarray(Image.open(raw / "id_02" / "img_01.png"))
    emb = run.embed([data, arr, str(raw / "id_02" / "img_01.png")])
    assert emb.shape == (3, 128) and torch.allclose(emb[0], emb[1], atol=1e-5) and torch.allclose(emb[0], emb[2],
                                                                                                   atol=1e-5)
    assert isinstance(run.threshold, float) and len(run.fingerprint) == 64


def test_a_classifier_run_is_not_a_face_run(tmp_path, capsys):
    from tests.conftest import TINY  # noqa: F401 (the shared tiny recipe)

    r = danlu.train(None, overrides=[*TINY, "run.max_iter=5"], out=tmp_path / "lenet", device="cpu", quiet=True)
    assert main(["face", "embed", str(r.run_dir), "x.png"]) == 2
    assert "not a face model" in capsys.readouterr().err
    assert not (tmp_path / "lenet" / "face.json").exists()


def test_served_classify_on_a_face_run_sees_face_crops(faces):
    """danlu serve on a face run: /v1/classify answers what the model says of the face crop (cut as in training),
    not of the resized whole photo."""
    from fastapi.testclient import TestClient

    from danlu.serve import create_app

    root, raw, _ = faces
    path = raw / "id_03" / "img_02.png"
    run = load_face_run(root / "run", device="cpu")
    crops, _ = run.faces([path.read_bytes()])  # (1, C, H, W) uint8
    with torch.inference_mode():
        want = torch.softmax(run.run.model(run.run.augment(crops, train=False)).float(), 1)[0]  # (identities,)
    with TestClient(create_app(root / "run", device="cpu")) as client:
        r = client.post("/v1/classify?top=3", files=[("file", ("img_02.png", path.read_bytes(), "image/png"))])
    assert r.status_code == 200, r.text
    top = r.json()["images"][0]["top"]
    classes = run.run.classes
    assert [t["class"] for t in top] == [classes[i] for i in want.topk(3).indices.tolist()]
    assert top[0]["prob"] == pytest.approx(want.max().item(), abs=1e-4)

"""`danlu face import dlib`: a run folder with no training that the face verbs accept, whose embeddings are dlib's
descriptors, and `danlu face prepare --for RUN` cutting the chips that run's model expects."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from danlu.cli import main
from danlu.errors import DanluError
from danlu.face.dlib import files
from danlu.face.dlib.network import dlib_model_path


def _needs_weights():
    try:
        dlib_model_path()
    except DanluError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def dlib_run(tmp_path_factory):
    _needs_weights()
    run = tmp_path_factory.mktemp("imported") / "dlib"
    assert main(["face", "import", "dlib", "-o", str(run)]) == 0
    return run


def test_the_imported_run_is_a_face_run_with_dlibs_cut(dlib_run):
    from danlu.face import load_face_run

    assert sorted(p.name for p in dlib_run.iterdir()) == ["face.json", "model.safetensors", "recipe.yaml",
                                                         "summary.json"]
    face = load_face_run(dlib_run, device="cpu")
    o = face.options
    assert (o.chip, o.size, o.margin, o.equalize, o.channels) == ("dlib", 150, 0.25, "none", 3)
    assert face.dim == 128 and -1 < face.threshold < 1
    from danlu.io import sha256

    summary = json.loads((dlib_run / "summary.json").read_text())
    assert summary["iterations"] == 0 and summary["imported"]["sha256"] == sha256(dlib_model_path())


def test_its_embeddings_are_dlibs_descriptors_on_a_real_face(dlib_run):
    """The same 150 px chip (dlib's own, from dlib's detector and landmarks) through the imported run and through
    dlib's C++ network: unit-length dlib descriptors within 1e-4."""
    dlib = pytest.importorskip("dlib")
    skimage_data = pytest.importorskip("skimage.data")
    from danlu.face import load_face_run
    from danlu.face.dlib.landmarks import model_path as landmarks_path

    rgb = skimage_data.astronaut()
    box = dlib.get_frontal_face_detector()(rgb, 1)
    box = max(box, key=lambda r: r.width() * r.height())
    chip = dlib.get_face_chip(rgb, dlib.shape_predictor(str(landmarks_path()))(rgb, box), size=150, padding=0.25)
    want = np.asarray(dlib.face_recognition_model_v1(str(dlib_model_path())).compute_face_descriptor(chip))
    face = load_face_run(dlib_run, device="cpu")
    x = torch.from_numpy(np.ascontiguousarray(chip.transpose(2, 0, 1)))[None]  # (1, 3, 150, 150) uint8
    assert face.run.model.test_flip  # the run adds each face's mirror image's descriptor: dlib's alone without it
    face.run.model.test_flip = False
    got = face.embed_crops(x)[0].numpy()
    assert np.abs(got - want / np.linalg.norm(want)).max() < 1e-4


def test_danlus_own_cut_finds_dlibs_landmarks_on_a_real_face(dlib_run):
    """Through danlu's pipeline (dlib's MMOD box, dlib's 5 landmarks, the chip) the landmarks land
    where dlib's own pipeline puts them, within 2 px on the astronaut's 512 px photo."""
    dlib = pytest.importorskip("dlib")
    skimage_data = pytest.importorskip("skimage.data")
    from danlu.face import load_face_run
    from danlu.face.detect import preprocess
    from danlu.face.dlib.landmarks import model_path as landmarks_path

    rgb = skimage_data.astronaut()
    box = max(dlib.get_frontal_face_detector()(rgb, 1), key=lambda r: r.width() * r.height())
    shape = dlib.shape_predictor(str(landmarks_path()))(rgb, box)
    want = np.array([[p.x, p.y] for p in shape.parts()], float)
    chw, info = preprocess(rgb, load_face_run(dlib_run, device="cpu").options)
    assert chw.shape == (3, 150, 150) and info["reason"] is None and info["aligned"]
    assert np.abs(np.array(info["landmarks"]) - want).max() <= 2.0


def test_an_import_never_overwrites_a_run(dlib_run, capsys):
    assert main(["face", "import", "dlib", "-o", str(dlib_run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and len(err.strip().splitlines()) == 1


def test_without_the_package_one_line_names_the_pip_command(tmp_path, monkeypatch, capsys):
    from danlu.face.dlib import network

    monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(network, "DAT_SHA256", "0" * 64)  # no cache of the published file either
    assert main(["face", "import", "dlib", "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'danlu[face-pretrained]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _people(root, n=2, per=3):
    skimage_data = pytest.importorskip("skimage.data")
    rgb = skimage_data.astronaut()
    for k in range(n):
        (root / f"p{k}").mkdir(parents=True)
        for j in range(per):
            Image.fromarray(rgb).rotate(3 * j + 5 * k).save(root / f"p{k}" / f"{j}.png")  # tilted a little
    return root


def test_prepare_for_a_run_cuts_its_chips(dlib_run, tmp_path):
    raw = _people(tmp_path / "raw")
    assert main(["face", "prepare", str(raw), "-o", str(tmp_path / "store"), "--for", str(dlib_run),
                 "--quiet"]) == 0
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["source"]["face"] == json.loads((dlib_run / "face.json").read_text())["preprocess"]
    assert meta["shape"] == [3, 150, 150]
    report = json.loads((tmp_path / "store" / "prepare_report.json").read_text())
    assert report["face_found"] == 6 and report["centre_squares"] == 0


def test_prepare_for_a_run_refuses_other_cut_options(dlib_run, tmp_path, capsys):
    raw = _people(tmp_path / "raw", n=2, per=1)
    assert main(["face", "prepare", str(raw), "-o", str(tmp_path / "store"), "--for", str(dlib_run),
                 "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert "--size 64" in err and "--for" in err and not (tmp_path / "store").exists()
    assert main(["face", "prepare", str(raw), "-o", str(tmp_path / "s2"), "--for", str(tmp_path)]) == 2
    assert "no face.json" in capsys.readouterr().err


def test_serve_and_the_gallery_take_the_imported_run(dlib_run, tmp_path):
    """`danlu serve` embeds and verifies with the imported run's own cut and threshold; enroll and identify find the
    one person enrolled."""
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient

    from danlu.face import enroll, identify
    from danlu.serve import create_app

    buf = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buf, format="JPEG")
    with TestClient(create_app(dlib_run, device="cpu")) as c:
        e = c.post("/v1/faces/embed", files={"file": ("a.jpg", buf.getvalue(), "image/jpeg")}).json()
        v = c.post("/v1/faces/verify", files=[("a", ("a.jpg", buf.getvalue(), "image/jpeg")),
                                              ("b", ("b.jpg", buf.getvalue(), "image/jpeg"))]).json()
        k = c.post("/v1/classify", files={"file": ("a.jpg", buf.getvalue(), "image/jpeg")})
    assert k.status_code == 409 and "no classes" in k.json()["error"] and "/v1/faces/embed" in k.json()["error"]
    assert len(e["images"][0]["embedding"]) == 128 and v["same"] and v["threshold"] == pytest.approx(0.9128)
    raw = _people(tmp_path / "people", n=2, per=2)
    assert enroll(dlib_run, raw, tmp_path / "g.sqlite", device="cpu")["added"] == 4
    (hit,) = identify(dlib_run, [raw / "p1" / "0.png"], tmp_path / "g.sqlite", device="cpu")
    assert hit["identity"] in ("p0", "p1") and hit["similarity"] > 0.99  # the same photo, tilted: one person

"""serve/faces.py: the server's face service on a real face run (tests/serve/test_app.py drives the endpoints with
a stand-in service): it cuts, embeds and identifies as danlu.face does, and refuses what cannot be served."""
import json
import shutil

import pytest
import torch

from danlu.errors import DanluError
from danlu.face import enroll, load_face_run
from danlu.runs import load_run
from danlu.serve.faces import FaceService, face_service


@pytest.fixture(scope="module")
def face_run(tmp_path_factory):
    """A MobileFaceNet run of 4 steps on synthetic identities (32 px), and raw face images of 4 identities."""
    from tests.face.synth import make_identities, train_tiny_face_run

    root = tmp_path_factory.mktemp("servefaces")
    yield train_tiny_face_run(root / "run"), make_identities(root / "raw", identities=4, per_identity=3, size=48)


def test_a_classifier_run_has_no_face_service(tiny_run):
    run = load_run(tiny_run, device="cpu")
    assert face_service(run) is None
    with pytest.raises(DanluError, match="is not a face model .*lenet.*expected a face run, or no --gallery"):
        face_service(run, gallery="team.sqlite")


def test_the_service_cuts_and_embeds_as_the_face_run_does(face_run):
    run_dir, raw = face_run
    faces = face_service(load_run(run_dir, device="cpu"))
    reference = load_face_run(run_dir, device="cpu")
    assert isinstance(faces, FaceService) and faces.shape == (3, 32, 32) and not faces.has_gallery
    assert faces.threshold == pytest.approx(json.loads((run_dir / "face.json").read_text())["threshold"])
    images = [(raw / "id_00" / "img_00.png").read_bytes(), (raw / "id_03" / "img_01.png").read_bytes()]
    crops = faces.crops(images)
    assert crops.dtype == torch.uint8 and torch.equal(crops, reference.faces(images)[0])
    emb = faces.embed(crops)
    assert emb.shape == (2, reference.dim) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(emb, reference.embed(images), atol=1e-6)
    with pytest.raises(DanluError, match="^image 2: not a readable image"):
        faces.crops([images[0], b"\x89PNG but cut"])


def test_identify_searches_the_gallery_the_run_made(face_run, tmp_path):
    run_dir, raw = face_run
    enroll(run_dir, raw, tmp_path / "g.sqlite", device="cpu")
    faces = face_service(load_run(run_dir, device="cpu"), gallery=tmp_path / "g.sqlite")
    assert faces.has_gallery
    emb = faces.embed(faces.crops([(raw / "id_01" / "img_02.png").read_bytes()]))
    ((best, similarity), second) = faces.identify(emb, top=2)[0]
    assert best == "id_01" and similarity == pytest.approx(1.0, abs=1e-4) and second[1] <= similarity


def test_what_cannot_be_served_is_refused(face_run, tmp_path):
    run_dir, _ = face_run
    from danlu.face import Gallery

    Gallery(tmp_path / "other.sqlite", fingerprint="f" * 64, create=True, info={"run": "runs/elsewhere"})
    with pytest.raises(DanluError, match="another model"):
        face_service(load_run(run_dir, device="cpu"), gallery=tmp_path / "other.sqlite")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    info = json.loads((copy / "face.json").read_text())
    del info["threshold"]
    (copy / "face.json").write_text(json.dumps(info))
    with pytest.raises(DanluError, match="no verification threshold in face.json"):
        face_service(load_run(copy, device="cpu"))

"""danlu.face's Python interface on a tiny trained face run (tests/face/test_pipeline.py runs the whole path on a
longer run): what embed returns, that verify compares the listed pairs' own embeddings and saves its threshold,
what identify answers, and what a gallery's fingerprint is tied to."""
import json

import numpy as np
import pytest
import torch

from danlu.errors import DanluError
from danlu.face import embed, enroll, identify, load_face_run, pairs, verify_pairs
from danlu.face.verify import read_pairs
from danlu.tasks.verification import ten_fold

from .synth import make_identities, train_tiny_face_run


@pytest.fixture(scope="module")
def face_run(tmp_path_factory):
    """A MobileFaceNet run of 4 steps on synthetic identities (32 px, 3 channels), and a raw identity folder."""
    root = tmp_path_factory.mktemp("faceapi")
    yield train_tiny_face_run(root / "run"), make_identities(root / "raw", identities=4, per_identity=5, size=48)


def test_embed_gives_unit_vectors_whatever_the_image_form(face_run):
    run_dir, raw = face_run
    run = load_face_run(run_dir, device="cpu")
    path = raw / "id_01" / "img_02.png"
    from PIL import Image

    emb = run.embed([str(path), path.read_bytes(), np.asarray(Image.open(path).convert("RGB"))])
    assert emb.shape == (3, run.dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(emb[0], emb[1], atol=1e-6) and torch.allclose(emb[0], emb[2], atol=1e-6)
    assert run.embed([]).shape == (0, run.dim)
    (row,) = embed(run_dir, [path], device="cpu")  # the CLI's function: rounded lists, and the face info
    assert row["image"] == str(path) and set(row["face"]) == {"faces", "box", "reason", "aligned"}
    assert np.allclose(row["embedding"], emb[0].numpy(), atol=1e-6)


def test_an_unreadable_image_is_named(face_run, tmp_path):
    run = load_face_run(face_run[0], device="cpu")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DanluError, match=r"notes.png: not a readable image"):
        run.embed([str(tmp_path / "notes.png")])
    with pytest.raises(DanluError, match=r"^image 2: not a readable image"):
        run.embed([np.zeros((8, 8), np.uint8), b"garbage"])


def test_verify_compares_each_listed_pair_and_saves_its_threshold(face_run, tmp_path):
    run_dir, raw = face_run
    pairs(raw, tmp_path / "pairs.txt", n=6, folds=2)
    report = verify_pairs(run_dir, tmp_path / "pairs.txt", raw, json_out=tmp_path / "v.json", device="cpu",
                          save_threshold=True)
    listed, fold_of = read_pairs(tmp_path / "pairs.txt", raw)
    run = load_face_run(run_dir, device="cpu")
    a = run.embed([str(p) for p, _, _ in listed])  # each pair's own two embeddings, computed here
    b = run.embed([str(q) for _, q, _ in listed])
    same = np.array([s for _, _, s in listed])
    mine = ten_fold((a * b).sum(1).numpy(), same, folds=2, fold_of=fold_of)
    assert report["pairs"] == len(listed) == 24 and report["images"] == len({x for p in listed for x in p[:2]})
    assert report["fold_accuracies"] == mine["fold_accuracies"]
    assert report["threshold"] == pytest.approx(mine["threshold"], abs=1e-5)
    assert json.loads((tmp_path / "v.json").read_text())["threshold"] == report["threshold"]
    assert (tmp_path / "v_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert run.threshold == pytest.approx(report["threshold"])  # face.json now holds it
    assert "face verify" in run.info["threshold_from"]


def test_identify_answers_the_nearest_identity_or_unknown(face_run, tmp_path):
    run_dir, raw = face_run
    enrolled = enroll(run_dir, raw, tmp_path / "g.sqlite", device="cpu")
    assert (enrolled["identities"], enrolled["added"], enrolled["skipped"]) == (4, 20, [])
    probe = raw / "id_02" / "img_04.png"  # enrolled itself: its own embedding is the nearest, similarity 1
    (hit,) = identify(run_dir, [probe], tmp_path / "g.sqlite", top=2, threshold=0.5, device="cpu")
    assert hit["identity"] == "id_02" and hit["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert [m["name"] for m in hit["matches"]][0] == "id_02" and len(hit["matches"]) == 2
    (miss,) = identify(run_dir, [probe], tmp_path / "g.sqlite", threshold=1.01, device="cpu")
    assert miss["identity"] == "unknown" and miss["matches"][0]["name"] == "id_02"
    with pytest.raises(DanluError, match="--top 0: expected at least 1"):
        identify(run_dir, [probe], tmp_path / "g.sqlite", top=0, device="cpu")


def test_the_fingerprint_follows_the_weights_and_the_preprocessing(face_run, tmp_path):
    import shutil

    run_dir, _ = face_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    same = load_face_run(copy, device="cpu")
    assert same.fingerprint == load_face_run(run_dir, device="cpu").fingerprint  # the same weights and cut
    info = json.loads((copy / "face.json").read_text())
    info["preprocess"] = {**same.options.to_dict(), "equalize": "clahe"}
    (copy / "face.json").write_text(json.dumps(info))
    assert load_face_run(copy, device="cpu").fingerprint != same.fingerprint  # another cut: another gallery
    info["preprocess"]["size"] = 48
    (copy / "face.json").write_text(json.dumps(info))
    with pytest.raises(DanluError, match="preprocessing gives 3x48x48; the model takes 3x32x32"):
        load_face_run(copy, device="cpu")


def test_face_verify_says_it_replaced_the_runs_threshold_from_what_and_how_to_keep_it(face_run, tmp_path, capsys):
    """`danlu face verify` makes the threshold best on the pairs the run's (face.json); the console used to show
    only 'threshold 0.3980'. Now it names the old one and where it came from, and --keep-threshold."""
    import shutil

    from danlu.cli import main

    run_dir, raw = shutil.copytree(face_run[0], tmp_path / "run"), face_run[1]
    pairs(raw, tmp_path / "pairs.txt", n=6, folds=2)
    old = json.loads((run_dir / "face.json").read_text())
    args = ["face", "verify", str(run_dir), "--pairs", str(tmp_path / "pairs.txt"), "--root", str(raw), "--device",
            "cpu", "--json", str(tmp_path / "v.json")]
    assert main(args) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    new = json.loads((run_dir / "face.json").read_text())
    assert new["threshold_from"].startswith("face verify ")
    assert (f"threshold {new['threshold']:.4f} on these pairs, now the run's in {run_dir / 'face.json'} (was "
            f"{old['threshold']:.4f} from {old['threshold_from']}; --keep-threshold leaves the run's as it is)") in line
    kept = (run_dir / "face.json").read_bytes()
    assert main(args + ["--keep-threshold"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert f"on these pairs; the run's stays {new['threshold']:.4f}; report" in line
    assert (run_dir / "face.json").read_bytes() == kept

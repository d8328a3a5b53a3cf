"""model.init (danlu.models.weights): a face model trained on one set of people starts a run on another (the
backbone is copied, the identity head rebuilt for the new people), and test-time flip fusion of face embeddings."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from danlu.errors import DanluError
from danlu.models import create_model
from danlu.models.weights import describe, init_from
from tests.face.synth import train_tiny_face_run


def trained_classes(run) -> int:
    return len(json.loads((run / "summary.json").read_text())["classes"])


def _face(classes: int, **kw) -> torch.nn.Module:
    return create_model("mobilefacenet", num_classes=classes, head="arcface", width_mult=0.25, **kw)


def test_a_face_run_starts_a_run_on_other_people_backbone_copied_head_rebuilt(tmp_path):
    first = train_tiny_face_run(tmp_path / "eight")  # 8 identities
    second = train_tiny_face_run(tmp_path / "five", "data.num_classes=5", "data.train_size=40", "data.test_size=20",
                                 "run.max_iter=1", "optim.lr=0", "optim.weight_decay=0", f"model.init={first}")
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    params = {n for n, _ in _face(5).named_parameters()}
    backbone = sorted(n for n in params if not n.startswith("head."))
    assert backbone and all(torch.equal(a[n], b[n]) for n in backbone)  # lr 0: the copied weights as they came
    na, nb = a["head.weight"].shape[0], b["head.weight"].shape[0]  # the trained identities (some are held back)
    assert na == trained_classes(first) and nb == trained_classes(second) and na != nb
    init = json.loads((second / "summary.json").read_text())["init"]
    assert init["source"] == str(first) and init["fresh"] == [f"head.weight [{na}, 128] (model [{nb}, 128])"]
    assert init["loaded"] == init["of"] - 1 and init["adapted"] == [] and init["unused"] == []
    fresh = _face(5)  # what the run would have started from without model.init: other weights
    assert not all(torch.equal(fresh.state_dict()[n], b[n]) for n in backbone)


def test_a_safetensors_file_and_other_input_channels(tmp_path):
    src = _face(8, in_channels=3)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    gray = _face(3, in_channels=1)
    report = init_from(gray, tmp_path / "w.safetensors")
    first = next(n for n, p in gray.named_parameters() if p.dim() == 4)
    assert report["adapted"] == [first]
    assert torch.allclose(gray.state_dict()[first], src.state_dict()[first].sum(1, keepdim=True))
    assert "adapted to the input channels" in describe(report) and "head.weight" in describe(report)


def test_what_cannot_start_a_model_is_one_line(tmp_path):
    with pytest.raises(DanluError, match=r"model.init=.*nope: no such file or folder"):
        init_from(_face(4), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DanluError, match="a folder without model.safetensors or snapshots/"):
        init_from(_face(4), tmp_path / "empty")
    save_file(create_model("lenet", num_classes=10).state_dict(), str(tmp_path / "lenet.safetensors"))
    with pytest.raises(DanluError, match="none of its 8 tensors fits this model"):
        init_from(_face(4), tmp_path / "lenet.safetensors")


def test_flip_fusion_embeds_a_face_and_its_mirror_image_alike_and_only_with_test_flip():
    torch.manual_seed(0)
    model = _face(4).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused, mirrored = model.embed(x), model.embed(x.flip(-1))
        f, g = model.backbone(x), model.backbone(x.flip(-1))
        model.test_flip = False
        plain, plain_mirrored = model.embed(x), model.embed(x.flip(-1))
    assert torch.allclose(fused, mirrored, atol=1e-6)
    assert torch.allclose(fused, torch.nn.functional.normalize(f + g, dim=1), atol=1e-6)
    assert torch.allclose(plain, torch.nn.functional.normalize(f, dim=1), atol=1e-6)
    assert (plain - plain_mirrored).abs().max() > 1e-3  # without fusion a face and its mirror image differ

import math

import pytest
import torch
import torch.nn.functional as F

from danlu.errors import DanluError
from danlu.face.heads import CosineHead, MarginLoss, build_criterion
from danlu.models import create_model


def test_arcface_logits_match_a_hand_computed_reference():
    s, m = 30.0, 0.5
    cos = torch.tensor([[0.8, 0.1, -0.3], [-0.95, 0.2, 0.6]])  # row 1's target cos(theta) is below cos(pi - m)
    labels = torch.tensor([0, 0])
    got = MarginLoss("arcface", s, m).margin_logits(s * cos, labels)
    t0 = math.cos(math.acos(0.8) + m)  # cos(theta + m)
    t1 = -0.95 - math.sin(math.pi - m) * m  # beyond pi - m: cos(theta) - m sin(m), insightface's fallback
    want = torch.tensor([[s * t0, s * 0.1, s * -0.3], [s * t1, s * 0.2, s * 0.6]])
    assert torch.allclose(got, want, atol=1e-5)
    loss = MarginLoss("arcface", s, m)(s * cos, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(want, labels).item(), abs=1e-5)


def test_cosface_subtracts_the_margin_on_the_target_only():
    s, m = 64.0, 0.35
    cos = torch.tensor([[0.2, 0.7], [0.5, -0.1]])
    got = MarginLoss("cosface", s, m).margin_logits(s * cos, torch.tensor([1, 0]))
    assert torch.allclose(got, s * torch.tensor([[0.2, 0.7 - m], [0.5 - m, -0.1]]), atol=1e-5)


def test_cosine_head_gives_scaled_cosines():
    head = CosineHead(4, 3, scale=10.0)
    emb = F.normalize(torch.randn(5, 4), dim=1)
    want = 10.0 * emb @ F.normalize(head.weight, dim=1).T
    assert torch.allclose(head(emb), want, atol=1e-6) and head(emb).abs().max() <= 10.0 + 1e-5


def test_criterion_builder_and_bad_kind():
    assert isinstance(build_criterion("softmax", 64, 0.5), torch.nn.CrossEntropyLoss)
    assert build_criterion("cosface", 30, 0.35).kind == "cosface"
    with pytest.raises(DanluError, match="arcface or cosface"):
        MarginLoss("sphereface")


@pytest.mark.parametrize("head", ["softmax", "arcface"])
def test_face_model_embeds_unit_vectors(head):
    model = create_model("mobilefacenet", num_classes=6, head=head, input_size=32, width_mult=0.25).eval()
    x = torch.randn(3, 3, 32, 32)
    emb = model.embed(x)
    assert emb.shape == (3, 128) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model(x).shape == (3, 6)
    with pytest.raises(DanluError, match="model.head"):
        create_model("mobilefacenet", head="triplet")


def test_inception_resnet_v1_is_facenets_size():
    model = create_model("inception_resnet_v1", num_classes=10).eval()
    n = sum(p.numel() for p in model.backbone.parameters())
    assert 23_000_000 < n < 24_000_000  # facenet-pytorch's InceptionResnetV1 without its logits layer: 23.48M
    with torch.no_grad():
        assert model.embed(torch.randn(1, 3, 160, 160)).shape == (1, 512)

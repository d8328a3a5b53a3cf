import math

import pytest
import torch
import torch.nn.functional as F

from danlu.errors import DanluError
from danlu.models.heads import COLLAPSED, CosineHead, MarginLoss, build_criterion
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


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_the_margin_grows_with_the_schedule_from_a_normalized_softmax(kind):
    """model.margin_warmup: the Schedule sets the share of the margin in effect by iteration, (it + 1) / N up to 1:
    none at the start (the plain scaled-cosine cross-entropy), half way a loss with half the margin."""
    from danlu.engine.schedule import Schedule

    s, m, N = 32.0, 0.4, 10
    logits = s * torch.tensor([[0.8, 0.1, -0.3], [-0.2, 0.2, 0.6], [-0.99, 0.1, 0.0]])
    labels = torch.tensor([0, 2, 0])
    loss = MarginLoss(kind, s, m)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = Schedule(lambda it: 0.1, margin=loss, margin_iters=N)
    ramps = []
    for it in (0, 4, 9, 30):
        schedule(it, opt)
        ramps.append(loss.ramp)
    assert ramps == [0.1, 0.5, 1.0, 1.0]
    loss.ramp = 0.0
    assert torch.allclose(loss.margin_logits(logits, labels), logits, atol=1e-5)
    loss.ramp = 0.5
    assert torch.allclose(loss(logits, labels), MarginLoss(kind, s, m / 2)(logits, labels))
    loss.ramp = 1.0
    assert torch.allclose(loss(logits, labels), MarginLoss(kind, s, m)(logits, labels))
    assert not torch.allclose(MarginLoss(kind, s, m / 2)(logits, labels), MarginLoss(kind, s, m)(logits, labels))


def test_a_recipes_margin_warmup_reaches_the_schedule_of_its_build():
    import danlu
    from danlu.config import load_recipe
    from danlu.engine.build import build

    train, test = danlu.load_dataset("synthetic", size=32, channels=3, num_classes=4, train_size=64, test_size=16)
    for warmup, iters in ((2.5, 10), (0.0, 0)):  # 64 images in batches of 16: 4 iterations an epoch
        recipe = load_recipe(overrides=["model.name=mobilefacenet", "model.head=arcface", "model.kwargs.width_mult=0.25",
                                        f"model.margin_warmup={warmup}", "data.name=synthetic", "data.size=32",
                                        "data.channels=3", "data.num_classes=4", "data.batch_size=16",
                                        "precision=fp32"])
        p = build(recipe, train, test, torch.device("cpu")).parts
        assert p.schedule.margin is p.criterion and p.schedule.margin_iters == iters
        p.schedule(0, p.optimizer)
        assert p.criterion.ramp == (0.1 if iters else 1.0)


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


def test_the_identity_weights_mean_cosine_tells_spread_weights_from_collapsed_ones():
    head = CosineHead(16, 7)
    w = F.normalize(head.weight.detach(), dim=1)
    pairs = [(w[i] @ w[j]).item() for i in range(7) for j in range(7) if i != j]
    assert head.mean_cosine() == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)  # the plain mean over pairs
    with torch.no_grad():
        head.weight.copy_(torch.eye(16)[:7] * 3)  # orthogonal, of any length
    assert head.mean_cosine() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        head.weight.copy_(torch.randn(16).expand(7, 16) + 1e-3 * torch.randn(7, 16))  # all one way
    assert head.mean_cosine() > COLLAPSED

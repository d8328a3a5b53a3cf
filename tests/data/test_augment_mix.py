"""TrivialAugment-lite and mixup / cutmix against slow per-sample references written from their definitions
(data/augment.py's docstring), on the draws Augment makes; the draws' order and distribution; 2 ranks = 1."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import danlu
from danlu.config import load_recipe
from danlu.data.augment import TRIVIAL_OPS, Augment
from danlu.engine.build import build_augment
from danlu.engine.metrics import Meter
from danlu.errors import DanluError


def batch(B=4, C=3, H=9, W=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def bilinear_zero(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """img (C, H, W) at the continuous pixel position (y, x), pixels outside the image black."""
    C, H, W = img.shape
    y0, x0 = math.floor(y), math.floor(x)
    out = np.zeros(C)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                out += wy * wx * img[:, yy, xx]
    return out


def ref_trivial(img: np.ndarray, op: str, m: float, white: float) -> np.ndarray:
    """One image (C, H, W) in [0, white], one op at signed magnitude m, from the docstring's definitions."""
    C, H, W = img.shape
    gray = (0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None] if C == 3 else img
    f = 1 + 0.99 * m
    if op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        a = math.radians(135 * m) if op == "rotate" else 0.0
        M = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
        if op == "shear_x":
            M[0][1] = 0.99 * m
        if op == "shear_y":
            M[1][0] = 0.99 * m
        tx = 0.14 * m * W if op == "translate_x" else 0.0
        ty = 0.14 * m * H if op == "translate_y" else 0.0
        out = np.zeros_like(img)
        for i in range(H):
            for j in range(W):
                u, v = j - (W - 1) / 2, i - (H - 1) / 2
                sx, sy = M[0][0] * u + M[0][1] * v - tx, M[1][0] * u + M[1][1] * v - ty
                out[:, i, j] = bilinear_zero(img, (H - 1) / 2 + sy, (W - 1) / 2 + sx)
    elif op == "brightness":
        out = img * f
    elif op == "color":
        out = gray + f * (img - gray)
    elif op == "contrast":
        out = gray.mean() + f * (img - gray.mean())
    elif op == "posterize":
        shift = math.floor(7 * abs(m))  # 8 - bits
        v = np.floor(img * 255 / white).astype(np.int64)
        out = ((v >> shift) << shift) * white / 255
    elif op == "solarize":
        out = np.where(img * 255 / white >= 255 * (1 - abs(m)), white - img, img)
    elif op == "autocontrast":
        out = img.copy()
        for c in range(C):
            lo, hi = img[c].min(), img[c].max()
            if hi > lo:
                out[c] = (img[c] - lo) / (hi - lo) * white
    else:
        out = img
    return np.clip(out, 0, white)


@pytest.mark.parametrize("C, scale", [(3, 1 / 255), (1, 1.0)])
def test_trivial_augment_matches_the_reference_for_every_op(C, scale):
    B = 64
    x = batch(B=B, C=C)
    aug = Augment(scale=scale, trivial=True)
    aug.dtype = torch.float64
    p = aug._draw(B, 9, 11, gen(), x.device)
    assert set(p["trivial_op"].tolist()) == set(range(len(TRIVIAL_OPS)))  # every op drawn at least once
    assert (p["trivial_m"] < 0).any() and (p["trivial_m"] > 0).any() and (p["trivial_m"].abs() < 1).all()
    y = aug(x, gen(), train=True).numpy()
    white = 255 * scale
    for b in range(B):
        op, m = TRIVIAL_OPS[int(p["trivial_op"][b])], float(p["trivial_m"][b])
        want = ref_trivial(x[b].double().numpy() * scale, op, m, white)
        assert np.abs(y[b] - want).max() < 1e-9 * white, (op, m)


def beta_reference(alpha: float, normal, uniform, boost) -> float:
    """One Gamma(alpha) draw by Marsaglia and Tsang from given candidates, boosted for alpha < 1."""
    a = alpha + 1 if alpha < 1 else alpha
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    g = None
    for n, u in zip(normal, uniform):
        v = (1 + c * n) ** 3
        if v > 0 and math.log(u) < 0.5 * n * n + d - d * v + d * math.log(v):
            g = d * v
            break
    if g is None:
        g = d * max((1 + c * normal[-1]) ** 3, 0)
    return g * boost ** (1 / alpha) if alpha < 1 else g


def replay_lambdas(B, alpha, seed, with_cut_draw=False):
    """The draws of a mixup-only Augment, replayed from the generator in their documented order."""
    g = gen(seed)
    torch.rand((B, 1), generator=g, dtype=torch.float64)  # mix (mix_p)
    if with_cut_draw:
        torch.rand((B, 1), generator=g, dtype=torch.float64)
    gammas = []
    for _ in range(2):
        n = torch.randn((B, 8), generator=g, dtype=torch.float64)
        u = torch.rand((B, 8), generator=g, dtype=torch.float64)
        boost = 1 - torch.rand((B, 1), generator=g, dtype=torch.float64)[:, 0]
        gammas.append([beta_reference(alpha, n[b].tolist(), u[b].tolist(), float(boost[b])) for b in range(B)])
    box = torch.rand((B, 2), generator=g, dtype=torch.float64)
    return [a / (a + b) for a, b in zip(*gammas)], box


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.5])
def test_lambda_is_drawn_in_order_as_the_reference(alpha):
    aug = Augment(mixup=alpha, num_classes=3)
    p = aug._draw(16, 4, 4, gen(5), torch.device("cpu"))
    lams, box = replay_lambdas(16, alpha, 5)
    assert np.allclose(p["lam"].numpy(), lams, atol=1e-12, rtol=0)
    assert torch.equal(p["box"], box)


def test_lambda_is_beta_distributed():
    stats = pytest.importorskip("scipy.stats")
    for alpha in (0.2, 1.0, 3.0):
        lam = Augment(mixup=alpha, num_classes=2)._draw(20000, 2, 2, gen(7), torch.device("cpu"))["lam"].numpy()
        assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).statistic < 0.015, alpha


def ref_mix(x: np.ndarray, labels, p, b: int, classes: int):
    """Image b of a batch x (B, C, H, W) after mixup / cutmix with its neighbour b xor 1, and its soft label."""
    B, C, H, W = x.shape
    j = b ^ 1 if (b ^ 1) < B else b
    lam = float(p["lam"][b]) if bool(p["mix"][b]) else 1.0
    out = x[b].copy()
    if bool(p["mix"][b]) and bool(p["cut"][b]):  # timm's rand_bbox, then the share left
        r = math.sqrt(1 - lam)
        ch, cw = int(H * r), int(W * r)
        cy, cx = int(float(p["box"][b, 0]) * H), int(float(p["box"][b, 1]) * W)
        y0, y1 = np.clip(cy - ch // 2, 0, H), np.clip(cy + ch // 2, 0, H)
        x0, x1 = np.clip(cx - cw // 2, 0, W), np.clip(cx + cw // 2, 0, W)
        out[:, y0:y1, x0:x1] = x[j][:, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        out = lam * x[b] + (1 - lam) * x[j]
    soft = np.zeros(classes)
    soft[labels[b]] += lam
    soft[labels[j]] += 1 - lam
    return out, soft


@pytest.mark.parametrize("kw", [dict(mixup=0.4), dict(cutmix=1.0), dict(mixup=0.2, cutmix=1.0, mix_p=0.6)])
def test_mixup_and_cutmix_match_the_reference(kw):
    B, classes = 12, 5
    x, labels = batch(B=B, H=10, W=14), torch.arange(B) % classes
    aug = Augment(scale=1 / 255, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4], flip=True, num_classes=classes, **kw)
    aug.dtype = torch.float64
    p = aug._draw(B, 10, 14, gen(), x.device)
    plain = aug(x, gen(), train=True).numpy()  # the same draws, not mixed
    y, soft = aug.train_batch(x, labels, gen())
    assert soft.dtype == torch.float32 and soft.shape == (B, classes)
    for b in range(B):
        want, want_soft = ref_mix(plain, labels.tolist(), p, b, classes)
        assert np.abs(y[b].numpy() - want).max() < 1e-12, b
        assert np.allclose(soft[b].numpy(), want_soft, atol=1e-6), b
    cut, mixed = p["cut"] & p["mix"], p["mix"] & ~p["cut"]
    assert cut.any() == bool(kw.get("cutmix")) and mixed.any() == bool(kw.get("mixup"))
    if kw.get("mix_p", 1) < 1:
        assert not p["mix"].all() and p["mix"].any()


def test_two_ranks_draw_what_one_does():
    B = 8
    x, labels = batch(B=2 * B), torch.arange(2 * B) % 3
    kw = dict(trivial=True, mixup=0.3, cutmix=1.0, flip=True, rotate=10, num_classes=3)
    one, soft = Augment(**kw).train_batch(x, labels, gen(3))
    for r in range(2):
        y, s = Augment(**kw).for_rank(r, 2).train_batch(x[r * B:(r + 1) * B], labels[r * B:(r + 1) * B], gen(3))
        assert torch.equal(y, one[r * B:(r + 1) * B]) and torch.equal(s, soft[r * B:(r + 1) * B])


def test_the_soft_label_loss_and_the_dominant_label():
    logits, soft = torch.randn(4, 3), torch.tensor([[0.7, 0.3, 0], [0, 0.4, 0.6], [0.5, 0, 0.5], [0, 0, 1.0]])
    want = -(soft * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(torch.nn.CrossEntropyLoss()(logits, soft), want)  # what build_criterion gives
    meter = Meter(torch.device("cpu"))
    meter.add(torch.tensor(1.0), torch.tensor([[2.0, 0, 0], [0, 0, 1], [0, 3, 0], [0, 0, 1]]), soft)
    assert meter.read()[1] == 0.75  # dominant labels 0, 2, 0, 2: three right


def test_the_recipe_switches_them_on_and_checks_them():
    r = load_recipe(overrides=["augment.trivial=true", "augment.mixup=0.2", "augment.cutmix=1", "augment.mix_p=0.5"])
    train, _ = danlu.load_dataset("synthetic", train_size=16, test_size=8)
    aug = build_augment(r, train)
    assert (aug.trivial, aug.mixup, aug.cutmix, aug.mix_p, aug.num_classes) == (True, 0.2, 1.0, 0.5, 10)
    assert not aug.is_identity and build_augment(load_recipe(overrides=["augment.mixup=0.5"])).is_identity is False
    with pytest.raises(DanluError, match=r"augment.mixup=0.2 mixes images in pairs .*data.batch_size=33; expected an "
                                         r"even batch size"):
        load_recipe(overrides=["augment.mixup=0.2", "data.batch_size=33"])
    with pytest.raises(DanluError, match=r"augment.cutmix with model.head=arcface"):
        load_recipe(overrides=["augment.cutmix=1", "model.name=mobilefacenet", "model.head=arcface"])
    with pytest.raises(DanluError, match=r"augment.mix_p"):
        load_recipe(overrides=["augment.mix_p=2"])


def test_a_run_with_all_of_them(tmp_path):
    r = danlu.train("lenet_mnist5k", overrides=["data.name=synthetic", "data.train_size=128", "data.test_size=32",
                                                "data.batch_size=16", "run.max_iter=8", "run.tensorboard=false",
                                                "augment.trivial=true", "augment.mixup=0.2", "augment.cutmix=1.0",
                                                "precision=fp32"],
                    out=tmp_path / "run", device="cpu", quiet=True)
    assert r.iterations == 8 and math.isfinite(r.test_loss)

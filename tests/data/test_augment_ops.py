"""The continuous augmentations (affine warp, lighting, grayscale, blur, erasing, resize) against slow per-sample,
per-pixel reference code written from their definitions (data/augment.py's docstring), on the draws Augment makes."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from danlu.data.augment import Augment
from danlu.errors import DanluError


def batch(B=4, C=3, H=9, W=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def bilinear_border(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """img (C, H, W) at the continuous pixel position (y, x) (pixel centres at integers), edges replicated."""
    C, H, W = img.shape
    y, x = min(max(y, 0.0), H - 1.0), min(max(x, 0.0), W - 1.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * (1 - fx) * img[:, y0, x0] + (1 - fy) * fx * img[:, y0, x1] + fy * (1 - fx) * img[:, y1, x0]
            + fy * fx * img[:, y1, x1])


def ref_warp(img: np.ndarray, p: dict, b: int, area=(1.0, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """The affine step in pixels, from its definition: an output pixel's offset from the centre is rotated by the
    angle, divided by the zoom, shifted by (tx W, ty H), scaled into the resized-crop box and read there."""
    C, H, W = img.shape
    out = np.zeros_like(img)
    a = math.radians(float(p["angle"][b])) if "angle" in p else 0.0
    z = float(p["zoom"][b]) if "zoom" in p else 1.0
    tx, ty = (float(p["tx"][b]), float(p["ty"][b])) if "tx" in p else (0.0, 0.0)
    bw, bh, cx, cy = W, H, (W - 1) / 2, (H - 1) / 2  # the box (pixels): the whole image, centred
    if "rrc" in p:
        d = [float(v) for v in p["rrc"][b]]
        share = area[0] + d[0] * (area[1] - area[0])
        aspect = math.exp(math.log(ratio[0]) + d[1] * (math.log(ratio[1]) - math.log(ratio[0])))
        bw, bh = min(math.sqrt(share * H * W * aspect), W), min(math.sqrt(share * H * W / aspect), H)
        cx = (W - 1) / 2 + (2 * d[2] - 1) * (W - bw) / 2
        cy = (H - 1) / 2 + (2 * d[3] - 1) * (H - bh) / 2
    for i in range(H):
        for j in range(W):
            dx, dy = j - (W - 1) / 2, i - (H - 1) / 2  # output offset from the centre, pixels
            rx = (math.cos(a) * dx - math.sin(a) * dy) / z + tx * W
            ry = (math.sin(a) * dx + math.cos(a) * dy) / z + ty * H
            out[:, i, j] = bilinear_border(img, cy + ry * bh / H, cx + rx * bw / W)
    return out


@pytest.mark.parametrize("kw", [dict(rotate=25), dict(zoom=0.3), dict(translate=0.2),
                                dict(rotate=15, zoom=0.2, translate=0.1),
                                dict(resized_crop=(0.3, 0.9), ratio=(0.5, 2.0)),
                                dict(resized_crop=(0.5, 1.0), rotate=10)])
def test_affine_warp_matches_the_pixel_reference(kw):
    x = batch()
    aug = Augment(scale=1.0, **kw)
    aug.dtype = torch.float64
    p = aug._draw(4, 9, 11, gen(), x.device)
    y = aug(x, gen(), train=True)
    for b in range(4):
        want = ref_warp(x[b].double().numpy(), p, b, kw.get("resized_crop") or (1.0, 1.0),
                        kw.get("ratio", (3 / 4, 4 / 3)))
        assert np.abs(y[b].numpy() - want).max() < 1e-9, kw


def test_lighting_matches_the_reference():
    x = batch(B=6)
    aug = Augment(scale=1 / 255, gamma=0.5, contrast=0.4, brightness=0.2, saturation=0.5, ramp=0.6, p_light=0.7)
    aug.dtype = torch.float64
    p = aug._draw(6, 9, 11, gen(3), x.device)
    y = aug(x, gen(3), train=True).numpy()
    H, W = 9, 11
    ys, xs = np.linspace(-1, 1, H)[:, None], np.linspace(-1, 1, W)[None, :]
    for b in range(6):
        v = x[b].double().numpy() / 255
        if bool(p["light"][b]):
            v = v ** float(p["gamma"][b])
            m = v.mean()
            v = (v - m) * float(p["contrast"][b]) + m
            v = v + float(p["brightness"][b])
            gray = 0.2989 * v[0] + 0.587 * v[1] + 0.114 * v[2]
            v = (v - gray) * float(p["saturation"][b]) + gray
            pos = math.cos(float(p["ramp_angle"][b])) * xs + math.sin(float(p["ramp_angle"][b])) * ys
            v = v * np.maximum(1 + float(p["ramp"][b]) * pos, 0)
            v = np.clip(v, 0, 1)
        assert np.abs(y[b] - v).max() < 1e-9, b
    assert 0 < p["light"].sum() < 6  # some samples lit, some left alone


def test_grayscale_is_torchvisions_luma():
    from torchvision.transforms.v2 import functional as TF

    x = batch(B=8)
    aug = Augment(scale=1.0, grayscale=0.5)
    p = aug._draw(8, 9, 11, gen(4), x.device)
    y = aug(x, gen(4), train=True)
    gray = TF.rgb_to_grayscale(x.float(), num_output_channels=3)
    for b in range(8):
        assert torch.allclose(y[b], gray[b] if p["gray"][b] else x[b].float(), atol=1e-4)
    assert 0 < p["gray"].sum() < 8


def test_blur_matches_a_per_sample_gaussian_with_reflected_edges():
    x = batch(B=5, C=2, H=12, W=10)
    aug = Augment(scale=1.0, blur=2.0, blur_p=0.6)
    aug.dtype = torch.float64
    p = aug._draw(5, 12, 10, gen(5), x.device)
    y = aug(x, gen(5), train=True).numpy()
    r = math.ceil(3 * 2.0)
    for b in range(5):
        img = x[b].double().numpy()
        if not bool(p["blur"][b]):
            assert np.array_equal(y[b], img)  # untouched samples are exact copies
            continue
        s = float(p["sigma"][b])
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        k /= k.sum()
        pad = np.pad(img, ((0, 0), (r, r), (r, r)), mode="reflect")
        want = np.zeros_like(img)
        for i in range(12):
            for j in range(10):
                want[:, i, j] = np.einsum("cij,i,j->c", pad[:, i:i + 2 * r + 1, j:j + 2 * r + 1], k, k)
        assert np.abs(y[b] - want).max() < 1e-9


def test_erasing_sets_one_box_to_zero_after_normalization():
    x = batch(B=8, C=1, H=16, W=16)
    aug = Augment(scale=1 / 255, erase=0.5, mean=[0.5], std=[0.5])
    p = aug._draw(8, 16, 16, gen(6), x.device)
    y = aug(x, gen(6), train=True)
    plain = Augment(scale=1 / 255, mean=[0.5], std=[0.5])(x, train=False)
    for b in range(8):
        d = [float(v) for v in p["erase_box"][b]]
        area = (0.02 + d[0] * 0.31) * 256
        aspect = math.exp(math.log(0.3) + d[1] * (math.log(3.3) - math.log(0.3)))
        eh, ew = min(max(round(math.sqrt(area * aspect)), 1), 16), min(max(round(math.sqrt(area / aspect)), 1), 16)
        top, left = math.floor(d[2] * (16 - eh + 1)), math.floor(d[3] * (16 - ew + 1))
        want = plain[b].clone()
        if bool(p["erase"][b]):
            want[:, top:top + eh, left:left + ew] = 0
        assert torch.equal(y[b], want), b


def test_resize_to_data_size_is_antialiased_bilinear_in_training_and_evaluation():
    x = batch(B=3, C=3, H=40, W=30)
    aug = Augment(scale=1 / 255, size=(20, 16))
    want = F.interpolate(x.float() / 255, size=(20, 16), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(aug(x, train=False), want, atol=1e-6)
    assert aug(x, gen(), train=True).shape == (3, 3, 20, 16)


def test_switching_an_op_on_leaves_the_draws_of_the_others():
    a = Augment(flip=True, crop=2)._draw(16, 8, 8, gen(7), torch.device("cpu"))
    b = Augment(flip=True, crop=2, rotate=10, gamma=0.3, erase=0.5)._draw(16, 8, 8, gen(7), torch.device("cpu"))
    for k in ("oy", "ox", "flip"):
        assert torch.equal(a[k], b[k])


def test_two_ranks_draw_the_global_batch_one_rank_draws():
    x = batch(B=8, C=3, H=10, W=10)
    kw = dict(flip=True, rotate=20, zoom=0.2, gamma=0.4, contrast=0.3, blur=1.0, blur_p=0.5, erase=0.5,
              mean=[0.5] * 3, std=[0.5] * 3)
    whole = Augment(**kw)(x, gen(8), train=True)
    halves = [Augment(**kw).for_rank(r, 2)(x[4 * r:4 * r + 4], gen(8), train=True) for r in (0, 1)]
    assert torch.allclose(torch.cat(halves), whole, atol=1e-6)


def test_no_random_op_means_identity_and_bad_ranges_are_refused():
    assert Augment(size=(8, 8)).is_identity and not Augment(rotate=5).is_identity
    assert not Augment(erase=0.1).is_identity and not Augment(blur=1, blur_p=0.5).is_identity
    with pytest.raises(DanluError, match="augment.resized_crop"):
        Augment(resized_crop=(0.9, 0.2))
    with pytest.raises(DanluError, match="augment.ratio"):
        Augment(ratio=(2.0, 1.0))

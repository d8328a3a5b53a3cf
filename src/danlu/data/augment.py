"""Batch preprocessing and augmentation on the device, random per sample.

Input is a uint8 batch (B, C, H, W) on any device; output is float32 (B, C, H, W). Random draws come from a
``torch.Generator`` the caller owns (and saves in snapshots), so a resumed run draws the same augmentations.

Training order, each op only where it is switched on:

1. on the uint8 pixels, exact copies: random crop with zero padding -> random shift with edge-replicate fill (Keras
   ``width_shift_range`` / ``height_shift_range`` with ``fill_mode='nearest'``, integer offsets) -> random horizontal
   flip (p=0.5). Composed into one row index map (B, H) and one column index map (B, W), applied with one pair of
   gathers (on the CPU, a per-sample slice copy: the same values, faster there).
2. ``x.float() * scale``; resized (antialiased bilinear) to ``size`` where that differs from the batch's.
3. one affine warp per sample (bilinear, edge-replicate fill): random resized crop (a box of ``resized_crop`` of the
   area and aspect ratio in ``ratio``, as torchvision's RandomResizedCrop), rotation by up to ``rotate`` degrees,
   zoom by a factor in [1 - zoom, 1 + zoom] (> 1: closer), translation by up to ``translate`` of each side.
4. lighting, all at once with probability ``p_light``: gamma exp(U(-gamma, gamma)) on the pixels' [0, white] range,
   contrast U(1 - contrast, 1 + contrast) about each image's mean, brightness U(-brightness, brightness) of white
   added, saturation U(1 - saturation, 1 + saturation) against the image's gray (colour images), and a side light: a
   linear ramp of strength U(0, ramp) across the image in a random direction, multiplying the pixels by 1 + r <d, pos>
   (pos in [-1, 1]). Then the pixels are clamped to [0, white] (white = 255 * scale).
5. grayscale with probability ``grayscale`` (colour images: each channel becomes the luma); Gaussian blur with
   probability ``blur_p``, sigma U(0.1, blur) pixels.
6. TrivialAugment-lite (``trivial``): one op per image, drawn uniformly from TRIVIAL_OPS, at a magnitude m drawn
   uniformly in [0, 1) (and a random sign for the signed ones), on the pixels in [0, white] (as torchvision's
   TrivialAugmentWide, without sharpness and equalize, with bilinear sampling and fractions of the side for
   translation): identity; brightness x (1 + 0.99 m); colour (saturation) and contrast blended by 1 + 0.99 m with
   the image's gray / mean gray; posterize to 8 - floor(7 m) bits; solarize above (1 - m) white; autocontrast (each
   channel stretched to [0, white]); rotate by 135 m degrees; shear x / y by 0.99 m; translate x / y by 0.14 m of
   the side. Geometric ops fill with black. Every op is computed for the whole batch and kept where drawn (no host
   sync), then the pixels are clamped to [0, white].
7. minus ``mean``, divided by ``std`` (where set). Then random erasing with probability ``erase``: one rectangle of
   U(0.02, 0.33) of the area and aspect ratio log-U(0.3, 3.3), set to 0 (the mean, after normalization), as
   torchvision's RandomErasing with value=0; a box larger than the image is clipped to it.
8. Training batches only (``train_batch``, which also takes the labels): mixup / cutmix. Image i is mixed with its
   neighbour j = i xor 1 (pairs never straddle two processes' shares, as the per-device batch is even), with
   probability ``mix_p``, by lambda ~ Beta(alpha, alpha) (alpha: ``mixup`` or ``cutmix``; with both on, cutmix for
   half the images): mixup x_i <- lambda x_i + (1 - lambda) x_j; cutmix pastes x_j's box of about 1 - lambda of the
   area (timm's rand_bbox: side sqrt(1 - lambda) of each, centred uniformly, clipped) and sets lambda to the share
   left. The labels become soft, lambda onehot(y_i) + (1 - lambda) onehot(y_j), for a soft-label cross-entropy;
   the training accuracy counts the dominant label. lambda is drawn exactly from the generator as a ratio of two
   Gamma(alpha) draws (Marsaglia and Tsang's method, 8 candidates each, alpha < 1 boosted by U ** (1 / alpha)).

Without training (evaluation, inference) only step 2 and the normalization run. Random draws are made in a fixed
order, op by op, only for the ops that are on, the newest ops last, so switching one on leaves the draws of the ops
before it where they were.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from danlu.errors import DanluError

# TrivialAugment-lite's ops (step 6), in the order their index is drawn
TRIVIAL_OPS = ("identity", "brightness", "color", "contrast", "posterize", "solarize", "autocontrast", "rotate",
               "shear_x", "shear_y", "translate_x", "translate_y")
_TRIVIAL_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_GAMMA_TRIES = 8  # Marsaglia-Tsang candidates per Gamma draw (all rejected: p < 1e-10; then the last one is used)


def _gather2d(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """out[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]]. x (B, C, H', W'), rows (B, H), cols (B, W) -> (B, C, H, W)."""
    B, C, _, Wp = x.shape
    H, W = rows.shape[1], cols.shape[1]
    x = x.gather(2, rows[:, None, :, None].expand(B, C, H, Wp))  # (B, C, H, W')
    return x.gather(3, cols[:, None, None, :].expand(B, C, H, W))  # (B, C, H, W)


def _shift_index(idx: Tensor, d: Tensor, n: int) -> Tensor:
    """Source indices for a shift by d (B,) with edge replication: clamp(idx - d, 0, n-1). idx (B, n) -> (B, n)."""
    return (idx - d[:, None]).clamp_(0, n - 1)


def _shift(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Shift sample b down by dy[b] and right by dx[b] pixels (negative: up/left), edge-replicate fill."""
    B, _, H, W = x.shape
    rows = torch.arange(H, device=x.device).expand(B, H)
    cols = torch.arange(W, device=x.device).expand(B, W)
    return _gather2d(x, _shift_index(rows, dy, H), _shift_index(cols, dx, W))


def _crop(x: Tensor, pad: int, oy: Tensor, ox: Tensor) -> Tensor:
    """Zero-pad by ``pad`` on every side, then take the H x W window at (oy[b], ox[b]), offsets in [0, 2*pad]."""
    B, _, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = oy[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(W, device=x.device)  # (B, W)
    return _gather2d(xp, rows, cols)


def _crop_flip_by_slices(x: Tensor, p: dict[str, Tensor], pad: int) -> Tensor:
    """Crop and flip on the CPU, sample by sample: a window of the padded image, reversed where flipped. The same
    values as the gathers (tests/data/test_augment.py), about 10x faster on a CPU, where gathering with expanded
    int64 index maps costs more per pixel than the copy itself. x (B, C, H, W) -> (B, C, H, W)."""
    B, _, H, W = x.shape
    xp = F.pad(x, (pad,) * 4) if "oy" in p else x  # (B, C, H+2p, W+2p)
    oy = p["oy"].tolist() if "oy" in p else [0] * B
    ox = p["ox"].tolist() if "ox" in p else [0] * B
    flip = p["flip"].tolist() if "flip" in p else [False] * B
    out = torch.empty_like(x)
    for b in range(B):
        window = xp[b, :, oy[b]:oy[b] + H, ox[b]:ox[b] + W]  # (C, H, W) view
        out[b] = window.flip(-1) if flip[b] else window
    return out


_PER_IMAGE = 32768  # values an image from which the CPU's last step goes image by image (a 28 px digit's 784 are
# faster as one batched op each: four numpy calls an image cost more than the whole batch's pass)


def _crop_flip_normalize_cpu(x: Tensor, p: dict[str, Tensor], pad: int, scale: float, mean: Tensor | None,
                             std: Tensor | None, memory_format: torch.memory_format) -> Tensor:
    """Crop, flip, float and normalization on the CPU: the batch padded and mirrored whole (one op each, uint8), then
    image by image in numpy its window (of the mirror where flipped) becomes float32 and is scaled, centred and
    divided while it is in the cache, on this one thread. The same values as the batched ops (the same float32
    operations in the same order). Batched, each op is a pass over a 38 MiB float batch (224 px, 64 images) that
    wakes the intra-op threads, which then spin beside a shard loader's decode processes (about 3x this thread's
    time on 2 cores, an ad-hoc measurement; the shard rows of docs/evidence/benchmarks.md show the whole effect).
    x uint8 (B, C, H, W) -> float32 (B, C, H, W)."""
    B, C, H, W = x.shape
    fmt = torch.contiguous_format if memory_format == torch.preserve_format else memory_format
    out = torch.empty((B, C, H, W), dtype=torch.float32, memory_format=fmt)
    xp = F.pad(x, (pad,) * 4) if "oy" in p else x  # (B, C, H+2p, W+2p)
    Wp = xp.shape[-1]
    oy = p["oy"].tolist() if "oy" in p else [0] * B
    ox = p["ox"].tolist() if "ox" in p else [0] * B
    flip = p["flip"].tolist() if "flip" in p else [False] * B
    o, xs = out.numpy(), xp.numpy()
    xf = xp.flip(-1).numpy() if any(flip) else None  # the window at ox, reversed = the mirror's at Wp - ox - W
    m = None if mean is None else mean.numpy()
    s = None if std is None else std.numpy()
    k = np.float32(scale)
    for b in range(B):
        ob = o[b]
        if flip[b]:
            np.copyto(ob, xf[b, :, oy[b]:oy[b] + H, Wp - ox[b] - W:Wp - ox[b]], casting="unsafe")
        else:
            np.copyto(ob, xs[b, :, oy[b]:oy[b] + H, ox[b]:ox[b] + W], casting="unsafe")
        if k != 1:
            np.multiply(ob, k, out=ob)
        if m is not None:
            np.subtract(ob, m, out=ob)
        if s is not None:
            np.divide(ob, s, out=ob)
    return out


def affine_theta(p: dict[str, Tensor], h: int, w: int, area: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """(B, 2, 3) matrices for F.affine_grid (normalized coordinates, align_corners=False: they map each output
    pixel to where it reads the input) from the draws `p`: output pixel offsets from the centre are rotated by
    `angle` degrees, divided by `zoom`, shifted by (tx, ty) of the side, then mapped into the resized-crop box (the
    whole image without one). Rotation is in pixels, not in normalized units, so a non-square image turns without
    shearing."""
    ref = next(iter(p.values()))
    B, dev = ref.shape[0], ref.device
    wide = next(v.dtype for v in p.values() if v.is_floating_point())  # the draws' (Augment.wide)
    one, zero = torch.ones(B, dtype=wide, device=dev), torch.zeros(B, dtype=wide, device=dev)
    bw, bh, cx, cy = one, one, zero, zero  # box half-size and centre, in normalized units of the image
    if "rrc" in p:
        bw, bh, cx, cy = _box(p["rrc"], h, w, area, ratio)
    angle = torch.deg2rad(p["angle"]) if "angle" in p else zero
    z = p["zoom"] if "zoom" in p else one
    tx, ty = (p["tx"], p["ty"]) if "tx" in p else (zero, zero)
    cos, sin, a = torch.cos(angle) / z, torch.sin(angle) / z, h / w  # a: the output's aspect (pixels)
    # source (box units) = [[cos, -sin a], [sin / a, cos]] @ (u, v) + 2 (tx, ty); then image = box * (bw, bh) + c
    theta = torch.stack([torch.stack([bw * cos, -bw * sin * a, bw * 2 * tx + cx], 1),
                         torch.stack([bh * sin / a, bh * cos, bh * 2 * ty + cy], 1)], 1)
    return theta  # (B, 2, 3) float64 (float32 on mps)


def _box(d: Tensor, h: int, w: int, area: tuple[float, float],
         ratio: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random resized crop boxes from draws d (B, 4) in [0, 1): a share of the image's area in `area` and an aspect
    ratio (width / height) log-uniform in `ratio`, clipped to the image (where torchvision would draw again), placed
    uniformly where it fits. Returns half-width, half-height, centre x, centre y in normalized units ([-1, 1] spans
    the image)."""
    share = area[0] + d[:, 0] * (area[1] - area[0])
    aspect = torch.exp(math.log(ratio[0]) + d[:, 1] * (math.log(ratio[1]) - math.log(ratio[0])))
    fw = ((share * h * w * aspect).sqrt() / w).clamp(max=1.0)  # the box's width as a share of the image's
    fh = ((share * h * w / aspect).sqrt() / h).clamp(max=1.0)
    return fw, fh, (2 * d[:, 2] - 1) * (1 - fw), (2 * d[:, 3] - 1) * (1 - fh)


def _luma(y: Tensor) -> Tensor:
    """ITU-R 601 luma of RGB images (B, 3, h, w) -> (B, 1, h, w), as torchvision's rgb_to_grayscale."""
    return (0.2989 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]).to(y.dtype)


def _lighting(y: Tensor, p: dict[str, Tensor], white: float) -> Tensor:
    """Step 4 on every sample (the caller keeps it where p['light']): gamma, contrast, brightness, saturation, ramp,
    then clamped to [0, white]."""
    def per(t: Tensor) -> Tensor:  # (B,) -> (B, 1, 1, 1) in y's dtype
        return t.to(y.dtype)[:, None, None, None]

    if "gamma" in p:
        y = (y / white).clamp_min(0).pow(per(p["gamma"])) * white
    if "contrast" in p:
        m = y.mean((1, 2, 3), keepdim=True)
        y = (y - m) * per(p["contrast"]) + m
    if "brightness" in p:
        y = y + per(p["brightness"]) * white
    if "saturation" in p and y.shape[1] == 3:
        g = _luma(y)
        y = (y - g) * per(p["saturation"]) + g
    if "ramp" in p:
        h, w = y.shape[-2:]
        ys = torch.linspace(-1, 1, h, device=y.device, dtype=y.dtype)[None, :, None]  # (1, h, 1)
        xs = torch.linspace(-1, 1, w, device=y.device, dtype=y.dtype)[None, None, :]  # (1, 1, w)
        a = p["ramp_angle"].to(y.dtype)[:, None, None]
        pos = torch.cos(a) * xs + torch.sin(a) * ys  # (B, h, w) in [-sqrt 2, sqrt 2]
        y = y * (1 + per(p["ramp"])[:, 0] * pos).clamp_min(0)[:, None]
    return y.clamp(0, white)


def _gaussian_blur(y: Tensor, sigma: Tensor, sigma_max: float) -> Tensor:
    """Per-sample separable Gaussian blur, reflect padding; sigma (B,) in pixels, 0: unchanged (an exact copy).
    The kernel spans 3 sigma_max on each side."""
    B, C, h, w = y.shape
    r = max(1, min(math.ceil(3 * sigma_max), (min(h, w) - 1)))
    wide = sigma.dtype  # the draws' (Augment.wide)
    t = torch.arange(-r, r + 1, device=y.device, dtype=wide)  # (k,)
    s = sigma[:, None]
    k = torch.where(s > 0, torch.exp(-0.5 * (t / s.clamp_min(1e-12)) ** 2), (t == 0).to(wide))  # (B, k)
    k = (k / k.sum(1, keepdim=True)).to(y.dtype).repeat_interleave(C, 0)  # (B*C, k)
    z = F.pad(y.reshape(1, B * C, h, w), (r, r, r, r), mode="reflect")
    z = F.conv2d(z, k[:, None, :, None], groups=B * C)  # vertical
    z = F.conv2d(z, k[:, None, None, :], groups=B * C)  # horizontal
    return z.reshape(B, C, h, w)


def _erase(y: Tensor, on: Tensor, d: Tensor) -> Tensor:
    """Random erasing: per sample where `on`, one box from draws d (B, 4): area share U(0.02, 0.33), aspect ratio
    log-U(0.3, 3.3), top and left uniform where it fits (a box larger than the image is clipped to it); set to 0."""
    B, _, h, w = y.shape
    area = (0.02 + d[:, 0] * (0.33 - 0.02)) * h * w
    aspect = torch.exp(math.log(0.3) + d[:, 1] * (math.log(3.3) - math.log(0.3)))
    eh = (area * aspect).sqrt().round().clamp(1, h)  # (B,) rows
    ew = (area / aspect).sqrt().round().clamp(1, w)
    top = (d[:, 2] * (h - eh + 1)).floor()
    left = (d[:, 3] * (w - ew + 1)).floor()
    rows = torch.arange(h, device=y.device, dtype=d.dtype)[None, :]  # (1, h)
    cols = torch.arange(w, device=y.device, dtype=d.dtype)[None, :]
    mr = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (B, h)
    mc = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B, w)
    mask = (mr[:, :, None] & mc[:, None, :] & on[:, None, None])[:, None]  # (B, 1, h, w)
    return y.masked_fill(mask, 0.0)


def trivial_theta(op: Tensor, m: Tensor, h: int, w: int) -> Tensor:
    """(B, 2, 3) matrices for F.affine_grid (align_corners=False) of TrivialAugment's geometric ops: op (B,) indices
    into TRIVIAL_OPS, m (B,) signed magnitudes in (-1, 1). In pixels about the centre, an output pixel offset (u, v)
    reads the input at M (u, v) - t: rotate M = [[cos, -sin], [sin, cos]] (135 m degrees), shear_x [[1, s], [0, 1]]
    and shear_y [[1, 0], [s, 1]] (s = 0.99 m), translate t = 0.14 m of the side; the identity for other ops."""
    B, dev = op.shape[0], op.device
    wide = m.dtype  # the draws' (Augment.wide)
    zero, one = torch.zeros(B, dtype=wide, device=dev), torch.ones(B, dtype=wide, device=dev)

    def is_(name: str) -> Tensor:
        return op == TRIVIAL_OPS.index(name)

    a = torch.where(is_("rotate"), torch.deg2rad(135.0 * m), zero)
    m00, m01, m10, m11 = torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)
    m01 = torch.where(is_("shear_x"), 0.99 * m, m01)
    m10 = torch.where(is_("shear_y"), 0.99 * m, m10)
    tx = torch.where(is_("translate_x"), 0.14 * m * w, zero)  # pixels
    ty = torch.where(is_("translate_y"), 0.14 * m * h, zero)
    # normalized units: a pixel offset p is 2 p / side
    return torch.stack([torch.stack([m00, m01 * h / w, -2 * tx / w], 1),
                        torch.stack([m10 * w / h, m11, -2 * ty / h], 1)], 1) * one[:, None, None]  # (B, 2, 3)


def _trivial(y: Tensor, op: Tensor, m: Tensor, white: float) -> Tensor:
    """Step 6 on y (B, C, h, w) in [0, white]: TRIVIAL_OPS[op[b]] at signed magnitude m[b] (see the docstring)."""
    def per(t: Tensor) -> Tensor:  # (B,) -> (B, 1, 1, 1) in y's dtype
        return t.to(y.dtype)[:, None, None, None]

    def where(name: str, z: Tensor, cur: Tensor) -> Tensor:
        return torch.where(per(op == TRIVIAL_OPS.index(name)).bool(), z, cur)

    geometric = sum(op == TRIVIAL_OPS.index(n) for n in _TRIVIAL_GEOMETRIC).bool()  # (B,)
    theta = trivial_theta(op, m, y.shape[-2], y.shape[-1]).to(y.dtype)
    grid = F.affine_grid(theta, list(y.shape), align_corners=False)
    out = torch.where(per(geometric).bool(), F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros",
                                                           align_corners=False), y)
    f = 1 + 0.99 * per(m)  # the factor of brightness, colour, contrast: 1 -+ 0.99 |m|
    gray = _luma(y) if y.shape[1] == 3 else y
    out = where("brightness", y * f, out)
    out = where("color", gray + f * (y - gray), out)
    mean_gray = gray.mean((1, 2, 3), keepdim=True)
    out = where("contrast", mean_gray + f * (y - mean_gray), out)
    v = y * (255.0 / white)  # 0..255 units
    q = torch.exp2(torch.floor(7 * per(m.abs())))  # 2 ** (8 - bits), bits = 8 - floor(7 |m|)
    out = where("posterize", torch.floor(torch.floor(v) / q) * q * (white / 255.0), out)
    out = where("solarize", torch.where(v >= 255.0 * (1 - per(m.abs())), white - y, y), out)
    lo, hi = y.amin((2, 3), keepdim=True), y.amax((2, 3), keepdim=True)  # (B, C, 1, 1)
    stretched = torch.where(hi > lo, (y - lo) / (hi - lo).clamp_min(1e-12) * white, y)
    out = where("autocontrast", stretched, out)
    return out.clamp(0, white)


def _gamma(a: Tensor, normal: Tensor, uniform: Tensor, boost: Tensor) -> Tensor:
    """Gamma(a) draws (B,) from given draws: Marsaglia and Tsang's method on normal, uniform (B, K) candidates
    (the first accepted one; none: the last), and for a < 1 Gamma(a + 1) x boost ** (1 / a), boost (B,) in (0, 1]."""
    a1 = torch.where(a < 1, a + 1, a)[:, None]  # (B, 1)
    d = a1 - 1.0 / 3
    c = 1.0 / torch.sqrt(9 * d)
    v = (1 + c * normal) ** 3  # (B, K)
    ok = (v > 0) & (torch.log(uniform) < 0.5 * normal ** 2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
    ok[:, -1] = True
    first = ok.int().argmax(1, keepdim=True)  # (B, 1) index of the first accepted candidate
    g = (d * v.clamp_min(0)).gather(1, first)[:, 0]
    return torch.where(a < 1, g * boost ** (1.0 / a), g)


def _mix(y: Tensor, labels: Tensor, p: dict[str, Tensor], num_classes: int) -> tuple[Tensor, Tensor]:
    """Step 8: mixup / cutmix of y (B, C, h, w) with the neighbours j = i xor 1, soft labels (B, classes)."""
    B, _, h, w = y.shape
    idx = torch.arange(B, device=y.device)
    j = torch.where((idx ^ 1) < B, idx ^ 1, idx)  # an odd last image pairs with itself
    lam = torch.where(p["mix"], p["lam"], 1.0)  # (B,) float64 (float32 on mps)
    cut = p["cut"] & p["mix"]
    r = torch.sqrt(1 - lam)  # timm's rand_bbox: cut sides int(side * sqrt(1 - lam)), centre uniform, clipped
    ch, cw = torch.floor(h * r), torch.floor(w * r)
    cy, cx = torch.floor(p["box"][:, 0] * h), torch.floor(p["box"][:, 1] * w)
    y0, y1 = (cy - torch.floor(ch / 2)).clamp(0, h), (cy + torch.floor(ch / 2)).clamp(0, h)
    x0, x1 = (cx - torch.floor(cw / 2)).clamp(0, w), (cx + torch.floor(cw / 2)).clamp(0, w)
    rows = torch.arange(h, device=y.device, dtype=lam.dtype)[None, :]
    cols = torch.arange(w, device=y.device, dtype=lam.dtype)[None, :]
    box = (((rows >= y0[:, None]) & (rows < y1[:, None]))[:, :, None]
           & ((cols >= x0[:, None]) & (cols < x1[:, None]))[:, None, :] & cut[:, None, None])[:, None]  # (B,1,h,w)
    lam = torch.where(cut, 1 - (y1 - y0) * (x1 - x0) / (h * w), lam)  # the share of image i left
    mixed = torch.where(box, y[j], y)
    lam_x = torch.where(cut, 1.0, lam).to(y.dtype)[:, None, None, None]
    mixed = lam_x * mixed + (1 - lam_x) * y[j]  # cutmix: the box pasted, nothing blended
    onehot = F.one_hot(labels, num_classes).to(torch.float32)  # (B, classes)
    lam32 = lam.to(torch.float32)[:, None]
    return mixed, lam32 * onehot + (1 - lam32) * onehot[j]


def _as_channel_tensor(v: Tensor | Sequence[float], name: str) -> Tensor:
    """A per-channel sequence -> (C, 1, 1); a per-pixel image (C, H, W) stays as is. float32 on the CPU."""
    t = torch.as_tensor(v, dtype=torch.float32).detach().cpu()
    if t.dim() == 1:
        return t[:, None, None]
    if t.dim() == 3:
        return t
    raise DanluError(f"augment.{name}: expected a per-channel list or a (C, H, W) image, got shape {tuple(t.shape)}")


class Augment:
    """Preprocess (and, in training, augment) a uint8 batch (B, C, H, W) into float32 (B, C, H, W).

    shift: max shift as a fraction of H and W (0.1 = Keras width/height_shift_range=0.1).
    flip: random horizontal flip with p=0.5.  crop: zero padding in pixels for the random crop (4 = CIFAR style).
    mean: per-channel sequence (len C) or per-pixel mean image (C, H, W), in scaled units.
    std: per-channel sequence (len C) or None.  scale: multiplier applied to the uint8 values first.
    size: (h, w) of the batches handed to the model (None: the input's).
    The rest (resized_crop, ratio, rotate, zoom, translate, brightness, contrast, saturation, gamma, ramp, p_light,
    grayscale, blur, blur_p, erase): see the module's docstring; 0 / None is off.

        aug = Augment(flip=True, rotate=10, zoom=0.1, gamma=0.4, contrast=0.3, mean=[0.5], std=[0.5])
        x = aug(uint8_batch, generator, train=True)      # (B, C, H, W) float32
    """

    def __init__(self, *, shift: float = 0.0, flip: bool = False, crop: int = 0,
                 mean: Tensor | Sequence[float] | None = None, std: Sequence[float] | None = None,
                 scale: float = 1 / 255, size: tuple[int, int] | None = None,
                 resized_crop: tuple[float, float] | None = None, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 rotate: float = 0.0, zoom: float = 0.0, translate: float = 0.0, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0, gamma: float = 0.0, ramp: float = 0.0,
                 p_light: float = 1.0, grayscale: float = 0.0, blur: float = 0.0, blur_p: float = 0.0,
                 erase: float = 0.0, trivial: bool = False, mixup: float = 0.0, cutmix: float = 0.0,
                 mix_p: float = 1.0, num_classes: int | None = None):
        if not 0.0 <= shift < 1.0:
            raise DanluError(f"augment.shift: must be in [0, 1), got {shift}")
        if crop < 0:
            raise DanluError(f"augment.crop: must be >= 0, got {crop}")
        if resized_crop is not None and not 0 < resized_crop[0] <= resized_crop[1] <= 1:
            raise DanluError(f"augment.resized_crop: {list(resized_crop)}; expected [lo, hi] with 0 < lo <= hi <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise DanluError(f"augment.ratio: {list(ratio)}; expected [lo, hi] with 0 < lo <= hi")
        self.shift, self.flip, self.crop, self.scale = float(shift), bool(flip), int(crop), float(scale)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.resized_crop = None if resized_crop is None else (float(resized_crop[0]), float(resized_crop[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.rotate, self.zoom, self.translate = float(rotate), float(zoom), float(translate)
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)
        self.gamma, self.ramp, self.p_light = float(gamma), float(ramp), float(p_light)
        self.grayscale, self.blur, self.blur_p, self.erase = float(grayscale), float(blur), float(blur_p), float(erase)
        self.trivial, self.mixup, self.cutmix, self.mix_p = bool(trivial), float(mixup), float(cutmix), float(mix_p)
        if (self.mixup < 0 or self.cutmix < 0) or not 0 <= self.mix_p <= 1:
            raise DanluError(f"augment.mixup / cutmix / mix_p: {mixup} / {cutmix} / {mix_p}; expected alphas >= 0 "
                             f"and a probability in [0, 1]")
        self.num_classes = num_classes  # for the soft labels of mixup / cutmix
        self._mean = None if mean is None else _as_channel_tensor(mean, "mean")  # (C,1,1) or (C,H,W)
        self._std = None if std is None else _as_channel_tensor(std, "std")  # (C,1,1)
        # layout of the float batches handed to the model: engine/speed.py sets channels_last where the model's
        # weights are; preserve_format keeps the uint8 batch's (contiguous NCHW) layout
        self.memory_format = torch.preserve_format
        self.dtype = torch.float32  # of the batches handed to the model (float64 for precision fp64)
        # of the random draws and the geometry computed from them: float64 for exact references; engine/build.py
        # sets float32 on a device without float64 (mps)
        self.wide = torch.float64
        self.rank, self.world = 0, 1  # training batches are this share of a global batch (see for_rank)

    def for_rank(self, rank: int, world: int) -> "Augment":
        """Make each training batch (B, ...) the `rank`-th share of a global batch of B * world: every rank draws
        the numbers of the whole global batch and keeps its share. All ranks then hold one generator state (saved
        once, by rank 0) and sample j of a global batch gets the same augmentation on 1 or N processes."""
        self.rank, self.world = rank, world
        return self

    @property
    def is_identity(self) -> bool:
        """True when there are no random ops, so the caller need not pass (or advance) a generator."""
        return self.shift == 0.0 and not self.flip and self.crop == 0 and not self._continuous and not self._mixing

    @property
    def _mixing(self) -> bool:
        return self.mix_p > 0 and bool(self.mixup or self.cutmix)

    @property
    def _affine(self) -> bool:
        return self.resized_crop is not None or bool(self.rotate or self.zoom or self.translate)

    @property
    def _light(self) -> bool:
        return self.p_light > 0 and bool(self.brightness or self.contrast or self.saturation or self.gamma or self.ramp)

    @property
    def _continuous(self) -> bool:
        """Any op of steps 3 to 6 (module docstring) on."""
        return self._affine or self._light or self.grayscale > 0 or (self.blur > 0 and self.blur_p > 0) \
            or self.erase > 0 or self.trivial

    @property
    def mean(self) -> Tensor | None:
        """The mean subtracted after scaling: (C, 1, 1) or a per-pixel (C, H, W) image; None when not set."""
        return self._mean

    @property
    def std(self) -> Tensor | None:
        return self._std

    def set_stats(self, mean: Tensor | Sequence[float] | None, std: Tensor | Sequence[float] | None) -> None:
        """Replace the normalization statistics (e.g. with those a run was trained with)."""
        self._mean = None if mean is None else _as_channel_tensor(mean, "mean")
        self._std = None if std is None else _as_channel_tensor(std, "std")

    def __repr__(self) -> str:
        return f"Augment(shift={self.shift}, flip={self.flip}, crop={self.crop}, scale={self.scale})"

    def _draw(self, B: int, H: int, W: int, generator: torch.Generator | None,
              device: torch.device) -> dict[str, Tensor]:
        """Per-sample random parameters, each (B,) on ``device``: oy, ox (crop), dy, dx (shift), flip (bool).
        Drawn on the generator's device in this fixed order, only for the enabled ops."""
        gdev = generator.device if generator is not None else device
        wide = self.wide
        first = B * self.rank  # this rank's share of the B * world draws (see for_rank)

        def randint(lo: int, hi: int) -> Tensor:  # uniform integers in [lo, hi], shape (B,)
            draws = torch.randint(lo, hi + 1, (B * self.world,), generator=generator, device=gdev)
            return draws[first:first + B].to(device)

        def rand(n: int = 1) -> Tensor:  # uniform in [0, 1), shape (B,) or (B, n), `wide`
            draws = torch.rand((B * self.world, n), generator=generator, device=gdev, dtype=wide)
            out = draws[first:first + B].to(device)
            return out[:, 0] if n == 1 else out

        def randn(n: int) -> Tensor:  # standard normal, (B, n) `wide`
            draws = torch.randn((B * self.world, n), generator=generator, device=gdev, dtype=wide)
            return draws[first:first + B].to(device)

        p: dict[str, Tensor] = {}
        if self.crop:
            p["oy"], p["ox"] = randint(0, 2 * self.crop), randint(0, 2 * self.crop)
        if self.shift:
            sy, sx = round(self.shift * H), round(self.shift * W)
            p["dy"], p["dx"] = randint(-sy, sy), randint(-sx, sx)
        if self.flip:
            p["flip"] = randint(0, 1).bool()
        if self.resized_crop is not None:  # area share, log aspect ratio, box position (each in [0, 1))
            p["rrc"] = rand(4)
        if self.rotate:
            p["angle"] = (2 * rand() - 1) * self.rotate  # degrees
        if self.zoom:
            p["zoom"] = 1 + (2 * rand() - 1) * self.zoom
        if self.translate:
            p["tx"], p["ty"] = ((2 * rand(2) - 1) * self.translate).unbind(1)  # shares of the width, height
        if self._light:
            p["light"] = rand() < self.p_light
            if self.gamma:
                p["gamma"] = torch.exp((2 * rand() - 1) * self.gamma)
            if self.contrast:
                p["contrast"] = 1 + (2 * rand() - 1) * self.contrast
            if self.brightness:
                p["brightness"] = (2 * rand() - 1) * self.brightness
            if self.saturation:
                p["saturation"] = 1 + (2 * rand() - 1) * self.saturation
            if self.ramp:
                p["ramp_angle"], p["ramp"] = (rand(2) * torch.tensor([2 * math.pi, self.ramp], device=device)).unbind(1)
        if self.grayscale:
            p["gray"] = rand() < self.grayscale
        if self.blur and self.blur_p:
            p["blur"] = rand() < self.blur_p
            p["sigma"] = 0.1 + rand() * max(self.blur - 0.1, 0.0)
        if self.erase:
            p["erase"] = rand() < self.erase
            p["erase_box"] = rand(4)  # area share, log aspect ratio, top, left
        if self.trivial:
            p["trivial_op"] = randint(0, len(TRIVIAL_OPS) - 1)
            p["trivial_m"] = rand() * (1 - 2 * randint(0, 1))  # signed magnitude in (-1, 1)
        if self._mixing:
            p["mix"] = rand() < self.mix_p
            both = bool(self.mixup and self.cutmix)
            p["cut"] = rand() < 0.5 if both else torch.full((B,), not self.mixup, dtype=torch.bool, device=device)
            alpha = torch.where(p["cut"], torch.tensor(self.cutmix, dtype=wide, device=device),
                                torch.tensor(self.mixup, dtype=wide, device=device))  # (B,)
            g = [_gamma(alpha, randn(_GAMMA_TRIES), rand(_GAMMA_TRIES), 1 - rand()) for _ in range(2)]
            p["lam"] = g[0] / (g[0] + g[1]).clamp_min(1e-300)  # Beta(alpha, alpha)
            p["box"] = rand(2)  # cutmix: the box's centre (row, column) as shares of the side
        return p

    def _geometric(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Apply crop -> shift -> flip with one pair of gathers. Index maps are built backwards from the output."""
        if x.device.type == "cpu" and "dy" not in p:
            return _crop_flip_by_slices(x, p, self.crop)
        B, _, H, W = x.shape
        rows = torch.arange(H, device=x.device).expand(B, H)  # (B, H) output row -> source row
        cols = torch.arange(W, device=x.device).expand(B, W)  # (B, W)
        if "flip" in p:  # flipped output column j reads shifted column W-1-j
            cols = torch.where(p["flip"][:, None], W - 1 - cols, cols)
        if "dy" in p:  # shifted pixel reads the cropped image at (i - dy, j - dx), clamped to the edge
            rows, cols = _shift_index(rows, p["dy"], H), _shift_index(cols, p["dx"], W)
        if "oy" in p:  # cropped pixel reads the zero-padded image at (i + oy, j + ox)
            rows, cols = rows + p["oy"][:, None], cols + p["ox"][:, None]
            x = F.pad(x, (self.crop,) * 4)  # (B, C, H+2p, W+2p)
        return _gather2d(x, rows, cols)

    def _stat(self, name: str, device: torch.device) -> Tensor | None:
        """The cached mean/std tensor, moved to ``device`` on first use there."""
        t = getattr(self, name)
        if t is not None and t.device != device:
            t = t.to(device)
            setattr(self, name, t)
        return t

    def __call__(self, x: Tensor, generator: torch.Generator | None = None, train: bool = True) -> Tensor:
        """uint8 (B, C, H, W) -> float32 (B, C, H, W) (or ``self.dtype``); random ops only when ``train``."""
        return self._run(x, generator, train)[0]

    def train_batch(self, x: Tensor, labels: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """A training batch: uint8 (B, C, H, W) and labels (B,) -> float (B, C, H, W) augmented, and the labels:
        (B,) as given, or with mixup / cutmix on, soft labels (B, classes) float32."""
        y, p = self._run(x, generator, True)
        if not self._mixing:
            return y, labels
        if self.num_classes is None:
            raise DanluError("augment.mixup / cutmix: the number of classes is not set; expected "
                             "Augment(num_classes=...)")
        return _mix(y, labels, p, self.num_classes)

    def _run(self, x: Tensor, generator: torch.Generator | None, train: bool) -> tuple[Tensor, dict[str, Tensor]]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"Augment expects a uint8 (B, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
        p: dict[str, Tensor] = {}
        if train and not self.is_identity:
            B, _, H, W = x.shape
            p = self._draw(B, H, W, generator, x.device)
        mean, std = self._stat("_mean", x.device), self._stat("_std", x.device)
        if (x.device.type == "cpu" and self.dtype == torch.float32 and not (train and self._continuous)
                and "dy" not in p and (self.size is None or tuple(x.shape[-2:]) == self.size)
                and math.prod(x.shape[1:]) >= _PER_IMAGE):  # (an empty batch too: a rank's last test batch)
            return _crop_flip_normalize_cpu(x, p, self.crop, self.scale, mean, std, self.memory_format), p
        if p and (self.shift or self.flip or self.crop):
            x = self._geometric(x, p)
        y = x.to(self.dtype, memory_format=self.memory_format).mul_(self.scale)  # one copy: dtype and layout
        if self.size is not None and tuple(y.shape[-2:]) != self.size:
            y = F.interpolate(y, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        if train and self._continuous:
            y = self._photometric(self._warp(y, p), p)
        if mean is not None:
            y.sub_(mean)
        if std is not None:
            y.div_(std)
        if "erase" in p:
            y = _erase(y, p["erase"], p["erase_box"])
        return y, p

    def _warp(self, y: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Step 3: one affine warp per sample (resized crop, rotation, zoom, translation), y (B, C, h, w)."""
        if not self._affine:
            return y
        theta = affine_theta(p, y.shape[-2], y.shape[-1], self.resized_crop or (1.0, 1.0), self.ratio)  # (B, 2, 3)
        grid = F.affine_grid(theta.to(y.dtype), list(y.shape), align_corners=False)
        return F.grid_sample(y, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _photometric(self, y: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Steps 4 to 6: lighting, grayscale, blur, TrivialAugment-lite, on pixels in [0, white], y (B, C, h, w)."""
        white = 255.0 * self.scale
        if "light" in p:
            y = torch.where(p["light"][:, None, None, None], _lighting(y, p, white), y)
        if "gray" in p and y.shape[1] == 3:
            y = torch.where(p["gray"][:, None, None, None], _luma(y).expand_as(y), y)
        if "blur" in p:
            y = _gaussian_blur(y, torch.where(p["blur"], p["sigma"], 0.0), max(self.blur, 0.1))
        if "trivial_op" in p:
            y = _trivial(y, p["trivial_op"], p["trivial_m"], white)
        return y


def _chunks(images: Tensor, chunk: int):
    """Float64 views of (N, C, H, W) images, ``chunk`` at a time (never a float copy of the whole set)."""
    images = torch.as_tensor(images)
    for i in range(0, images.shape[0], chunk):
        yield images[i:i + chunk].to(torch.float64)


def per_pixel_mean(images_uint8: Tensor, scale: float = 1 / 255, chunk: int = 1024) -> Tensor:
    """The mean image (C, H, W) float32 of a uint8 set (N, C, H, W), in scaled units (for ``Augment(mean=...)``)."""
    total = sum(c.sum(0) for c in _chunks(images_uint8, chunk))  # (C, H, W) float64
    return (total * scale / images_uint8.shape[0]).float()


def channel_mean_std(images_uint8: Tensor, scale: float = 1 / 255,
                     chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of a uint8 set (N, C, H, W), in scaled units."""
    s = s2 = 0.0
    for c in _chunks(images_uint8, chunk):
        s = s + c.sum((0, 2, 3))  # (C,)
        s2 = s2 + c.square().sum((0, 2, 3))
    n = images_uint8.shape[0] * images_uint8.shape[2] * images_uint8.shape[3]
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(0).sqrt()
    return (mean * scale).tolist(), (std * scale).tolist()

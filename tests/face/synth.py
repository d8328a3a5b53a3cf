"""Procedural face-like identity sets for CPU tests: per identity a fixed random pattern (a smooth random texture
inside an oval, with its own eye positions and sizes), per image a random pose (shift, rotation, scale), lighting
(gain, offset, a side gradient) and noise."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _identity(rng: np.random.Generator, size: int) -> dict:
    low = rng.normal(0, 1, (6, 6))
    texture = np.kron(low, np.ones((size // 6 + 1, size // 6 + 1)))[:size, :size]
    return {"texture": texture, "eyes_y": rng.uniform(0.35, 0.45), "eyes_dx": rng.uniform(0.14, 0.22),
            "eye_r": rng.uniform(0.04, 0.08), "mouth_w": rng.uniform(0.1, 0.25), "tone": rng.uniform(110, 170)}


def _render(ident: dict, rng: np.random.Generator, size: int) -> np.ndarray:
    import cv2

    yy, xx = np.mgrid[0:size, 0:size] / size
    face = ((xx - 0.5) / 0.33) ** 2 + ((yy - 0.5) / 0.42) ** 2 <= 1
    img = np.full((size, size), 40.0)
    img[face] = ident["tone"] + 25 * ident["texture"][face]
    for side in (-1, 1):  # eyes
        ex, ey = 0.5 + side * ident["eyes_dx"], ident["eyes_y"]
        img[((xx - ex) ** 2 + (yy - ey) ** 2) <= ident["eye_r"] ** 2] = 20
    mouth = (np.abs(yy - 0.72) < 0.025) & (np.abs(xx - 0.5) < ident["mouth_w"])
    img[mouth] = 60
    angle, scale = rng.uniform(-8, 8), rng.uniform(0.92, 1.08)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    m[:, 2] += rng.uniform(-0.05, 0.05, 2) * size
    img = cv2.warpAffine(img, m, (size, size), borderMode=cv2.BORDER_REPLICATE)
    gain, offset = rng.uniform(0.75, 1.25), rng.uniform(-20, 20)
    gradient = rng.uniform(-25, 25) * (xx - 0.5)
    img = img * gain + offset + gradient + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_identities(root: Path, identities: int = 24, per_identity: int = 16, size: int = 64, seed: int = 0) -> Path:
    """root/id_XX/img_YY.png gray images; returns root."""
    import cv2

    rng = np.random.default_rng(seed)
    for k in range(identities):
        ident = _identity(rng, size)
        d = root / f"id_{k:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_identity):
            cv2.imwrite(str(d / f"img_{j:02d}.png"), _render(ident, rng, size))
    return root


def train_tiny_face_run(out: Path, *overrides: str) -> Path:
    """A MobileFaceNet (x0.25) run of 4 steps of the light ArcFace recipe on synthetic identities (32 px, 3
    channels), trained on one thread: 2 shared cores make MobileFaceNet's many small ops stall on two under load.
    `overrides` (recipe keys, as --set) come last and win."""
    import torch

    import danlu

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        danlu.train("face_arcface_light", overrides=[
            "data.name=synthetic", "data.channels=3", "data.num_classes=8", "data.train_size=64", "data.test_size=32",
            "data.batch_size=8", "data.test_pairs=10", "data.size=32", "model.kwargs={width_mult: 0.25}",
            "precision=fp32", "run.max_iter=4", "run.tensorboard=false", "run.snapshot_every=0", *overrides],
            out=out, device="cpu", quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out

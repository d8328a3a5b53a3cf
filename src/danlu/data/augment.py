"""Batch preprocessing and augmentation on the device, random per sample.

Input is a uint8 batch (B, C, H, W) on any device; output is float32 (B, C, H, W). Random draws come from a
``torch.Generator`` the caller owns (and saves in snapshots), so a resumed run draws the same augmentations.

Training order: random crop with zero padding -> random shift with edge-replicate fill (Keras ``width_shift_range``
/ ``height_shift_range`` with ``fill_mode='nearest'``, integer offsets) -> random horizontal flip (p=0.5). The three
geometric ops are composed into one row index map (B, H) and one column index map (B, W) and applied with a single
pair of gathers, no Python loop over the batch. Then, always: ``x.float() * scale``, minus ``mean``, divided by
``std`` (each only where set).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from danlu.errors import DanluError


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
    """

    def __init__(self, *, shift: float = 0.0, flip: bool = False, crop: int = 0,
                 mean: Tensor | Sequence[float] | None = None, std: Sequence[float] | None = None,
                 scale: float = 1 / 255):
        if not 0.0 <= shift < 1.0:
            raise DanluError(f"augment.shift: must be in [0, 1), got {shift}")
        if crop < 0:
            raise DanluError(f"augment.crop: must be >= 0, got {crop}")
        self.shift, self.flip, self.crop, self.scale = float(shift), bool(flip), int(crop), float(scale)
        self._mean = None if mean is None else _as_channel_tensor(mean, "mean")  # (C,1,1) or (C,H,W)
        self._std = None if std is None else _as_channel_tensor(std, "std")  # (C,1,1)
        # layout of the float batches handed to the model: engine/speed.py sets channels_last where the model's
        # weights are; preserve_format keeps the uint8 batch's (contiguous NCHW) layout
        self.memory_format = torch.preserve_format
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
        return self.shift == 0.0 and not self.flip and self.crop == 0

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
        first = B * self.rank  # this rank's share of the B * world draws (see for_rank)

        def randint(lo: int, hi: int) -> Tensor:  # uniform integers in [lo, hi], shape (B,)
            draws = torch.randint(lo, hi + 1, (B * self.world,), generator=generator, device=gdev)
            return draws[first:first + B].to(device)

        p: dict[str, Tensor] = {}
        if self.crop:
            p["oy"], p["ox"] = randint(0, 2 * self.crop), randint(0, 2 * self.crop)
        if self.shift:
            sy, sx = round(self.shift * H), round(self.shift * W)
            p["dy"], p["dx"] = randint(-sy, sy), randint(-sx, sx)
        if self.flip:
            p["flip"] = randint(0, 1).bool()
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
        """uint8 (B, C, H, W) -> float32 (B, C, H, W); random ops only when ``train``."""
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"Augment expects a uint8 (B, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
        if train and not self.is_identity:
            B, _, H, W = x.shape
            x = self._geometric(x, self._draw(B, H, W, generator, x.device))
        y = x.to(torch.float32, memory_format=self.memory_format).mul_(self.scale)  # one copy: dtype and layout
        mean, std = self._stat("_mean", x.device), self._stat("_std", x.device)
        if mean is not None:
            y.sub_(mean)
        if std is not None:
            y.div_(std)
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

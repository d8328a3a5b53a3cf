"""dlib's aligned face chips without dlib: `chip_transform` is get_face_chip_details (the 5-point version) and
`extract_chip` is extract_image_chip (dlib/image_transforms/interpolation.h), so that

    chip = extract_chip(rgb, chip_transform(points))          # (150, 150, 3) uint8

equals dlib.get_face_chip(rgb, shape, size=150, padding=0.25) for the landmarks `points` of
danlu.face.dlib.landmarks.ShapePredictor: the input dlib's face recognition network expects.

Coordinates are pixel positions (x right, y down), pixel (col, row) centred at (col, row), as in dlib and OpenCV.

`hog_box_from_haar` maps a face box from OpenCV's Haar cascade (what danlu.face.detect finds) to the box dlib's HOG
detector would give the same face, the kind of box the landmark model was trained on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from danlu.errors import DanluError

# get_face_chip_details: where the 5 landmarks go in a chip, as shares of the unpadded face square (dlib's mean face)
MEAN_FACE = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                      [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                      [0.4901123135679, 0.6277975316475]])


@dataclass(frozen=True)
class ChipTransform:
    """Where a chip is cut, as dlib's chip_details: the square `rect` (left, top, right, bottom: the image positions
    of the chip's corner pixels' centres before rotation) turned by `angle` radians about its centre, sampled as a
    `size` x `size` image."""
    rect: tuple[float, float, float, float]
    angle: float
    size: int

    def matrix(self) -> np.ndarray:
        """(2, 3) float64 affine map from chip pixel (col, row, 1) to image (x, y) at full resolution: the chip's
        corner pixels go to the turned rect's corners. Apply to points with `m[:, :2] @ p + m[:, 2]`. (dlib centres
        the rect on the image of the chip point (size/2, size/2), not of the middle pixel's centre (size - 1)/2, so
        this map sits about half a chip pixel off the landmarks' similarity; it is the map dlib samples with.)"""
        return _corner_map(self.rect, self.angle, self.size, self.size)


def chip_transform(landmarks: np.ndarray, size: int = 150, padding: float = 0.25,
                   round_landmarks: bool = True) -> ChipTransform:
    """dlib's get_face_chip_details for (5, 2) landmarks (x, y) from the 5-point model: the similarity that puts the
    landmarks nearest to dlib's mean face in a `size` x `size` chip with `padding` (a share of the face's width) on
    every side. `round_landmarks`: round to whole pixels first, as dlib's full_object_detection stores them (dlib's
    chips, and the face network trained on them, come from the rounded points)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise DanluError(f"chip landmarks of shape {pts.shape}: expected (5, 2) finite (x, y) points from the "
                         "5-point model")
    if int(size) != size or size < 2:
        raise DanluError(f"chip size {size}: expected a whole number of pixels, at least 2")
    if not (math.isfinite(padding) and padding >= 0):
        raise DanluError(f"chip padding {padding}: expected a share of the face's width, 0 or more (dlib: 0.25)")
    size = int(size)
    if round_landmarks:
        pts = np.floor(pts + 0.5)  # dlib's point conversion: nearest pixel, halves up
    if np.ptp(pts, axis=0).max() == 0:
        raise DanluError(f"chip landmarks all at {pts[0].tolist()}: expected 5 points spread over a face")
    pad = float(np.float32(padding))  # dlib's Python get_face_chip takes padding as a C++ float
    chip_pts = (pad + MEAN_FACE) / (2 * pad + 1) * size
    # chip_details(chip_points, img_points, dims): the similarity chip -> image gives the angle, the scale and the
    # centre; the rect is the chip's size times the scale, centred on the image of the point (size/2, size/2)
    m, t = _similarity(chip_pts, pts)
    angle = math.atan2(m[1, 0], m[0, 0])
    scale = math.hypot(m[0, 0], m[1, 0])
    cx, cy = m @ np.array([size / 2.0, size / 2.0]) + t
    half = (size * scale - 1) / 2  # dlib's centered_drect: a width of w spans w - 1 between corner centres
    return ChipTransform(rect=(cx - half, cy - half, cx + half, cy + half), angle=angle, size=size)


def extract_chip(image: np.ndarray, chip: ChipTransform) -> np.ndarray:
    """dlib's extract_image_chip with bilinear interpolation: (size, size, 3) from an (H, W, 3) uint8 image,
    (size, size) from (H, W). As dlib: when the chip is much smaller than its region of the image, the region is first
    halved with dlib's 5x5 Gaussian pyramid (until one more halving would leave no more pixels than the chip has), so
    that the interpolation still averages; values are truncated, not rounded; pixels whose 2x2 neighbourhood leaves
    the image (including its last row and column) are black."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DanluError(f"chip image {what}: expected a uint8 (H, W) gray or (H, W, 3) RGB array")
    n = chip.size
    left, top, right, bottom = chip.rect
    if chip.angle == 0 and right - left + 1 == n and bottom - top + 1 == n:
        return _copy_chip(image, chip.rect)  # dlib: no rotation, no scaling: a plain copy
    H, W = image.shape[:2]
    # the pyramid's depth: halve the rect until one more halving would leave no more pixels than the chip has
    depth, grow, rect = 0, 2.0, _rect_down(chip.rect)
    while _area(rect) > n * n:
        rect, depth, grow = _rect_down(rect), depth + 1, grow * 2 + 2  # a 2 pixel border per level for the filter
    # the region of the image read: the turned rect's bounding box grown by that border, inside the image
    corners = _turned_corners(chip.rect, chip.angle)  # (4, 2)
    box = (corners[:, 0].min() - grow, corners[:, 1].min() - grow, corners[:, 0].max() + grow,
           corners[:, 1].max() + grow)
    box = tuple(_lround(v) for v in (max(box[0], 0), max(box[1], 0), min(box[2], W - 1), min(box[3], H - 1)))
    shape = (n, n) + image.shape[2:]
    if box[0] > box[2] or box[1] > box[3]:
        return np.zeros(shape, dtype=np.uint8)  # the chip lies wholly outside the image
    img = image[box[1]:box[3] + 1, box[0]:box[2] + 1]
    rect = (left - box[0], top - box[1], right - box[0], bottom - box[1])
    while depth > 0 and _area(_rect_down(rect)) > n * n:
        img, rect, depth = _pyramid_down(img), _rect_down(rect), depth - 1
    m = _corner_map(rect, chip.angle, n, n)
    col, row = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64))  # (n, n) each
    x = m[0, 0] * col + m[0, 1] * row + m[0, 2]
    y = m[1, 0] * col + m[1, 1] * row + m[1, 2]
    return _bilinear(img, x, y).reshape(shape)


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dlib's find_similarity_transform(src, dst) for (N, 2) points: ((2, 2) scaled rotation, (2,) translation),
    float64; Umeyama's least squares in the closed form 2-D allows (see landmarks._similarity)."""
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - ms, dst - md
    var = (s * s).sum()
    a = (s * d).sum() / var
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / var
    m = np.array([[a, -b], [b, a]])
    return m, md - m @ ms


def _lround(v: float) -> int:
    """C's lround: to the nearest integer, halves away from zero (Python's round() takes halves to even)."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def _area(rect: tuple[float, float, float, float]) -> float:
    """A dlib drectangle's area: (right - left + 1) * (bottom - top + 1), 0 when empty."""
    left, top, right, bottom = rect
    return 0.0 if left > right or top > bottom else (right - left + 1) * (bottom - top + 1)


def _rect_down(rect: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """pyramid_down<2>::rect_down: each corner p -> p / 2 - (1.25, 0.75), dlib's (approximate) map to the next
    level's coordinates."""
    left, top, right, bottom = rect
    return left / 2 - 1.25, top / 2 - 0.75, right / 2 - 1.25, bottom / 2 - 0.75


def _turned_corners(rect: tuple[float, float, float, float], angle: float) -> np.ndarray:
    """(4, 2): the rect's tl, tr, bl, br corners turned by `angle` about its centre (dlib's rotate_point)."""
    left, top, right, bottom = rect
    cx, cy = (left + right) / 2, (top + bottom) / 2
    c, s = math.cos(angle), math.sin(angle)
    out = []
    for px, py in ((left, top), (right, top), (left, bottom), (right, bottom)):
        dx, dy = px - cx, py - cy
        out.append((c * dx - s * dy + cx, s * dx + c * dy + cy))
    return np.array(out)


def _corner_map(rect: tuple[float, float, float, float], angle: float, rows: int, cols: int) -> np.ndarray:
    """(2, 3): chip pixel (0, 0) -> the turned rect's tl corner, (cols - 1, 0) -> tr, (0, rows - 1) -> bl (dlib fits
    this affine map to those three pairs)."""
    tl, tr, bl, _ = _turned_corners(rect, angle)
    return np.column_stack([(tr - tl) / (cols - 1), (bl - tl) / (rows - 1), tl])


def _copy_chip(image: np.ndarray, rect: tuple[float, float, float, float]) -> np.ndarray:
    """dlib's basic_extract_image_chip: the pixels of the rect (corners rounded) as they are, black outside."""
    left, top, right, bottom = (_lround(v) for v in rect)
    H, W = image.shape[:2]
    out = np.zeros((bottom - top + 1, right - left + 1) + image.shape[2:], dtype=np.uint8)
    t, b, l, r = max(top, 0), min(bottom, H - 1), max(left, 0), min(right, W - 1)
    if t <= b and l <= r:
        out[t - top:b - top + 1, l - left:r - left + 1] = image[t:b + 1, l:r + 1]
    return out


def _pyramid_down(img: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2>: a separable [1 4 6 4 1] / 16 filter, keeping every other row and column from the
    first full window, integer sums floored (/ 256). (H, W[, 3]) uint8 -> ((H - 3) // 2, (W - 3) // 2[, 3])."""
    H, W = img.shape[:2]
    if H <= 8 or W <= 8:
        return np.zeros((0, 0) + img.shape[2:], dtype=np.uint8)  # dlib: too small to halve, an empty image
    rows, cols = (H - 3) // 2, (W - 3) // 2
    a = img.astype(np.int32)

    def taps(x: np.ndarray, n: int, axis: int) -> np.ndarray:  # the 5 taps at 2k .. 2k + 4, k < n, along `axis`
        s = [np.take(x, np.arange(j, j + 2 * n, 2), axis=axis) for j in range(5)]
        return s[0] + 4 * s[1] + 6 * s[2] + 4 * s[3] + s[4]

    return (taps(taps(a, cols, 1), rows, 0) // 256).astype(np.uint8)


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dlib's interpolate_bilinear at the points (x, y) (any equal shapes): (N[, 3]) uint8, truncated; 0 where the
    2x2 neighbourhood is not wholly inside the image."""
    H, W = img.shape[:2]
    x, y = x.ravel(), y.ravel()
    left, top = np.floor(x), np.floor(y)
    ok = (left >= 0) & (top >= 0) & (left + 1 < W) & (top + 1 < H)
    out = np.zeros((x.size,) + img.shape[2:], dtype=np.uint8)
    if not ok.any():
        return out
    l, t = left[ok].astype(np.intp), top[ok].astype(np.intp)
    lr, tb = x[ok] - left[ok], y[ok] - top[ok]
    if img.ndim == 3:
        lr, tb = lr[:, None], tb[:, None]
    tl, tr = img[t, l].astype(np.float64), img[t, l + 1].astype(np.float64)
    bl, br = img[t + 1, l].astype(np.float64), img[t + 1, l + 1].astype(np.float64)
    # dlib's expression and order, in float64; the cast to uint8 truncates as C++'s does
    out[ok] = ((1 - tb) * ((1 - lr) * tl + lr * tr) + tb * ((1 - lr) * bl + lr * br)).astype(np.uint8)
    return out


# Haar -> HOG box: the HOG box's centre is the Haar box's moved by (HAAR_TO_HOG_DX, HAAR_TO_HOG_DY) x the Haar
# box's side, and its side is HAAR_TO_HOG_SCALE x the Haar side.
# Measured on 2,936 LFW deep-funneled photos (a seeded sample of 3,000; in the rest one detector found no face or the
# boxes overlapped by less than IoU 0.3): the largest face of danlu.face.detect.detect_faces (OpenCV's
# haarcascade_frontalface_default, equalized gray, scale 1.1, 5 neighbours) against dlib.get_frontal_face_detector()
# with one upsampling. Least squares through the origin of each of the three against the Haar side, scale-free: a fit
# with intercepts in pixels fitted LFW's sides a little better (0.085 against 0.094) but missed ORL's smaller faces by
# 24% of their side.
# Residuals, rms as a share of the HOG box's side, on a held-out half of LFW: centre x 0.045, centre y 0.046, side
# 0.094 (most of the side's is HOG's own pyramid steps of 6/5). On ORL's 344 tightly framed 92x112 faces (not used
# for the fit): 0.050, 0.050, 0.13 (ORL alone would give dy 0.095, scale 1.01).
# Landmarks from the corrected boxes against those from the HOG boxes, LFW: median 0.19 px, mean 0.80 px, 2.3% of
# faces with a point more than 10% of the eye distance away (2.8% from the uncorrected Haar box; most are faces whose
# two boxes overlap by IoU < 0.6); ORL: median 0.16 px, mean 0.35 px (the same as uncorrected).
HAAR_TO_HOG_DX, HAAR_TO_HOG_DY, HAAR_TO_HOG_SCALE = -0.0216, 0.0714, 0.917


def hog_box_from_haar(box: Sequence[float]) -> tuple[float, float, float, float]:
    """A face box (x, y, w, h) from OpenCV's Haar cascade (danlu.face.detect.detect_faces) -> the box (x, y, w, h)
    dlib's HOG detector would about give the same face: a little smaller and lower (see the constants above)."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise DanluError(f"face box {box!r}: expected (x, y, w, h), four numbers") from None
    if not (np.isfinite([x, y, w, h]).all() and w > 0 and h > 0):
        raise DanluError(f"face box {box!r}: expected (x, y, w, h) with finite values and w, h above 0")
    cx, cy = x + w / 2 + HAAR_TO_HOG_DX * w, y + h / 2 + HAAR_TO_HOG_DY * h
    w, h = HAAR_TO_HOG_SCALE * w, HAAR_TO_HOG_SCALE * h
    return cx - w / 2, cy - h / 2, w, h

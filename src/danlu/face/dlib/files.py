"""Where dlib's model files come from: the face-recognition-models wheel (public domain; danlu's [face-pretrained]
extra), found without importing it (its __init__ imports pkg_resources, which setuptools 81 and later no longer
ship; the files' place in the package is all it computes).

    path = model_file("shape_predictor_5_face_landmarks.dat", "dlib's face landmark model")
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from danlu.errors import DanluError

PIP_HINT = "pip install 'danlu[face-pretrained]'"


def model_file(name: str, what: str) -> Path:
    """The path of models/`name` inside the installed face_recognition_models package; DanluError (one line naming
    the pip command) where the package or the file is missing. `what` names the file for a person."""
    spec = importlib.util.find_spec("face_recognition_models")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise DanluError(f"{what} ({name}) comes from the face_recognition_models package, which is not installed: "
                         f"{PIP_HINT}")
    path = Path(folders[0]) / "models" / name
    if not path.is_file():
        raise DanluError(f"{path}: not found in the installed face_recognition_models package; expected {name} "
                         f"(reinstall: {PIP_HINT})")
    return path

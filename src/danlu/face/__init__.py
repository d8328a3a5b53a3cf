"""Face recognition on danlu's engine: prepare (detect, align, equalize, crop) -> train (softmax / ArcFace / CosFace
heads, verification on held-out identities) -> verify (LFW protocol) -> enroll / identify (a SQLite gallery).

    from danlu.face import load_face_run, Gallery
    run = load_face_run("runs/faces")                     # .embed(images) -> (N, D), .threshold, .fingerprint
    Gallery("g.sqlite", fingerprint=run.fingerprint).identify(run.embed([jpeg_bytes]), top=5)

Nothing is imported until used: importing one module of the package (danlu.face.verify) loads no detector and no
gallery.
"""
from __future__ import annotations

_LAZY = {
    "FaceRun": "danlu.face.api", "embed": "danlu.face.api", "enroll": "danlu.face.api", "identify": "danlu.face.api",
    "load_face_run": "danlu.face.api", "pairs": "danlu.face.api",
    "verify_pairs": ("danlu.face.api", "verify"),  # `danlu.face.verify` is the pairs files' module
    "FaceOptions": "danlu.face.detect", "detect_faces": "danlu.face.detect", "preprocess": "danlu.face.detect",
    "read_image": "danlu.face.detect", "Gallery": "danlu.face.gallery", "prepare_faces": "danlu.face.prepare",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'danlu.face' has no attribute {name!r}")

"""Face recognition on danlu's engine: prepare (detect, align, equalize, crop) -> train (softmax / ArcFace / CosFace
heads, verification on held-out identities) -> verify (LFW protocol) -> enroll / identify (a SQLite gallery).

    from danlu.face import load_face_run, Gallery
    run = load_face_run("runs/faces")                     # .embed(images) -> (N, D), .threshold, .fingerprint
    Gallery("g.sqlite", fingerprint=run.fingerprint).identify(run.embed([jpeg_bytes]), top=5)
"""
from danlu.face.api import FaceRun, embed, enroll, identify, load_face_run, pairs
from danlu.face.api import verify as verify_pairs  # `danlu.face.verify` is the protocol's module
from danlu.face.detect import FaceOptions, detect_faces, preprocess, read_image
from danlu.face.gallery import Gallery
from danlu.face.prepare import prepare_faces

__all__ = ["FaceOptions", "FaceRun", "Gallery", "detect_faces", "embed", "enroll", "identify", "load_face_run",
           "pairs", "prepare_faces", "preprocess", "read_image", "verify_pairs"]

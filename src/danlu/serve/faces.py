"""What the server needs from a face model, in one place: the `/v1/faces/*` endpoints and the page's Faces view are
written against `FaceService` only.

    faces = face_service(run, gallery="team.sqlite")   # None for a classifier run
    x = faces.crops([jpeg_bytes, png_bytes])           # (N, C, H, W) uint8 faces, cut as the run's training faces were
    emb = faces.embed(x)                               # (N, D) float32, rows of unit length (micro-batched)
    sim = float(emb[0] @ emb[1])                       # cosine similarity; same person when >= faces.threshold
    faces.identify(emb, top=5)                         # per row: [(name, similarity), ...] best first

The face models themselves (detection and alignment, heads, the verification threshold, the SQLite gallery) live in
`danlu.face`; `face_service` wraps its `FaceRun` and `Gallery` for a face run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Union, runtime_checkable

import torch

from danlu.errors import DanluError


@runtime_checkable
class FaceService(Protocol):
    shape: tuple[int, int, int]  # (C, H, W) of the face crops the model takes
    threshold: float  # the run's verification threshold: cosine similarity at or above it means the same person
    has_gallery: bool  # whether identify() has a gallery to search

    def crops(self, images: list[bytes]) -> torch.Tensor:
        """Encoded images -> (N, C, H, W) uint8 face crops, cut as the run's training faces were. An image that is
        not readable raises DanluError naming it ('image 2: ...')."""
        ...

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> (N, D) float32 on the CPU, each row of unit length."""
        ...

    def identify(self, embeddings: torch.Tensor, top: int) -> list[list[tuple[str, float]]]:
        """(N, D) -> for each row the `top` nearest gallery names with their cosine similarity, best first."""
        ...


class _FaceRunService:
    """danlu.face's FaceRun (and Gallery) as a FaceService."""

    def __init__(self, face_run, gallery):
        self.face_run, self.gallery = face_run, gallery
        self.shape = tuple(face_run.run.shape)
        self.threshold = float(face_run.threshold)
        self.has_gallery = gallery is not None

    def crops(self, images: list[bytes]) -> torch.Tensor:
        return self.face_run.faces(images)[0]

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        return self.face_run.embed_crops(crops)

    def identify(self, embeddings: torch.Tensor, top: int) -> list[list[tuple[str, float]]]:
        return self.gallery.identify(embeddings, top=top)


def face_service(run, gallery: Union[str, Path, None] = None) -> Optional[FaceService]:
    """The face service of `run` (a danlu.runs.LoadedRun), or None when the run is a classifier. A gallery given for a
    run that is not a face model is an error, as is a face run without a verification threshold."""
    from danlu.models import is_face_model

    if not is_face_model(run.model):
        if gallery is not None:
            raise DanluError(f"--gallery {gallery}: run {run.run_dir} is not a face model (model "
                             f"{run.recipe.model.name}); expected a face run, or no --gallery")
        return None
    from danlu.face import Gallery
    from danlu.face.api import face_run_from

    face_run = face_run_from(run)  # the served run's own model, not a second copy
    if face_run.threshold is None:
        raise DanluError(f"{run.run_dir}: this face run has no verification threshold in face.json; expected one "
                         f"measured by training on held-out identities or by danlu.face.verify")
    return _FaceRunService(face_run, Gallery(gallery, fingerprint=face_run.fingerprint) if gallery else None)

"""Face models: a backbone that maps images to a D-dim feature, an L2-normalised embedding, and an identity head.

    model = create_model("mobilefacenet", num_classes=5000, head="arcface", scale=64.0)
    logits = model(x)            # (B, 5000): scale * cos(theta) for arcface/cosface, a linear classifier for softmax
    emb = model.embed(x)         # (B, 128), unit length: what verification, search and the gallery use

`test_flip` (on by default) fuses each image with its mirror image at test time, as every LFW result does: the
embedding is the normalized sum of the features of x and of x flipped left-right, so a face and its mirror image get
the same embedding.

`set_whitening(mean, matrix)` (fitted after training by `within_class_whitening`, `model.whiten`): embeddings become
normalize((e - mean) @ matrix), which scales down the directions along which one person's photos vary (lighting, pose,
expression) as measured on the training people: within-class covariance normalization (WCCN, as in speaker and face
verification). Training and its logits never use it.

Training calls `model(x)` like any classifier (the margin lives in the loss, danlu.models.heads.MarginLoss).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import DanluError
from danlu.models.heads import HEADS, CosineHead


class FaceModel(nn.Module):
    """backbone (B, C, H, W) -> (B, D) features -> head. The softmax head (FaceNet's classifier, the article's) is a
    linear layer on the features; arcface / cosface use a normalised linear layer on the unit embedding."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, head: str = "softmax", scale: float = 64.0,
                 test_flip: bool = True):
        super().__init__()
        if head not in HEADS:
            raise DanluError(f"model.head={head!r}: expected one of {', '.join(HEADS)}")
        self.backbone, self.head_kind, self.embedding_dim = backbone, head, dim
        with warnings.catch_warnings():  # 0 identities (an imported network, no head yet): nothing to initialize
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.head = nn.Linear(dim, num_classes) if head == "softmax" else CosineHead(dim, num_classes, scale)
        self.test_flip = bool(test_flip)
        # the embedding's whitening (empty: none); not in the weights: a run keeps it in whiten.safetensors
        self.register_buffer("whiten_mean", torch.zeros(0), persistent=False)  # (D,)
        self.register_buffer("whiten_matrix", torch.zeros(0), persistent=False)  # (D, D)

    def set_whitening(self, mean: torch.Tensor | None, matrix: torch.Tensor | None) -> None:
        """Whiten embed()'s output from now on (None, None: stop)."""
        ref = self.head.weight
        self.whiten_mean = torch.zeros(0) if mean is None else mean.to(ref.device, torch.float32)
        self.whiten_matrix = torch.zeros(0) if matrix is None else matrix.to(ref.device, torch.float32)

    @property
    def whitened(self) -> bool:
        return self.whiten_matrix.numel() > 0

    def whitening(self) -> dict[str, torch.Tensor]:
        """{'mean', 'matrix'} on the CPU, as a run's whiten.safetensors holds them ({} where none is set)."""
        if not self.whitened:
            return {}
        return {"mean": self.whiten_mean.cpu().contiguous(), "matrix": self.whiten_matrix.cpu().contiguous()}

    def unit_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, D) unit embeddings before any whitening; with test_flip, of each
        image fused with its mirror image (one forward pass of 2B images)."""
        if not self.test_flip:
            return F.normalize(self.backbone(x).float(), dim=1)
        f = self.backbone(torch.cat([x, x.flip(-1)])).float()  # (2B, D)
        return F.normalize(f[:len(x)] + f[len(x):], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, D) unit embeddings (whitened where set_whitening was called)."""
        e = self.unit_embed(x)
        if not self.whitened:
            return e
        return F.normalize((e - self.whiten_mean) @ self.whiten_matrix, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # (B, D)
        return self.head(f if self.head_kind == "softmax" else F.normalize(f, dim=1))  # (B, classes)


def within_class_whitening(emb: torch.Tensor, labels: torch.Tensor, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, matrix) whitening unit embeddings (N, D) of labelled people against their within-class covariance W:
    matrix = (W + shrink * mean eigenvalue * I)^(-1/2), mean = the embeddings' mean. `shrink` keeps the directions that
    a few people cannot measure from being blown up (the light recipe's 1.0 was steadier than 0.3 on AT&T/ORL,
    docs/evidence/faces.md). In float64; at least two images of some person are needed."""
    e, y = emb.double().cpu(), labels.cpu()
    groups = [e[y == c] for c in torch.unique(y)]
    centred = torch.cat([g - g.mean(0) for g in groups if len(g) > 1])
    if len(centred) == 0:
        raise DanluError("model.whiten: no training person has two images; expected people with several photos "
                         "(or model.whiten=0)")
    w = centred.T @ centred / len(centred)  # (D, D)
    w = w + shrink * (w.trace() / len(w)) * torch.eye(len(w), dtype=w.dtype)
    values, vectors = torch.linalg.eigh(w)
    matrix = vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T
    return e.mean(0).float(), matrix.float()

"""Face models: a backbone that maps images to a D-dim feature, an L2-normalised embedding, and an identity head.

    model = create_model("mobilefacenet", num_classes=5000, head="arcface", scale=64.0)
    logits = model(x)            # (B, 5000): scale * cos(theta) for arcface/cosface, a linear classifier for softmax
    emb = model.embed(x)         # (B, 128), unit length: what verification, search and the gallery use

`test_flip` (on by default) fuses each image with its mirror image at test time, as every LFW result does: the
embedding is the normalized sum of the features of x and of x flipped left-right, so a face and its mirror image get
the same embedding.

Training calls `model(x)` like any classifier (the margin lives in the loss, danlu.face.heads.MarginLoss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import DanluError


class FaceModel(nn.Module):
    """backbone (B, C, H, W) -> (B, D) features -> head. The softmax head (FaceNet's classifier, the article's) is a
    linear layer on the features; arcface / cosface use a normalised linear layer on the unit embedding."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, head: str = "softmax", scale: float = 64.0,
                 test_flip: bool = True):
        super().__init__()
        from danlu.face.heads import HEADS, CosineHead

        if head not in HEADS:
            raise DanluError(f"model.head={head!r}: expected one of {', '.join(HEADS)}")
        self.backbone, self.head_kind, self.embedding_dim = backbone, head, dim
        self.head = nn.Linear(dim, num_classes) if head == "softmax" else CosineHead(dim, num_classes, scale)
        self.test_flip = bool(test_flip)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, D) unit embeddings; with test_flip, of each image fused with its
        mirror image (one forward pass of 2B images)."""
        if not self.test_flip:
            return F.normalize(self.backbone(x).float(), dim=1)
        f = self.backbone(torch.cat([x, x.flip(-1)])).float()  # (2B, D)
        return F.normalize(f[:len(x)] + f[len(x):], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # (B, D)
        return self.head(f if self.head_kind == "softmax" else F.normalize(f, dim=1))  # (B, classes)

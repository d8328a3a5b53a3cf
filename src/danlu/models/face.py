"""Face models: a backbone that maps images to a D-dim feature, an L2-normalised embedding, and an identity head.

    model = create_model("mobilefacenet", num_classes=5000, head="arcface", scale=64.0)
    logits = model(x)            # (B, 5000): scale * cos(theta) for arcface/cosface, a linear classifier for softmax
    emb = model.embed(x)         # (B, 128), unit length: what verification, search and the gallery use

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

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, head: str = "softmax", scale: float = 64.0):
        super().__init__()
        from danlu.face.heads import HEADS, CosineHead

        if head not in HEADS:
            raise DanluError(f"model.head={head!r}: expected one of {', '.join(HEADS)}")
        self.backbone, self.head_kind, self.embedding_dim = backbone, head, dim
        self.head = nn.Linear(dim, num_classes) if head == "softmax" else CosineHead(dim, num_classes, scale)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, D) unit embeddings."""
        return F.normalize(self.backbone(x).float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # (B, D)
        return self.head(f if self.head_kind == "softmax" else F.normalize(f, dim=1))  # (B, classes)

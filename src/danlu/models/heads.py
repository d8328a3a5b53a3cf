"""Identity heads and margin losses: softmax (the article's classifier), ArcFace and CosFace.

The face model returns logits, so the training loop's `loss = criterion(model(x), y)` is unchanged. With a margin
head the logits are scaled cosines `s * cos(theta)` (B, identities) from a normalised linear layer (`CosineHead`), and
the margin is applied to the target column inside the loss (`MarginLoss`), so top-1 accuracy from the logits stays
meaningful and evaluation needs no margin:

    head = CosineHead(512, num_identities, scale=64.0)      # logits = 64 * cos(theta), (B, identities)
    criterion = MarginLoss("arcface", scale=64.0, margin=0.5)
    loss = criterion(head(F.normalize(features)), labels)   # ArcFace: s * cos(theta_y + m) on the target column
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import DanluError

HEADS = ("softmax", "arcface", "cosface")
COLLAPSED = 0.8  # identity weights' mean cosine from which a run has collapsed (good runs measured -0.03 to 0.20)


class CosineHead(nn.Module):
    """Normalised linear layer: (B, D) unit embeddings -> (B, classes) logits `scale * cos(theta)`."""

    def __init__(self, dim: int, num_classes: int, scale: float = 64.0):
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(emb, F.normalize(self.weight, dim=1))  # (B, classes)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, classes={self.weight.shape[0]}, scale={self.scale}"

    @torch.no_grad()
    def mean_cosine(self) -> float:
        """The mean cosine between two different identities' weights: near 0 where they spread, near 1 where they
        all point one way. A margin head can collapse so: every face then lies on the far side of every weight,
        where ArcFace's fallback `cos(theta) - m sin(m)` barely separates the identities, and training stalls."""
        w = F.normalize(self.weight.float(), dim=1)  # (classes, D)
        k = len(w)
        if k < 2:
            return 0.0
        total = w.sum(0)
        return float((total @ total - k) / (k * (k - 1)))  # sum over i != j of w_i . w_j, averaged


class MarginLoss(nn.Module):
    """Cross-entropy with an additive angular (ArcFace: cos(theta + m)) or cosine (CosFace: cos(theta) - m) margin on
    the target column of scaled-cosine logits `s * cos(theta)` (B, classes).

        criterion = MarginLoss("cosface", scale=30.0, margin=0.35)
        loss = criterion(logits, labels)

    ArcFace follows insightface's ArcMarginProduct: where theta + m would pass pi (cos(theta) <= cos(pi - m)) the
    target becomes cos(theta) - m sin(m), which keeps the target logit decreasing in theta."""

    def __init__(self, kind: str, scale: float = 64.0, margin: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        if kind not in ("arcface", "cosface"):
            raise DanluError(f"model.head={kind!r}: a margin loss needs arcface or cosface")
        self.kind, self.scale, self.margin, self.label_smoothing = kind, float(scale), float(margin), label_smoothing
        self.ramp = 1.0  # the share of the margin in effect (model.margin_warmup: set by the Schedule each step)

    def margin_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits with the margin applied to each row's target column, float32."""
        m = self.margin * self.ramp
        cos = (logits.float() / self.scale).clamp(-1.0, 1.0)  # (B, classes)
        target = cos.gather(1, labels[:, None])  # (B, 1) cos(theta_y)
        if self.kind == "arcface":
            sin = (1.0 - target.square()).clamp_min(0.0).sqrt()
            phi = target * math.cos(m) - sin * math.sin(m)  # cos(theta_y + m)
            phi = torch.where(target > math.cos(math.pi - m), phi, target - math.sin(math.pi - m) * m)
        else:
            phi = target - m
        return self.scale * cos.scatter(1, labels[:, None], phi)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.margin_logits(logits, labels), labels, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        now = f" (x {self.ramp:.3g} now)" if self.ramp < 1 else ""
        return f"{self.kind}, scale={self.scale}, margin={self.margin}{now}"


def build_criterion(head: str, scale: float, margin: float, label_smoothing: float = 0.0) -> nn.Module:
    """The loss for a head: plain cross-entropy for softmax, MarginLoss for arcface / cosface."""
    if head == "softmax":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return MarginLoss(head, scale, margin, label_smoothing)

"""A small, fast CIFAR network after Keller Jordan's airbench94 (2024: CIFAR-10 94% in 2.59 s on one A100): a 2x2
stem, three conv groups of widths 64, 256, 256, each two 3x3 convolutions with a max pool, BatchNorm and GELU, a 3x3
max pool and a linear classifier scaled down by 9. Unlike airbench, the stem is learned (no whitening of patches
from the data) and BatchNorm is torch's default: a model of the registry, not a training script.

    model = create_model("airbench", num_classes=10)       # 32x32 RGB in, (B, 10) logits out
"""
from __future__ import annotations

import torch
from torch import nn

from danlu.models.registry import register_model


class ConvGroup(nn.Sequential):
    """conv 3x3 -> max pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU: (B, cin, H, W) -> (B, cout, H/2, W/2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout),
                         nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class Airbench(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (64, 256, 256)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 24, 2, bias=True), nn.GELU())  # 32 -> 31
        self.groups = nn.Sequential(ConvGroup(24, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]))  # 31 -> 15 -> 7 -> 3
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 32, 32)
        x = self.pool(self.groups(self.stem(x))).flatten(1)  # (B, 256)
        return self.head(x) / 9  # (B, classes): the small logit scale airbench trains with


@register_model
def airbench(num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (64, 256, 256)) -> nn.Module:
    """airbench94's network (32x32 inputs; any size with the adaptive pool)."""
    return Airbench(num_classes, in_channels, tuple(widths))

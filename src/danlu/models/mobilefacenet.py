"""MobileFaceNet (Chen et al. 2018): a ~1M-parameter face embedding network for CPUs and phones. Inverted residual
bottlenecks with PReLU, total stride 16, then a global depthwise convolution (GDC: a learned, per-channel weighting of
the last feature map instead of average pooling) and a linear 1x1 layer to the embedding (128-d).

The GDC kernel is the last map's size for `input_size` (7x7 at 112 px, 3x3 at 48 px); a map of another size is
average-pooled to it first, so the model runs at any input size."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from danlu.models.face import FaceModel
from danlu.models.registry import register_model


class ConvBn(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([nn.PReLU(cout)] if act else []))


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand (t) -> 3x3 depthwise (stride) -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(ConvBn(cin, mid), ConvBn(mid, mid, 3, stride, groups=mid),
                                  ConvBn(mid, cout, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# (expansion t, channels c, repeats n, stride s) of the paper's Table 1
_SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class MobileFaceNetFeatures(nn.Module):
    """(B, C, H, W) -> (B, embedding_dim) features (before L2 normalisation)."""

    def __init__(self, in_channels: int = 3, embedding_dim: int = 128, input_size: int = 112, width_mult: float = 1.0):
        super().__init__()
        ch = lambda c: max(8, int(round(c * width_mult / 8)) * 8)  # noqa: E731 (MobileNet's width multiplier)
        width, last = ch(64), ch(512)
        self.stem = nn.Sequential(ConvBn(in_channels, width, 3, 2), ConvBn(width, width, 3, 1, groups=width))
        blocks, cin = [], width
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(Bottleneck(cin, ch(c), s if i == 0 else 1, t))
                cin = ch(c)
        self.blocks = nn.Sequential(*blocks)
        self.conv = ConvBn(cin, last)
        self.gdc_size = math.ceil(input_size / 16)  # the last map's side at input_size (stride 16, 'same' padding)
        self.gdc = nn.Sequential(nn.Conv2d(last, last, self.gdc_size, groups=last, bias=False), nn.BatchNorm2d(last))
        self.linear = nn.Linear(last, embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.blocks(self.stem(x)))  # (B, 512 * width_mult, H/16, W/16)
        if x.shape[-2:] != (self.gdc_size, self.gdc_size):
            x = F.adaptive_avg_pool2d(x, self.gdc_size)
        x = self.gdc(x).flatten(1)  # (B, 512 * width_mult)
        return self.bn(self.linear(x))  # (B, embedding_dim)


@register_model(face=True)
def mobilefacenet(num_classes: int = 10, in_channels: int = 3, head: str = "softmax", scale: float = 64.0,
                  embedding_dim: int = 128, input_size: int = 112, width_mult: float = 1.0,
                  test_flip: bool = True) -> nn.Module:
    """MobileFaceNet (128-d embedding, 112 px in the paper; any size here) with an identity head; `width_mult`
    scales every layer's channels (0.25: about 16x fewer operations)."""
    return FaceModel(MobileFaceNetFeatures(in_channels, embedding_dim, input_size, width_mult), embedding_dim,
                     num_classes, head, scale, test_flip)

"""MiniGoogLeNet from Adrian Rosebrock's "How-To: Multi-GPU training with Keras, Python, and deep learning"
(PyImageSearch, 2017), the CIFAR-10 model.

Layout (channels @ spatial size for a 32x32 input):

    stem        conv 96@3x3/1                      ->  96 @ 32
    inception   1x1 32 | 3x3 32                    ->  64 @ 32
    inception   1x1 32 | 3x3 48                    ->  80 @ 32
    downsample  3x3/2 valid 80 | maxpool 3x3/2     -> 160 @ 15
    inception   112 | 48                           -> 160 @ 15
    inception    96 | 64                           -> 160 @ 15
    inception    80 | 80                           -> 160 @ 15
    inception    48 | 96                           -> 144 @ 15
    downsample  3x3/2 valid 96 | maxpool 3x3/2     -> 240 @ 7
    inception   176 | 160                          -> 336 @ 7
    inception   176 | 160                          -> 336 @ 7
    avgpool (adaptive; the article's 7x7) -> dropout 0.5 -> linear num_classes

Every conv is Conv + BatchNorm + ReLU. Convs keep their bias as in the Keras original (Conv2D's default), so the
trainable parameter count matches the article's model summary.
"""
from __future__ import annotations

import torch
from torch import nn

from danlu.models.registry import register_model


def _conv(cin: int, cout: int, k: int, stride: int = 1, same: bool = True) -> nn.Sequential:
    """Conv(k x k, stride, 'same' or 'valid' padding) -> BN -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=k // 2 if same else 0),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Inception(nn.Module):
    """concat(conv 1x1 k1, conv 3x3 k3) on channels: (N, cin, H, W) -> (N, k1 + k3, H, W)."""

    def __init__(self, cin: int, k1: int, k3: int):
        super().__init__()
        self.b1, self.b3 = _conv(cin, k1, 1), _conv(cin, k3, 3)
        self.out_channels = k1 + k3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x)], 1)


class _Downsample(nn.Module):
    """concat(conv 3x3/2 valid k, maxpool 3x3/2) on channels: (N, cin, H, W) -> (N, k + cin, (H-3)//2+1, ...)."""

    def __init__(self, cin: int, k: int):
        super().__init__()
        self.conv, self.pool = _conv(cin, k, 3, stride=2, same=False), nn.MaxPool2d(3, 2)
        self.out_channels = k + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.pool(x)], 1)


class MiniGoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = [_conv(in_channels, 96, 3)]
        c = 96
        for spec in [(32, 32), (32, 48), (80,), (112, 48), (96, 64), (80, 80), (48, 96), (96,), (176, 160), (176, 160)]:
            layers.append(_Inception(c, *spec) if len(spec) == 2 else _Downsample(c, *spec))
            c = layers[-1].out_channels
        self.features = nn.Sequential(*layers)  # (N, 336, 7, 7) for 32x32
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, 32, 32)
        x = self.pool(self.features(x)).flatten(1)  # (N, 336)
        return self.fc(self.dropout(x))  # (N, num_classes)


@register_model
def minigooglenet(num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """MiniGoogLeNet (Rosebrock's Keras CIFAR-10 model); kw: dropout (default 0.5)."""
    return MiniGoogLeNet(num_classes, in_channels, **kw)

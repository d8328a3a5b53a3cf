"""Inception-ResNet-V1, FaceNet's feature extractor (Szegedy et al. 2016; Schroff et al. 2015), in the layout of
facenet-pytorch / David Sandberg's facenet (module names included): 160x160 input -> 1792-d pooled features ->
dropout -> a 512-d bottleneck with BatchNorm -> the identity head (danlu.models.face.FaceModel). The smallest input
it takes is 75x75 (five stride-2 stages without padding).

Its `backbone` holds facenet-pytorch's InceptionResnetV1 weights as they are (same names, BatchNorm eps 0.001 and
momentum 0.1, bias-free bottleneck): `model.pretrained: facenet:vggface2` (or `true`) / `facenet:casia-webface` start
from FaceNet's published models (danlu.models.pretrained); `embed` with test_flip off gives facenet-pytorch's
embeddings."""
from __future__ import annotations

import torch
from torch import nn

from danlu.errors import DanluError
from danlu.models.face import FaceModel
from danlu.models.registry import register_model

MIN_INPUT = 75  # the smallest side its five unpadded stride-2 stages take


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Block35(nn.Module):  # 35x35 grid in the paper (17x17 at 160 px), 256 channels
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(256, 32, 1, 1)
        self.branch1 = nn.Sequential(BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, 1))
        self.branch2 = nn.Sequential(BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, 1),
                                     BasicConv2d(32, 32, 3, 1, 1))
        self.conv2d = nn.Conv2d(96, 256, 1, 1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1))
        return self.relu(out * self.scale + x)


class Block17(nn.Module):  # 896 channels
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(896, 128, 1, 1)
        self.branch1 = nn.Sequential(BasicConv2d(896, 128, 1, 1), BasicConv2d(128, 128, (1, 7), 1, (0, 3)),
                                     BasicConv2d(128, 128, (7, 1), 1, (3, 0)))
        self.conv2d = nn.Conv2d(256, 896, 1, 1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1))
        return self.relu(out * self.scale + x)


class Block8(nn.Module):  # 1792 channels
    def __init__(self, scale: float = 1.0, no_relu: bool = False):
        super().__init__()
        self.scale, self.no_relu = scale, no_relu
        self.branch0 = BasicConv2d(1792, 192, 1, 1)
        self.branch1 = nn.Sequential(BasicConv2d(1792, 192, 1, 1), BasicConv2d(192, 192, (1, 3), 1, (0, 1)),
                                     BasicConv2d(192, 192, (3, 1), 1, (1, 0)))
        self.conv2d = nn.Conv2d(384, 1792, 1, 1)
        if not no_relu:
            self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1)) * self.scale + x
        return out if self.no_relu else self.relu(out)


class Mixed6a(nn.Module):  # reduction: 256 -> 896 channels, stride 2
    def __init__(self):
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, 3, 2)
        self.branch1 = nn.Sequential(BasicConv2d(256, 192, 1, 1), BasicConv2d(192, 192, 3, 1, 1),
                                     BasicConv2d(192, 256, 3, 2))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class Mixed7a(nn.Module):  # reduction: 896 -> 1792 channels, stride 2
    def __init__(self):
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 384, 3, 2))
        self.branch1 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 2))
        self.branch2 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 1, 1),
                                     BasicConv2d(256, 256, 3, 2))
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class InceptionResnetV1Features(nn.Module):
    """(B, C, H, W) -> (B, embedding_dim) bottleneck features (before L2 normalisation)."""

    def __init__(self, in_channels: int = 3, embedding_dim: int = 512, dropout: float = 0.6):
        super().__init__()
        self.conv2d_1a = BasicConv2d(in_channels, 32, 3, 2)  # 160 -> 79
        self.conv2d_2a = BasicConv2d(32, 32, 3, 1)  # 77
        self.conv2d_2b = BasicConv2d(32, 64, 3, 1, 1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)  # 38
        self.conv2d_3b = BasicConv2d(64, 80, 1, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3, 1)  # 36
        self.conv2d_4b = BasicConv2d(192, 256, 3, 2)  # 17
        self.repeat_1 = nn.Sequential(*[Block35(scale=0.17) for _ in range(5)])
        self.mixed_6a = Mixed6a()  # 8
        self.repeat_2 = nn.Sequential(*[Block17(scale=0.10) for _ in range(10)])
        self.mixed_7a = Mixed7a()  # 3
        self.repeat_3 = nn.Sequential(*[Block8(scale=0.20) for _ in range(5)])
        self.block8 = Block8(no_relu=True)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.last_linear = nn.Linear(1792, embedding_dim, bias=False)
        self.last_bn = nn.BatchNorm1d(embedding_dim, eps=0.001, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "conv2d_4b",
                     "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8", "avgpool_1a"):
            x = getattr(self, name)(x)
        x = self.dropout(x.flatten(1))  # (B, 1792)
        return self.last_bn(self.last_linear(x))  # (B, embedding_dim)


@register_model(face=True)
def inception_resnet_v1(num_classes: int = 10, in_channels: int = 3, head: str = "softmax", scale: float = 64.0,
                        embedding_dim: int = 512, dropout: float = 0.6, test_flip: bool = True,
                        input_size: int = 160) -> nn.Module:
    """FaceNet's Inception-ResNet-V1 (512-d embedding, 160 px; at least 75 px) with an identity head. `input_size`
    (the data's, from the recipe) is only checked: the network pools globally, so it takes any side from 75."""
    if input_size < MIN_INPUT:
        raise DanluError(f"model.input_size: inception_resnet_v1 needs input_size >= {MIN_INPUT} (set data.size), "
                         f"got {input_size}")
    return FaceModel(InceptionResnetV1Features(in_channels, embedding_dim, dropout), embedding_dim, num_classes,
                     head, scale, test_flip)

"""dlib's face recognition ResNet (dlib_face_recognition_resnet_model_v1, Davis King 2017, public domain): 29
convolutions, 150x150 RGB face chips -> a 128-d descriptor, 99.38% on LFW; the network of dlib's
examples/dnn_face_recognition_ex.cpp, layer for layer, so that dlib's weights (danlu.face.dlib.network) give dlib's
descriptors.

    stem   conv 7x7/2 (no padding) 3->32, affine, relu, max pool 3x3/2 (no padding)    150 -> 72 -> 35
    level4 3 x block(32)                                                                35
    level3 block_down(64), 3 x block(64)                                                17
    level2 block_down(128), 2 x block(128)                                              8
    level1 block_down(256), 2 x block(256)                                              4 (see below)
    level0 block_down(256)                                                              2
    mean over the map, fc 256->128 (no bias)

A block is conv 3x3 -> affine -> relu -> conv 3x3 -> affine, plus its input, then relu (dlib's `ares`). A down block
(`ares_down`) strides its first conv by 2 with no padding, and its shortcut is a 2x2/2 average pool of the input,
with no projection: dlib's add_prev adds tensors of different shapes by zero-padding each to the larger one at the
end of every dimension. So the shortcut's missing channels are zeros (32 -> 64 ...), and where the two branches'
maps differ in size (level1: 3x3 conv branch, 4x4 pooled shortcut; level0: 1x1 and 2x2) the conv branch is
zero-padded on the bottom and right. `_add_padded` does exactly that.

dlib's `affine_` layer is a BatchNorm folded into a per-channel scale and shift (dlib keeps no statistics): here
`Affine`, whose weight and bias are trainable parameters and which does the same thing in training and in evaluation.
An nn.BatchNorm2d could not start fine-tuning from dlib's network: in training mode it renormalises every channel with
the batch's statistics, and the statistics dlib trained with are not in the file, so the first step would already
run a different network. With Affine, step 0 is dlib's network exactly (as a frozen BatchNorm in detection
fine-tuning, but trainable); its 1-d weight and bias get danlu's no-weight-decay rule like a BatchNorm's.
`fuse_affine` folds each Affine into the convolution before it, for inference.

Inputs are dlib's: RGB, (pixel - mean) / 256 with mean (122.782, 117.001, 104.298), i.e. data.scale=1/256,
data.mean=DLIB_MEAN, data.std=[1, 1, 1] (danlu.face.dlib.network reads the mean from the file).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import DanluError
from danlu.models.face import FaceModel
from danlu.models.registry import register_model

# dlib's input_rgb_image_sized<150> mean (RGB, 0..255 pixel units; the values in the .dat file) and divisor
DLIB_PIXEL_MEAN = (122.782, 117.001, 104.298)
DLIB_PIXEL_DIVISOR = 256.0
# the same as danlu data settings: x * scale, then (x - mean) / std per channel (mean in scaled units)
DLIB_SCALE = 1 / DLIB_PIXEL_DIVISOR  # exact in binary, so x * scale - mean is dlib's (x - mean) / 256 to rounding
DLIB_MEAN = tuple(m / DLIB_PIXEL_DIVISOR for m in DLIB_PIXEL_MEAN)
DLIB_STD = (1.0, 1.0, 1.0)

# (channels, identity blocks after the down block) of levels 3..0; level4 is 3 identity blocks of 32 channels
_LEVELS = ((64, 3), (128, 2), (256, 2), (256, 0))
# the smallest side every unpadded 3x3/2 convolution has a 3x3 input at: 103 -> 49 -> 24 -> 12 -> 6 -> 3 -> 1
MIN_INPUT = 103


class Affine(nn.Module):
    """Per-channel scale and shift, y = x * weight + bias (dlib's affine_ layer): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's tt::add(dest, a, b): a + b where a tensor missing an element (channel, row, column) counts it as 0;
    (B, Ca, Ha, Wa), (B, Cb, Hb, Wb) -> (B, max C, max H, max W)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(p, q) for p, q in zip(a.shape[1:], b.shape[1:]))
    pad = lambda t: F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))  # noqa: E731 (end of each dim)
    return pad(a) + pad(b)


class DlibBlock(nn.Module):
    """dlib's ares (stride 1: 3x3 convs padded by 1, identity shortcut) or ares_down (stride 2: the first conv
    unpadded, shortcut = 2x2/2 average pool, zero-padded to the conv branch's channels)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        # dlib's con_ pads by kernel/2 only at stride 1 (layers.h: _padding = _stride != 1 ? 0 : _nr/2)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1 if stride == 1 else 0)
        self.affine1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.affine2 = Affine(cout)
        self.down = stride != 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))  # (B, cout, H', W')
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x  # (B, cin, H/2, W/2) or (B, cin, H, W)
        return F.relu(_add_padded(y, shortcut))


class DlibResNet(nn.Module):
    """(B, 3, 150, 150) dlib-normalised RGB chips -> (B, embedding_dim) descriptors (dlib's, not unit length).

    Modules are registered in dlib's computation order (conv, affine, conv, affine ..., fc), which the weight
    converter relies on. Other input sizes run (the last pool is global) but the network was trained at 150."""

    def __init__(self, in_channels: int = 3, embedding_dim: int = 128):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 32, 7, 2, 0)  # dlib's con<32,7,7,2,2>: stride 2, so no padding
        self.affine = Affine(32)
        blocks, cin = [DlibBlock(32, 32) for _ in range(3)], 32
        for cout, repeats in _LEVELS:
            blocks += [DlibBlock(cin, cout, 2)] + [DlibBlock(cout, cout) for _ in range(repeats)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, embedding_dim, bias=False)  # dlib's fc_no_bias<128>

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, 2)  # (B, 32, 35, 35) at 150 px
        x = self.blocks(x)  # (B, 256, 2, 2) at 150 px
        return self.fc(x.mean((2, 3)))  # (B, 128)


def fuse_affine(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference with every Affine folded into the Conv2d just before it (conv weight * scale,
    bias * scale + shift) and replaced by nn.Identity: the same function in one op less per convolution."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parent in list(model.modules()):
            names = list(parent._modules)
            for conv_name, affine_name in zip(names, names[1:]):
                conv, affine = parent._modules[conv_name], parent._modules[affine_name]
                if isinstance(conv, nn.Conv2d) and isinstance(affine, Affine):
                    conv.weight.mul_(affine.weight.view(-1, 1, 1, 1))
                    if conv.bias is None:
                        conv.bias = nn.Parameter(torch.zeros_like(affine.bias))
                    conv.bias.mul_(affine.weight).add_(affine.bias)
                    setattr(parent, affine_name, nn.Identity())
    return model


@register_model(face=True)
def dlib_resnet(num_classes: int = 10, in_channels: int = 3, head: str = "softmax", scale: float = 64.0,
                embedding_dim: int = 128, test_flip: bool = True, input_size: int = 150) -> nn.Module:
    """dlib's face recognition ResNet (29 convs, 150 px RGB, 128-d) with an identity head; dlib's own weights:
    danlu.face.dlib.network.load_dlib_weights() (the backbone's keys: model.backbone.load_state_dict). embed() is
    dlib's descriptor made unit length with test_flip=False; test_flip fuses it with the mirror image's.
    `input_size` (the data's, from the recipe) is only checked: the last pool is global, so any side from 103 runs."""
    if input_size < MIN_INPUT:
        raise DanluError(f"model.input_size: dlib_resnet needs input_size >= {MIN_INPUT} (set data.size; dlib's "
                         f"weights were trained at 150), got {input_size}")
    return FaceModel(DlibResNet(in_channels, embedding_dim), embedding_dim, num_classes, head, scale, test_flip)

"""LeNet as in Caffe's examples/mnist/lenet_train_test.prototxt."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import DanluError
from danlu.models.registry import register_model


class LeNet(nn.Module):
    """conv1 20@5x5 -> maxpool 2x2/2 -> conv2 50@5x5 -> maxpool 2x2/2 -> fc1 500 -> ReLU -> fc2 num_classes.

    No ReLU after the convs (Caffe's prototxt has none). Weights use Caffe's 'xavier' filler (uniform,
    +-sqrt(3/fan_in)) and zero biases, as in the prototxt. Pooling floors odd sizes (PyTorch default; Caffe
    rounds up), which only matters when `input_size` gives odd maps, not for 28 or 32.

    `bn=True` (model.kwargs: {bn: true}) is a modern LeNet with the same layers and nearly the same FLOPs:
    BatchNorm and ReLU after each convolution, which trains to the same accuracy in far fewer images.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, bn: bool = False):
        super().__init__()
        side = ((input_size - 4) // 2 - 4) // 2  # 28 -> 24 -> 12 -> 8 -> 4
        if side < 1:
            raise DanluError(f"model.input_size: lenet needs input_size >= 16, got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.bn1 = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU()) if bn else nn.Identity()
        self.bn2 = nn.Sequential(nn.BatchNorm2d(50), nn.ReLU()) if bn else nn.Identity()
        self.fc1 = nn.Linear(50 * side * side, 500)  # 800 inputs for 28x28
        self.fc2 = nn.Linear(500, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = math.sqrt(3.0 / (m.weight[0].numel()))  # Caffe xavier, variance_norm FAN_IN
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, 28, 28)
        x = F.max_pool2d(self.bn1(self.conv1(x)), 2, 2)  # (N, 20, 12, 12)
        x = F.max_pool2d(self.bn2(self.conv2(x)), 2, 2)  # (N, 50, 4, 4)
        x = F.relu(self.fc1(x.flatten(1)))  # (N, 500)
        return self.fc2(x)  # (N, num_classes)


@register_model
def lenet(num_classes: int = 10, in_channels: int = 3, input_size: int = 28, **kw) -> nn.Module:
    """Caffe MNIST LeNet; `input_size` (square side) fixes fc1's input size at construction. Pass in_channels=1
    for MNIST (the default 3 is the registry-wide one)."""
    return LeNet(num_classes, in_channels, input_size, **kw)

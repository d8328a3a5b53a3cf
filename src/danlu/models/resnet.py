"""ResNet-18/34/50 with a CIFAR stem: torchvision's ResNet with conv1 = 3x3 stride 1 (64 channels) and no maxpool,
so a 32x32 input reaches layer4 at 4x4 instead of 1x1."""
from __future__ import annotations

from torch import nn

from danlu.models.registry import register_model


def _cifar_resnet(block_name: str, layers: list[int], num_classes: int, in_channels: int, **kw) -> nn.Module:
    from torchvision.models import resnet as tv  # lazy: keep `import danlu.models` light

    model = tv.ResNet(getattr(tv, block_name), layers, num_classes=num_classes, **kw)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)  # (N, C, 32, 32) -> (N, 64, 32, 32)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits convs
    model.maxpool = nn.Identity()
    return model


@register_model
def resnet18(num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """ResNet-18, CIFAR stem; kw go to torchvision.models.ResNet (zero_init_residual, norm_layer, ...)."""
    return _cifar_resnet("BasicBlock", [2, 2, 2, 2], num_classes, in_channels, **kw)


@register_model
def resnet34(num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """ResNet-34, CIFAR stem; kw go to torchvision.models.ResNet."""
    return _cifar_resnet("BasicBlock", [3, 4, 6, 3], num_classes, in_channels, **kw)


@register_model
def resnet50(num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """ResNet-50, CIFAR stem; kw go to torchvision.models.ResNet."""
    return _cifar_resnet("Bottleneck", [3, 4, 6, 3], num_classes, in_channels, **kw)

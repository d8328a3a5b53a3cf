"""Model registry: `@register_model` entry points plus every torchvision classifier as `tv:<name>`.

Entry point signature: ``fn(num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module``, registered under
``fn.__name__``. torchvision is imported lazily (only for `tv:` names and the architectures that reuse its blocks).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from danlu.errors import DanluError, nearest

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TV = "tv:"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register `fn` as a model entry point under its function name (timm-style)."""
    _MODELS[fn.__name__] = fn
    return fn


def entry_point(name: str) -> Callable[..., nn.Module] | None:
    """The registered entry point for `name` (None for `tv:` names and unknown names)."""
    return _MODELS.get(name)


@functools.lru_cache(maxsize=1)
def _tv_names() -> tuple[str, ...]:
    import torchvision.models

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def list_models(include_torchvision: bool = False) -> list[str]:
    """Sorted registered names; with include_torchvision also 'tv:<name>' for torchvision's classification models."""
    names = list(_MODELS)
    if include_torchvision:
        names += [_TV + n for n in _tv_names()]
    return sorted(names)


def _replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the model's first nn.Conv2d (in registration order) for one with the same config but `in_channels` inputs."""
    for qualname, old in model.named_modules():
        if isinstance(old, nn.Conv2d):
            if old.in_channels == in_channels:
                return model
            new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                            old.groups if in_channels % old.groups == 0 else 1, old.bias is not None, old.padding_mode)
            parent_name, _, attr = qualname.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
            return model
    raise DanluError(f"model.in_channels: {type(model).__name__} has no Conv2d whose input channels could be set")


def _build_tv(name: str, num_classes: int, in_channels: int, **kw) -> nn.Module:
    import torchvision.models

    tv_name = name[len(_TV):]
    if tv_name not in _tv_names():
        raise DanluError(f"model.name: unknown torchvision model {name!r}; expected tv:<name> for a torchvision "
                         f"classification model, e.g. tv:resnet50" + nearest(name, [_TV + n for n in _tv_names()]))
    model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kw)
    return _replace_first_conv(model, in_channels) if in_channels != 3 else model


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """Build a registered model or a torchvision one ('tv:resnet50'); bad names and arguments raise DanluError."""
    if num_classes < 1 or in_channels < 1:
        raise DanluError(f"model: num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
    if name.startswith(_TV):
        build = functools.partial(_build_tv, name)
    elif name in _MODELS:
        build = _MODELS[name]
    else:
        # Suggest among our names first, then among torchvision's (e.g. 'mobilenet_v2' -> 'tv:mobilenet_v2').
        exact = name in _tv_names()  # a torchvision name without its prefix: that is the one meant
        hint = (f" (did you mean '{_TV}{name}'?)" if exact else
                nearest(name, _MODELS) or nearest(name, [_TV + n for n in _tv_names()]))
        raise DanluError(f"model.name: unknown model {name!r}; expected one of {', '.join(sorted(_MODELS))} "
                         f"or tv:<torchvision name>" + hint)
    try:
        return build(num_classes=num_classes, in_channels=in_channels, **kw)
    except TypeError as e:  # unexpected / ill-typed keyword, e.g. "ResNet.__init__() got an unexpected keyword 'x'"
        raise DanluError(f"model: bad argument for model {name!r}: {' '.join(str(e).split())}") from e

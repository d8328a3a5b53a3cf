"""Model registry: `@register_model` entry points plus every torchvision classifier as `tv:<name>` and, where the
optional `timm` library is installed (`pip install danlu[timm]`), every timm model as `timm:<name>`.

Entry point signature: ``fn(num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module``, registered under
``fn.__name__``; `@register_model(face=True)` marks a face model (an embedding network with an identity head, see
models/face.py). torchvision is imported lazily (only for `tv:` names and the architectures that reuse its blocks).

    model_info("mobilefacenet").face        # True: the one answer to "is this a face model?" (is_face_model)
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from danlu.errors import DanluError, nearest

_TV = "tv:"
_TIMM = "timm:"


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows of a model name, read once when it is registered."""
    name: str
    entry: Optional[Callable[..., nn.Module]]  # None for torchvision's models (tv:NAME)
    face: bool = False  # a face model: backbone -> unit embedding -> identity head (danlu.models.face.FaceModel)
    takes_input_size: bool = False  # built for the data's input size (e.g. LeNet's fixed flatten size)


_MODELS: dict[str, ModelInfo] = {}


def register_model(fn: Optional[Callable[..., nn.Module]] = None, *, face: bool = False):
    """Decorator: register `fn` as a model entry point under its function name (timm-style):
    `@register_model` or `@register_model(face=True)`."""
    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        takes = "input_size" in inspect.signature(f).parameters
        _MODELS[f.__name__] = ModelInfo(f.__name__, f, face=face, takes_input_size=takes)
        return f

    return add(fn) if fn is not None else add


def model_info(name: str) -> ModelInfo:
    """The registry's entry for `name` (a registered name or tv:NAME); DanluError for an unknown name."""
    if name in _MODELS:
        return _MODELS[name]
    if name.startswith(_TV):
        _check_tv(name)
        return ModelInfo(name, None)
    if name.startswith(_TIMM):
        _check_timm(name)
        return ModelInfo(name, None)
    raise _unknown(name)


def is_face_model(model: Union[str, nn.Module]) -> bool:
    """Whether `model` (a model name, or a module, wrapped or not) is a face model: an embedding network with an
    identity head, whose test metric is verification and whose run folder gets face.json."""
    if isinstance(model, str):
        return model_info(model).face
    from danlu.models.face import FaceModel

    return isinstance(unwrap(model), FaceModel)


def classifier_name(model: nn.Module, num_classes: int) -> Optional[str]:
    """The name of the module that produces the class scores: a face model's `head`, else the last nn.Linear (or 1x1
    nn.Conv2d, as SqueezeNet's) with `num_classes` outputs; None where there is none. Fine-tuning's "head"
    (model.freeze: backbone, optim.head_lr_mult).

        classifier_name(create_model("tv:resnet18", num_classes=2), 2)      # 'fc'
    """
    model = unwrap(model)
    if is_face_model(model):
        return "head"
    found = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or (
                isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1)):
            found = name
    return found


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


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


def _check_tv(name: str) -> None:
    if name[len(_TV):] not in _tv_names():
        raise DanluError(f"model.name: unknown torchvision model {name!r}; expected tv:<name> for a torchvision "
                         f"classification model, e.g. tv:resnet50" + nearest(name, [_TV + n for n in _tv_names()]))


def timm_module():
    """The timm library, or a DanluError saying how to install it (it is an optional extra)."""
    try:
        import timm
    except ImportError:
        raise DanluError("model.name=timm:...: the timm library is not installed; expected `pip install "
                         "'danlu[timm]'` (or `pip install timm`)") from None
    return timm


def _check_timm(name: str) -> None:
    timm = timm_module()
    arch = name[len(_TIMM):].split(".")[0]  # resnet18.a1_in1k: the architecture and a pretrained tag
    if not timm.is_model(arch):
        raise DanluError(f"model.name: unknown timm model {name!r}; expected timm:<name> of a timm model, e.g. "
                         f"timm:resnet18" + nearest(arch, timm.list_models()))


def _build_timm(name: str, num_classes: int, in_channels: int, **kw) -> nn.Module:
    """A timm model with random weights (model.pretrained loads timm's through danlu.models.pretrained)."""
    _check_timm(name)
    return timm_module().create_model(name[len(_TIMM):], pretrained=False, num_classes=num_classes,
                                      in_chans=in_channels, **kw)


def _unknown(name: str) -> DanluError:
    # suggest among our names first, then among torchvision's (e.g. 'mobilenet_v2' -> 'tv:mobilenet_v2')
    exact = name in _tv_names()  # a torchvision name without its prefix: that is the one meant
    hint = (f" (did you mean '{_TV}{name}'?)" if exact else
            nearest(name, _MODELS) or nearest(name, [_TV + n for n in _tv_names()]))
    return DanluError(f"model.name: unknown model {name!r}; expected one of {', '.join(sorted(_MODELS))}, "
                      f"tv:<torchvision name> or timm:<timm name>" + hint)


def _build_tv(name: str, num_classes: int, in_channels: int, **kw) -> nn.Module:
    import torchvision.models

    _check_tv(name)
    tv_name = name[len(_TV):]
    model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kw)
    return _replace_first_conv(model, in_channels) if in_channels != 3 else model


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """Build a registered model or a torchvision one ('tv:resnet50'); bad names and arguments raise DanluError."""
    info = model_info(name)
    # a face model may have no identity head yet (0 identities: an imported network, embedding only)
    if num_classes < (0 if info.face else 1) or in_channels < 1:
        raise DanluError(f"model: num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
    build = info.entry or functools.partial(_build_timm if name.startswith(_TIMM) else _build_tv, name)
    try:
        return build(num_classes=num_classes, in_channels=in_channels, **kw)
    except TypeError as e:  # unexpected / ill-typed keyword, e.g. "ResNet.__init__() got an unexpected keyword 'x'"
        raise DanluError(f"model: bad argument for model {name!r}: {' '.join(str(e).split())}") from e

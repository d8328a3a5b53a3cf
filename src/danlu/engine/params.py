"""Which parameters train, and how: the optimizer's parameter groups (weight decay, the head's LR multiplier) and
the frozen part of a model (fine-tuning).

    frozen = freeze(model, "backbone", head="fc")        # requires_grad off for everything but fc.*; returns them
    groups = param_groups(model, head="fc", weight_decay=5e-4, exclude_norm_bias=True, head_lr_mult=10)
    opt = torch.optim.SGD(groups, lr=0.01)               # the schedule sets each group's lr = rate x group["lr_mult"]

Every parameter is in a group, frozen or not: a frozen one has no gradient, so the optimizer leaves it alone (no
update, no weight decay), and unfreezing it later (model.unfreeze_at) changes nothing in the optimizer's shape, so
its state loads from any snapshot of the run.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

from torch import nn

from danlu.errors import DanluError, few


def _under(name: str, prefix: str) -> bool:
    """Whether parameter `name` is `prefix` or inside it ('layer1' holds 'layer1.0.conv1.weight', not 'layer10.x')."""
    return name == prefix or name.startswith(prefix + ".")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """timm's param_groups_weight_decay rule: biases and 1-d parameters (normalization scales and shifts)."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, *, head: Optional[str], weight_decay: float, exclude_norm_bias: bool = True,
                 head_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Parameter groups in a fixed order (body with decay, body without, head with, head without; empty ones left
    out), each with its `weight_decay` and `lr_mult` (head_lr_mult for the parameters under `head`, else 1)."""
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        in_head = head is not None and head_lr_mult != 1.0 and _under(name, head)
        decay = not (exclude_norm_bias and _no_decay(name, p))
        buckets.setdefault((in_head, decay), []).append(p)
    return [{"params": buckets[key], "weight_decay": weight_decay if key[1] else 0.0,
             "lr_mult": head_lr_mult if key[0] else 1.0}
            for key in ((False, True), (False, False), (True, True), (True, False)) if key in buckets]


def freeze(model: nn.Module, what: Union[str, Sequence[str]], head: Optional[str]) -> list[nn.Parameter]:
    """Turn off requires_grad for `what`: 'backbone' (every parameter outside `head`) or a list of name prefixes;
    returns the frozen parameters. A prefix that names no parameter, or a backbone without a head, is refused."""
    named = list(model.named_parameters())
    if what == "backbone":
        if head is None:
            raise DanluError(f"model.freeze=backbone: found no classifier in {type(model).__name__} (a Linear with "
                             f"one output per class); expected model.freeze as a list of parameter prefixes")
        chosen = [p for n, p in named if not _under(n, head)]
    else:
        tops = sorted({n.split(".")[0] for n, _ in named})
        for prefix in what:
            if not any(_under(n, prefix) for n, _ in named):
                raise DanluError(f"model.freeze: {prefix!r} names no parameter of {type(model).__name__}; expected "
                                 f"prefixes of parameter names such as {few(tops, 6)}")
        chosen = [p for n, p in named if any(_under(n, prefix) for prefix in what)]
    if len(chosen) == len(named):
        raise DanluError(f"model.freeze={what}: would freeze every parameter; expected some left to train")
    for p in chosen:
        p.requires_grad_(False)
    return chosen

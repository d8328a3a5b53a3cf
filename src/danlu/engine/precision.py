"""Precision: the one place that knows the numeric format of training. The loop only calls

    with precision.autocast():  loss = criterion(model(x), y)
    precision.backward(loss)
    precision.step(optimizer, params, clip_grad_norm)

so it never branches on dtype. This release trains in fp32; mixed precision plugs in here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Optional

import torch

from danlu.errors import DanluError

PRECISIONS = ("fp32",)


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise DanluError(f"precision: '{name}' is not supported; expected one of {', '.join(PRECISIONS)}")
        self.name, self.device = name, device

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
             clip_grad_norm: Optional[float] = None) -> bool:
        """Clip (if asked) and step. Returns whether the step was taken."""
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        optimizer.step()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

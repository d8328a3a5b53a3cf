"""An exponential moving average of a model's weights (optim.ema), kept on the training device.

    ema = EMA(model, decay=0.999)      # a copy of the weights now
    ...optimizer.step(); ema.update()  # w_ema <- decay * w_ema + (1 - decay) * w, for every floating tensor
    acc = evaluate(ema.model, ...)     # evaluated beside the raw weights; saved as model_ema.safetensors

Every floating tensor of the state dict moves (parameters and BatchNorm's running statistics, as timm's ModelEmaV2);
integer buffers (BatchNorm's step counter) are copied. With several processes every rank keeps the same average, as
the weights it follows are the same on every rank.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.source = float(decay), model
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs()

    def _pairs(self) -> None:
        ema, src = self.model.state_dict(keep_vars=True), self.source.state_dict(keep_vars=True)
        floats = [k for k, v in ema.items() if v.is_floating_point()]
        self._ema_f, self._src_f = [ema[k].data for k in floats], [src[k].data for k in floats]
        self._ema_i = [ema[k].data for k in ema if k not in floats]
        self._src_i = [src[k].data for k in ema if k not in floats]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step (no host sync)."""
        torch._foreach_lerp_(self._ema_f, self._src_f, 1.0 - self.decay)
        for e, s in zip(self._ema_i, self._src_i):
            e.copy_(s)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average again from the model's weights now (a resumed run whose snapshot has no average)."""
        self.model.load_state_dict(self.source.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

"""Precision: the one place that knows the numeric format of training. The loop only calls

    with precision.autocast():  loss = criterion(model(x), y)
    precision.backward(loss)
    precision.step(optimizer, params, clip_grad_norm)

so it never branches on dtype. The formats (`precision:` in a recipe):

    fp32  IEEE float32 throughout. On CUDA, TF32 is switched off for matmuls and convolutions too (cuDNN would
          otherwise use it for convolutions by default), so fp32 means fp32 and the fp32/tf32 comparison is honest.
    tf32  float32 tensors; matmuls and convolutions on TensorFloat-32 tensor cores (CUDA only: it is a mode of
          NVIDIA's tensor cores, Ampere and later).
    bf16  the forward pass and the loss under torch.autocast(bfloat16), on CPU and CUDA; weights, gradients and
          optimizer state stay float32. bfloat16 has float32's range, so no loss scaling is needed.
    fp16  the same under autocast(float16), plus one dynamic loss scaler (torch.amp.GradScaler) for the whole run:
          the loss is scaled before backward, gradients are unscaled before clipping, a step whose gradients hold
          inf/NaN is skipped (the scale halves) and counted in `skipped_steps`, and the scaler's state (scale, growth
          tracker) travels in snapshots, so a resumed run scales exactly as the uninterrupted one.
    fp64  float64 weights, batches, gradients and optimizer state (`param_dtype`): slow everywhere, for numerical
          checks where float32's rounding would hide the answer (2 processes x batch B against 1 x 2B agree to
          ~1e-12 in float64, to ~1e-4 in float32 after 50 steps, depending on the CPU's kernels).
    auto  resolved once, when a run starts, to one of the above (`resolve_auto`), and saved as that in recipe.yaml
          and summary.json: bf16 on GPUs with bf16 tensor cores (Ampere and later), fp32 on older GPUs and on CPUs.
          On a CPU bf16 is only taken when asked: whether it is faster depends on the CPU, the model and the threads
          each process has (LeNet on a 2-core AMD EPYC, 2026-12-01, by the timing probe auto used to run: 1.90x
          with 2 threads, 1.15x with 1 each), so a measured choice would differ between 1 process and 2, and between
          a quiet machine and a busy one, and with it the result. `danlu bench --device cpu --precision fp32,bf16`
          measures it for a model.

The TF32 switches are process-wide torch settings: `configure_backends()` sets them, once, where a run starts
(training, or loading a run for inference); building a Precision changes nothing outside it. fp32 and fp64 switch
TF32 off (fp32 means fp32); the mixed-precision modes (tf32, bf16, fp16) let the float32 work outside autocast use it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Optional

import torch

from danlu.errors import DanluError

PRECISIONS = ("auto", "fp32", "tf32", "fp16", "bf16", "fp64")
FORMATS = PRECISIONS[1:]  # what a Precision is built from (and bench measures); auto is a policy that picks one
_AUTOCAST_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}
_NULL = contextlib.nullcontext()  # reusable: entering it does nothing


class Precision:
    """`Precision("bf16", torch.device("cpu"))`. `autocast_cache=False` where the model is replayed as a CUDA graph
    (autocast's cast cache must not outlive a graph capture)."""

    def __init__(self, name: str, device: torch.device | str, *, autocast_cache: bool = True):
        if name not in FORMATS:
            raise DanluError(f"precision: '{name}' is not a format; expected one of {', '.join(FORMATS)} "
                             f"(auto is resolved to one of them first: resolve_auto)")
        device = torch.device(device)
        if name == "tf32" and device.type != "cuda":
            raise DanluError(f"precision: tf32 needs a CUDA device (TensorFloat-32 is a mode of NVIDIA tensor cores) "
                             f"but this run is on {device}; expected fp32, bf16 or fp16 there")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DanluError(f"precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                             f"expected fp16, tf32 or fp32 on this GPU")
        self.name, self.device = name, device
        self.dtype: Optional[torch.dtype] = _AUTOCAST_DTYPE.get(name)  # the autocast dtype; None: no autocast
        self.param_dtype = torch.float64 if name == "fp64" else torch.float32  # weights and input batches
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        self.skipped_steps = 0  # steps the loss scaler skipped (inf/NaN gradients); always 0 without a scaler
        self._cache = autocast_cache
        self._scale: Optional[float] = None  # host copy of the scale the next step starts with

    def configure_backends(self) -> None:
        """Set torch's process-wide switches for this precision: on CUDA, TF32 for matmuls and cuDNN convolutions
        on for tf32 and off otherwise (cuDNN would use it for fp32 convolutions by default). Once per run."""
        if self.device.type == "cuda":
            # the legacy switches, as torch._inductor reads them (mixing them with the newer fp32_precision API
            # raises in torch >= 2.9)
            torch.backends.cuda.matmul.allow_tf32 = self.name in ("tf32", "bf16", "fp16")
            torch.backends.cudnn.allow_tf32 = self.name in ("tf32", "bf16", "fp16")

    @classmethod
    def for_inference(cls, name: str, device: torch.device | str) -> "Precision":
        """The precision a run trained with, for evaluation or prediction on `device`: as training, except that a
        tf32 run evaluated off CUDA computes in fp32 (TF32 exists only on NVIDIA tensor cores), and auto takes the
        device's rule (bf16 on a GPU with bf16 tensor cores, else fp32)."""
        device = torch.device(device)
        if name == "auto":
            name = resolve_auto(device)[0]
        if name == "tf32" and device.type != "cuda":
            name = "fp32"
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            name = "fp32"
        return cls(name, device)

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, {self.device})"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Where the forward pass and the loss run: autocast to the half dtype, or nothing."""
        if self.dtype is None:
            return _NULL
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=self._cache)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()  # scaled so that small fp16 gradients do not flush to zero

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
             clip_grad_norm: Optional[float] = None) -> bool:
        """Clip (if asked) and step. Returns whether the step was taken (False: the loss scaler skipped it)."""
        if self.scaler is None:
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            optimizer.step()
            return True
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        if self._scale is None:
            self._scale = self.scaler.get_scale()
        self.scaler.step(optimizer)  # unscales (unless done above) and skips optimizer.step() on inf/NaN gradients
        self.scaler.update()  # a skip halves the scale; growth_interval good steps in a row double it
        # The scale drops exactly when the step was skipped. get_scale() is one host sync, after the one the
        # scaler itself makes to read its inf check; the scale before the step is the one read here last time.
        before, self._scale = self._scale, self.scaler.get_scale()
        taken = self._scale >= before
        self.skipped_steps += not taken
        return taken

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers only (weights_only-safe): the scaler's scale and growth tracker, and the skip count."""
        state: dict[str, Any] = {"name": self.name, "skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; a snapshot from another precision brings only its skip count."""
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
            self._scale = None


def resolve_auto(device: torch.device) -> tuple[str, str]:
    """precision: auto -> (a format, why): bf16 on a GPU with bf16 tensor cores, else fp32 (a CPU included)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8 and torch.cuda.is_bf16_supported():
            return "bf16", f"bf16 tensor cores (compute capability {major}.{minor}); TF32 for the float32 rest"
        return "fp32", f"no bf16 tensor cores (compute capability {major}.{minor})"
    return "fp32", (f"{device.type}: fp32, the same on any number of processes and threads "
                    "(bf16 only when asked: danlu bench --device cpu --precision fp32,bf16 measures it)")

"""Export a trained run for use outside danlu: ONNX, TorchScript or a self-describing safetensors file.

    from danlu.export import export
    r = export("runs/lenet", "onnx", "lenet.onnx")
    print(r.message)          # ... onnxruntime against PyTorch: max abs difference 3.6e-07 (< 1e-4)

ONNX and TorchScript models take what a user has, pixels, and do the run's preprocessing inside:

    input  'pixels': float32 (batch, C, H, W), values 0..255, gray (C=1) or RGB (C=3), H x W = the run's input size
    output 'logits': float32 (batch, classes); softmax gives the probabilities; classes in the file's metadata

The batch axis is dynamic. Each export is checked before it is renamed into place: the ONNX file in onnxruntime
and the TorchScript file reloaded, each against the PyTorch model on random batches of 1 and 3 images (max abs
difference of the logits below 1e-4); the safetensors file reloaded and compared tensor by tensor. A run whose
weights do not match its recipe's model is refused, naming the keys (danlu.runs.load_run).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from danlu.errors import DanluError

FORMATS = ("onnx", "torchscript", "safetensors")
TOLERANCE = 1e-4  # max abs difference of logits between the exported model and PyTorch


class Deployable(nn.Module):
    """The run's preprocessing and model in one module: pixels (B, C, H, W) float32 0..255 -> logits (B, classes).
    `size`: the (h, w) the run's preprocessing resizes to (antialiased bilinear), None where it does not."""

    def __init__(self, model: nn.Module, scale: float, mean: Optional[torch.Tensor], std: Optional[torch.Tensor],
                 size: Optional[tuple[int, int]] = None, flip: bool = False):
        super().__init__()
        self.model, self.scale, self.size, self.flip = model, float(scale), size, flip
        # (C, 1, 1) per channel or (C, H, W) per pixel, in scaled units, as danlu.data.augment.Augment holds them
        self.register_buffer("mean", mean.float().clone() if mean is not None else None)
        self.register_buffer("std", std.float().clone() if std is not None else None)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels * self.scale  # (B, C, H, W)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = nn.functional.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        if self.flip:  # the run's test-time flip: logits averaged over each image and its mirror image
            return (self.model(x) + self.model(x.flip(-1))) / 2
        return self.model(x)  # (B, classes)


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: Optional[float]  # exported vs PyTorch on random inputs (None for safetensors: compared exactly)
    message: str


def export(run_dir: Union[str, Path], fmt: str, out: Union[str, Path], *, force: bool = False) -> ExportResult:
    """Export the run in `run_dir` as `fmt` ('onnx', 'torchscript', 'safetensors') to `out`, checked (see module);
    an existing `out` is replaced only with `force`."""
    from danlu.runs import load_run

    if fmt not in FORMATS:
        raise DanluError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise DanluError(f"-o {out}: is a folder; expected a file name such as model.{_suffix(fmt)}")
    if out.exists() and not force:
        raise DanluError(f"-o {out}: exists; expected a new file name (or --force to replace it)")
    if not out.parent.is_dir():
        raise DanluError(f"-o {out}: folder {out.parent} does not exist")
    run = load_run(run_dir, device="cpu")
    # float32 in and out, also for a run trained in fp64
    from danlu.models import is_face_model

    deploy = Deployable(run.model.float(), run.augment.scale, run.augment.mean, run.augment.std, run.augment.size,
                        flip=bool(run.recipe.model.test_flip) and not is_face_model(run.model)).eval()
    meta = {"danlu_model": run.recipe.model.name, "model_kwargs": json.dumps(run.recipe.model.kwargs),
            "classes": json.dumps(run.classes), "input_shape": json.dumps(list(run.shape)),
            "input": "pixels float32 (batch, C, H, W) 0..255" if fmt != "safetensors" else "",
            "run_dir": str(run.run_dir)}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        diff = {"onnx": _onnx, "torchscript": _torchscript, "safetensors": _safetensors}[fmt](deploy, run, tmp, meta)
        os.replace(tmp, out)
    except OSError as e:
        raise DanluError(f"-o {out}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    c, h, w = run.shape
    size = f"{out.stat().st_size / 1e6:.1f} MB"
    if fmt == "safetensors":
        msg = (f"wrote {out} ({size}): {run.recipe.model.name} weights ({len(run.model.state_dict())} tensors, "
               f"reloaded and identical) with classes, input shape and preprocessing in its metadata")
    else:
        how = "onnxruntime" if fmt == "onnx" else "the reloaded TorchScript module"
        msg = (f"wrote {out} ({size}): input 'pixels' float32 [batch, {c}, {h}, {w}] (0..255; the run's preprocessing "
               f"is inside), output 'logits' [batch, {len(run.classes)}]; {how} against PyTorch on random batches "
               f"of 1 and 3: max abs difference {diff:.1e} (< {TOLERANCE:g})")
    return ExportResult(out, fmt, diff, msg)


def _suffix(fmt: str) -> str:
    return {"onnx": "onnx", "torchscript": "pt", "safetensors": "safetensors"}[fmt]


def _random_batches(shape: tuple[int, int, int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand((n, *shape), generator=g) * 255 for n in (1, 3)]  # (n, C, H, W) pixels 0..255


def _check(name: str, diff: float) -> float:
    if not diff <= TOLERANCE:  # also catches NaN
        raise DanluError(f"{name} export differs from PyTorch by {diff:.2e} (max abs, logits) on random inputs; "
                         f"expected below {TOLERANCE:g}; nothing written")
    return diff


@torch.no_grad()
def _onnx(deploy: Deployable, run, tmp: Path, meta: dict[str, str]) -> float:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise DanluError(f"--format onnx needs the 'onnx', 'onnxscript' and 'onnxruntime' packages ({e.name} is "
                         f"missing); expected: pip install 'danlu[export]'") from None
    example = torch.rand((2, *run.shape)) * 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(deploy, (example,), None, input_names=["pixels"], output_names=["logits"],
                                    dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}},
                                    dynamo=True, external_data=False, verbose=False)
    program.save(str(tmp), external_data=False)
    model = onnx.load(str(tmp))
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(tmp))
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    diff = 0.0
    for x in _random_batches(run.shape):
        got = torch.from_numpy(session.run(["logits"], {"pixels": x.numpy()})[0])
        diff = max(diff, (got - deploy(x)).abs().max().item())
    return _check("ONNX", diff)


@torch.no_grad()
def _torchscript(deploy: Deployable, run, tmp: Path, meta: dict[str, str]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks TorchScript deprecated; it still works
        traced = torch.jit.trace(deploy, torch.rand((2, *run.shape)) * 255)
        torch.jit.save(traced, str(tmp), _extra_files={"danlu.json": json.dumps(meta)})
        loaded = torch.jit.load(str(tmp), map_location="cpu")
    diff = max((loaded(x) - deploy(x)).abs().max().item() for x in _random_batches(run.shape))
    return _check("TorchScript", diff)


def _safetensors(deploy: Deployable, run, tmp: Path, meta: dict[str, str]) -> None:
    """The plain model's weights (load into danlu.create_model(...)) with what is needed to use them as metadata."""
    from safetensors.torch import load_file, save

    def as_list(t: Optional[torch.Tensor]) -> Optional[list]:
        return None if t is None else t.flatten().tolist() if t.shape[1:] == (1, 1) else t.tolist()

    meta = {**meta, "preprocess": json.dumps({"scale": run.augment.scale, "mean": as_list(run.augment.mean),
                                              "std": as_list(run.augment.std)}),
            "recipe": json.dumps(run.recipe.to_dict())}
    state = {k: v.detach().contiguous() for k, v in run.model.state_dict().items()}
    tmp.write_bytes(save(state, metadata={k: v for k, v in meta.items() if v}))
    back = load_file(str(tmp))
    bad = [k for k in state if k not in back or not torch.equal(back[k], state[k])]
    if bad or len(back) != len(state):
        raise DanluError(f"safetensors export did not read back identical ({', '.join(bad[:4])}); nothing written")
    return None

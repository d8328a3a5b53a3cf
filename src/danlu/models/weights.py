"""Starting a model from weights trained elsewhere (`model.init` in a recipe): another danlu run, a .safetensors
file, or a PyTorch .pt / .pth file. Nothing is loaded silently and nothing runs code: .pt files are read with
`weights_only=True`, and every layer that does not fit is named.

    report = init_from(model, "runs/faces-big")     # {'loaded': 250, 'adapted': [...], 'fresh': [...], ...}

A tensor whose name and shape match is copied. A first convolution that differs only in its input channels is
adapted as timm does: RGB weights summed over the channels for a 1-channel model, gray weights repeated (and divided
by 3) for RGB. Any other layer that does not fit (a classifier for other classes, an identity head for other people)
keeps the model's fresh initialization and is listed in `fresh`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from danlu.errors import DanluError, few


def read_weights(source: Union[str, Path], key: str = "model.init") -> dict[str, torch.Tensor]:
    """The tensors of a run folder (its model.safetensors, else its newest snapshot's model), a .safetensors file or
    a .pt / .pth file (a state dict, or a dict holding one under 'model' or 'state_dict'). `key`: the recipe key
    errors name."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        elif (path / "snapshots").is_dir():
            from danlu.engine.checkpoint import load_latest

            state, _ = load_latest(path)
            return dict(state["model"])
        else:
            raise DanluError(f"{key}={source}: a folder without model.safetensors or snapshots/; expected a danlu "
                             f"run folder, a .safetensors or a .pt/.pth file")
    if not path.is_file():
        raise DanluError(f"{key}={source}: no such file or folder; expected a danlu run folder, a .safetensors or "
                         f"a .pt/.pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise DanluError(f"{key}={source}: cannot read the weights ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, a refused global (weights_only), a damaged zip
        raise DanluError(f"{key}={source}: cannot read it as weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); expected a state dict saved with torch.save") from None
    for inner in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(inner), dict):
            obj = obj[inner]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DanluError(f"{key}={source}: holds no state dict (name -> tensor); expected one saved with "
                         f"torch.save(model.state_dict(), ...)")
    return obj


def _adapt_channels(name: str, have: torch.Tensor, want: torch.Tensor) -> torch.Tensor | None:
    """A conv weight (O, I, k, k) for another number of input channels: 3 -> 1 summed, 1 -> 3 repeated / 3."""
    if have.dim() != 4 or want.dim() != 4 or have.shape[0] != want.shape[0] or have.shape[2:] != want.shape[2:]:
        return None
    if have.shape[1] == 3 and want.shape[1] == 1:
        return have.sum(1, keepdim=True)
    if have.shape[1] == 1 and want.shape[1] == 3:
        return have.repeat(1, 3, 1, 1) / 3
    return None


def init_from(model: nn.Module, source: Union[str, Path]) -> dict[str, Any]:
    """Copy the weights of `source` into `model` where they fit (see the module's docstring). Returns what happened:
    loaded (count), adapted (names), fresh (names kept as initialized), unused (names in the file the model lacks).
    A file of which nothing fits is refused: it is another model."""
    return fit_weights(model, read_weights(source), source)


def fit_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Union[str, Path],
                key: str = "model.init") -> dict[str, Any]:
    """init_from for tensors in hand (`source` names them in the report and errors, `key` the recipe key)."""
    own = model.state_dict()
    fitted, adapted, fresh = {}, [], []
    for name, want in own.items():
        have = weights.get(name)
        if have is not None and have.shape == want.shape:
            fitted[name] = have
        elif have is not None and (changed := _adapt_channels(name, have, want)) is not None:
            fitted[name], _ = changed, adapted.append(name)
        elif have is None and not want.is_floating_point():  # a counter (BatchNorm's steps) older files lack
            continue
        else:
            fresh.append(name if have is None else f"{name} {list(have.shape)} (model {list(want.shape)})")
    unused = sorted(set(weights) - set(own))
    learned = [n for n in own if own[n].is_floating_point()]
    if not any(n in fitted for n in learned):
        raise DanluError(f"{key}={source}: none of its {len(weights)} tensors fits this model ("
                         f"{few(sorted(weights))}); expected weights of the same architecture")
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in fitted.items()}})
    return {"source": str(source), "loaded": len(fitted), "of": len(own), "adapted": adapted, "fresh": fresh,
            "unused": unused}


def describe(report: dict[str, Any]) -> str:
    """One line for the console: what model.init loaded and what it did not."""
    parts = [f"{report.get('key', 'model.init')} {report['source']}: {report['loaded']} of {report['of']} tensors "
             f"loaded"]
    if report["adapted"]:
        parts.append(f"adapted to the input channels: {few(report['adapted'])}")
    if report["fresh"]:
        parts.append(f"freshly initialized (not in the file or another shape): {few(report['fresh'])}")
    if report["unused"]:
        parts.append(f"not used: {few(report['unused'])}")
    return "; ".join(parts)

"""Devices: the one place that knows the words for them (`devices.device` in a recipe, `--device` on the command
line) and turns a word into a torch.device that works here.

    resolve_device("auto")        # cuda when there is a GPU, else mps (Apple silicon), else cpu
    resolve_device("cuda:1")      # DanluError naming the GPUs this machine has, if it has no second one
"""
from __future__ import annotations

from danlu.errors import DanluError

DEVICE_WORDS = ("auto", "cpu", "cuda", "mps", "cuda:N")
NO_FLOAT64 = {"mps"}  # device types without float64 tensors (Apple's Metal)


def check_device(name: str) -> str:
    """`name` if it is a device word (auto, cpu, cuda, mps, cuda:N), else ValueError saying what is expected."""
    if name in DEVICE_WORDS[:-1] or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError(f"expected {', '.join(DEVICE_WORDS[:-1])} or {DEVICE_WORDS[-1]}")


def mps_available() -> bool:
    """Whether torch can run on Apple silicon's GPU here (Metal Performance Shaders): built with MPS and on a Mac
    that has it. False for a torch without the backend."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_built() and mps.is_available())


def resolve_device(name: str):
    """'auto' -> the first GPU when there is one, else Apple silicon's (mps), else the CPU; 'cuda' / 'cuda:N' only
    where CUDA works, 'mps' only where torch has it."""
    import torch

    try:
        check_device(name)
    except ValueError as e:
        raise DanluError(f"--device {name}: {e}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if name == "mps":
        if not mps_available():
            raise DanluError("--device mps: this torch cannot use Apple's GPU here (MPS needs Apple silicon, macOS "
                             "12.3+ and a torch built with MPS); expected cpu or auto")
        return torch.device("mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DanluError(f"--device {name}: CUDA is not available on this machine; expected cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DanluError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                             f"expected cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    return torch.device(name)


def wide_float(device):
    """The float type of danlu's bookkeeping on `device` (meters, evaluation sums, augmentation draws): float64, or
    float32 where the device has no float64 (mps).

        wide_float(torch.device("cuda"))      # torch.float64
    """
    import torch

    return torch.float32 if torch.device(device).type in NO_FLOAT64 else torch.float64


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

"""FLOPs of a training step and the device's peak, for achieved TFLOP/s and MFU."""
from __future__ import annotations

import re
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from danlu.bench.timing import sync


def sig(v: Optional[float], digits: int = 4) -> Optional[float]:
    """`digits` significant digits (a CPU's TFLOP/s are 0.0001s; rounding to decimals would zero them)."""
    return None if v is None else float(f"{v:.{digits}g}")


# Dense peak TFLOP/s (no structured sparsity) from NVIDIA's data sheets: fp32 on CUDA cores; tf32, bf16 and fp16 on
# tensor cores with fp32 accumulation. First match of the pattern in torch.cuda.get_device_name() wins, so the more
# specific names come first. A precision missing from a device's entry (T4 and V100 have no tf32/bf16 tensor cores)
# and any device not listed here get a measured matmul instead.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    (r"H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    (r"H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),  # SXM5 ("H100 80GB HBM3")
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    (r"\bA10\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    (r"\bT4\b", {"fp32": 8.1, "fp16": 65.0}),
    (r"V100S", {"fp32": 16.4, "fp16": 130.0}),
    (r"V100-PCIE", {"fp32": 14.0, "fp16": 112.0}),
    (r"V100", {"fp32": 15.7, "fp16": 125.0}),
]


def count_flops(recipe, train) -> Optional[int]:
    """FLOPs of one training step (forward, loss, backward; the optimizer's elementwise work is not counted), by
    FlopCounterMode on a copy of the model on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from danlu.engine.build import build_model

    try:
        with torch.device("meta"):
            model = build_model(recipe, train.shape, len(train.classes))
            x = torch.empty(recipe.data.batch_size, *train.shape)  # (B, C, H, W)
            y = torch.zeros(recipe.data.batch_size, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), y).backward()
        return int(counter.get_total_flops())
    except Exception as e:  # an op without a meta kernel: leave FLOPs (and MFU) out rather than guess
        print(f"bench: FLOPs not counted ({type(e).__name__}: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return None


_MEASURED: dict[tuple[str, str], tuple[float, str]] = {}


def table_peak(gpu_name: str, precision: str) -> Optional[tuple[float, str]]:
    """The data sheet's dense peak for a GPU by its torch.cuda.get_device_name(): (TFLOP/s, source), or None for an
    unlisted GPU, a precision it lacks tensor cores for, or a MIG slice (a fraction of the GPU)."""
    if "MIG" in gpu_name:
        return None
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, gpu_name):
            if precision not in peaks:
                return None
            return peaks[precision], f"data sheet ({pattern.replace(chr(92) + 'b', '')}, dense)"
    return None


def peak_tflops(device: torch.device, precision: str) -> tuple[Optional[float], str]:
    """(peak TFLOP/s, where it comes from) for `precision` on `device`: the data-sheet table for known GPUs, else a
    measured matmul (call after the precision's Precision object is built: tf32's switches must be set)."""
    if device.type == "cuda":
        known = table_peak(torch.cuda.get_device_name(device), precision)
        if known is not None:
            return known
    key = (str(device), precision)
    if key not in _MEASURED:
        _MEASURED[key] = _measure_matmul(device, precision)
    if precision in ("fp16", "bf16") and device.type == "cpu":
        # a CPU without half-precision units is slower in fp16 than in fp32, while autocast's kernels may convert
        # and compute in fp32: the peak is then the fp32 one (else the MFU of such a run reads above 100%)
        fp32 = peak_tflops(device, "fp32")
        if fp32[0] > _MEASURED[key][0]:
            return fp32[0], f"{fp32[1]}, faster here than {precision}"
    return _MEASURED[key]


def _measure_matmul(device: torch.device, precision: str) -> tuple[float, str]:
    """Best of 3 square matmuls in the precision's dtype, the size doubled until one takes >= 50 ms (or n reaches
    2048 on a CPU, 8192 on a GPU)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}.get(precision, torch.float32)
    n, top = (512, 2048) if device.type == "cpu" else (4096, 8192)
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up (library init, kernel selection)
        sync(device)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - t)
        if min(times) >= 0.05 or n >= top:
            break
        n *= 2
    name = str(dtype).replace("torch.", "")
    return 2 * n ** 3 / min(times) / 1e12, f"measured ({n}x{n} {name} matmul, best of {len(times)})"



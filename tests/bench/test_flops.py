"""danlu.bench.flops: FLOPs of a training step against a hand count, the data-sheet peaks, and the peak a CPU's
half-precision row is measured against."""
import pytest
import torch

from danlu import bench
from danlu.bench import flops
from danlu.data.datasets import ImageSet
from lenet_flops import lenet_training_flops


def test_lenet_flops_at_28px_match_the_hand_count():
    recipe = bench.bench_recipe("lenet", 28, 1, 10, 64, bench.Combo("fp32", "off", False, 1), "auto",
                                torch.device("cpu"))
    train = ImageSet(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), torch.zeros(1), [str(i) for i in range(10)])
    assert bench.count_flops(recipe, train) == lenet_training_flops(64, 28) == 64 * 13_182_000


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 80GB HBM3", "fp32", 67.0),
    ("NVIDIA H100 PCIe", "tf32", 378.0), ("NVIDIA H200", "fp16", 989.4), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA L4", "bf16", 121.0), ("NVIDIA L40S", "bf16", 362.0), ("Tesla T4", "fp16", 65.0),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0), ("Tesla T4", "bf16", None), ("NVIDIA A10G", "bf16", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16", None),
])
def test_peak_table(name, precision, peak):
    found = bench.table_peak(name, precision)
    assert (found[0] if found else None) == peak


@pytest.mark.parametrize("bf16, want", [(0.25, (1.0, "measured fp32, faster here than bf16")),
                                        (4.0, (4.0, "measured bf16"))])
def test_a_cpu_half_precision_row_is_measured_against_the_faster_of_its_matmul_and_fp32s(monkeypatch, bf16, want):
    """A CPU without bf16 units runs a bf16 matmul slower than fp32, while autocast may compute in fp32: its peak is
    then fp32's (else MFU could read above 100%); a CPU whose bf16 matmul is faster keeps its own. Each peak is
    measured once per device and precision."""
    calls = []

    def matmul(device, precision):
        calls.append(precision)
        return {"fp32": 1.0, "bf16": bf16}[precision], f"measured {precision}"

    monkeypatch.setattr(flops, "_measure_matmul", matmul)
    monkeypatch.setattr(flops, "_MEASURED", {})  # a fresh cache: nothing measured in this process yet
    cpu = torch.device("cpu")
    assert flops.peak_tflops(cpu, "bf16") == want
    assert flops.peak_tflops(cpu, "bf16") == want and flops.peak_tflops(cpu, "fp32") == (1.0, "measured fp32")
    assert sorted(calls) == ["bf16", "fp32"]  # measured once each


def test_figures_keep_significant_digits_not_decimals():
    """A CPU's TFLOP/s are 0.000x: rounding to decimals would print 0."""
    assert flops.sig(0.000123456) == 0.0001235 and flops.sig(123456.7, 6) == 123457.0
    assert flops.sig(None) is None

"""`danlu bench` in its reduced CI form (2 steps, LeNet at 16 px): every agreed JSON field, FLOPs against a hand count,
the table and the plot; the peak table; bad flags exit 2."""
import json

import pytest
import torch

from danlu import bench
from danlu.data.datasets import ImageSet
from danlu.cli import main
from tests.conftest import run_cli

ENV_FIELDS = ("date", "device", "driver", "torch", "danlu", "danlu_commit", "python", "cpu", "torch_threads")


def lenet_training_flops(batch: int, side: int, classes: int = 10) -> int:
    """FLOPs of one LeNet training step (forward + backward; the input needs no gradient), by hand: a conv or
    linear layer costs 2*MACs forward, twice that backward (input and weight gradients), conv1 only its weights'."""
    s1 = side - 4  # conv1 5x5 output side
    s2 = s1 // 2 - 4  # conv2 output side
    conv1 = 2 * 20 * s1 * s1 * 1 * 25
    conv2 = 2 * 50 * s2 * s2 * 20 * 25
    fc1 = 2 * (50 * (s2 // 2) ** 2) * 500
    fc2 = 2 * 500 * classes
    return batch * (2 * conv1 + 3 * (conv2 + fc1 + fc2))


def test_reduced_bench_writes_every_field(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = run_cli("bench", "--model", "lenet", "--size", "16", "--batch", "8", "--precision", "fp32,bf16,tf32",
                "--compile", "off", "--procs", "1", "--steps", "2", "--warmup", "1", "--device", "cpu",
                "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert set(ENV_FIELDS) <= set(d["env"]) and d["env"]["device"].startswith("cpu")
    rows = d["rows"]
    assert [row["precision"] for row in rows] == ["fp32", "bf16"]  # tf32 needs CUDA: skipped, and said so
    assert d["skipped"] == [{"precision": "tf32", "compile": "off", "cuda_graphs": False, "procs": 1,
                             "reason": "tf32 needs CUDA"}]
    assert "skipped: tf32" in r.stdout and "vs plain" in r.stdout  # the rich table
    for row in rows:
        assert set(bench.ROW_FIELDS) <= set(row), set(bench.ROW_FIELDS) - set(row)
        assert (row["device"], row["model"], row["compile"], row["procs"], row["batch"]) == \
            (d["env"]["device"], "lenet", "off", 1, 8)
        assert row["steps"] == 2 and row["images_per_second"] > 0 and row["ms_per_step_p90"] >= 0
        assert row["images_per_second"] == pytest.approx(8 / (row["ms_per_step_median"] / 1e3), rel=1e-3)
        assert row["vs_plain_loop"] == pytest.approx(row["plain_ms_per_step_median"] / row["ms_per_step_median"],
                                                     rel=1e-3)
        assert row["flops_per_step"] == lenet_training_flops(8, 16)
        assert row["tflops"] == pytest.approx(row["flops_per_step"] / (row["ms_per_step_median"] / 1e3) / 1e12,
                                              rel=1e-2)
        assert row["peak_tflops"] > 0 and row["peak_source"].startswith("measured")  # no data sheet for a CPU
        assert row["mfu"] == pytest.approx(row["tflops"] / row["peak_tflops"], rel=1e-2, abs=1e-4)
        assert row["peak_memory_mb"] is None  # the CPU allocator keeps no peak
        assert 0 <= row["data_wait_share"] <= 1
    assert rows[0]["speedup_vs_fp32_eager"] == 1.0
    assert rows[1]["speedup_vs_fp32_eager"] == pytest.approx(
        rows[1]["images_per_second"] / rows[0]["images_per_second"], rel=1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# step seconds chosen so that every figure is a round number: danlu's median 27.5 ms (sorted: 10, 20, 25, 30, 40,
# 50 ms), p90 45 ms (between 40 and 50, numpy's linear rule), mean 29.1667 ms; the plain loop's median 33 ms
DANLU_STEPS = [0.010, 0.050, 0.020, 0.030, 0.040, 0.025]
PLAIN_STEPS = [0.030, 0.036, 0.033, 0.040, 0.031]


@pytest.mark.parametrize("procs", [1, 2])
def test_row_figures_follow_from_the_step_times(monkeypatch, procs):
    """measure() on known step times (timing stubbed): every figure of the row is what it is computed from."""
    import danlu.launch
    from danlu.bench import matrix

    timings = {"danlu": DANLU_STEPS, "plain": PLAIN_STEPS, "wait": 0.0175, "peak_memory_mb": None,
               "channels_last": False, "skipped_steps": 0, "device": "cpu (stub)"}
    monkeypatch.setattr(matrix, "time_both", lambda combo, cfg: dict(timings))
    monkeypatch.setattr(danlu.launch, "run_workers", lambda fn, combo, cfg, procs, gpus: [dict(timings)] * procs)
    monkeypatch.setattr(matrix, "peak_tflops", lambda device, precision: (2.0, "stub"))
    cfg = {"model": "lenet", "size": 16, "channels": 1, "classes": 10, "batch": 8, "steps": 6, "warmup": 1,
           "device": "cpu", "channels_last": "auto", "loader": "device"}
    row = bench.measure(bench.Combo("fp32", "off", False, procs), cfg, 10 ** 9, lambda msg: None)
    assert (row["procs"], row["global_batch"], row["steps"]) == (procs, 8 * procs, 6)
    assert row["ms_per_step_median"] == 27.5 and row["ms_per_step_p90"] == 45.0
    assert row["ms_per_step_mean"] == pytest.approx(175 / 6, abs=1e-3)
    assert row["images_per_second"] == pytest.approx(8 * procs / 0.0275, abs=0.01)  # batch x procs / median step
    assert row["plain_ms_per_step_median"] == 33.0
    assert row["plain_images_per_second"] == pytest.approx(8 * procs / 0.033, abs=0.01)
    assert row["vs_plain_loop"] == pytest.approx(0.033 / 0.0275, abs=1e-4)  # > 1: danlu's step is the faster
    assert row["data_wait_share"] == pytest.approx(0.0175 / 0.175, abs=1e-4)  # loader waits / all danlu step time
    tflops = 10 ** 9 * procs / 0.0275 / 1e12  # every process does a step's FLOPs each median step
    assert row["tflops"] == pytest.approx(tflops, rel=1e-3)
    assert row["mfu"] == pytest.approx(tflops / 2.0, rel=1e-3)  # the CPU's peak is shared, not multiplied
    assert (row["peak_tflops"], row["peak_source"]) == (2.0, "stub")


def test_ratios_keep_their_precision_when_danlus_step_is_far_slower(monkeypatch):
    """On a busy machine a 2-step bench can read danlu 40x slower than the plain loop: the ratio keeps 4 significant
    digits (rounded to decimals, 0.02304 became 0.023, 0.2% off the step times it is computed from)."""
    from danlu.bench import matrix

    slow = [t * 43.4 for t in PLAIN_STEPS]
    monkeypatch.setattr(matrix, "time_both", lambda combo, cfg: {
        "danlu": slow, "plain": PLAIN_STEPS, "wait": 0.0, "peak_memory_mb": None, "channels_last": False,
        "skipped_steps": 0, "device": "cpu (stub)"})
    monkeypatch.setattr(matrix, "peak_tflops", lambda device, precision: (2.0, "stub"))
    cfg = {"model": "lenet", "size": 16, "channels": 1, "classes": 10, "batch": 8, "steps": 5, "warmup": 1,
           "device": "cpu", "channels_last": "auto", "loader": "device"}
    row = bench.measure(bench.Combo("fp32", "off", False, 1), cfg, 10 ** 9, lambda msg: None)
    assert row["vs_plain_loop"] == pytest.approx(row["plain_ms_per_step_median"] / row["ms_per_step_median"], rel=1e-3)
    assert row["vs_plain_loop"] == pytest.approx(1 / 43.4, rel=1e-3)


def test_lenet_flops_at_28px_match_the_hand_count():
    recipe = bench.bench_recipe("lenet", 28, 1, 10, 64, bench.Combo("fp32", "off", False, 1), "auto", torch.device("cpu"))
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


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp8"], "--precision fp8: 'fp8' is not one of fp32, tf32, fp16, bf16, fp64"),
    (["--compile", "maybe"], "--compile maybe: 'maybe' is not one of off, on, max-autotune"),
    (["--model", "lenett"], "--model lenett: unknown model"),
    (["--procs", "0"], "--procs 0: '0' is not a process count"),
    (["--precision", "tf32", "--device", "cpu"], "nothing cpu"),
])
def test_bad_bench_flags_exit_2(capsys, args, message):
    assert main(["bench", "--model", "lenet", "--size", "16", "--batch", "4", "--steps", "1", "--compile", "off",
                 *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bench_precision_auto_is_measured_or_refused_up_front(capsys):
    rc = main(["bench", "--model", "lenet", "--size", "16", "--batch", "4", "--steps", "1", "--warmup", "1",
               "--compile", "off", "--precision", "auto", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0 or (rc == 2 and "warm-up" not in err and "one of fp32, tf32, fp16, bf16, fp64" in err), err


def test_two_processes_time_rank_zero_and_count_both(tmp_path):
    """--procs 2 on the CPU: two gloo processes started by danlu's launcher, each stepping its half of the batches."""
    r = bench.run(model="lenet", size=16, batch=4, precisions=["fp32"], compiles=["off"], procs=[2], steps=2,
                  warmup=1, device="cpu", quiet=True, json_out=str(tmp_path / "b.json"))
    (row,) = r["rows"]
    assert row["procs"] == 2 and row["global_batch"] == 8 and row["steps"] == 2
    assert row["images_per_second"] == pytest.approx(8 / (row["ms_per_step_median"] / 1e3), rel=1e-3)
    assert row["flops_per_step"] == lenet_training_flops(4, 16) and row["vs_plain_loop"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["complete"] is True

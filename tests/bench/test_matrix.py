"""danlu.bench.matrix: the whole `danlu bench` run in its reduced CI form (2 steps, LeNet at 16 px: every agreed
JSON field, the table and the plot), one row's figures from known step times, two processes, merged results, and
the flags it refuses (exit 2, before anything is measured)."""
import json

import pytest

from conftest import run_cli
from danlu import bench
from danlu.cli import main
from danlu.errors import DanluError
from lenet_flops import lenet_training_flops

ENV_FIELDS = ("date", "device", "driver", "torch", "danlu", "danlu_commit", "python", "cpu", "torch_threads")


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


def _row(precision: str, compile: str, images_per_second: float, batch: int = 8) -> dict:
    return {"device": "cpu (stub)", "model": "lenet", "size": 16, "channels": 1, "batch": batch, "procs": 1,
            "loader": "device", "precision": precision, "compile": compile, "cuda_graphs": False,
            "images_per_second": images_per_second, "speedup_vs_fp32_eager": None}


def test_merged_results_find_each_rows_fp32_eager_row_in_another_result():
    """`merge` of a run that measured fp32 eager and one that measured only bf16 compiled (e.g. one per process
    count or per model): the speed-ups are recomputed across them; a row without a comparable fp32 eager row (another
    batch) has none; the last result's end load and every skip are kept; the inputs are left as they were."""
    eager = {"env": {"device": "cpu", "load_average_end": [1.0]}, "rows": [_row("fp32", "off", 100.0)],
             "skipped": [], "complete": True}
    compiled = {"env": {"device": "cpu", "load_average_end": [2.0]},
                "rows": [_row("bf16", "on", 250.0), _row("bf16", "on", 300.0, batch=16)],
                "skipped": [{"precision": "tf32", "reason": "tf32 needs CUDA"}], "complete": False}
    merged = bench.merge([eager, compiled])
    assert [r["speedup_vs_fp32_eager"] for r in merged["rows"]] == [1.0, 2.5, None]
    assert merged["env"] == {"device": "cpu", "load_average_end": [2.0]}
    assert merged["skipped"] == compiled["skipped"] and merged["complete"] is False
    assert compiled["rows"][0]["speedup_vs_fp32_eager"] is None  # a copy was changed, not the result given
    with pytest.raises(DanluError, match="no bench results"):
        bench.merge([])


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


def test_bench_precision_auto_is_refused_up_front(capsys, monkeypatch):
    """bench measures precision formats; `auto` is a policy that picks one of them when a run starts (bf16 on a
    GPU with bf16 tensor cores, else fp32), so a row labelled auto would mean different things on different
    machines. `--precision auto` exits 2 with one line listing the formats, before anything is measured, even where
    it follows a format that could be (fp32,auto); the Python API refuses it the same way."""
    from danlu.bench import matrix

    measured = []
    monkeypatch.setattr(matrix, "measure", lambda *a, **kw: measured.append(a))  # nothing may get this far
    for flag in ("auto", "fp32,auto"):
        rc = main(["bench", "--model", "lenet", "--size", "16", "--batch", "4", "--steps", "1", "--warmup", "1",
                   "--compile", "off", "--precision", flag, "--device", "cpu"])
        captured = capsys.readouterr()
        assert rc == 2, captured.err
        assert captured.err == f"danlu: error: --precision {flag}: 'auto' is not one of fp32, tf32, fp16, bf16, " \
                               f"fp64\n"
        assert captured.out == ""
    with pytest.raises(DanluError, match=r"^--precision: 'auto' is not one of fp32, tf32, fp16, bf16, fp64$"):
        bench.run(model="lenet", size=16, batch=4, precisions=["fp32", "auto"], compiles=["off"], steps=1,
                  warmup=1, device="cpu", quiet=True)
    assert measured == []


def test_two_processes_time_rank_zero_and_count_both(tmp_path):
    """--procs 2 on the CPU: two gloo processes started by danlu's launcher, each stepping its half of the batches."""
    r = bench.run(model="lenet", size=16, batch=4, precisions=["fp32"], compiles=["off"], procs=[2], steps=2,
                  warmup=1, device="cpu", quiet=True, json_out=str(tmp_path / "b.json"))
    (row,) = r["rows"]
    assert row["procs"] == 2 and row["global_batch"] == 8 and row["steps"] == 2
    assert row["images_per_second"] == pytest.approx(8 / (row["ms_per_step_median"] / 1e3), rel=1e-3)
    assert row["flops_per_step"] == lenet_training_flops(4, 16) and row["vs_plain_loop"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["complete"] is True

"""`danlu bench`: the speed matrix, measured so that it tells the truth.

    danlu bench --model lenet --size 28 --batch 64 --precision fp32,bf16 --compile off --steps 30 --json b.json
    rows = danlu.bench.run(model="lenet", size=28, batch=64, precisions=["fp32", "bf16"], steps=30)["rows"]

For each combination of precision x compile x CUDA graphs x processes that the device supports, on synthetic uint8
images already on the device:

- danlu's real training step: `engine.loop.train_loop` on the `Parts` that `danlu.engine.build.build` makes from the
  recipe, as `danlu.train` does, with bench's loader and a constant LR, and a stand-in log that marks the end of
  every step;
- a plain hand-written PyTorch loop on the same model, batch and switches (autocast, one GradScaler for fp16,
  torch.compile, channels-last, CUDA graphs written out by hand), marking its steps the same way.

Both warm up first (compilation, cuDNN autotuning, allocator), then run `steps` timed steps interleaved step by step
(danlu, plain, danlu, plain, ...: a plain step runs at the end of each danlu step, from train_loop's per-step log
call) so that a change in machine load hits both alike. A step's time is the interval between the ends of
consecutive steps: CUDA events on the stream on a GPU (no host sync inside the timed steps),
`time.perf_counter` on the CPU. Reported per combination: images/s (batch x processes / median step), ms per step
(median, p90), peak device memory, FLOPs per step counted by `torch.utils.flop_counter.FlopCounterMode`, achieved
TFLOP/s and MFU against the device's peak (a data-sheet table for known GPUs; otherwise a large matmul measured
here, marked "measured"), speed-up against fp32 eager, and danlu / plain loop. With `procs` > 1 the processes are
started by danlu's launcher (danlu.launch.run_workers) and rank 0's steps are timed.

Where things are: matrix.py (the combinations, one row, the whole run), plain.py (the plain loop), timing.py (step
marks, interleaving, percentiles), flops.py (FLOPs of a step, device peaks, MFU); the tables and the chart are in
danlu.report, the environment beside each figure in danlu.runs.
"""
from __future__ import annotations

_LAZY = {
    **{k: "danlu.bench.flops" for k in ("PEAK_TFLOPS", "count_flops", "peak_tflops", "table_peak")},
    **{k: "danlu.bench.matrix" for k in ("ROW_FIELDS", "SWITCH_WORDS", "Combo", "bench_recipe", "measure", "merge",
                                         "parse_list", "parse_procs", "run")},
    "PRECISIONS": ("danlu.engine.precision", "FORMATS"),  # bench measures formats, not the auto policy
    "COMPILE_WORDS": "danlu.engine.speed",
    **{k: "danlu.report" for k in ("bench_chart", "bench_markdown", "print_bench_table")},
}
__all__ = sorted(_LAZY)  # nothing is imported until used


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module '{__name__}' has no attribute {name!r}")

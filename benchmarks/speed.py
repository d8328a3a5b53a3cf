"""The speed issue's CPU targets, measured in one run: `danlu bench` for LeNet (28 px, batch 64) and ResNet-18
(32 px, batch 16) in fp32 and bf16, eager, against a plain PyTorch loop timed in the same run.

    .venv/bin/python benchmarks/speed.py [--steps 60] [--json OUT] [--markdown OUT.md]

Prints one Markdown table (the eager fp32/bf16 rows of docs/evidence/benchmarks.md's CPU table, there measured with the
`danlu bench` commands it names) and, per model, whether danlu / plain loop meets the
target of 0.97 in fp32. bf16 is reported as it is: on a CPU without bf16 units it is slower than fp32. The figures
are only as good as the machine is quiet: the table's head gives the load average before and after.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from danlu import bench
from danlu.io import write_json
from danlu.engine.speed import reuse_freed_memory

TARGET = 0.97
RUNS = [  # (model, size, batch, timed steps, warm-up steps): LeNet at Caffe's batch 64; ResNet-18 small enough
    ("lenet", 28, 64, 60, 10),  # for a 2-core CPU (a step of batch 16 is about a second there)
    ("resnet18", 32, 16, 12, 3),
]


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # as every danlu process does; the side it is compared with runs in this process too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, help="timed steps per combination (default: 60 LeNet, 12 ResNet-18)")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--json", help="write the merged bench JSON here")
    ap.add_argument("--markdown", help="write the Markdown table here")
    a = ap.parse_args(argv)
    results = []
    for model, size, batch, steps, warmup in RUNS:
        results.append(bench.run(model=model, size=size, batch=batch, precisions=a.precision.split(","),
                                 compiles=["off"], steps=a.steps or steps, warmup=warmup, device="cpu"))
    merged = bench.merge(results)
    command = "python benchmarks/speed.py" + (f" --steps {a.steps}" if a.steps else "")
    table = bench.bench_markdown(merged, command)
    print(table)
    for row in merged["rows"]:
        if row["precision"] == "fp32":
            verdict = "meets" if row["vs_plain_loop"] >= TARGET else "MISSES"
            print(f"{row['model']}: danlu / plain loop {row['vs_plain_loop']:.3f} ({verdict} the target {TARGET})")
    if a.json:
        write_json(Path(a.json), merged)
    if a.markdown:
        Path(a.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

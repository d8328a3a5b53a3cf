#!/usr/bin/env bash
# Everything danlu does on a CUDA GPU, in one command, for a machine with one:
#   1. the tests marked `cuda` (fp16 loss scaling, bf16, tf32, compile, channels-last, CUDA graphs, a --gpus 1 NCCL run);
#   2. `danlu bench` for LeNet (28 px, batch 512), ResNet-18 (32 px, batch 512), MiniGoogLeNet (32 px, batch 256) and
#      ResNet-50 (torchvision's, 224 px, batch 256) in fp32, tf32, bf16 and fp16, eager and compiled (bf16), and for
#      LeNet also with CUDA graphs;
#   3. one Markdown table (report.md) and one JSON (bench.json) of every row, with the date, device, driver, torch and
#      the danlu commit, in the folder it names at the end (default gpu-check-<date>-<time>).
# It keeps to a time budget (GPU_CHECK_BUDGET seconds, default 450: under 8 minutes on one H100 with start-up): the
# parts run in order of importance, each under `timeout` for the time left, and whatever did not fit is listed in
# report.md as not measured.
#
#   scripts/gpu_check.sh [OUT_DIR]
#   GPU_CHECK_SMOKE=1 scripts/gpu_check.sh     # no GPU needed: checks this script's plumbing on the CPU (tiny runs)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
BUDGET=${GPU_CHECK_BUDGET:-450}
SMOKE=${GPU_CHECK_SMOKE:-0}
START=$(date +%s)
mkdir -p "$OUT/parts"
: > "$OUT/not_measured.txt"

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  echo "gpu_check: smoke mode: tiny runs on the CPU (this checks the script, not a GPU)"
else
  DEVICE=cuda
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine, or set"
    echo "GPU_CHECK_SMOKE=1 to check the script itself on the CPU"; exit 2; }
  "$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# ---- 1. the tests marked cuda
tests_rc=0
if [ "$SMOKE" = 1 ]; then
  "$PY" -m pytest -p no:cacheprovider -m cuda tests/engine/test_speed.py >"$OUT/tests.log" 2>&1; tests_rc=$?
  [ "$tests_rc" = 5 ] && tests_rc=0  # the cuda tests are all skipped (deselected) without a GPU
else
  timeout 170 "$PY" -m pytest -p no:cacheprovider -m cuda tests >"$OUT/tests.log" 2>&1; tests_rc=$?
fi
tail -3 "$OUT/tests.log"
echo "gpu_check: cuda tests exit code $tests_rc, $(( $(date +%s) - START )) s so far"

# ---- 2. the bench matrix, most important first; each part gets at most the time left
bench() {  # bench NAME MIN_SECONDS ARGS...: one `danlu bench` run into parts/NAME.json, if at least MIN_SECONDS are left
  local name=$1 need=$2; shift 2
  local t; t=$(left)
  if [ "$t" -lt "$need" ]; then
    echo "$name: $* (about ${need} s needed, ${t} s left)" >> "$OUT/not_measured.txt"
    echo "gpu_check: $name not run: ${t} s left of the budget"
    return
  fi
  echo "gpu_check: $name (${t} s left): danlu bench $*"
  timeout "$t" "$PY" -m danlu bench --device "$DEVICE" "$@" --json "$OUT/parts/$name.json" \
    --plot "$OUT/parts/$name.png" >>"$OUT/bench.log" 2>&1
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "$name: danlu bench $* stopped with exit code $rc (see bench.log)" >> "$OUT/not_measured.txt"
    echo "gpu_check: $name stopped with exit code $rc; its finished rows are kept"
  fi
}

ALL=fp32,tf32,bf16,fp16
if [ "$SMOKE" = 1 ]; then
  bench lenet 5 --model lenet --size 16 --batch 8 --precision $ALL --compile off --steps 2 --warmup 1
  bench lenet-compile 5 --model lenet --size 16 --batch 8 --precision bf16 --compile on --steps 2 --warmup 1
  bench resnet18 5 --model resnet18 --size 8 --batch 4 --precision fp32 --compile off --steps 2 --warmup 1
else
  bench resnet50 60 --model tv:resnet50 --size 224 --batch 256 --precision $ALL --compile off --steps 20 --warmup 5
  bench resnet50-compile 90 --model tv:resnet50 --size 224 --batch 256 --precision bf16 --compile on --steps 20 \
    --warmup 5
  bench lenet 40 --model lenet --size 28 --batch 512 --precision $ALL --compile off,on --steps 50 --warmup 10
  bench lenet-graphs 40 --model lenet --size 28 --batch 512 --precision fp32,bf16 --compile off,on --cuda-graphs on \
    --steps 50 --warmup 10
  bench resnet18 30 --model resnet18 --size 32 --batch 512 --precision $ALL --compile off --steps 30 --warmup 5
  bench minigooglenet 30 --model minigooglenet --size 32 --batch 256 --precision $ALL --compile off --steps 30 \
    --warmup 5
  bench resnet18-compile 45 --model resnet18 --size 32 --batch 512 --precision bf16 --compile on --steps 30 --warmup 5
  bench minigooglenet-compile 45 --model minigooglenet --size 32 --batch 256 --precision bf16 --compile on \
    --steps 30 --warmup 5
fi

# ---- 3. one JSON and one Markdown table
"$PY" - "$OUT" "$tests_rc" "$(( $(date +%s) - START ))" <<'PY'
import json, sys
from pathlib import Path

from danlu import bench
from danlu.io import write_json

out, tests_rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
parts = sorted((out / "parts").glob("*.json"), key=lambda p: p.stat().st_mtime)
results = [json.loads(p.read_text()) for p in parts]
missing = [line for line in (out / "not_measured.txt").read_text().splitlines() if line.strip()]
if results:
    merged = bench.merge(results)
    write_json(out / "bench.json", {**merged, "tests_exit_code": tests_rc, "seconds": seconds,
                                    "not_measured": missing})
    table = bench.bench_markdown(merged, "scripts/gpu_check.sh")
else:
    table = "no bench rows were measured\n"
tests = (out / "tests.log").read_text().strip().splitlines()
report = [f"# danlu GPU check ({seconds} s)", "", f"cuda tests: exit code {tests_rc}; "
          f"{tests[-1] if tests else 'no output'}", "", table]
if missing:
    report += ["Not measured:", ""] + [f"- {m}" for m in missing] + [""]
(out / "report.md").write_text("\n".join(report))
print("\n".join(report))
PY
echo "gpu_check: $(( $(date +%s) - START )) s; report: $OUT/report.md, rows: $OUT/bench.json"
[ "$tests_rc" = 0 ]

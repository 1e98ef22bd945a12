#!/usr/bin/env bash
# One-shot GPU check for a short device lease (one call, at most ~9 minutes of command time):
#   1. the `gpu`-marked tests (engine CUDA graphs in fp32/bf16/fp16, graph sampling distribution,
#      capture next to a busy thread, session eviction, training steps in bf16/fp16 with resume,
#      sample-batch on CUDA, Inception features on CUDA), at most PYTEST_LIMIT_S seconds;
#   2. benchmarks/bench_engine.py at the issue's workloads (GPT-B/L/XL, 256 and 384 px, batch 8
#      and 64, cfg 4.0, top-k 2000, bf16), at most BENCH_LIMIT_S seconds, each workload stopped
#      after WORKLOAD_BUDGET_S seconds and no workload started after BENCH_BUDGET_S seconds.
# Results go to $OUT (the device tool's output folder) or runs/gpu-check: env.txt, pytest.log,
# pytest.xml, bench.log, bench.json. The last lines printed are the test summary, the benchmark
# table and the targets, so the tail of the output is the report.
#
#   bash benchmarks/gpu_check.sh                      # from the repository root
#
# It uses whatever `python3` has torch (a device machine's image has no argen dependencies beyond
# numpy/scipy/safetensors/pillow/tqdm/pytest; argen is imported from src/, nothing is installed).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-runs/gpu-check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
PYTEST_LIMIT_S="${PYTEST_LIMIT_S:-200}"
BENCH_LIMIT_S="${BENCH_LIMIT_S:-300}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-250}"
WORKLOAD_BUDGET_S="${WORKLOAD_BUDGET_S:-45}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

{
  date -u
  nvidia-smi -L 2>&1 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA',
torch.version.cuda, '| available', torch.cuda.is_available(),
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')" 2>&1
} | tee "$OUT_DIR/env.txt"

# 1. tests: only the modules that hold gpu tests (others may need packages the device image lacks)
mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
extra=()
"$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
echo "== pytest -m gpu ${files[*]}"
timeout -k 10 "$PYTEST_LIMIT_S" "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider "${extra[@]}" \
  --junitxml "$OUT_DIR/pytest.xml" "${files[@]}" 2>&1 | tee "$OUT_DIR/pytest.log"
pytest_rc=${PIPESTATUS[0]}
echo "== pytest exit status $pytest_rc after $(( $(date +%s) - start )) s"

# 2. the engine benchmark at the issue's workloads
echo "== bench_engine.py (GPU mode)"
timeout -k 10 "$BENCH_LIMIT_S" "$PY" benchmarks/bench_engine.py --models GPT-B,GPT-L,GPT-XL --sizes 256,384 \
  --batches 8,64 --cfg-scale 4.0 --top-k 2000 --repeats 3 --reference-repeats 1 \
  --workload-budget-s "$WORKLOAD_BUDGET_S" --total-budget-s "$BENCH_BUDGET_S" \
  --json "$OUT_DIR/bench.json" 2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary ($(( $(date +%s) - start )) s in all; files in $OUT_DIR)"
cat "$OUT_DIR/env.txt"
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|error" "$OUT_DIR/pytest.log" | tail -n 25
echo "pytest exit status $pytest_rc (124: stopped at ${PYTEST_LIMIT_S} s)"
grep -E "^(#|\|)|^- " "$OUT_DIR/bench.log"
echo "bench exit status $bench_rc (124: stopped at ${BENCH_LIMIT_S} s; 1: a workload failed)"
[ "$pytest_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

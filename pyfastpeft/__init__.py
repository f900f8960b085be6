"""pyfastpeft: fast, memory-lean parameter-efficient fine-tuning for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension)

from ._extension import build_info, cuda_available

# isort: split
from . import io, nn, ops, tuners
from .report import Report, report
from .tuners import LoraConfig, PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "cuda_available",
    "ops",
    "nn",
    "__version__",
    "io",
    "tuners",
    "LoraConfig",
    "PeftModel",
    "get_peft_model",
    "Report",
    "report",
]

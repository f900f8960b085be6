"""pyfastpeft: fast, memory-lean parameter-efficient fine-tuning for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension)

from ._extension import build_info, cuda_available
from . import ops, nn  # noqa: E402
from . import io, tuners  # noqa: E402
from .report import Report, report  # noqa: E402
from .tuners import LoraConfig, PeftModel, get_peft_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "build_info", "cuda_available", "ops", "nn", "__version__",
    "io", "tuners", "LoraConfig", "PeftModel", "get_peft_model", "Report", "report",
]

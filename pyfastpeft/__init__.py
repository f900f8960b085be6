"""pyfastpeft: fast, memory-lean parameter-efficient fine-tuning for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension)

from . import distill, io, nn, ops, optim, quant, tuners
from ._extension import build_info, cuda_available
from .report import Report, report
from .tuners import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "Report",
    "__version__",
    "build_info",
    "cuda_available",
    "distill",
    "get_peft_model",
    "io",
    "nn",
    "ops",
    "optim",
    "quant",
    "report",
    "tuners",
]

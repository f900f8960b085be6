"""pyfastpeft: fast, memory-lean parameter-efficient fine-tuning for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension)

from . import distill, heads, io, nn, ops, optim, quant, tuners
from ._extension import build_info, cuda_available
from .heads import with_task_head
from .models.gguf_file import from_gguf
from .report import Report, report
from .tuners import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LayerFreezeConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "IA3Config",
    "BitFitConfig",
    "LayerFreezeConfig",
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
    "from_gguf",
    "get_peft_model",
    "heads",
    "io",
    "nn",
    "ops",
    "optim",
    "quant",
    "report",
    "tuners",
    "with_task_head",
]

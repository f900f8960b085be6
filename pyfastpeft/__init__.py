"""pyfastpeft: fast, memory-lean parameter-efficient fine-tuning for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension)

from . import distill, heads, io, nn, ops, optim, quant, tuners
from ._extension import build_info, cuda_available
from .heads import with_task_head
from .lm_loss import causal_lm_loss
from .models import gguf_file as _gguf_file
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


def from_gguf(path, quantized: bool = False):
    """``(model, tokenizer)`` of a llama GGUF file.

    ``quantized=False``: the float32 transformers model (the file converted once into a cached Hugging
    Face folder). ``quantized=True``: the projections, the embedding and a tied head keep the file's
    Q4_0/Q4_1/Q8_0 blocks in memory (:class:`pyfastpeft.nn.GGUFLinear`, :class:`pyfastpeft.nn.GGUFEmbedding`,
    computed by the fused ``gguf`` ops); tensors of other formats are de-quantized with a warning."""
    return _gguf_file.from_gguf(path, quantized, make_linear=nn.GGUFLinear, make_embedding=nn.GGUFEmbedding)


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
    "causal_lm_loss",
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

"""Functional ops: thin wrappers over ``torch.ops.pyfastpeft.*`` with autograd and fake kernels."""

from .lora import lora_linear, philox_dropout
from .quant import fake_quantize, fake_quantize_lsq

__all__ = ["lora_linear", "philox_dropout", "fake_quantize", "fake_quantize_lsq"]

"""Functional ops: thin wrappers over ``torch.ops.pyfastpeft.*`` with autograd and fake kernels."""

from .lora import lora_linear, philox_dropout
from .multi_lora import check_adapter_indices, multi_lora_linear

__all__ = ["lora_linear", "philox_dropout", "multi_lora_linear", "check_adapter_indices"]

"""Functional ops: thin wrappers over ``torch.ops.pyfastpeft.*`` with autograd and fake kernels."""

from .lora import lora_linear, philox_dropout

__all__ = ["lora_linear", "philox_dropout"]

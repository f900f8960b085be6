"""Functional ops: thin wrappers over ``torch.ops.pyfastpeft.*`` with autograd and fake kernels."""

from .distill import fused_linear_kd_loss, kd_loss
from .lora import lora_linear, philox_dropout

__all__ = ["lora_linear", "philox_dropout", "kd_loss", "fused_linear_kd_loss"]

"""Functional ops: thin wrappers over ``torch.ops.pyfastpeft.*`` with autograd and fake kernels."""

from .. import _extension  # noqa: F401, I001  (loads the compiled operators first)
from .lora import lora_linear, philox_dropout

__all__ = ["lora_linear", "philox_dropout"]

"""Inject adapters into any nn.Module by module-name pattern."""

from .inject import inject_lora, trainable_parameters

__all__ = ["inject_lora", "trainable_parameters"]

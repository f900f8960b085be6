"""PEFT modules."""

from .lora_linear import LoRALinear

__all__ = ["LoRALinear"]

"""PEFT modules."""

from .lora_linear import LoRALinear
from .multi_lora_linear import BASE_ADAPTER, MultiLoRALinear, adapter_indices_from_names

__all__ = ["LoRALinear", "MultiLoRALinear", "BASE_ADAPTER", "adapter_indices_from_names"]

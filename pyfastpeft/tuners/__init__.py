"""PEFT configs, injection by module-name pattern, named adapters, merging."""

from .config import LoraConfig
from .inject import find_targets, inject_lora, trainable_parameters
from .lora_layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSaveWrapper
from .peft_model import PeftModel, get_peft_model

__all__ = [
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModulesToSaveWrapper",
    "PeftModel",
    "find_targets",
    "get_peft_model",
    "inject_lora",
    "trainable_parameters",
]

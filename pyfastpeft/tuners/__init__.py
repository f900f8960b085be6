"""PEFT configs, injection by module-name pattern, named adapters, merging."""

from .base import TunerModel
from .config import LoraConfig
from .inject import find_targets, inject_lora, trainable_parameters
from .lora_layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSaveWrapper
from .peft_model import PeftModel, get_peft_model
from .prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from .prompt_learning import PromptLearningModel
from .registry import config_from_dict, peft_types, register_peft_type

__all__ = [
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningModel",
    "PromptTuningConfig",
    "TunerModel",
    "config_from_dict",
    "find_targets",
    "get_peft_model",
    "inject_lora",
    "peft_types",
    "register_peft_type",
    "trainable_parameters",
]

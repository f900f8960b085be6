"""PEFT configs, injection by module-name pattern, named adapters, merging."""

from .adapters import AdapterConfig, AdapterModel, AdapterWrapper
from .base import TunerModel
from .bitfit import BitFitConfig, BitFitModel
from .config import LoraConfig
from .ia3 import IA3Config, IA3Linear, IA3Model
from .inject import find_targets, inject_lora, trainable_parameters
from .layer_freeze import LayerFreezeConfig, LayerFreezeModel
from .lora_layers import LoraEmbedding, LoraLayer, LoraLinear
from .modules_to_save import ModulesToSaveWrapper
from .peft_model import PeftModel, get_peft_model
from .prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from .prompt_learning import PromptLearningModel
from .registry import config_from_dict, peft_types, register_peft_type

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "AdapterWrapper",
    "IA3Config",
    "IA3Linear",
    "IA3Model",
    "BitFitConfig",
    "BitFitModel",
    "LayerFreezeConfig",
    "LayerFreezeModel",
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

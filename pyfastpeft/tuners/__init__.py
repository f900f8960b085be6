"""One PeftModel over any PEFT method; one package per method (config, layer, tuner), registered once
by peft_type in :mod:`pyfastpeft.tuners.registry`."""

from ..report import trainable_parameters
from .adapter import AdapterConfig, AdapterModel, AdapterWrapper
from .base import BaseTuner
from .bitfit import BitFitConfig, BitFitModel
from .ia3 import IA3Config, IA3Linear, IA3Model
from .layer_freeze import LayerFreezeConfig, LayerFreezeModel
from .lora import LoraConfig, LoraEmbedding, LoraLayer, LoraLinear, LoraModel, find_targets, inject_lora
from .modules_to_save import ModulesToSaveWrapper
from .peft_model import PeftModel, get_peft_model
from .prompt_learning import PrefixTuningConfig, PromptEncoderConfig, PromptLearningModel, PromptTuningConfig
from .registry import config_from_dict, peft_types, register_peft_type
from .sparse import SparseConfig, SparseModel

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "AdapterWrapper",
    "BaseTuner",
    "BitFitConfig",
    "BitFitModel",
    "IA3Config",
    "IA3Linear",
    "IA3Model",
    "LayerFreezeConfig",
    "LayerFreezeModel",
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningModel",
    "PromptTuningConfig",
    "SparseConfig",
    "SparseModel",
    "config_from_dict",
    "find_targets",
    "get_peft_model",
    "inject_lora",
    "peft_types",
    "register_peft_type",
    "trainable_parameters",
]

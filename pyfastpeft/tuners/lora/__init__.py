"""LoRA (with rsLoRA scaling, DoRA, tied factors): config, layers, tuner."""

from .config import LoraConfig
from .embedding import LoraEmbedding
from .layer import LoraLayer, LoraLinear
from .model import LoraModel, find_targets, inject_lora

__all__ = ["LoraConfig", "LoraEmbedding", "LoraLayer", "LoraLinear", "LoraModel", "find_targets", "inject_lora"]

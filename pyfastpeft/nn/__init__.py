"""PEFT modules."""

from .bias_only_linear import BiasOnlyLinear, bitfit_
from .bottleneck_adapter import BottleneckAdapter
from .fake_quant_linear import FakeQuantLinear
from .gguf import GGUFEmbedding, GGUFLinear
from .lora_linear import LoRALinear
from .multi_lora_linear import BASE_ADAPTER, MultiLoRALinear, adapter_indices_from_names
from .prompt_encoders import PrefixEncoder, PromptEmbedding, PromptEncoder
from .pruning import prune_magnitude_
from .quantized_linear import QuantizedLinear, QuantLoRALinear
from .sparse_delta_linear import SparseDeltaLinear, gradient_scores, select_indices

__all__ = [
    "BASE_ADAPTER",
    "BiasOnlyLinear",
    "BottleneckAdapter",
    "FakeQuantLinear",
    "GGUFEmbedding",
    "GGUFLinear",
    "LoRALinear",
    "MultiLoRALinear",
    "PrefixEncoder",
    "PromptEmbedding",
    "PromptEncoder",
    "QuantLoRALinear",
    "QuantizedLinear",
    "SparseDeltaLinear",
    "adapter_indices_from_names",
    "bitfit_",
    "gradient_scores",
    "prune_magnitude_",
    "select_indices",
]

"""PEFT modules."""

from .bias_only_linear import BiasOnlyLinear, bitfit_
from .bottleneck_adapter import BottleneckAdapter
from .fake_quant_linear import FakeQuantLinear
from .gguf import GGUFEmbedding, GGUFLinear
from .prompt_encoders import PrefixEncoder, PromptEmbedding, PromptEncoder
from .pruning import prune_magnitude_
from .quantized_linear import QuantizedLinear
from .sparse_delta_linear import SparseDeltaLinear, gradient_scores, select_indices

__all__ = [
    "BiasOnlyLinear",
    "BottleneckAdapter",
    "FakeQuantLinear",
    "GGUFEmbedding",
    "GGUFLinear",
    "PrefixEncoder",
    "PromptEmbedding",
    "PromptEncoder",
    "QuantizedLinear",
    "SparseDeltaLinear",
    "bitfit_",
    "gradient_scores",
    "prune_magnitude_",
    "select_indices",
]

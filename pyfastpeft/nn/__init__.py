"""PEFT modules."""

from .fake_quant_linear import FakeQuantLinear
from .lora_linear import LoRALinear
from .pruning import prune_magnitude_
from .quantized_linear import QuantizedLinear, QuantLoRALinear
from .sparse_delta_linear import SparseDeltaLinear, gradient_scores, select_indices

__all__ = [
    "FakeQuantLinear",
    "LoRALinear",
    "QuantLoRALinear",
    "QuantizedLinear",
    "SparseDeltaLinear",
    "gradient_scores",
    "prune_magnitude_",
    "select_indices",
]

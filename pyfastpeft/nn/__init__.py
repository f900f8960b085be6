"""PEFT modules."""

from .lora_linear import LoRALinear
from .pruning import prune_magnitude_
from .sparse_delta_linear import SparseDeltaLinear, gradient_scores, select_indices

__all__ = ["LoRALinear", "SparseDeltaLinear", "gradient_scores", "prune_magnitude_", "select_indices"]

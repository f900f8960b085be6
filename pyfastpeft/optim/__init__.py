"""Optimizers that update only what trains: fused AdamW, compact-state sparse AdamW, dynamic freezing."""

from .freezing import FreezingScheduler
from .fused_adamw import FusedAdamW, lora_plus_param_groups
from .sparse_adamw import SparseAdamW

__all__ = ["FreezingScheduler", "FusedAdamW", "SparseAdamW", "lora_plus_param_groups"]

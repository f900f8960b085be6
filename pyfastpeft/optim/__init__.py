"""Optimizers that update only what trains: fused AdamW, compact-state sparse AdamW, dynamic freezing."""

from .fused_adamw import FusedAdamW, lora_plus_param_groups

__all__ = ["FusedAdamW", "lora_plus_param_groups"]

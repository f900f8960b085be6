"""Layer freezing / selective layer tuning: config and tuner (no layer: it trains the model's own tensors)."""

from .config import LayerFreezeConfig
from .model import LayerFreezeModel

__all__ = ["LayerFreezeConfig", "LayerFreezeModel"]

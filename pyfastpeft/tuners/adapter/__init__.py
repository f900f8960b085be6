"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): config, layer, tuner."""

from .config import AdapterConfig
from .layer import AdapterWrapper
from .model import AdapterModel

__all__ = ["AdapterConfig", "AdapterModel", "AdapterWrapper"]

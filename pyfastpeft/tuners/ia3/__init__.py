"""(IA)³: config, layer, tuner."""

from .config import IA3Config
from .layer import IA3Linear
from .model import IA3Model

__all__ = ["IA3Config", "IA3Linear", "IA3Model"]

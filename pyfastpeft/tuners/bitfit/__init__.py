"""BitFit: config and tuner; its layer is :class:`pyfastpeft.nn.BiasOnlyLinear`."""

from .config import BitFitConfig
from .model import BitFitModel

__all__ = ["BitFitConfig", "BitFitModel"]

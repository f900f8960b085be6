"""Sparse fine-tuning: config and tuner; its layer is :class:`pyfastpeft.nn.SparseDeltaLinear`."""

from .config import SparseConfig
from .model import SparseModel

__all__ = ["SparseConfig", "SparseModel"]

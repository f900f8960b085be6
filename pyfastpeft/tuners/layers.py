"""What the layers of several methods share: recognising transformers' Conv1D, and reading the wrapped
layer's attributes through a wrapping layer."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): ``y = x·W + b`` with W stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class BaseLayerPassthrough:
    """For a module wrapping ``base_layer``: code that reads the wrapped layer's attributes
    (``q_proj.weight.dtype``, ``k_proj.in_features``, ``c_attn.nf``) keeps working."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["base_layer"], name)

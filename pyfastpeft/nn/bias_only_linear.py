"""BitFit: train biases only.

:class:`BiasOnlyLinear` is a linear layer whose weight is frozen and whose bias trains through
:func:`pyfastpeft.ops.bias_only_linear`, so the backward saves no input activation. :func:`bitfit_`
turns a whole model into a BitFit model in place.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.bias import bias_only_linear


class BiasOnlyLinear(nn.Module):
    """``y = x·Wᵀ + b`` with ``W`` frozen (``requires_grad=False``) and ``b`` trainable."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BiasOnlyLinear:
        """Wraps ``linear``'s own parameters: the weight (frozen, shared, not copied) and the bias (made
        trainable; a zero bias is created when ``linear`` has none)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features = linear.in_features
        module.out_features = linear.out_features
        linear.weight.requires_grad_(False)
        module.weight = linear.weight
        if linear.bias is None:
            w = linear.weight
            module.bias = nn.Parameter(torch.zeros(linear.out_features, device=w.device, dtype=w.dtype))
        else:
            module.bias = linear.bias
            module.bias.requires_grad_(True)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_only_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _is_norm(module: nn.Module) -> bool:
    # nn.LayerNorm / GroupNorm and the RMSNorm classes of the built-in and Hugging Face models
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def bitfit_(model: nn.Module) -> list[str]:
    """Makes ``model`` a BitFit model in place; returns the names of the parameters left trainable.

    Every ``nn.Linear`` becomes a :class:`BiasOnlyLinear` (weight frozen, bias trainable; a zero bias
    is added where there was none); layer-norm and RMSNorm biases, where a norm has one, stay trainable;
    every other parameter is frozen.
    """
    if isinstance(model, nn.Linear):
        raise ValueError("model: a bare nn.Linear cannot be replaced in place; use BiasOnlyLinear.from_linear")
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, BiasOnlyLinear.from_linear(linear))
    for module in model.modules():
        is_bitfit_linear = isinstance(module, BiasOnlyLinear)  # also those made by an earlier call
        if (is_bitfit_linear or _is_norm(module)) and isinstance(getattr(module, "bias", None), nn.Parameter):
            module.bias.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]

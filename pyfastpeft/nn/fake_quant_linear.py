"""Quantization-aware linears: FakeQuantLinear (training) and QuantizedLinear (real integer weights, the
reference dequantizing linear for inference). LoRA over either, frozen, is the quantized-base mode of the
LoRA layer (``pyfastpeft.tuners.LoraLinear``).

Both compute ``linear(aq(x), wq, bias)`` with the same ``aq`` (dynamic per-token activation fake
quantization, or identity for weight-only schemes) and bitwise the same ``wq``: FakeQuantLinear fake-quantizes
the float weight each forward; QuantizedLinear stores the integer codes and dequantizes them with the
same formula, so a converted model gives exactly the fake-quantized model's outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.quant import QUANT_EPS


def _check_bits(name: str, bits: int | None, allow_none: bool = False) -> None:
    if bits is None and allow_none:
        return
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name}: expected an integer width in [2, 8]{' or None' if allow_none else ''}, got {bits!r}")


class _ActivationQuant:
    """What FakeQuantLinear and QuantizedLinear share: ``aq(x)``, dynamic per-token fake quantization
    of the input (one group per row), ``y = aq(x)·wqᵀ + b`` with the layer's ``quantized_weight()``,
    and the scheme as a dict."""

    activation_bits: int | None
    activation_symmetric: bool

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is None:
            return x
        return ops.fake_quantize(x, self.activation_bits, x.shape[-1], self.activation_symmetric)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def scheme(self) -> dict:
        return {
            "weight_bits": self.weight_bits,
            "weight_group_size": self.weight_group_size,
            "weight_symmetric": self.weight_symmetric,
            "activation_bits": self.activation_bits,
            "activation_symmetric": self.activation_symmetric,
        }


class FakeQuantLinear(_ActivationQuant, nn.Module):
    """``y = linear(aq(x), fq(W), b)`` with fake-quantized weights (and activations) for QAT.

    Args:
        weight_bits: weight code width (4 for "8da4w").
        weight_group_size: ``g > 0`` groups of g input features per output row, ``-1`` one scale per output
            row, ``0`` one scale for the tensor.
        weight_symmetric: symmetric weight codes (zero point 0).
        activation_bits: per-token dynamic activation codes (8 for "8da4w"); None for weight-only.
        activation_symmetric: symmetric activation codes (default asymmetric, as torchao's 8da4w).
        learnable_scale: learn the weight scales (and zero points) with LSQ instead of recomputing them
            from min/max every step; they start at the min/max scales of the weight.

    ``weight`` and ``bias`` are ordinary parameters (``from_linear`` shares the nn.Linear's own), trained
    through the straight-through estimator.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_bits: int = 4,
        weight_group_size: int = 32,
        weight_symmetric: bool = True,
        activation_bits: int | None = 8,
        activation_symmetric: bool = False,
        learnable_scale: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_bits("weight_bits", weight_bits)
        _check_bits("activation_bits", activation_bits, allow_none=True)
        if weight_group_size > 0 and in_features % weight_group_size:
            raise ValueError(f"weight_group_size: {weight_group_size} does not divide in_features ({in_features})")
        if weight_group_size < -1:
            raise ValueError(f"weight_group_size: expected -1, 0 or a positive size, got {weight_group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bits = weight_bits
        self.weight_group_size = weight_group_size
        self.weight_symmetric = weight_symmetric
        self.activation_bits = activation_bits
        self.activation_symmetric = activation_symmetric
        self.learnable_scale = learnable_scale
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.weight_scale: nn.Parameter | None = None
        self.weight_zero_point: nn.Parameter | None = None
        if learnable_scale:
            self.reset_scale()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **scheme) -> FakeQuantLinear:
        """A FakeQuantLinear sharing ``linear``'s weight and bias parameters (optimizer state stays valid)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            dtype=w.dtype,
            **{**scheme, "learnable_scale": False},
        )
        module.weight = linear.weight
        module.bias = linear.bias
        if scheme.get("learnable_scale", False):
            module.learnable_scale = True
            module.reset_scale()
        return module

    @torch.no_grad()
    def reset_scale(self) -> None:
        """(Re)initialise the learnable scales (and zero points) from the weight's min/max."""
        _, scale, zero_point = ops.fake_quantize(
            self.weight.detach(), self.weight_bits, self.weight_group_size, self.weight_symmetric, 0
        )
        self.weight_scale = nn.Parameter(scale.float() if scale.dtype != torch.float64 else scale)
        self.weight_zero_point = None if self.weight_symmetric else nn.Parameter(zero_point.to(self.weight_scale.dtype))

    def quantized_weight(self) -> torch.Tensor:
        """``fq(W)``: the fake-quantized weight in W's dtype (differentiable: STE, or LSQ when learnable)."""
        if self.learnable_scale:
            return ops.fake_quantize_lsq(
                self.weight,
                self.weight_scale,
                self.weight_zero_point,
                self.weight_bits,
                self.weight_group_size,
                0,
            )
        return ops.fake_quantize(self.weight, self.weight_bits, self.weight_group_size, self.weight_symmetric, 0)[0]

    @torch.no_grad()
    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, int32 zero point) ``quantized_weight`` uses now, as convert() stores them."""
        if self.learnable_scale:
            scale = self.weight_scale.detach().clamp(min=QUANT_EPS)
            qmin, qmax = -(2 ** (self.weight_bits - 1)), 2 ** (self.weight_bits - 1) - 1
            if self.weight_zero_point is None:
                zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
            else:
                zero_point = self.weight_zero_point.detach().round().clamp(qmin, qmax).to(torch.int32)
            return scale.to(torch.float64 if self.weight.dtype == torch.float64 else torch.float32), zero_point
        _, scale, zero_point = ops.fake_quantize(
            self.weight.detach(), self.weight_bits, self.weight_group_size, self.weight_symmetric, 0
        )
        return scale, zero_point

    def extra_repr(self) -> str:
        scheme = ", ".join(f"{k}={v}" for k, v in self.scheme().items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"{scheme}, learnable_scale={self.learnable_scale}"
        )

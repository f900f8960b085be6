"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update, through the fused op."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


class LoRALinear(nn.Module):
    """``y = base(x) + scaling · B·A·dropout(x)``, computed by :func:`pyfastpeft.ops.lora_linear`.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen.
        r: rank of the update.
        alpha: ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout probability on the LoRA branch's input (training mode only).
        rslora: rank-stabilised scaling.

    ``lora_A`` starts Kaiming-uniform and ``lora_B`` at zero, as in Hugging Face PEFT, so the adapted
    layer starts equal to the base layer.
    """

    def __init__(
        self, base_layer: nn.Linear, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, rslora: bool = False
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer: expected an nn.Linear, got {type(base_layer).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.rslora = rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        p = self.dropout if self.training else 0.0
        return ops.lora_linear(
            x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B, self.scaling, p
        )

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B·A`` in the base weight's dtype, computed in float32 (float64 for float64)."""
        acc = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        delta = (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc)) * self.scaling
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (forward then runs the base layer alone)."""
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, dropout={self.dropout}, rslora={self.rslora}, merged={self.merged}"
        )

"""BottleneckAdapter: the small down-project / activate / up-project network of adapter tuning."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckAdapter(nn.Module):
    """``f(h) = up(act(down(h)))``, ``down: in → bottleneck``, ``up: bottleneck → out`` (both with bias).

    The caller adds it to a residual stream (serial: ``h + s·f(h)``; parallel: ``M(x) + s·f(x)``). With
    ``init_identity`` the up-projection starts at zero, so ``f ≡ 0`` and the adapted model starts as the
    base model; the down-projection gets nn.Linear's Kaiming-uniform init so gradients reach ``up``.
    """

    def __init__(
        self,
        in_features: int,
        bottleneck: int,
        out_features: int | None = None,
        non_linearity: str = "relu",
        init_identity: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__()
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity: expected one of {sorted(ACTIVATIONS)}, got {non_linearity!r}")
        for name, value in (("in_features", in_features), ("bottleneck", bottleneck)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        out_features = in_features if out_features is None else out_features
        kw = {"dtype": dtype, "device": device}
        self.adapter_down = nn.Linear(in_features, bottleneck, **kw)
        self.adapter_up = nn.Linear(bottleneck, out_features, **kw)
        self.non_linearity = non_linearity
        self._act = ACTIVATIONS[non_linearity]
        with torch.no_grad():
            if init_identity:
                nn.init.zeros_(self.adapter_up.weight)
                nn.init.zeros_(self.adapter_up.bias)
            else:
                nn.init.kaiming_uniform_(self.adapter_up.weight, a=math.sqrt(5))
                nn.init.uniform_(self.adapter_up.bias, -0.1, 0.1)

    @property
    def in_features(self) -> int:
        return self.adapter_down.in_features

    @property
    def out_features(self) -> int:
        return self.adapter_up.out_features

    @property
    def bottleneck(self) -> int:
        return self.adapter_down.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self._act(self.adapter_down(h)))

    def extra_repr(self) -> str:
        return f"non_linearity={self.non_linearity}"

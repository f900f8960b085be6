"""(IA)³: learned per-feature scaling of keys, values and the feed-forward activation.

For a target linear ``y = W x + b`` with vector ``l``:
    attention-side (not feed-forward):  y = l ⊙ (W x + b)          l: [out, 1]
    feed-forward:                       y = W (l ⊙ x) + b           l: [1, in]
exactly as Hugging Face PEFT does (the output scaling also scales the bias). Merging folds ``l`` into
W's rows (output) or columns (input), and into b for the output case.

Cost over the base linear: the feed-forward case scales the matmul's input (an input-sized temporary,
nothing weight-sized); the output case is one elementwise multiply of the matmul's output. Both go
through the op :func:`pyfastpeft.ops.ia3_scale`, whose backward makes ``dx`` and ``dl`` in one pass over
the activations. Backward keeps what PEFT's keeps: the input x (feed-forward) or the pre-scaling output.

Over a GGUF block base (:class:`pyfastpeft.nn.GGUFLinear`) the forward is the same, the base product
being the block kernel; merging is refused, since it would re-quantize the blocks.

Files: ``base_model.model.<path>.ia3_l`` per adapted module, PEFT's exact keys and shapes, plus
modules_to_save as ``base_model.model.<path>.<param>``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ... import ops
from ...nn.gguf import GGUFLinear
from ..layers import BaseLayerPassthrough, is_conv1d


def is_feedforward(path: str, feedforward_modules: list[str] | str | None) -> bool:
    """PEFT's rule: a regex must match the full path; a list entry matches with a plain ``endswith``."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, path) is not None
    return any(path.endswith(f) for f in feedforward_modules)


class IA3Linear(BaseLayerPassthrough, nn.Module):
    """(IA)³ on ``nn.Linear`` (weight [out, in]), Conv1D (weight [in, out]) or ``GGUFLinear`` (GGUF
    blocks, never merged); several named vectors, one set active. ``ia3_l[name]`` is [1, in] for a
    feed-forward layer, [out, 1] otherwise."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        # a GGUF block base: no float weight; the vectors live in float32 beside the blocks
        self.block_base = isinstance(base_layer, GGUFLinear)
        if is_conv1d(base_layer):
            self.fan_in_fan_out = True
            self.in_features, self.out_features = base_layer.weight.shape
        elif isinstance(base_layer, nn.Linear) or self.block_base:
            self.fan_in_fan_out = False
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            raise ValueError(
                f"base_layer: expected nn.Linear, transformers' Conv1D or GGUFLinear, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.is_feedforward = feedforward
        self.ia3_l = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []

    def update_layer(self, name: str, init: bool) -> None:
        if self.block_base:
            device, dtype = self.base_layer.blocks.device, torch.float32
        else:
            device, dtype = self.base_layer.weight.device, self.base_layer.weight.dtype
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vector = torch.ones(shape) if init else torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(vector.to(device=device, dtype=dtype))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
        del self.ia3_l[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _scale_oi(self, name: str, acc: torch.dtype) -> torch.Tensor:
        """The vector shaped to broadcast over the [out, in] weight."""
        return self.ia3_l[name].detach().to(acc)

    def _weight_oi(self) -> torch.Tensor:
        if self.block_base:  # a new float tensor: for reports, never on the forward path
            with torch.no_grad():
                return self.base_layer.dequantized_weight(torch.float32)
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of the [out, in] weight that merging ``name`` makes (float32; float64 for float64)."""
        w = self._weight_oi().detach()
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        scale = self._scale_oi(name, acc)
        w = w.to(acc)
        if name in self.merged_adapters:  # the base holds W·l now
            w = w / scale
        return w * (scale - 1)

    def check_mergeable(self, names: list[str]) -> None:
        """Raises if merging ``names`` would have to change a GGUF block base."""
        if self.block_base and any(n in self.ia3_l and n not in self.merged_adapters for n in names):
            raise ValueError(
                f"merge: the base is a {type(self.base_layer).__name__}; merging the (IA)³ scales into its GGUF "
                "blocks would re-quantize them. Keep the adapter separate, or merge into the float model"
            )

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        self.check_mergeable(names)
        for name in names:
            if name in self.merged_adapters or name not in self.ia3_l:
                continue
            w = self._weight_oi()
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            w.copy_((w.to(acc) * self._scale_oi(name, acc)).to(w.dtype))
            bias = self.bias
            if not self.is_feedforward and bias is not None:
                bias.copy_((bias.to(acc) * self.ia3_l[name].reshape(bias.shape).to(acc)).to(bias.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            if bool((self.ia3_l[name] == 0).any()):
                raise ValueError(
                    f"unmerge: adapter {name!r} has zero scales, so the merged weights cannot be divided back; "
                    "reload the base weights instead"
                )
            self.merged_adapters.pop()
            w = self._weight_oi()
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            w.copy_((w.to(acc) / self._scale_oi(name, acc)).to(w.dtype))
            bias = self.bias
            if not self.is_feedforward and bias is not None:
                bias.copy_((bias.to(acc) / self.ia3_l[name].reshape(bias.shape).to(acc)).to(bias.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[active[0]].flatten()
        for name in active[1:]:
            scale = scale * self.ia3_l[name].flatten()
        # pyfastpeft.ops.ia3_scale: x ⊙ l whose backward makes dx and dl in one pass
        if self.is_feedforward:
            return self.base_layer(ops.ia3_scale(x, scale.to(x.dtype)), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return ops.ia3_scale(y, scale.to(y.dtype))

    def extra_repr(self) -> str:
        kind = "input" if self.is_feedforward else "output"
        return f"scales={kind}, adapters={list(self.ia3_l)}"

"""The weights an adapted model computes with, by their names in the base model: what ``compare``,
``report`` and ``merge`` measure a method's change of the base by, whatever the method."""

from __future__ import annotations

import torch

from ..nn import FakeQuantLinear, SparseDeltaLinear
from .lora.layer import LoraLinear


@torch.no_grad()
def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model computes with, by their names in the base model: LoRA (and DoRA) merged
    in, a sparse delta added, a fake-quantized weight as it is quantized."""
    skip = {id(m.delta) for m in model.modules() if isinstance(m, SparseDeltaLinear)}
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name or id(p) in skip:
            continue
        out[name.replace(".base_layer.", ".")] = p.detach().double()
    # the base layers first (a LoRA layer's base may be fake-quantized), then the LoRA updates
    for name, m in model.named_modules():
        key = f"{name}.weight".replace(".base_layer.", ".")
        if isinstance(m, FakeQuantLinear):
            out[key] = m.quantized_weight().detach().double()
        elif isinstance(m, SparseDeltaLinear):
            out[key] = out[key] + m.delta_weight().double()
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):  # Conv1D stores [in, out]
            delta = sum(m.delta_weight(a).double() for a in m.active_adapters if a not in m.merged_adapters)
            if isinstance(delta, torch.Tensor):
                w = out[f"{name}.weight"]
                out[f"{name}.weight"] = w + (delta if w.shape == delta.shape else delta.t())
    return out

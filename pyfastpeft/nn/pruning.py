"""Magnitude pruning, unstructured or 2:4, whose zeros survive training.

The pruned entries are zeroed and a gradient hook multiplies the weight's gradient by the mask. With a
zero value and a zero gradient, AdamW's moments stay zero and its update (m / (√v + eps), decay of 0)
is exactly zero, so the pruned weights stay exactly zero through training with no optimizer change.
"""

from __future__ import annotations

import torch
from torch import nn


def magnitude_mask(weight: torch.Tensor, sparsity: float = 0.5, pattern: str = "unstructured") -> torch.Tensor:
    """Bool mask of the weights to keep. ``unstructured``: all but the ``sparsity`` fraction with the
    smallest |w|; ``2:4``: the two largest |w| in every group of four consecutive inputs (50 %)."""
    w = weight.detach().abs().float()
    if pattern == "unstructured":
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity: expected a value in [0, 1), got {sparsity}")
        n_prune = int(sparsity * w.numel())
        keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        if n_prune:
            keep[torch.topk(w.flatten(), n_prune, largest=False, sorted=False).indices] = False
        return keep.view_as(weight)
    if pattern == "2:4":
        if w.shape[-1] % 4 != 0:
            raise ValueError(f"weight: 2:4 pruning needs in_features divisible by 4, got shape {tuple(w.shape)}")
        groups = w.reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, torch.topk(groups, 2, dim=1).indices, True)
        return keep.view_as(weight)
    raise ValueError(f"pattern: expected 'unstructured' or '2:4', got {pattern!r}")


@torch.no_grad()
def prune_magnitude_(module: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured") -> torch.Tensor:
    """Prunes ``module.weight`` in place and masks its future gradients; returns the keep mask (also
    stored as the buffer ``weight_mask``)."""
    mask = magnitude_mask(module.weight, sparsity, pattern)
    module.weight.mul_(mask.to(module.weight.dtype))
    module.register_buffer("weight_mask", mask)
    module.weight.register_hook(lambda grad: grad * module.weight_mask.to(grad.dtype))
    return mask

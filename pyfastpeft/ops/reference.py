"""Plain-PyTorch references of every op. Tests compare the kernels against these in float64;
benchmarks time them as the eager baseline."""

from __future__ import annotations

import torch


def lora_linear(x, weight, bias, lora_A, lora_B, scaling=1.0, dropout_mask=None, dropout_p=0.0):
    """Hugging Face PEFT's LoRA formula: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``.

    ``dropout_mask`` (same shape as x, 0/1) fixes the dropout so the result can be compared exactly.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    return y + (xd @ lora_A.t() @ lora_B.t()) * scaling


def sampled_weight_grad(grad_y, x, indices, in_features):
    """The dense weight gradient ``grad_yᵀ·x`` gathered at the flat indices."""
    dense = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, in_features)
    return dense.reshape(-1)[indices.long()]


def sparse_delta_linear(x, weight, bias, delta, indices):
    """``linear(x, W₀ + Δ, b)`` with Δ scattered densely (differentiable in x, bias and delta)."""
    dense = torch.zeros(weight.numel(), dtype=delta.dtype, device=delta.device).index_put((indices.long(),), delta)
    return torch.nn.functional.linear(x, weight + dense.view_as(weight), bias)

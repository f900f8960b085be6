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


def multi_lora_linear(
    x, weight, bias, lora_A, lora_B, scalings, adapter_indices, dropout_mask=None, dropout_p=0.0
):
    """Each adapter run separately on its own tokens with :func:`lora_linear`, the base layer alone on
    the tokens with index -1, and the rows put back in token order (what a mixed batch must equal)."""
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)
    idx = adapter_indices.reshape(-1).long()
    mask2 = None if dropout_mask is None else dropout_mask.reshape(-1, in_features)
    rows = []
    order = []
    for k in [-1, *range(lora_A.shape[0])]:
        sel = (idx == k).nonzero().flatten()
        if sel.numel() == 0:
            continue
        xs = x2[sel]
        if k < 0:
            rows.append(torch.nn.functional.linear(xs, weight, bias))
        else:
            mk = None if mask2 is None else mask2[sel]
            s_k = float(scalings[k])
            rows.append(lora_linear(xs, weight, bias, lora_A[k], lora_B[k], s_k, mk, dropout_p))
        order.append(sel)
    y = torch.cat(rows)[torch.argsort(torch.cat(order))]
    return y.reshape(*x.shape[:-1], weight.shape[0])

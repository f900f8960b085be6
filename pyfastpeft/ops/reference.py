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

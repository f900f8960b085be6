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


def philox4x32_10(counter_lo, counter_hi: int, key: int):
    """Philox4x32-10 on numpy arrays of 64-bit counters (the spec csrc/include/pyfastpeft/philox.h
    implements); returns the four 32-bit words as uint64 arrays."""
    import numpy as np

    m32 = np.uint64(0xFFFFFFFF)
    ctr = np.asarray(counter_lo, dtype=np.uint64)
    c0, c1 = ctr & m32, ctr >> np.uint64(32)
    c2 = np.full_like(c0, counter_hi & 0xFFFFFFFF)
    c3 = np.full_like(c0, (counter_hi >> 32) & 0xFFFFFFFF)
    k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0),
            p1 & m32,
            (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1),
            p0 & m32,
        )
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def philox_keep_mask(numel: int, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The keep mask (bool, flat) every pyfastpeft dropout draws for ``numel`` elements."""
    import numpy as np

    e = np.arange(numel, dtype=np.int64)
    block = (e // 128) * 16 + e % 16
    lane = (e % 128) // 16
    words = np.stack(philox4x32_10(block.astype(np.uint64), offset, seed))
    word = words[lane // 2, np.arange(numel)]
    u16 = (word >> (16 * (lane % 2)).astype(np.uint64)) & np.uint64(0xFFFF)
    threshold = min(int(p * 65536.0 + 0.5), 65535)
    return torch.from_numpy(u16 >= threshold)
def sampled_weight_grad(grad_y, x, indices, in_features):
    """The dense weight gradient ``grad_yᵀ·x`` gathered at the flat indices."""
    dense = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, in_features)
    return dense.reshape(-1)[indices.long()]


def sparse_delta_linear(x, weight, bias, delta, indices):
    """``linear(x, W₀ + Δ, b)`` with Δ scattered densely (differentiable in x, bias and delta)."""
    dense = torch.zeros(weight.numel(), dtype=delta.dtype, device=delta.device).index_put((indices.long(),), delta)
    return torch.nn.functional.linear(x, weight + dense.view_as(weight), bias)

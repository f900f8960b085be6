"""DoRA's row norm over a GGUF block base (:class:`pyfastpeft.nn.GGUFLinear`) without its float weight.

DoRA rescales each output row by ``m / ‖W_i + s·(B·A)_i‖``. Over blocks, the sum under the root is
expanded so that no weight-sized float tensor is built::

    ‖W_i + s·(B·A)_i‖² = ‖W_i‖² + 2s · Σ_k B_ik (A·Wᵀ)_ki + s² · B_i (A·Aᵀ) B_iᵀ

``‖W_i‖²`` never changes (the base is frozen): it is computed once, de-quantizing a bounded number of
rows at a time. ``A·Wᵀ`` is the block kernel run on A's r rows as if they were tokens; ``A·Aᵀ`` is r × r.
Everything is float64 and detached (the norm is a constant for autograd, as in PEFT).
"""

from __future__ import annotations

import torch

from ... import ops

# Rows de-quantized at once for ‖W_i‖²: bounds the temporary to ROWS_PER_SLICE × in_features floats.
ROWS_PER_SLICE = 256


@torch.no_grad()
def row_square_norms(blocks: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """``‖W_i‖²`` for every row of the block weight, float64 ``[rows]``, a slice of rows at a time."""
    out = torch.empty(blocks.shape[0], dtype=torch.float64, device=blocks.device)
    for start in range(0, blocks.shape[0], ROWS_PER_SLICE):
        rows = ops.gguf_dequantize(blocks[start : start + ROWS_PER_SLICE], qtype, in_features, torch.float64)
        out[start : start + rows.shape[0]] = rows.square().sum(dim=1)
    return out


@torch.no_grad()
def dora_row_norm(
    row_sq: torch.Tensor,
    blocks: torch.Tensor,
    qtype: int,
    in_features: int,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``‖W_i + s·(B·A)_i‖`` per output row, float64 ``[out]``, detached.

    Args:
        row_sq: ``‖W_i‖²`` (:func:`row_square_norms`).
        blocks, qtype, in_features: the base's GGUF weight ``[out, in]``.
        a, b: the adapter's ``A [r, in]`` and ``B [out, r]``.
        scaling: ``s``.
    """
    a = a.detach().to(device=blocks.device, dtype=torch.float64)
    b = b.detach().to(device=blocks.device, dtype=torch.float64)
    aw = ops.gguf_linear(a, blocks, qtype, in_features)  # A·Wᵀ: [r, out]
    cross = (b * aw.t()).sum(dim=1)
    update_sq = ((b @ (a @ a.t())) * b).sum(dim=1)
    # rounding can push a (near-)zero sum of squares below zero
    return (row_sq + 2.0 * scaling * cross + scaling * scaling * update_sq).clamp_min(0.0).sqrt()

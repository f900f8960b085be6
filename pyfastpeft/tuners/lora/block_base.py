"""LoRA and DoRA over a GGUF block base (:class:`pyfastpeft.nn.GGUFLinear`), without its float weight:
the forward :class:`~pyfastpeft.tuners.lora.layer.LoraLinear` runs over such a base, and DoRA's row norm.

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


class BlockBaseForward:
    """:class:`~pyfastpeft.tuners.lora.layer.LoraLinear`'s forward over a GGUF block base (``block_base``):
    the block kernel for the base product, the rank-r products added, DoRA's norm from the functions
    above. Reads the layer's adapter tables (``lora_A``, ``lora_B``, ``lora_magnitude_vector``,
    ``scaling``, ``dropout_p``, ``use_dora``), its non-persistent ``block_row_sq_norms`` buffer and its
    rank-r helpers ``_down`` and ``_update``."""

    def _block_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """``base(x) + Σ s·B·A·dropout(x)`` over a GGUF block base: the base product is the block kernel
        (its backward reads the blocks again; nothing weight-sized is saved), the rank-r products are
        plain matmuls and the dropout is the Philox op, which regenerates its mask for the backward.
        DoRA: ``m / ‖W + s·B·A‖ ⊙ (W x + s·B·A·dropout(x)) + b``, as the float path."""
        dtype = self._compute_dtype(x)
        x = x.to(dtype)
        base = self.base_layer
        if not any(self.use_dora[n] for n in active):
            y = base(x)
            for name in active:
                # y + s·(A·dropout(x))·Bᵀ as one addmm: no [tokens, out] temporaries beside y
                u = self._down(x, name)
                out = torch.addmm(
                    y.reshape(-1, self.out_features),
                    u.reshape(-1, u.shape[-1]),
                    self.lora_B[name].weight.to(x.dtype).t(),
                    alpha=self.scaling[name],
                )
                y = out.view(y.shape)
            return y
        # DoRA rescales W x, so the block kernel runs without the bias, which is added after the scale
        wx = ops.gguf_linear(x, base.blocks, base.qtype, base.in_features)
        if len(active) == 1:
            y = (wx + self._update(x, active[0])) * self._block_dora_scale(active[0], dtype)
        else:  # several active adapters, as the float path: each adds its output minus the shared W x
            y = wx
            for name in active:
                u = self._update(x, name)
                y = y + ((wx + u) * self._block_dora_scale(name, dtype) - wx if self.use_dora[name] else u)
        bias = base.bias
        return y if bias is None else y + bias.to(dtype)

    def _block_row_sq(self) -> torch.Tensor:
        """``‖W_i‖²`` of the block base (float64), computed once; again only if the blocks were written
        in place (a loaded state dict) or the cache was cast away from float64."""
        base = self.base_layer
        cached = self.block_row_sq_norms
        if cached is not None and torch.compiler.is_compiling():  # version counters are not traced
            return cached
        stale = (
            cached is None
            or cached.dtype != torch.float64
            or cached.device != base.blocks.device
            or self._block_row_sq_version != base.blocks._version
        )
        if stale:
            self.block_row_sq_norms = row_square_norms(base.blocks, base.qtype, base.in_features)
            self._block_row_sq_version = base.blocks._version
        return self.block_row_sq_norms

    def _block_dora_norm(self, name: str) -> torch.Tensor:
        """``‖W + s·B·A‖`` per row over the blocks (float64, detached), without the float weight."""
        base = self.base_layer
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return dora_row_norm(self._block_row_sq(), base.blocks, base.qtype, base.in_features, a, b, self.scaling[name])

    def _block_dora_scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """DoRA's ``m / ‖W + s·B·A‖`` over the blocks, divided in float64 and rounded once to ``dtype``."""
        m = self.lora_magnitude_vector[name].weight
        return (m.to(torch.float64) / self._block_dora_norm(name).to(m.device)).to(dtype)

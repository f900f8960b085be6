"""Sparse-delta linear: ``y = x·(W₀ + Δ)ᵀ + b`` with Δ non-zero at k sorted flat indices.

The backward computes Δ's gradient only at those indices with the sampled-gradient kernel
(``dΔ_j = Σ_n dy[n, row_j]·x[n, col_j]``) and never forms a dense weight gradient; W₀ is frozen.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._checks import check_same_device

_OP = torch.ops.pyfastpeft


@torch.library.register_fake("pyfastpeft::sampled_weight_grad")
def _sampled_weight_grad_fake(grad_y, x, indices, in_features):
    check_same_device("x", x, grad_y=grad_y, indices=indices)
    return x.new_empty((indices.shape[0],))


@torch.library.register_fake("pyfastpeft::sparse_delta_linear")
def _sparse_delta_linear_fake(x, weight, bias, delta, indices):
    check_same_device("x", x, weight=weight, bias=bias, delta=delta, indices=indices)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("pyfastpeft::sparse_delta_linear_backward")
def _sparse_delta_linear_backward_fake(grad_y, x, weight, delta, indices, output_mask):
    check_same_device("x", x, grad_y=grad_y, weight=weight, delta=delta, indices=indices)
    need_dx, need_db, need_ddelta = output_mask
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
        x.new_empty((weight.shape[0],)) if need_db else x.new_empty((0,)),
        x.new_empty((indices.shape[0],)) if need_ddelta else x.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, delta, indices = inputs
    ctx.save_for_backward(x, weight, delta, indices)


@once_differentiable  # the backward op has no derivative: differentiating twice raises, never gives zeros
def _backward(ctx, grad_y):
    x, weight, delta, indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[1]:
        raise RuntimeError("sparse_delta_linear: weight (W₀) is frozen; train the delta instead")
    mask = [need[0], need[2], need[3]]
    dx, db, ddelta = _OP.sparse_delta_linear_backward(grad_y, x, weight, delta, indices, mask)
    return (dx if mask[0] else None), None, (db if mask[1] else None), (ddelta if mask[2] else None), None


torch.library.register_autograd("pyfastpeft::sparse_delta_linear", _backward, setup_context=_setup_context)


def _sampled_setup_context(ctx, inputs, output):
    grad_y, x, indices, in_features = inputs
    ctx.in_features = in_features
    ctx.save_for_backward(grad_y, x, indices)


def _sampled_backward(ctx, grad):
    # out_j = Σ_n gy[n, r_j]·x[n, c_j]. With G the [out, in] matrix holding grad_j at (r_j, c_j)
    # (repeated indices add up): d gy = x·Gᵀ and d x = gy·G. A dense G is the simple, rare path: this
    # is the gradient of a gradient.
    grad_y, x, indices = ctx.saved_tensors
    out_features = grad_y.shape[-1]
    dense = grad.new_zeros(out_features * ctx.in_features).index_add(0, indices.long(), grad)
    dense = dense.view(out_features, ctx.in_features)
    need_gy, need_x = ctx.needs_input_grad[:2]
    return (x @ dense.t() if need_gy else None), (grad_y @ dense if need_x else None), None, None


torch.library.register_autograd(
    "pyfastpeft::sampled_weight_grad", _sampled_backward, setup_context=_sampled_setup_context
)


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """``x·(W₀ + Δ)ᵀ + b`` where ``Δ.view(-1)[indices] = delta`` and Δ is zero elsewhere.

    Args:
        x: ``[..., in]``. weight: W₀ ``[out, in]``, frozen. bias: ``[out]`` or None.
        delta: ``[k]`` values of Δ. indices: ``[k]`` strictly increasing flat indices (int64 or int32).
    """
    if weight.requires_grad:
        raise ValueError("weight: W₀ must not require grad in sparse fine-tuning (train `delta` instead)")
    return _OP.sparse_delta_linear(x, weight, bias, delta, indices)


def sampled_weight_grad(grad_y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(grad_yᵀ·x).view(-1)[indices]`` without forming the dense product: ``[k]`` in x's dtype.

    ``indices`` (int64 or int32) may come in any order and repeat. Differentiable in grad_y and x.
    """
    return _OP.sampled_weight_grad(grad_y, x, indices, int(in_features))

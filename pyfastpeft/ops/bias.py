"""BitFit linear: ``y = x·Wᵀ + b`` with ``W`` frozen and only ``b`` trained.

The forward saves only ``W`` (a parameter, not an activation): ``dx = dy·W`` and ``db = Σ_n dy[n, :]``
need nothing of ``x``. The backward op makes both in one pass over ``dy``.
"""

from __future__ import annotations

import torch

from ._checks import check_same_device

_OP = torch.ops.pyfastpeft


@torch.library.register_fake("pyfastpeft::bias_only_linear")
def _bias_only_linear_fake(x, weight, bias):
    check_same_device("x", x, weight=weight, bias=bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("pyfastpeft::bias_only_linear_backward")
def _bias_only_linear_backward_fake(grad_y, weight, output_mask):
    check_same_device("grad_y", grad_y, weight=weight)
    need_dx, need_db = output_mask
    dx = grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1])) if need_dx else grad_y.new_empty((0,))
    db = grad_y.new_empty((weight.shape[0],)) if need_db else grad_y.new_empty((0,))
    return dx, db


def _setup_context(ctx, inputs, output):
    _, weight, _ = inputs
    ctx.save_for_backward(weight)  # never x: the backward does not need it


def _backward(ctx, grad_y):
    # W gets no gradient: the op keeps it frozen by definition
    need = ctx.needs_input_grad
    mask = [need[0], need[2]]
    if not any(mask):
        return None, None, None
    (weight,) = ctx.saved_tensors
    dx, db = _OP.bias_only_linear_backward(grad_y, weight, mask)
    return (dx if mask[0] else None), None, (db if mask[1] else None)


torch.library.register_autograd("pyfastpeft::bias_only_linear", _backward, setup_context=_setup_context)


def bias_only_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x·Wᵀ + b`` whose backward saves no input activation.

    Args:
        x: ``[..., in]`` input, any leading dimensions, any strides.
        weight: ``[out, in]`` frozen weight (``requires_grad`` must be False).
        bias: ``[out]`` trainable bias.
    """
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"bias: expected a tensor [out_features] (BitFit trains the bias), got {type(bias).__name__}")
    if weight.requires_grad:
        raise ValueError("weight: bias_only_linear keeps W frozen; pass a weight with requires_grad=False")
    return _OP.bias_only_linear(x, weight, bias)

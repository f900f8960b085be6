"""(IA)³ feature scaling: ``y = x ⊙ l`` over the last dimension, with a fused backward.

``dx = dy ⊙ l`` and ``dl = Σ_rows dy ⊙ x`` come from one pass over ``dy`` and ``x`` (autograd's multiply
would make ``dy ⊙ l``, then ``dy ⊙ x`` as a full-size temporary, then its column sum).
"""

from __future__ import annotations

import torch

from ._checks import check_same_device

_OP = torch.ops.pyfastpeft


@torch.library.register_fake("pyfastpeft::ia3_scale")
def _ia3_scale_fake(x, scale):
    check_same_device("x", x, scale=scale)
    torch._check(scale.dim() == 1 and scale.shape[0] == x.shape[-1], lambda: "scale: expected [x.shape[-1]]")
    return torch.empty_like(x)


@torch.library.register_fake("pyfastpeft::ia3_scale_backward")
def _ia3_scale_backward_fake(grad_y, x, scale, output_mask):
    check_same_device("x", x, grad_y=grad_y, scale=scale)
    need_dx, need_dl = output_mask
    dx = grad_y.new_empty(grad_y.shape) if need_dx else grad_y.new_empty((0,))
    dl = grad_y.new_empty(scale.shape) if need_dl else grad_y.new_empty((0,))
    return dx, dl


def _setup_context(ctx, inputs, output):
    x, scale = inputs
    # x is kept only when the scale trains: dx = dy ⊙ scale needs only the scale
    ctx.need_dl = scale.requires_grad
    ctx.save_for_backward(x if ctx.need_dl else None, scale)


def _backward(ctx, grad_y):
    x, scale = ctx.saved_tensors
    need_dx, need_dl = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.need_dl
    if not (need_dx or need_dl):
        return None, None
    # without a saved x dl is not asked for, and grad_y stands in for it
    dx, dl = _OP.ia3_scale_backward(grad_y, x if x is not None else grad_y, scale, [need_dx, need_dl])
    return (dx if need_dx else None), (dl if need_dl else None)


torch.library.register_autograd("pyfastpeft::ia3_scale", _backward, setup_context=_setup_context)


def ia3_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x ⊙ scale`` over the last dimension of ``x`` (any leading dimensions, any strides).

    Args:
        x: ``[..., d]`` float tensor.
        scale: ``[d]`` vector of x's dtype and device.
    """
    return _OP.ia3_scale(x, scale)

"""Philox dropout: ``x ⊙ mask / (1 - p)`` with the counter-based mask every pyfastpeft op draws.

The mask of element ``i`` (row-major index) depends only on (seed, offset, i) and is the same on the CPU
and on CUDA (``csrc/include/pyfastpeft/philox.h``), so the LoRA ops' fused dropout and this op agree
element for element, and a backward regenerates the mask instead of saving it.
"""

from __future__ import annotations

import torch

from . import _rng
from ._checks import check_same_device

_OP = torch.ops.pyfastpeft


@torch.library.register_fake("pyfastpeft::philox_dropout")
def _philox_dropout_fake(x, p, rng_state):
    check_same_device("x", x, rng_state=rng_state)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _philox_dropout_setup_context(ctx, inputs, output):
    _, p, rng_state = inputs
    ctx.p = p
    ctx.save_for_backward(rng_state)


def _philox_dropout_backward(ctx, grad):
    # d(x ⊙ m / (1 − p)) / dx = m / (1 − p): the same mask, regenerated from the same [seed, offset].
    (rng_state,) = ctx.saved_tensors
    return _OP.philox_dropout(grad, ctx.p, rng_state), None, None


torch.library.register_autograd(
    "pyfastpeft::philox_dropout", _philox_dropout_backward, setup_context=_philox_dropout_setup_context
)


def philox_dropout(x: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
    """``x ⊙ mask / (1 - p)`` with the Philox mask of every pyfastpeft op; differentiable in x (the
    backward regenerates the mask, nothing is saved but [seed, offset]).

    Args:
        x: float tensor, any shape and strides (the mask follows the row-major element index).
        p: drop probability in [0, 1).
        seed: None draws one from torch's generator; the same seed gives the same mask on every device
            and the mask :func:`pyfastpeft.ops.lora_linear` applies for that seed.
    """
    return _OP.philox_dropout(x, float(p), _rng.rng_state(seed, x.device))


# ``dropout(x) · weightᵀ`` for a small weight (LoRA's A over a base the fused LoRA op cannot read, such as
# GGUF blocks): the dropped input is not kept for the backward but regenerated from x and the same
# [seed, offset], which autograd holds anyway; composed of the philox_dropout kernel and a matmul.
@torch.library.custom_op("pyfastpeft::dropout_linear", mutates_args=())
def _dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float, rng_state: torch.Tensor) -> torch.Tensor:
    check_same_device("x", x, weight=weight, rng_state=rng_state)
    return torch.nn.functional.linear(_OP.philox_dropout(x, p, rng_state), weight)


@_dropout_linear.register_fake
def _dropout_linear_fake(x, weight, p, rng_state):
    check_same_device("x", x, weight=weight, rng_state=rng_state)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _dropout_linear_setup_context(ctx, inputs, output):
    x, weight, p, rng_state = inputs
    ctx.p = p
    ctx.save_for_backward(x, weight, rng_state)


def _dropout_linear_backward(ctx, grad):
    x, weight, rng_state = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        # d/dx of (x ⊙ m / (1 − p)) · Wᵀ: (grad · W) ⊙ m / (1 − p), the mask of x's shape regenerated
        grad_x = _OP.philox_dropout(grad.matmul(weight), ctx.p, rng_state)
    if ctx.needs_input_grad[1]:
        dropped = _OP.philox_dropout(x, ctx.p, rng_state)
        grad_w = grad.reshape(-1, weight.shape[0]).t().matmul(dropped.reshape(-1, weight.shape[1]))
    return grad_x, grad_w, None, None


_dropout_linear.register_autograd(_dropout_linear_backward, setup_context=_dropout_linear_setup_context)


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
    """``philox_dropout(x, p) · weightᵀ`` whose backward regenerates the dropped input from ``x`` instead
    of keeping it: for a small weight (LoRA's ``A``, ``[r, in]``), the one activation-sized tensor a
    dropout-then-linear would save is gone.

    Args:
        x: ``[..., in]`` float tensor, any strides (the mask follows the row-major element index, as in
            :func:`philox_dropout`).
        weight: ``[out, in]`` with x's dtype and device.
        p: drop probability in [0, 1).
        seed: as in :func:`philox_dropout`; the same seed drops the same elements.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x: expected a floating-point tensor [..., in], got {_describe(x)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected [out, {x.shape[-1]}] (in = x's last dimension), got {_describe(weight)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: expected x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected x's device {x.device}, got {weight.device}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"p: expected a drop probability in [0, 1), got {p}")
    return _dropout_linear(x, weight, float(p), _rng.rng_state(seed, x.device))


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__

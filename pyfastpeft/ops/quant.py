"""Fake quantization in one pass: scales, codes and the dequantized tensor (csrc/ops/quant).

Scheme (``group_size``): ``0`` per tensor, ``-1`` per channel along ``axis``, ``g > 0`` groups of ``g``
consecutive elements along the last dimension. Per-token dynamic activation quantization is the group
case with ``group_size = x.shape[-1]`` (one group per row). With ``qmin = -2^(bits-1)``,
``qmax = 2^(bits-1) - 1`` and ``acc`` = float32 (float64 for float64 inputs), per group::

    symmetric:   s = acc(amax / ((qmax - qmin) / 2)),                 z = 0
    asymmetric:  lo = min(min, 0), hi = max(max, 0)
                 s = acc((hi - lo) / (qmax - qmin)),  z = clamp(qmin - rint(acc(lo / s)), qmin, qmax)
    s = max(s, float32 eps)                  # an all-zero group gives exact zeros, never NaN
    q = rint(x * acc(1 / s)) + z             # round half to even
    out = (clamp(q, qmin, qmax) - z) * s

which is ``torch.fake_quantize_per_channel_affine`` / ``..._per_tensor_affine`` given ``(s, z)``, with the
scale rule of PyTorch's MinMax observers. Non-finite input: a group holding NaN or ±inf gets ``s = NaN``,
``z = 0``, an all-NaN output and a zero gradient; other groups are unaffected.

Backward (straight-through estimator): ``dx = dy`` where ``qmin <= q <= qmax``, else 0 — the mask is
recomputed from x and the scales, never saved. The learnable-scale variant (LSQ, :func:`fake_quantize_lsq`)
returns gradients for the scale (and zero point), reduced per group inside the kernel.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_same_device

_OP = torch.ops.pyfastpeft
QUANT_EPS = torch.finfo(torch.float32).eps  # the smallest scale, as PyTorch's observers


def _scale_shape(x: torch.Tensor, group_size: int, axis: int) -> tuple[int, ...]:
    if group_size == 0:
        return ()
    if group_size == -1:
        return (x.shape[axis],)
    return (*x.shape[:-1], x.shape[-1] // group_size)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("pyfastpeft::fake_quantize")
def _fake_quantize_fake(x, bits, group_size, symmetric, axis):
    shape = _scale_shape(x, group_size, axis)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, x.new_empty(shape, dtype=_acc_dtype(x)), x.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("pyfastpeft::fake_quantize_backward")
def _fake_quantize_backward_fake(grad_out, x, scale, zero_point, bits, group_size, axis):
    check_same_device("x", x, grad_out=grad_out, scale=scale, zero_point=zero_point)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyfastpeft::fake_quantize_lsq")
def _fake_quantize_lsq_fake(x, scale, zero_point, bits, group_size, axis, grad_factor):
    check_same_device("x", x, scale=scale, zero_point=zero_point)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyfastpeft::fake_quantize_lsq_backward")
def _fake_quantize_lsq_backward_fake(grad_out, x, scale, zero_point, bits, group_size, axis, grad_factor, need_grad_x):
    check_same_device("x", x, grad_out=grad_out, scale=scale, zero_point=zero_point)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_x else x.new_empty((0,))
    dz = torch.empty_like(scale) if zero_point is not None else scale.new_empty((0,))
    return dx, torch.empty_like(scale), dz


def _fq_setup_context(ctx, inputs, output):
    x, bits, group_size, symmetric, axis = inputs
    _, scale, zero_point = output
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (bits, group_size, axis)
    ctx.mark_non_differentiable(scale, zero_point)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable scale outputs


def _fq_backward(ctx, grad_out, _grad_scale, _grad_zero_point):
    if grad_out is None:
        return None, None, None, None, None
    x, scale, zero_point = ctx.saved_tensors
    return _OP.fake_quantize_backward(grad_out, x, scale, zero_point, *ctx.args), None, None, None, None


torch.library.register_autograd("pyfastpeft::fake_quantize", _fq_backward, setup_context=_fq_setup_context)


def _lsq_setup_context(ctx, inputs, output):
    x, scale, zero_point, bits, group_size, axis, grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (bits, group_size, axis)
    ctx.grad_factor = grad_factor


def _lsq_backward(ctx, grad_out):
    x, scale, zero_point = ctx.saved_tensors
    bits, group_size, axis = ctx.args
    need = ctx.needs_input_grad
    dx, dscale, dzero = _OP.fake_quantize_lsq_backward(
        grad_out, x, scale, zero_point, bits, group_size, axis, ctx.grad_factor, need[0]
    )
    return (
        dx if need[0] else None,
        dscale if need[1] else None,
        dzero if (zero_point is not None and need[2]) else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("pyfastpeft::fake_quantize_lsq", _lsq_backward, setup_context=_lsq_setup_context)


def _check_scheme(x: torch.Tensor, group_size: int, axis: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ValueError(f"group_size: expected an int, got {group_size!r}")
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(f"axis: expected an int, got {axis!r}")


def fake_quantize(
    x: torch.Tensor, bits: int = 8, group_size: int = -1, symmetric: bool = True, axis: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and dequantize ``x`` in one pass; returns ``(out, scale, zero_point)``.

    Args:
        x: float32, bfloat16 or float16 (float64 too, for gradcheck), any shape and strides.
        bits: code width in [2, 8] (int8, int4, int2, ...).
        group_size: ``0`` per tensor, ``-1`` per channel along ``axis``, ``g > 0`` groups of ``g`` along the
            last dimension (``g`` must divide it).
        symmetric: zero point 0 and ``s = amax / ((qmax - qmin) / 2)``; else min/max with a zero point.
        axis: the channel dimension for ``group_size = -1``.

    ``out`` has x's shape and dtype; ``scale`` (float32, float64 for float64 x) and ``zero_point`` (int32)
    have shape ``[]`` per tensor, ``[x.shape[axis]]`` per channel, ``[*x.shape[:-1], x.shape[-1] // g]`` per
    group. Gradients flow to x only (straight-through, the clipping mask recomputed in the backward).
    """
    _check_scheme(x, group_size, axis)
    return _OP.fake_quantize(x, int(bits), group_size, bool(symmetric), axis)


def lsq_grad_factor(x: torch.Tensor, bits: int, group_size: int, axis: int = 0) -> float:
    """LSQ's scale-gradient factor ``1 / sqrt(elements per group · qmax)``."""
    per_group = x.numel() // max(1, math.prod(_scale_shape(x, group_size, axis)))
    return 1.0 / math.sqrt(max(1, per_group) * (2 ** (bits - 1) - 1))


def fake_quantize_lsq(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    bits: int = 8,
    group_size: int = -1,
    axis: int = 0,
    grad_factor: float | None = None,
) -> torch.Tensor:
    """Fake quantization with a learnable scale (LSQ; LSQ+ with a learnable ``zero_point``).

    ``scale`` (and ``zero_point``) have the shape :func:`fake_quantize` returns for the scheme, any float
    dtype; they are used in float32 (float64 for float64 x), the scale clamped to at least float32 eps and
    the zero point rounded half to even and clamped to the code range, as
    ``torch._fake_quantize_learnable_per_channel_affine`` does. Gradients (reduced per group in the kernel,
    no full-size temporaries)::

        in range:  dx = dy,  ds = Σ dy·(rint(x/s) - x/s)
        clipped:   dx = 0,   ds = Σ dy·(qmin - z or qmax - z),  dz = Σ -dy·s

    with ``ds``, ``dz`` multiplied by ``grad_factor`` (default: LSQ's ``1/sqrt(group elements · qmax)``).
    """
    _check_scheme(x, group_size, axis)
    acc = _acc_dtype(x)
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x, bits, group_size, axis)
    z = zero_point.to(acc) if zero_point is not None else None
    return _OP.fake_quantize_lsq(x, scale.to(acc), z, int(bits), group_size, axis, float(grad_factor))

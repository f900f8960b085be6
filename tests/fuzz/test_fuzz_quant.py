"""Fuzz: fake quantization (min/max scales) and LSQ (learnable scales) against the float64 formula,
forward and backward, every scheme, any shapes (0 and 1 included), layouts and dtypes.

The forward and the input gradient are exact (the reference rounds where the kernel rounds); the LSQ
scale and zero-point gradients are per-group sums, within the summation's rounding of the reference."""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import pyfastpeft
from pyfastpeft.ops import reference as ref
from tests.conftest import lsq_qparam_grad_bounds
from tests.fuzz.common import FUZZ, dtypes, layouts, seeds, tensor


@st.composite
def schemes(draw):
    """(shape, group_size, axis): per tensor, per channel along any axis, or groups along the last one."""
    kind = draw(st.sampled_from(["tensor", "channel", "group"]))
    lead = draw(st.lists(st.integers(0, 6), min_size=0, max_size=2))
    if kind == "group":
        g = draw(st.sampled_from([1, 2, 8, 32, 64]))
        return (*lead, g * draw(st.integers(1, 3))), g, 0
    shape = (*lead, draw(st.integers(1, 40)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return shape, (0 if kind == "tensor" else -1), axis


@FUZZ
@given(
    scheme=schemes(),
    bits=st.sampled_from([2, 4, 8]),
    symmetric=st.booleans(),
    dtype=dtypes,
    spread=st.sampled_from([1e-3, 1.0, 1e3]),
    x_layout=layouts,
    dy_layout=layouts,
    seed=seeds,
)
def test_fake_quantize(scheme, bits, symmetric, dtype, spread, x_layout, dy_layout, seed):
    shape, group_size, axis = scheme
    x = tensor(shape, dtype, x_layout, seed, spread).requires_grad_()
    out, scale, zp = pyfastpeft.ops.fake_quantize(x, bits, group_size, symmetric, axis)
    ref_out, ref_scale, ref_zp = ref.fake_quantize(x.detach(), bits, group_size, symmetric, axis)
    assert out.dtype == dtype and out.shape == x.shape and zp.dtype == torch.int32
    assert torch.equal(scale.double(), ref_scale) and torch.equal(zp.double(), ref_zp)
    assert torch.equal(out.detach(), ref_out.detach().to(dtype))
    dy = tensor(shape, dtype, dy_layout, seed + 1)
    (dx,) = torch.autograd.grad(out, x, dy)
    x64 = x.detach().double().requires_grad_()
    ref_out64, _, _ = ref.fake_quantize(x64, bits, group_size, symmetric, axis, dtype=dtype)
    (ref_dx,) = torch.autograd.grad(ref_out64, x64, dy.double())
    assert torch.equal(dx.double(), ref_dx)  # dy where the code is in range, 0 elsewhere: no rounding


@FUZZ
@given(
    scheme=schemes(),
    bits=st.sampled_from([2, 4, 8]),
    with_zero_point=st.booleans(),
    dtype=dtypes,
    shrink=st.sampled_from([0.3, 0.7, 1.0, 1.5]),
    grad_factor=st.sampled_from([None, 1.0, 0.37]),
    train_x=st.booleans(),
    x_layout=layouts,
    dy_layout=layouts,
    seed=seeds,
)
def test_fake_quantize_lsq(
    scheme, bits, with_zero_point, dtype, shrink, grad_factor, train_x, x_layout, dy_layout, seed
):
    shape, group_size, axis = scheme
    x = tensor(shape, dtype, x_layout, seed, 2.0)
    _, scale0, zp0 = pyfastpeft.ops.fake_quantize(x, bits, group_size, not with_zero_point, axis)
    assume(torch.isfinite(scale0).all())
    # smaller scales clip a share of the codes; a non-integer zero point exercises its rounding
    scale = (scale0 * shrink).requires_grad_()
    zero = (zp0.to(scale.dtype) + 0.3).requires_grad_() if with_zero_point else None
    x.requires_grad_(train_x)
    gf = pyfastpeft.ops.quant.lsq_grad_factor(x, bits, group_size, axis) if grad_factor is None else grad_factor
    out = pyfastpeft.ops.fake_quantize_lsq(x, scale, zero, bits, group_size, axis, grad_factor=grad_factor)
    dy = tensor(shape, dtype, dy_layout, seed + 1)
    wrt = ([x] if train_x else []) + [scale] + ([zero] if zero is not None else [])
    grads = torch.autograd.grad(out, wrt, dy)

    x_value = x.detach().requires_grad_()  # the reference rounds x·(1/s) as the kernel does for x's dtype
    leaves = [scale.detach().double().requires_grad_()]
    if zero is not None:
        leaves.append(zero.detach().double().requires_grad_())
    ref_zero = leaves[1] if zero is not None else None
    ref_out = ref.fake_quantize_lsq(x_value, leaves[0], ref_zero, bits, group_size, axis, gf)
    assert out.dtype == dtype and torch.equal(out.detach(), ref_out.detach().to(dtype))
    ref_grads = torch.autograd.grad(ref_out, [x_value, *leaves], dy.double())
    if train_x:  # dy where the code is in range, else 0 (in float64 the formula's s·(1/s) is 1 ± an ulp)
        assert torch.equal(grads[0], torch.where(ref_grads[0] != 0, dy, 0))
        grads = grads[1:]
    bounds = lsq_qparam_grad_bounds(x, dy, scale, zero, bits, group_size, axis, gf)
    names = ["dscale", "dzero_point"][: len(bounds)]
    for name, g, r, bound in zip(names, grads, ref_grads[1:], bounds, strict=True):
        assert g.shape == r.shape, name
        err = (g.double() - r).abs()
        assert (err <= bound).all(), f"{name}: error {err.max().item():.3g}, bound {bound.min().item():.3g}"

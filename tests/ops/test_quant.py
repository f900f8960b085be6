"""pyfastpeft.ops.fake_quantize / fake_quantize_lsq against the float64 formula and PyTorch's quantizers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpeft
from pyfastpeft.ops import reference as ref
from tests.conftest import FLOAT_DTYPES, lsq_qparam_grad_bounds

OP = torch.ops.pyfastpeft

# (shape, group_size, axis): per tensor, per channel on several axes, groups along the last dimension.
SCHEMES = [
    ((37, 29), 0, 0),
    ((48, 33), -1, 0),
    ((48, 33), -1, 1),
    ((5, 7, 11), -1, 1),
    ((5, 7, 11), -1, -1),
    ((3, 6, 64), 32, 0),
    ((9, 128), 64, 0),
    ((7, 256), 128, 0),
    ((5, 512), 256, 0),
    ((33, 96), 96, 0),  # per token
]


def qrange(bits):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float32, device=device) * scale).to(dtype)


def check_forward(x, bits, group_size, symmetric, axis):
    out, scale, zp = pyfastpeft.ops.fake_quantize(x, bits, group_size, symmetric, axis)
    ref_out, ref_scale, ref_zp = ref.fake_quantize(x.cpu(), bits, group_size, symmetric, axis)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert scale.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert zp.dtype == torch.int32
    torch.testing.assert_close(scale.cpu().double(), ref_scale, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(zp.cpu().double(), ref_zp, rtol=0, atol=0)
    torch.testing.assert_close(out.cpu(), ref_out.to(x.dtype), rtol=0, atol=0, equal_nan=True)
    return out, scale, zp


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,group_size,axis", SCHEMES)
def test_forward_equals_float64_formula(device, dtype, bits, symmetric, shape, group_size, axis):
    x = rand(shape, dtype, device, scale=3.0)
    out, scale, zp = check_forward(x, bits, group_size, symmetric, axis)
    if dtype == torch.float32:
        # Integer codes: out / s recovers clamp(q) - z exactly for float32 outputs.
        qmin, qmax = qrange(bits)
        codes = ref.fake_quantize_codes(x.cpu(), scale.cpu(), zp.cpu(), bits, group_size, axis).clamp(qmin, qmax)
        s = ref._broadcast_qparam(scale.cpu().double(), x, group_size, axis)
        z = ref._broadcast_qparam(zp.cpu().double(), x, group_size, axis)
        assert torch.equal(torch.round(out.cpu().double() / s) + z, codes)


@given(
    rows=st.integers(0, 9),
    groups=st.integers(0, 4),
    group_size=st.sampled_from([32, 64, 128, 256]),
    bits=st.sampled_from([2, 4, 8]),
    symmetric=st.booleans(),
    scale=st.floats(1e-3, 1e3),
)
@settings(max_examples=60, deadline=None)
def test_grouped_random(rows, groups, group_size, bits, symmetric, scale):
    x = torch.randn(rows, groups * group_size) * scale
    check_forward(x, bits, group_size, symmetric, 0)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_torch_fake_quantize_per_channel(device, axis, bits, symmetric):
    x = rand((6, 10, 17), torch.float32, device, 2.0).requires_grad_()
    qmin, qmax = qrange(bits)
    out, scale, zp = pyfastpeft.ops.fake_quantize(x, bits, -1, symmetric, axis)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    assert torch.equal(out, expected)
    dy = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, dy)
    (expected_dx,) = torch.autograd.grad(expected, x, dy)
    assert torch.equal(dx, expected_dx)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_torch_fake_quantize_per_tensor(device, bits, symmetric):
    x = rand((31, 47), torch.float32, device, 5.0).requires_grad_()
    qmin, qmax = qrange(bits)
    out, scale, zp = pyfastpeft.ops.fake_quantize(x, bits, 0, symmetric)
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    assert torch.equal(out, expected)
    dy = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, dy)[0], torch.autograd.grad(expected, x, dy)[0])


def test_groups_match_torch_per_channel_on_grouped_view(device):
    x = rand((12, 256), torch.float32, device, 2.0)
    out, scale, zp = pyfastpeft.ops.fake_quantize(x, 4, 32, False)
    expected = torch.fake_quantize_per_channel_affine(x.reshape(-1, 32), scale.flatten(), zp.flatten(), 0, -8, 7)
    assert torch.equal(out, expected.reshape(x.shape))


@pytest.mark.parametrize("axis", [0, 1])
def test_symmetric_scale_equals_torch_observer(axis):
    x = torch.randn(40, 24) * 3
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=axis, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-8, quant_max=7
    )
    obs(x)
    expected_scale, expected_zp = obs.calculate_qparams()
    _, scale, zp = pyfastpeft.ops.fake_quantize(x, 4, -1, True, axis)
    assert torch.equal(scale, expected_scale.float())
    assert torch.equal(zp, expected_zp.int())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,group_size,axis", [SCHEMES[0], SCHEMES[2], SCHEMES[4], SCHEMES[5], SCHEMES[9]])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_backward_equals_autograd_reference(device, dtype, shape, group_size, axis, symmetric):
    x = rand(shape, dtype, device, 2.0).requires_grad_()
    out, _, _ = pyfastpeft.ops.fake_quantize(x, 4, group_size, symmetric, axis)
    dy = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, dy)
    x64 = x.detach().cpu().requires_grad_()
    ref_out, _, _ = ref.fake_quantize(x64, 4, group_size, symmetric, axis)
    (ref_dx,) = torch.autograd.grad(ref_out, x64, dy.cpu().double())
    assert torch.equal(dx.cpu(), ref_dx.to(dtype))


@pytest.mark.parametrize("shape,group_size,axis", [SCHEMES[0], SCHEMES[3], SCHEMES[4], SCHEMES[6]])
def test_ste_backward_mask_with_clipping(device, shape, group_size, axis):
    """The backward op alone, with scales small enough that many codes fall outside [qmin, qmax]."""
    x = rand(shape, torch.float32, device, 2.0)
    _, scale, zp = pyfastpeft.ops.fake_quantize(x, 4, group_size, False, axis)
    scale = scale * 0.5
    dy = torch.randn_like(x)
    dx = OP.fake_quantize_backward(dy, x, scale, zp, 4, group_size, axis)
    q = ref.fake_quantize_codes(x.cpu(), scale.cpu(), zp.cpu(), 4, group_size, axis)
    mask = (q >= -8) & (q <= 7)
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(dx.cpu(), torch.where(mask, dy.cpu(), 0.0))


def lsq_inputs(shape, group_size, axis, dtype, device, with_zero_point, bits=4):
    x = rand(shape, dtype, device, 2.0).requires_grad_()
    _, scale, zp = pyfastpeft.ops.fake_quantize(x.detach(), bits, group_size, not with_zero_point, axis)
    # Shrink the scales so that a good share of the codes clip, and make the zero point non-integer.
    scale = (scale * 0.7).requires_grad_()
    zero = (zp.to(scale.dtype) + 0.3).requires_grad_() if with_zero_point else None
    return x, scale, zero


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,group_size,axis", [SCHEMES[0], SCHEMES[2], SCHEMES[3], SCHEMES[4], SCHEMES[6]])
@pytest.mark.parametrize("with_zero_point", [False, True])
def test_lsq_forward_and_gradients(device, dtype, shape, group_size, axis, with_zero_point):
    x, scale, zero = lsq_inputs(shape, group_size, axis, dtype, device, with_zero_point)
    gf = 0.37
    out = pyfastpeft.ops.fake_quantize_lsq(x, scale, zero, 4, group_size, axis, grad_factor=gf)
    dy = torch.randn_like(out)
    inputs = [x, scale] + ([zero] if zero is not None else [])
    grads = torch.autograd.grad(out, inputs, dy)

    leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    x64 = leaves[0]
    x64_value = x.detach().cpu()  # the reference rounds x·(1/s) as the kernel does for x's dtype
    ref_out = ref.fake_quantize_lsq(
        x64_value.requires_grad_(),
        leaves[1],
        leaves[2] if zero is not None else None,
        4,
        group_size,
        axis,
        gf,
    )
    assert torch.equal(out.cpu(), ref_out.detach().to(dtype))
    ref_grads = torch.autograd.grad(ref_out, [x64_value, *leaves[1:]], dy.cpu().double())
    assert torch.equal(grads[0].cpu(), ref_grads[0].to(dtype).where(ref_grads[0] != 0, 0))
    # scale and zero-point gradients: per-group float32 sums, within their rounding of the reference
    bounds = lsq_qparam_grad_bounds(x, dy, scale, zero, 4, group_size, axis, gf)
    for g, r, bound in zip(grads[1:], ref_grads[1:], bounds, strict=True):
        assert ((g.cpu().double() - r).abs() <= bound.cpu()).all(), ((g.cpu().double() - r).abs().max(), bound.min())
    del x64


@pytest.mark.parametrize("axis", [0, 1])
def test_lsq_matches_torch_learnable_per_channel(device, axis):
    x = rand((16, 24), torch.float32, device, 2.0).requires_grad_()
    _, s0, _ = pyfastpeft.ops.fake_quantize(x.detach(), 8, -1, True, axis)
    scale = (s0 * 0.6).requires_grad_()
    zero = torch.zeros_like(scale).requires_grad_()
    out = pyfastpeft.ops.fake_quantize_lsq(x, scale, zero, 8, -1, axis, grad_factor=1.0)
    expected = torch._fake_quantize_learnable_per_channel_affine(x, scale, zero, axis, -128, 127, 1.0)
    assert torch.equal(out, expected)
    dy = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, scale, zero], dy)
    theirs = torch.autograd.grad(expected, [x, scale, zero], dy)
    assert torch.equal(ours[0], theirs[0])
    # both are per-channel float32 sums: each within the summation's rounding of the exact value
    bounds = lsq_qparam_grad_bounds(x, dy, scale, zero, 8, -1, axis, 1.0)
    for a, b, bound in zip(ours[1:], theirs[1:], bounds, strict=True):
        assert ((a.double() - b.double()).abs() <= 2 * bound).all()


def test_lsq_gradcheck_where_smooth():
    """Rounding has zero derivative almost everywhere, so the STE/LSQ gradients are estimators checked
    against autograd references above; where every code clips, out = (qmin|qmax - z)·s is affine in s
    and gradcheck applies to the in-kernel scale reduction (the rounded zero point is piecewise constant)."""
    x = torch.cat([torch.rand(6, 5) + 3, -torch.rand(6, 5) - 3], dim=1).double()
    scale = (torch.rand(6, dtype=torch.float64) * 0.05 + 0.1).requires_grad_()
    zero = torch.tensor([0.0, 1, -1, 2, 0, -2], dtype=torch.float64)

    def f(s):
        return pyfastpeft.ops.fake_quantize_lsq(x, s, zero, 4, -1, 0, grad_factor=1.0)

    assert torch.autograd.gradcheck(f, (scale,))


def test_lsq_default_grad_factor():
    x = torch.randn(4, 64)
    assert math.isclose(pyfastpeft.ops.quant.lsq_grad_factor(x, 4, 32), 1 / math.sqrt(32 * 7))
    assert math.isclose(pyfastpeft.ops.quant.lsq_grad_factor(x, 8, 0), 1 / math.sqrt(256 * 127))


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_range_groups(device, symmetric):
    x = torch.randn(4, 64, device=device)
    x[1] = 0
    x[2, :32] = 0
    x.requires_grad_()
    out, scale, zp = pyfastpeft.ops.fake_quantize(x, 4, 32, symmetric)
    assert torch.isfinite(out).all() and torch.isfinite(scale).all()
    assert (out[1] == 0).all() and (out[2, :32] == 0).all()
    assert (scale[1] == torch.finfo(torch.float32).eps).all()
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(dx).all() and (dx[1] == 1).all()
    check_forward(x.detach(), 4, 32, symmetric, 0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_huge_values(device, symmetric):
    x = torch.randn(8, 64, device=device) * 1e37
    x[0, 0] = 1e38
    x[3, 5] = -1e38
    out, scale, _ = check_forward(x, 8, -1, symmetric, 0)
    assert torch.isfinite(out).all() and torch.isfinite(scale).all()
    tiny = torch.randn(8, 64, device=device) * 1e-30  # below eps·qrange: every code is 0
    out, _, _ = check_forward(tiny, 8, -1, symmetric, 0)
    assert (out == 0).all()


@pytest.mark.parametrize("group_size,axis", [(32, 0), (-1, 0), (0, 0)])
def test_non_finite_input_poisons_only_its_group(device, group_size, axis):
    x = torch.randn(4, 64, device=device, requires_grad=True)
    with torch.no_grad():
        x[2, 3] = float("nan")
        x[1, 40] = float("inf")
    out, scale, zp = pyfastpeft.ops.fake_quantize(x, 4, group_size, False, axis)
    (dx,) = torch.autograd.grad(out.sum(), x)
    bad = torch.zeros(4, 64, dtype=torch.bool, device=device)
    if group_size == 32:
        bad[2, :32] = True
        bad[1, 32:] = True
    elif group_size == -1:
        bad[1:3] = True
    else:
        bad[:] = True
    assert torch.isnan(out[bad]).all() and not torch.isnan(out[~bad]).any()
    assert (dx[bad] == 0).all()
    assert torch.isnan(scale).sum() == (2 if group_size != 0 else 1) and (zp[torch.isnan(scale)] == 0).all()
    check_forward(x.detach(), 4, group_size, False, axis)


@pytest.mark.parametrize("group_size,axis", [(32, 0), (-1, 1), (0, 0)])
def test_non_contiguous_inputs(device, group_size, axis):
    base = torch.randn(64, 128, device=device)
    for x in (base.t(), base[:, ::2], base[1::2]):
        out, _, _ = check_forward(x, 4, group_size, False, axis)
        dy = torch.randn(x.shape, device=device)
        xg = x.clone().requires_grad_()
        o2, s2, z2 = pyfastpeft.ops.fake_quantize(xg, 4, group_size, False, axis)
        assert torch.equal(o2, out)
        dx = torch.autograd.grad(o2, xg, dy)[0]
        dx_view = torch.autograd.grad(
            pyfastpeft.ops.fake_quantize(x.requires_grad_(), 4, group_size, False, axis)[0], x, dy
        )[0]
        # the straight-through gradient is exact: dy where the float64 formula's code is in range, else 0
        x64 = x.detach().cpu().double().requires_grad_()
        ref_dx = torch.autograd.grad(
            ref.fake_quantize(x64, 4, group_size, False, axis, torch.float32)[0], x64, dy.cpu()
        )[0]
        assert torch.equal(dx.cpu().double(), ref_dx) and torch.equal(dx_view.cpu().double(), ref_dx)


def test_bad_arguments():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="group_size"):
        pyfastpeft.ops.fake_quantize(x, 4, 32)
    with pytest.raises(ValueError, match="group_size"):
        pyfastpeft.ops.fake_quantize(x, 4, -3)
    with pytest.raises(ValueError, match="bits"):
        pyfastpeft.ops.fake_quantize(x, 9, 16)
    with pytest.raises(ValueError, match="bits"):
        pyfastpeft.ops.fake_quantize(x, 1, 16)
    with pytest.raises(ValueError, match="axis"):
        pyfastpeft.ops.fake_quantize(x, 4, -1, axis=2)
    with pytest.raises(ValueError, match="x"):
        pyfastpeft.ops.fake_quantize(torch.ones(4, 48, dtype=torch.int32), 4, 16)
    with pytest.raises(ValueError, match="scale"):
        pyfastpeft.ops.fake_quantize_lsq(x, torch.ones(3), None, 4, -1, 0)
    with pytest.raises(ValueError, match="scale"):
        OP.fake_quantize_lsq(x, torch.ones(4, dtype=torch.float64), None, 4, -1, 0, 1.0)
    with pytest.raises(ValueError, match="zero_point"):
        pyfastpeft.ops.fake_quantize_lsq(x, torch.ones(4), torch.ones(5), 4, -1, 0)
    with pytest.raises(ValueError, match="zero_point"):
        OP.fake_quantize_backward(x, x, torch.ones(4), torch.ones(4), 4, -1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x = rand((6, 64), dtype, device, 2.0).requires_grad_()
    for args in [(4, 32, True, 0), (8, -1, False, 1), (2, 0, False, 0)]:
        torch.library.opcheck(OP.fake_quantize, (x, *args))
    _, scale, zp = OP.fake_quantize(x.detach(), 4, 32, False, 0)
    torch.library.opcheck(OP.fake_quantize_backward, (torch.randn_like(x), x.detach(), scale, zp, 4, 32, 0))
    s = (scale * 0.8).requires_grad_()
    z = zp.float().requires_grad_()
    torch.library.opcheck(OP.fake_quantize_lsq, (x, s, z, 4, 32, 0, 0.5))
    torch.library.opcheck(OP.fake_quantize_lsq, (x, s, None, 4, 32, 0, 0.5))
    dy = torch.randn_like(x)
    torch.library.opcheck(OP.fake_quantize_lsq_backward, (dy, x.detach(), s.detach(), z.detach(), 4, 32, 0, 0.5, True))
    torch.library.opcheck(OP.fake_quantize_lsq_backward, (dy, x.detach(), s.detach(), None, 4, 32, 0, 0.5, False))


def test_torch_compile_fullgraph():
    def f(x, s):
        out, _, _ = pyfastpeft.ops.fake_quantize(x, 4, 32, True)
        return out + pyfastpeft.ops.fake_quantize_lsq(x, s, None, 4, 32)

    x = torch.randn(4, 64, requires_grad=True)
    s = torch.full((4, 2), 0.2, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, s)
    torch.testing.assert_close(out, f(x, s), rtol=0, atol=0)  # the same ops, traced
    out.sum().backward()

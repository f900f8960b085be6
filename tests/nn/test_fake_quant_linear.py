"""FakeQuantLinear and QuantizedLinear against float64 references (LoRA over them:
tests/tuners/test_lora_quantized_base.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfastpeft
from pyfastpeft.nn import FakeQuantLinear, QuantizedLinear
from pyfastpeft.nn.quantized_linear import pack_codes, unpack_codes
from pyfastpeft.ops import reference as ref
from tests.conftest import FLOAT_DTYPES, low_precision_error_bound, lsq_qparam_grad_bounds

# (weight_bits, weight_group_size, weight_symmetric, activation_bits, activation_symmetric)
SCHEMES = {
    "8da4w": (4, 32, True, 8, False),
    "w4_g128_asym": (4, 128, False, None, False),
    "w8_per_channel": (8, -1, True, 8, True),
    "w2_g64": (2, 64, True, None, False),
    "w4_per_tensor": (4, 0, False, 8, False),
}


def make(name, in_features=256, out_features=48, dtype=torch.float32, device="cpu", learnable=False):
    wb, g, ws, ab, asym = SCHEMES[name]
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, device=device, dtype=dtype)
    return FakeQuantLinear.from_linear(
        linear,
        weight_bits=wb,
        weight_group_size=g,
        weight_symmetric=ws,
        activation_bits=ab,
        activation_symmetric=asym,
        learnable_scale=learnable,
    )


def reference_forward(m: FakeQuantLinear, x: torch.Tensor):
    """float64 linear over the float64-formula fake-quantized weight and activations (autograd: STE)."""
    w = m.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    wq = ref.fake_quantize(w, m.weight_bits, m.weight_group_size, m.weight_symmetric, 0, m.weight.dtype)[0]
    xq = x64
    if m.activation_bits is not None:
        xq = ref.fake_quantize(x64, m.activation_bits, x.shape[-1], m.activation_symmetric, 0, x.dtype)[0]
    b = m.bias.detach().double().requires_grad_() if m.bias is not None else None
    return F.linear(xq, wq, b), (x64, w, b), wq, xq


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", list(SCHEMES))
def test_forward_backward_against_reference(device, dtype, name):
    m = make(name, dtype=dtype, device=device)
    x = torch.randn(3, 7, 256, device=device, dtype=dtype, requires_grad=True)
    y = m(x)
    y64, (x64, w64, b64), wq64, xq64 = reference_forward(m, x.cpu())
    # The quantized operands are bitwise the reference's: the same F.linear gives the same output.
    same_op = F.linear(xq64.detach().to(dtype).to(device), wq64.detach().to(dtype).to(device), m.bias)
    assert torch.equal(y, same_op)
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [x, m.weight, m.bias], dy)
    rx, rw, rb = torch.autograd.grad(y64, [x64, w64, b64], dy.cpu().double(), retain_graph=True)
    # the straight-through masks of the float64 formula (the quantizers are elementwise)
    mx = torch.autograd.grad(xq64, x64, torch.ones_like(xq64), retain_graph=True)[0]
    mw = torch.autograd.grad(wq64, w64, torch.ones_like(wq64))[0]
    # plain PyTorch in the same dtype: the same linear over the same quantized operands, the same masks;
    # and the same sums over absolute values (the size of the terms each gradient adds up)
    lowp_leaves = [t.detach().to(dtype).requires_grad_() for t in (xq64, wq64, b64)]
    lowp = torch.autograd.grad(F.linear(*lowp_leaves), lowp_leaves, dy.cpu())
    abs_leaves = [t.detach().abs().requires_grad_() for t in (xq64, wq64, b64)]
    mags = torch.autograd.grad(F.linear(*abs_leaves), abs_leaves, dy.cpu().double().abs())
    masks = (mx, mw, torch.ones_like(rb))
    for name, ours, low, ref64, mag, mask in zip(
        ["dx", "dW", "db"], (gx, gw, gb), lowp, (rx, rw, rb), mags, masks, strict=True
    ):
        err, bound = low_precision_error_bound(ours.cpu(), low * mask.to(dtype), ref64, magnitude=mag * mask)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def test_from_linear_shares_parameters():
    linear = nn.Linear(64, 16)
    m = FakeQuantLinear.from_linear(linear)
    assert m.weight is linear.weight and m.bias is linear.bias
    assert [p for p in m.parameters()] == [linear.weight, linear.bias]


def test_learnable_scale_trains_scales(device):
    m = make("w4_g128_asym", device=device, learnable=True)
    assert m.weight_scale.requires_grad and m.weight_zero_point is not None
    x = torch.randn(5, 256, device=device)
    m(x).square().mean().backward()
    # the loss's gradient at the quantized weight (plain autograd), carried to the scales by the float64
    # LSQ formula: the module's gradients are that, within the per-group float32 sums' rounding
    wq = m.quantized_weight().detach().requires_grad_()
    (dwq,) = torch.autograd.grad(F.linear(x, wq, m.bias.detach()).square().mean(), wq)
    s64 = m.weight_scale.detach().double().requires_grad_()
    z64 = m.weight_zero_point.detach().double().requires_grad_()
    gf = pyfastpeft.ops.quant.lsq_grad_factor(m.weight, m.weight_bits, m.weight_group_size, 0)
    out64 = ref.fake_quantize_lsq(m.weight.detach(), s64, z64, m.weight_bits, m.weight_group_size, 0, gf)
    ref_grads = torch.autograd.grad(out64, [s64, z64], dwq.double())
    bounds = lsq_qparam_grad_bounds(m.weight, dwq, s64, z64, m.weight_bits, m.weight_group_size, 0, gf)
    for ours, r, bound in zip([m.weight_scale.grad, m.weight_zero_point.grad], ref_grads, bounds, strict=True):
        assert ours.shape == r.shape and ((ours.double() - r).abs() <= bound).all()
    # min/max scales clip no code: the zero point's gradient (−s·dy summed over clipped codes) is 0 here
    assert m.weight_scale.grad.abs().sum() > 0 and torch.equal(ref_grads[1], torch.zeros_like(ref_grads[1]))
    # the forward at initialisation equals min/max fake quantization (same scales)
    plain = make("w4_g128_asym", device=device)
    with torch.no_grad():
        assert torch.equal(m.quantized_weight(), plain.quantized_weight())


def test_bad_arguments():
    with pytest.raises(ValueError, match="weight_group_size"):
        FakeQuantLinear(100, 8, weight_group_size=32)
    with pytest.raises(ValueError, match="weight_bits"):
        FakeQuantLinear(64, 8, weight_bits=16)
    with pytest.raises(ValueError, match="activation_bits"):
        FakeQuantLinear(64, 8, activation_bits=1)
    with pytest.raises(ValueError, match="linear"):
        FakeQuantLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="in_features"):
        QuantizedLinear(63, 8, weight_bits=4, weight_group_size=-1)


@pytest.mark.parametrize("bits", [2, 4, 8, 3])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (7, 64), dtype=torch.int32)
    packed = pack_codes(codes, bits)
    per_byte = {2: 4, 4: 2}.get(bits, 1)
    assert packed.shape == (7, 64 // per_byte)
    assert packed.dtype == (torch.uint8 if per_byte > 1 else torch.int8)
    assert torch.equal(unpack_codes(packed, bits), codes)
    if bits == 4:  # element 2i in the low nibble, 2i+1 in the high nibble, offset by 8
        assert packed[0, 0].item() == (codes[0, 0].item() + 8) | ((codes[0, 1].item() + 8) << 4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("learnable", [False, True])
def test_quantized_linear_equals_fake_quant(device, dtype, name, learnable):
    m = make(name, dtype=dtype, device=device, learnable=learnable)
    if learnable:  # move the learned scales off their min/max start
        with torch.no_grad():
            m.weight_scale.mul_(0.8)
    q = QuantizedLinear.from_fake_quant(m)
    x = torch.randn(4, 256, device=device, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(q.dequantized_weight(), m.quantized_weight())
        assert torch.equal(q(x), m(x))
    qmin, qmax = -(2 ** (m.weight_bits - 1)), 2 ** (m.weight_bits - 1) - 1
    codes = q.codes()
    assert codes.min() >= qmin and codes.max() <= qmax
    if m.weight_bits == 4:
        assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (48, 128)


def test_quantized_weights_count_as_the_float_model_did():
    # the packed codes hold out · in weights (two 4-bit codes a byte), the bias is a buffer: counted as
    # the float layer's weight and bias, frozen, as GGUF blocks are
    from pyfastpeft.report import trainable_parameters

    fake = make("8da4w")
    float_model = torch.nn.Sequential(torch.nn.Linear(256, 48), torch.nn.Linear(48, 3))
    float_model[0].requires_grad_(False)
    model = torch.nn.Sequential(QuantizedLinear.from_fake_quant(fake), torch.nn.Linear(48, 3))
    assert model[0].qweight.numel() * 2 == 48 * 256 and model[0].bias is not None
    assert trainable_parameters(model) == trainable_parameters(float_model) == (48 * 3 + 3, 48 * 257 + 48 * 3 + 3)


def test_quantized_linear_rejects_non_finite_weights():
    m = make("8da4w")
    with torch.no_grad():
        m.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="weight"):
        QuantizedLinear.from_fake_quant(m)


def test_modules_compile():
    m = make("8da4w")
    x = torch.randn(4, 256)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, ye = compiled(xc), m(xe)
    assert torch.equal(yc, ye)  # the same ops in the same order: bit for bit
    dy = torch.randn_like(ye)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            torch.autograd.grad(yc, [xc, m.weight], dy), torch.autograd.grad(ye, [xe, m.weight], dy), strict=True
        )
    )

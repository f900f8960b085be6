"""The LoRA layer over a frozen fake-quantized (QAT + LoRA) or quantized (QLoRA-style) base, built directly:
``y = linear(aq(x), wq, b) + s·B·A·dropout(aq(x))`` against the float64 formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyfastpeft.nn import FakeQuantLinear, QuantizedLinear
from pyfastpeft.ops import reference as ref
from pyfastpeft.tuners import LoraLinear
from tests.conftest import assert_within_rounding, low_precision_error_bound

# (weight_bits, weight_group_size, weight_symmetric, activation_bits, activation_symmetric)
SCHEMES = {"8da4w": (4, 32, True, 8, False), "w4_g128_asym": (4, 128, False, None, False)}
IN, OUT, R = 256, 48, 4


def make(name, device="cpu"):
    wb, g, ws, ab, asym = SCHEMES[name]
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, device=device)
    return FakeQuantLinear.from_linear(
        linear, weight_bits=wb, weight_group_size=g, weight_symmetric=ws, activation_bits=ab, activation_symmetric=asym
    )


def factors(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


@pytest.mark.parametrize("base_kind", ["fake", "quantized"])
@pytest.mark.parametrize("name", ["8da4w", "w4_g128_asym"])
def test_lora_over_a_quantized_base(device, base_kind, name):
    base = make(name, device=device)
    if base_kind == "quantized":
        base = QuantizedLinear.from_fake_quant(base)
    layer = LoraLinear(base, r=R, lora_alpha=8.0)
    assert layer.quantized_base
    x = torch.randn(6, IN, device=device, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # lora_B starts at zero
        factors(layer)[1].normal_()
    y = layer(x)
    dy = torch.randn_like(y)
    gA, gB = torch.autograd.grad(y, list(factors(layer)), dy)
    with torch.no_grad():
        wq = base.quantized_weight()
    xq = base.quantize_input(x.detach())

    def formula(convert):
        a, b = (convert(t.detach()).requires_grad_() for t in factors(layer))
        bias = convert(base.bias.detach()) if base.bias is not None else None
        out = ref.lora_linear(convert(xq), convert(wq), bias, a, b, layer.scaling["default"])
        return [out.detach(), *torch.autograd.grad(out, [a, b], convert(dy))]

    ref64, magnitude = formula(lambda t: t.double()), formula(lambda t: t.double().abs())
    # the longest chain: dA sums over the 6 rows of products that sum over out (dy·B) and r; two
    # roundings to float32 (the rank-r intermediate, then the result)
    terms = x.shape[0] + IN + OUT + R
    for label, ours, r, m in zip(["y", "dA", "dB"], [y, gA, gB], ref64, magnitude, strict=True):
        assert_within_rounding(label, ours, r, m, terms=terms, roundings=2)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A.default.weight", "lora_B.default.weight"]


def test_dropout_sees_the_quantized_input():
    layer = LoraLinear(make("8da4w"), r=2, lora_dropout=0.5)
    with torch.no_grad():
        factors(layer)[1].normal_()  # B = 0 would give A a zero gradient
    layer.train()
    x = torch.randn(3, IN)
    torch.manual_seed(7)  # the dropout's [seed, offset] comes from torch's generator: draw it once more
    seed, offset = torch.randint(0, 2**62, (2,)).tolist()
    torch.manual_seed(7)
    layer(x).sum().backward()
    mask = ref.philox_keep_mask(x.numel(), 0.5, seed, offset).reshape(x.shape)
    assert 0 < mask.sum() < mask.numel()
    base = layer.base_layer
    with torch.no_grad():
        xq, wq = base.quantize_input(x), base.quantized_weight()

    def grads(convert):
        a, b = (convert(t.detach()).requires_grad_() for t in factors(layer))
        xd = convert(xq) * convert(mask.to(x.dtype)) * (1.0 / (1.0 - 0.5))
        y = ref.lora_linear(xd, convert(wq), convert(base.bias.detach()), a, b, layer.scaling["default"])
        return torch.autograd.grad(y, [a, b], convert(torch.ones_like(y)))

    ref64, lowp, mags = grads(lambda t: t.double()), grads(lambda t: t.clone()), grads(lambda t: t.double().abs())
    for ours, low, r, mag in zip([p.grad for p in factors(layer)], lowp, ref64, mags, strict=True):
        err, bound = low_precision_error_bound(ours, low, r, magnitude=mag)
        assert err <= bound, (err, bound)


def test_quantized_base_refuses_dora_pissa_and_merge():
    with pytest.raises(ValueError, match="DoRA and PiSSA need a float base weight"):
        LoraLinear(make("8da4w"), r=2, use_dora=True)
    with pytest.raises(ValueError, match="DoRA and PiSSA need a float base weight"):
        LoraLinear(QuantizedLinear.from_fake_quant(make("8da4w")), r=2, init_lora_weights="pissa")
    layer = LoraLinear(make("8da4w"), r=2)
    with pytest.raises(ValueError, match="merging a float update into quantized weights"):
        layer.merge()

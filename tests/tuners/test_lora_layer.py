"""pyfastpeft.tuners.LoraLinear built directly with one adapter (PEFT's ``lora.Linear`` arguments): the
layer get_peft_model installs, against the float64 formula."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pyfastpeft as pf
from pyfastpeft.ops import reference
from pyfastpeft.tuners import LoraLinear
from tests.conftest import assert_as_accurate_as, assert_within_rounding

IN, OUT = 19, 11


def make_layer(device, dtype=torch.float32, bias=True, r=4, alpha=8.0, dropout=0.0, rslora=False):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=bias).to(device=device, dtype=dtype)
    layer = LoraLinear(base, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B starts at zero; give the update something to do
    return layer


def factors(layer: LoraLinear, name: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def formula(layer: LoraLinear, x: torch.Tensor, convert) -> torch.Tensor:
    """``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` on ``convert`` of the layer's values (float64, or their absolute values for
    the sums' magnitudes)."""
    base = layer.base_layer
    a, b = factors(layer)
    bias = None if base.bias is None else convert(base.bias.detach())
    scaling = layer.scaling["default"]
    return reference.lora_linear(
        convert(x), convert(base.weight.detach()), bias, convert(a.detach()), convert(b.detach()), scaling
    )


def test_starts_equal_to_base(device):
    torch.manual_seed(0)
    base = nn.Linear(8, 5).to(device)
    x = torch.randn(3, 8, device=device)
    layer = LoraLinear(base, r=2)
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(5, 2, device=device))
    ref64 = formula(layer, x, lambda t: t.double())
    magnitude = formula(layer, x, lambda t: t.double().abs())
    assert_within_rounding("y", layer(x), ref64, magnitude, terms=8 + 1, roundings=1)


def test_without_r_the_layer_is_empty_and_runs_the_base(device):
    base = nn.Linear(8, 5).to(device)
    layer = LoraLinear(base)
    assert layer.adapters == [] and layer.active_adapters == [] and not layer.lora_A
    x = torch.randn(3, 8, device=device)
    assert torch.equal(layer(x), base(x))
    layer.update_layer("a", 2, 4.0, 0.0, False, False, True)  # get_peft_model's way to add adapters
    assert layer.adapters == ["a"] and layer.scaling == {"a": 2.0}


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_match_reference(device, rslora):
    layer = make_layer(device, r=4, alpha=6.0, rslora=rslora)
    assert layer.scaling["default"] == pytest.approx(6.0 / (math.sqrt(4) if rslora else 4))
    x = torch.randn(2, 7, IN, device=device, dtype=torch.float64)
    x32 = x.float().requires_grad_()
    y = layer(x32)
    dy = torch.randn_like(y)
    y.backward(dy)

    results = {}
    for key, sign in (("ref", lambda t: t), ("abs", torch.abs)):
        # float64 on the layer's float32 values, and on their absolute values: each result's sum of |terms|
        w, b = sign(layer.base_layer.weight.double()), sign(layer.base_layer.bias.double())
        A = sign(factors(layer)[0].detach().double()).requires_grad_()
        B = sign(factors(layer)[1].detach().double()).requires_grad_()
        x64 = sign(x32.detach().double()).requires_grad_()
        ref = reference.lora_linear(x64, w, b, A, B, layer.scaling["default"])
        ref.backward(sign(dy.double()))
        results[key] = (ref.detach(), x64.grad, A.grad, B.grad)
    ours = (y, x32.grad, factors(layer)[0].grad, factors(layer)[1].grad)
    # the longest chain: dA, a sum over the 14 rows of products that sum over out and r; two roundings
    # to float32 (x·Aᵀ or dy·B is kept in float32, then the result)
    terms = x.numel() // IN + IN + OUT + 4
    for name, o, r, m in zip(["y", "dx", "dA", "dB"], ours, results["ref"], results["abs"], strict=True):
        assert_within_rounding(name, o, r, m, terms=terms, roundings=2)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_several_active_adapters_add_their_updates_to_one_frozen_product(device):
    # a plain adapter and a DoRA one at once: W x + b + s·B·A·x for the plain one, and for the DoRA one
    # (k - 1)·W x + k·s'·B'·A'·x with k = m / ‖W + s'·B'·A'‖ (the norm detached): each adapter's own
    # result, with W x and b counted once
    layer = make_layer(device, r=4, alpha=6.0)
    layer.update_layer("dora", 3, 9.0, 0.0, False, True, True)
    with torch.no_grad():
        layer.lora_B["dora"].weight.normal_()  # so that k is not 1
    names = ["default", "dora"]
    layer.set_adapter(names)
    leaves = lambda: [t for n in names for t in factors(layer, n)] + [layer.lora_magnitude_vector["dora"].weight]  # noqa: E731
    x = torch.randn(2, 7, IN, device=device).transpose(0, 1).requires_grad_()  # a non-contiguous view
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    ours = [y, x.grad] + [t.grad for t in leaves()]

    def formula(dtype):
        x_ = x.detach().to(dtype).requires_grad_()
        (a, b, a2, b2, m) = params = [t.detach().to(dtype).requires_grad_() for t in leaves()]
        w, bias = layer.base_layer.weight.to(dtype), layer.base_layer.bias.to(dtype)
        s, s2 = layer.scaling["default"], layer.scaling["dora"]
        wx = x_ @ w.T
        k = m / torch.linalg.norm(w + s2 * b2.detach() @ a2.detach(), dim=1)
        out = wx + bias + s * ((x_ @ a.T) @ b.T) + (k - 1) * wx + k * (s2 * ((x_ @ a2.T) @ b2.T))
        out.backward(dy.to(dtype))
        return [out, x_.grad] + [t.grad for t in params]

    # plain PyTorch in float32 as the yardstick of float32 rounding through the norm and the products
    for name, o, plain, ref64 in zip(
        ["y", "dx", "dA", "dB", "dA'", "dB'", "dm"], ours, formula(torch.float32), formula(torch.float64), strict=True
    ):
        assert_as_accurate_as(name, o, plain, ref64)
    assert layer.base_layer.weight.grad is None


def test_base_is_frozen_and_unchanged_by_training(device):
    layer = make_layer(device, dropout=0.1)
    w0 = layer.base_layer.weight.detach().clone()
    b0 = layer.base_layer.bias.detach().clone()
    assert not layer.base_layer.weight.requires_grad
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = layer(torch.randn(5, IN, device=device)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A.default.weight",
        "lora_B.default.weight",
    }


def test_dropout_only_in_training(device):
    layer = make_layer(device, dropout=0.5)
    x = torch.randn(64, IN, device=device)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    b = layer(x)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(device, dtype):
    """Merged, the output is x·round(W + s·B·A)ᵀ + b: one rounding of each weight and one of the result,
    over sums of in + r terms; unmerging rounds the weight once more."""
    layer = make_layer(device, dtype=dtype)
    layer.eval()
    x = torch.randn(6, IN, device=device, dtype=dtype)
    w0 = layer.base_layer.weight.detach().clone()
    ref64 = formula(layer, x, lambda t: t.double())
    magnitude = formula(layer, x, lambda t: t.double().abs())
    a, b = (t.detach().double().abs() for t in factors(layer))
    delta_magnitude = layer.scaling["default"] * (b @ a)
    terms = IN + 4 + 2
    assert_within_rounding("unmerged y", layer(x), ref64, magnitude, terms=terms, roundings=2)
    layer.merge()
    assert layer.merged
    assert_within_rounding("merged y", layer(x), ref64, magnitude, terms=terms, roundings=2)
    layer.unmerge()
    assert not layer.merged
    assert_within_rounding(
        "W after unmerge", layer.base_layer.weight, w0, w0.double().abs() + delta_magnitude, terms=4 + 2, roundings=2
    )
    assert_within_rounding("y after unmerge", layer(x), ref64, magnitude, terms=terms, roundings=2)


def test_same_layer_and_layout_as_get_peft_model():
    """The directly built layer is get_peft_model's: same class, same state-dict keys, same outputs."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(IN, OUT))
    direct = LoraLinear(copy.deepcopy(model.proj), r=4, lora_alpha=8.0, lora_dropout=0.1)
    peft = pf.get_peft_model(model, pf.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.1, target_modules=["proj"]))
    installed = peft.get_base_model().proj
    assert type(installed) is LoraLinear
    with torch.no_grad():
        installed.lora_B["default"].weight.normal_()
    direct.load_state_dict(installed.state_dict(), strict=True)
    assert direct.scaling == installed.scaling and direct.dropout_p == installed.dropout_p
    x = torch.randn(3, IN)
    direct.eval()
    installed.eval()
    assert torch.equal(direct(x), installed(x))


def test_torch_compile_fullgraph():
    """Inductor traces the layer (fused op: fake kernel + autograd) with no graph break, in eval mode and
    in training mode, where the dropout seed is drawn inside the graph."""
    torch.manual_seed(0)
    model = nn.Sequential(
        LoraLinear(nn.Linear(16, 32), r=4, lora_dropout=0.1),
        nn.GELU(),
        LoraLinear(nn.Linear(32, 8), r=2, lora_dropout=0.1),
    )
    for m in (model[0], model[2]):
        nn.init.normal_(m.lora_B["default"].weight)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 16, requires_grad=True)

    model.eval()
    model64 = copy.deepcopy(model).double()
    x64 = x.detach().double().requires_grad_()
    y64 = model64(x64)
    (g64,) = torch.autograd.grad(y64.sum(), x64)
    y_eager = model(x)
    (g_eager,) = torch.autograd.grad(y_eager.sum(), x)
    y = compiled(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert_as_accurate_as("compiled y", y, y_eager, y64)
    assert_as_accurate_as("compiled dx", g, g_eager, g64)

    model.train()
    y = compiled(x)
    y.square().sum().backward()
    for m in (model[0], model[2]):
        for a_or_b in factors(m):
            assert a_or_b.grad is not None and a_or_b.grad.abs().sum() > 0


def test_conv1d_base_matches_the_formula():
    """transformers' Conv1D stores the weight [in, out]: the layer reads it transposed."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(OUT, IN).double()
    layer = LoraLinear(base, r=3, lora_alpha=6.0)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (IN, OUT)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(4, IN, dtype=torch.float64)
    a, b = factors(layer)
    ref64 = reference.lora_linear(x, base.weight.t(), base.bias, a.detach(), b.detach(), 2.0)
    magnitude = reference.lora_linear(
        x.abs(), base.weight.t().abs(), base.bias.abs(), a.detach().abs(), b.detach().abs(), 2.0
    )
    assert_within_rounding("y", layer(x), ref64, magnitude, terms=IN + 3 + 1, roundings=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r: expected a positive int"),
        ({"r": 2, "lora_dropout": 1.0}, r"lora_dropout: expected a probability in \[0, 1\)"),
        ({"r": 2, "lora_alpha": 0}, "lora_alpha: expected a positive number"),
        ({"r": 2, "init_lora_weights": "olora"}, "init_lora_weights: expected True, False"),
        ({"r": 2, "adapter_name": "__base__"}, "adapter_name: expected a non-empty name"),
        ({"r": 2, "adapter_name": "a.b"}, "adapter_name: expected a non-empty name"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraLinear(nn.Linear(4, 4), **kwargs)


def test_rejects_other_bases():
    with pytest.raises(ValueError, match="base_layer: expected nn.Linear"):
        LoraLinear(nn.Conv1d(4, 4, 1), r=2)

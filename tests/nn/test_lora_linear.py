"""pyfastpeft.nn.LoRALinear: the module around the fused op."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyfastpeft.nn import LoRALinear
from pyfastpeft.ops import reference
from tests.conftest import assert_within_rounding


def make_layer(device, dtype=torch.float32, bias=True, r=4, alpha=8.0, dropout=0.0, rslora=False):
    torch.manual_seed(0)
    base = nn.Linear(19, 11, bias=bias).to(device=device, dtype=dtype)
    layer = LoRALinear(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; give the update something to do
    return layer


def test_starts_equal_to_base(device):
    base = nn.Linear(8, 5).to(device)
    x = torch.randn(3, 8, device=device)
    expected = base(x)
    layer = LoRALinear(base, r=2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_match_reference(device, rslora):
    layer = make_layer(device, r=4, alpha=6.0, rslora=rslora)
    assert layer.scaling == pytest.approx(6.0 / (math.sqrt(4) if rslora else 4))
    x = torch.randn(2, 7, 19, device=device, dtype=torch.float64)
    x32 = x.float().requires_grad_()
    y = layer(x32)
    dy = torch.randn_like(y)
    y.backward(dy)

    results = {}
    for key, sign in (("ref", lambda t: t), ("abs", torch.abs)):
        # float64 on the layer's float32 values, and on their absolute values: each result's sum of |terms|
        w, b = sign(layer.base_layer.weight.double()), sign(layer.base_layer.bias.double())
        A = sign(layer.lora_A.detach().double()).requires_grad_()
        B = sign(layer.lora_B.detach().double()).requires_grad_()
        x64 = sign(x32.detach().double()).requires_grad_()
        ref = reference.lora_linear(x64, w, b, A, B, layer.scaling)
        ref.backward(sign(dy.double()))
        results[key] = (ref.detach(), x64.grad, A.grad, B.grad)
    ours = (y, x32.grad, layer.lora_A.grad, layer.lora_B.grad)
    # the longest chain: dA, a sum over the 14 rows of products that sum over out and r; two roundings
    # to float32 (x·Aᵀ or dy·B is kept in float32, then the result)
    terms = x.numel() // 19 + 19 + 11 + 4
    for name, o, r, m in zip(["y", "dx", "dA", "dB"], ours, results["ref"], results["abs"], strict=True):
        assert_within_rounding(name, o, r, m, terms=terms, roundings=2)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_base_is_frozen_and_unchanged_by_training(device):
    layer = make_layer(device, dropout=0.1)
    w0 = layer.base_layer.weight.detach().clone()
    b0 = layer.base_layer.bias.detach().clone()
    assert not layer.base_layer.weight.requires_grad
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = layer(torch.randn(5, 19, device=device)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_dropout_only_in_training(device):
    layer = make_layer(device, dropout=0.5)
    x = torch.randn(64, 19, device=device)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    b = layer(x)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(device, dtype):
    layer = make_layer(device, dtype=dtype)
    layer.eval()
    x = torch.randn(6, 19, device=device, dtype=dtype)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(layer(x), y, rtol=tol, atol=tol)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=tol, atol=tol / 10)
    torch.testing.assert_close(layer(x), y, rtol=tol, atol=tol)


def test_torch_compile_fullgraph():
    """Inductor traces the fused op (fake kernel + autograd) with no graph break, in eval mode and in
    training mode, where the dropout seed is drawn inside the graph."""
    torch.manual_seed(0)
    model = nn.Sequential(
        LoRALinear(nn.Linear(16, 32), r=4, dropout=0.1), nn.GELU(), LoRALinear(nn.Linear(32, 8), r=2, dropout=0.1)
    )
    for m in model:
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 16, requires_grad=True)

    model.eval()
    y_ref = model(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    y = compiled(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)

    model.train()
    y = compiled(x)
    y.square().sum().backward()
    for m in (model[0], model[2]):
        assert m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0
        assert m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r: expected a positive int"),
        ({"dropout": 1.0}, r"dropout: expected a probability in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(4, 4), **kwargs)


def test_rejects_non_linear():
    with pytest.raises(ValueError, match="base_layer: expected an nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1))

"""DoRA over a GGUF block base (GGUFLinear): outputs and gradients against a float64 reference on the
de-quantized weight, against DoRA over an nn.Linear holding that weight, through get_peft_model, and
the row norm taken from the blocks without ever building the float weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfastpeft
from pyfastpeft import LoraConfig, get_peft_model
from pyfastpeft.nn import GGUFLinear
from pyfastpeft.ops import gguf
from pyfastpeft.tuners import LoraLinear
from pyfastpeft.tuners.lora import block_base

from ..conftest import FLOAT_DTYPES, assert_within_rounding
from .test_lora_gguf_base import QTYPES, block_layer, fit_losses, two_block_layers

R = 3


def dora_layer(base: nn.Module, seed: int) -> LoraLinear:
    """A DoRA layer with B and m moved off their initial values, so every term of the formula counts."""
    layer = LoraLinear(base, r=R, lora_alpha=6, use_dora=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        b = layer.lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=g) / R)
        m = layer.lora_magnitude_vector["default"].weight
        m.mul_(0.5 + torch.rand(m.shape, generator=g))
    return layer


def run(layer: LoraLinear, src: torch.Tensor, view, dy_seed: int):
    """(y, dx, dA, dB, dm) of one forward and backward of ``view(src)`` (a non-contiguous view, say),
    with a seeded random dy."""
    src = src.detach().clone().requires_grad_(True)
    x = view(src)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=y.dtype)
    y.backward(dy)
    params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    params += (layer.lora_magnitude_vector["default"].weight,)
    grads = tuple(torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params)
    for p in params:
        p.grad = None
    return (y.detach(), view(src.grad), *grads), dy


def reference(layer: LoraLinear, w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor):
    """DoRA in float64 on ``w`` with the layer's own adapter values, run on the values and on their
    absolute values: the second gives each output's and each gradient's sum of |terms|. The norm is the
    exact row norm of the values in both runs, and detached, as in the layer. Also returns κ = max over
    rows of Σ(|W| + s|B||A|)² / ‖W + s·B·A‖², which bounds how much the rounding of the expanded sum of
    squares moves the norm, relative to the norm."""
    s = layer.scaling["default"]
    a0 = layer.lora_A["default"].weight.detach().double()
    b0 = layer.lora_B["default"].weight.detach().double()
    m0 = layer.lora_magnitude_vector["default"].weight.detach().double()
    bias0 = layer.base_layer.bias
    bias0 = None if bias0 is None else bias0.detach().double()
    norm = torch.linalg.norm(w + s * b0 @ a0, dim=1)
    out = {}
    for key, sign in (("ref", torch.clone), ("abs", torch.abs)):  # new leaves each time
        x64 = sign(x.detach().double()).requires_grad_(True)
        a = sign(a0).requires_grad_(True)
        b = sign(b0).requires_grad_(True)
        m = sign(m0).requires_grad_(True)
        z = x64 @ sign(w).T + s * (x64 @ a.T) @ b.T
        y = (m / norm) * z
        if bias0 is not None:
            y = y + sign(bias0)
        y.backward(sign(dy.double()))
        out[key] = (y.detach(), x64.grad, a.grad, b.grad, m.grad)
    return out["ref"], out["abs"], kappa(layer, w, "default")


def kappa(layer: LoraLinear, w: torch.Tensor, name: str) -> float:
    """max(1, max over rows of Σ(|W| + s|B||A|)² / ‖W + s·B·A‖²) for adapter ``name`` over ``w``."""
    s = layer.scaling[name]
    a = layer.lora_A[name].weight.detach().double()
    b = layer.lora_B[name].weight.detach().double()
    norm_sq = (w + s * b @ a).square().sum(1)
    return max(1.0, ((w.abs() + s * b.abs() @ a.abs()).square().sum(1) / norm_sq).max().item())


NAMES = ("y", "dx", "dA", "dB", "dm")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64])
@pytest.mark.parametrize(
    "tokens, in_features, out_features, bias", [(0, 32, 5, True), (1, 64, 1, False), (7, 96, 33, True)]
)
def test_forward_and_gradients_match_float64_on_the_dequantized_weight(
    qtype, dtype, tokens, in_features, out_features, bias
):
    base = block_layer(out_features, in_features, qtype, bias, seed=tokens + in_features)
    layer = dora_layer(base, seed=tokens)
    src = torch.randn(tokens, 2, in_features).to(dtype)
    view = lambda t: t.transpose(0, 1)  # noqa: E731 - a non-contiguous view [2, tokens, in]
    x = view(src)
    ours, dy = run(layer, src, view, dy_seed=1)
    ref, mag, kappa = reference(layer, base.dequantized_weight(torch.float64), x, dy)
    # Each result chains the sums over in, out, r and the tokens (the adapter gradients), a few
    # elementwise steps (s·, +, ·scale, +bias) and the float32 de-quantization of W in the kernel; its
    # roundings to the result's dtype are the intermediate and the result's. DoRA's scale adds the
    # float64 rounding of the expanded sum of squares, at most κ times the norm's own size, and one
    # rounding of the scale to the dtype: the magnitudes are taken κ times over to cover both.
    # A 16-bit x rounds every tensor between the products to its dtype: A and B cast for the products,
    # W x, A·x, its product with B, ·s, W x + the update, the scale, the scaled sum and + b (10 in all;
    # the backward's chain has as many). The float32 gradients of A, B and m are compared in the dtype
    # they were computed in (x's, or float32 for a float64 x, whose products are rounded to it once).
    chain = tokens * 2 + in_features + out_features + 2 * R + 8
    roundings = 3 if dtype in (torch.float32, torch.float64) else 10
    grad_dtype = torch.float32 if dtype == torch.float64 else dtype
    ours = (*ours[:2], *(g.to(grad_dtype) for g in ours[2:]))
    for name, got, want, size in zip(NAMES, ours, ref, mag, strict=True):
        assert_within_rounding(name, got, want, size * kappa, terms=chain, roundings=roundings)
    assert not base.blocks.requires_grad and base.blocks.grad is None


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_equals_dora_over_an_nn_linear_holding_the_dequantized_weight(qtype, bias):
    in_features, out_features, tokens = 64, 17, 5
    base = block_layer(out_features, in_features, qtype, bias, seed=qtype)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(base.dequantized_weight(torch.float32))
        if bias:
            linear.bias.copy_(base.bias)
    layer = dora_layer(base, seed=qtype)
    twin = LoraLinear(linear, r=R, lora_alpha=6, use_dora=True)
    # the magnitudes' initial values, ‖W‖, agree before any copying
    want_m = torch.linalg.norm(base.dequantized_weight(torch.float64), dim=1)
    twin_m = twin.lora_magnitude_vector["default"].weight
    assert_within_rounding("m at init", twin_m, want_m, want_m, terms=in_features, roundings=1)
    twin.load_state_dict(layer.state_dict(), strict=False)
    src = torch.randn(2, tokens, 2 * in_features)
    view = lambda t: t[..., ::2]  # noqa: E731 - a view with stride 2 along the features
    x = view(src)
    assert not x.is_contiguous()
    ours, dy = run(layer, src, view, dy_seed=2)
    theirs, _ = run(twin, src, view, dy_seed=2)
    _, mag, kappa = reference(layer, base.dequantized_weight(torch.float64), x, dy)
    # each is within the reference test's bound of the float64 result, so within twice it of the other
    chain = 2 * tokens + in_features + out_features + 2 * R + 8
    for name, got, other, size in zip(NAMES, ours, theirs, mag, strict=True):
        assert_within_rounding(name, got, other, size * kappa, terms=2 * chain, roundings=6)


def test_magnitude_starts_at_the_row_norm_of_the_blocks():
    base = block_layer(300, 64, gguf.Q4_1, False, seed=5)  # more rows than one slice of the row norm
    layer = LoraLinear(base, r=2, use_dora=True)
    want = torch.linalg.norm(base.dequantized_weight(torch.float64), dim=1)
    got = layer.lora_magnitude_vector["default"].weight
    # the squares summed in float64, then the root rounded once to float32
    assert_within_rounding("m", got, want, want, terms=0, roundings=1)
    # B = 0 and m = ‖W‖: the layer starts as the base, its scale 1 within the roundings of m and m/‖W‖
    x = torch.randn(4, 64)
    size = x.abs() @ base.dequantized_weight(torch.float32).abs().T
    assert_within_rounding("y at init", layer(x), base(x), size, terms=64, roundings=4)


def test_row_norms_go_a_bounded_slice_of_rows_at_a_time(monkeypatch):
    base = block_layer(33, 96, gguf.Q8_0, False, seed=6)
    seen = []
    dequantize = pyfastpeft.ops.gguf_dequantize

    def spy(blocks, qtype, cols, dtype=torch.float32):
        seen.append(blocks.shape[0])
        return dequantize(blocks, qtype, cols, dtype)

    monkeypatch.setattr(block_base, "ROWS_PER_SLICE", 8)
    monkeypatch.setattr(pyfastpeft.ops, "gguf_dequantize", spy)
    got = block_base.row_square_norms(base.blocks, base.qtype, base.in_features)
    assert seen == [8, 8, 8, 8, 1]
    want = base.dequantized_weight(torch.float64).square().sum(1)
    assert_within_rounding("‖W_i‖²", got, want, want, terms=base.in_features, roundings=0)


def test_the_forward_and_backward_never_build_the_float_weight(monkeypatch):
    base = block_layer(40, 64, gguf.Q4_0, True, seed=7)
    layer = dora_layer(base, seed=7)
    layer.train()
    layer.dropout_p["default"] = 0.1

    def refuse(*args, **kwargs):
        raise AssertionError("the float weight was built")

    class NoDequantize:  # the registered ops, but gguf_dequantize refused
        def __getattr__(self, name):
            if name == "gguf_dequantize":
                return refuse
            return getattr(torch.ops.pyfastpeft, name)

    monkeypatch.setattr(GGUFLinear, "dequantized_weight", refuse)
    monkeypatch.setattr(pyfastpeft.ops, "gguf_dequantize", refuse)
    monkeypatch.setattr(gguf, "gguf_dequantize", refuse)
    monkeypatch.setattr(gguf, "_OP", NoDequantize())
    x = torch.randn(3, 5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    grads.append(layer.lora_magnitude_vector["default"].weight.grad)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with pytest.raises(AssertionError, match="the float weight was built"):
        layer.weight_oi()  # the check itself bites


def test_the_row_norm_cache_is_not_saved_and_follows_new_blocks():
    base = block_layer(9, 32, gguf.Q4_1, False, seed=8)
    layer = dora_layer(base, seed=8)
    x = torch.randn(4, 32)
    layer(x)
    assert not any("row_sq" in k for k in layer.state_dict())
    other = block_layer(9, 32, gguf.Q4_1, False, seed=9)
    layer.base_layer.load_state_dict(other.state_dict())  # the blocks written in place
    ours, dy = run(layer, x, lambda t: t, dy_seed=3)
    ref, mag, kappa = reference(layer, other.dequantized_weight(torch.float64), x, dy)
    for name, got, want, size in zip(NAMES, ours, ref, mag, strict=True):
        assert_within_rounding(name, got, want, size * kappa, terms=4 * 2 + 32 + 9 + 2 * R + 8, roundings=3)


def test_get_peft_model_with_dora_trains_only_the_adapter_and_refuses_merging():
    model = two_block_layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True, target_modules=["up", "down"])
    peft = get_peft_model(model, config)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable)
    assert not any("row_sq" in k for k in peft.adapter_tensors("default"))
    losses, after = fit_losses(peft, lr=0.05, steps=20)
    assert after < losses[0]
    for path in ("up", "down"):  # B left zero and m left at ‖W‖ would mean the adapter did not train
        layer = peft.base_model.model.get_submodule(path)
        assert layer.lora_B["default"].weight.abs().sum() > 0
        start = torch.linalg.norm(layer.base_layer.dequantized_weight(torch.float64), dim=1).float()
        assert not torch.equal(layer.lora_magnitude_vector["default"].weight.detach(), start)
    for key, value in before.items():
        path, leaf = key.rsplit(".", 1)
        held = getattr(peft.base_model.model.get_submodule(path).base_layer, leaf)
        assert torch.equal(held, value), key  # blocks and bias, bit for bit
    with pytest.raises(ValueError, match="merge: the base is a GGUFLinear; merging a float update into quantized"):
        peft.merge_and_unload()


def test_several_active_adapters_add_up_as_over_an_nn_linear():
    base = block_layer(19, 64, gguf.Q8_0, True, seed=10)
    linear = nn.Linear(64, 19)
    with torch.no_grad():
        linear.weight.copy_(base.dequantized_weight(torch.float32))
        linear.bias.copy_(base.bias)
    layers = []
    for b in (base, linear):
        layer = dora_layer(b, seed=10)
        layer.update_layer("plain", 2, 4.0, 0.0, False, False, "gaussian")
        layer.update_layer("dora", 2, 4.0, 0.0, False, True, "gaussian")
        layers.append(layer)
    layers[1].load_state_dict(layers[0].state_dict(), strict=False)
    x = torch.randn(6, 64)
    for active in (["default", "dora"], ["plain", "dora", "default"]):
        outs = []
        for layer in layers:
            layer.set_adapter(active)
            outs.append(layer(x).detach())
        # each output: the bias, the shared W x and every adapter's term, in float32: bounded by the
        # same computation on absolute values, through the chain over in, the ranks and the adapters,
        # with the DoRA norms' conditioning κ (see reference)
        w64 = base.dequantized_weight(torch.float64)
        w = w64.abs()
        size = x.abs().double() @ w.T + base.bias.abs().double()
        worst = max(kappa(layers[0], w64, n) for n in active if layers[0].use_dora[n])
        for name in active:
            a = layers[0].lora_A[name].weight.detach().double().abs()
            b_ = layers[0].lora_B[name].weight.detach().double().abs()
            scale = 1.0
            if layers[0].use_dora[name]:
                m = layers[0].lora_magnitude_vector[name].weight.detach().double().abs()
                scale = 1 + m / layers[0]._block_dora_norm(name)
            size = size + scale * (x.abs().double() @ (w.T + layers[0].scaling[name] * a.T @ b_.T))
        assert_within_rounding(f"y {active}", outs[0], outs[1], size * worst, terms=2 * (64 + 2 * R + 12), roundings=8)

"""(IA)³ over a GGUF block base (GGUFLinear): the scaled input or output of the block kernel against a
float64 reference on the de-quantized weight and against (IA)³ over an nn.Linear holding that weight;
get_peft_model training only the vectors; merging refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyfastpeft import IA3Config, get_peft_model
from pyfastpeft.nn import GGUFLinear
from pyfastpeft.ops import gguf
from pyfastpeft.tuners import IA3Linear

from ..conftest import FLOAT_DTYPES, assert_within_rounding
from .test_lora_gguf_base import QTYPES, block_layer, fit_losses, two_block_layers

NAMES = ("y", "dx", "dl")


def ia3_layer(base: nn.Module, feedforward: bool, seed: int) -> IA3Linear:
    layer = IA3Linear(base, feedforward)
    layer.update_layer("a", init=True)
    layer.active_adapters = ["a"]
    with torch.no_grad():  # off the identity, seeded
        vector = layer.ia3_l["a"]
        vector.copy_(0.5 + torch.rand(vector.shape, generator=torch.Generator().manual_seed(seed)))
    return layer


def run(layer: IA3Linear, src: torch.Tensor, view, dy_seed: int):
    """(y, dx, dl) of one forward and backward of ``view(src)``, with a seeded random dy."""
    src = src.detach().clone().requires_grad_(True)
    y = layer(view(src))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=y.dtype)
    y.backward(dy)
    vector = layer.ia3_l["a"]
    dl = torch.zeros_like(vector) if vector.grad is None else vector.grad.clone()
    vector.grad = None
    return (y.detach(), view(src.grad), dl), dy


def reference(layer: IA3Linear, w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor):
    """(IA)³ in float64 on ``w`` with the layer's own vector, on the values and on their absolute values
    (each output's and gradient's sum of |terms|)."""
    bias0 = layer.base_layer.bias
    out = {}
    for key, sign in (("ref", torch.clone), ("abs", torch.abs)):  # new leaves each time
        x64 = sign(x.detach().double()).requires_grad_(True)
        l64 = sign(layer.ia3_l["a"].detach().double()).requires_grad_(True)
        b64 = None if bias0 is None else sign(bias0.detach().double())
        scale = l64.flatten()
        if layer.is_feedforward:
            y = nn.functional.linear(x64 * scale, sign(w), b64)
        else:
            y = nn.functional.linear(x64, sign(w), b64) * scale
        y.backward(sign(dy.double()))
        out[key] = (y.detach(), x64.grad, l64.grad)
    return out["ref"], out["abs"]


def chains(layer: IA3Linear, x: torch.Tensor) -> list[int]:
    """Per result: the sum over in (out) features, the rows for dl, the two products and the bias, and
    the float32 de-quantization of W in the kernel."""
    rows = x.numel() // x.shape[-1]
    n_in, n_out = layer.in_features, layer.out_features
    return [n_in + 4, n_out + 4, n_in + n_out + rows + 4]


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64])
@pytest.mark.parametrize(
    "tokens, in_features, out_features, bias", [(0, 32, 5, True), (1, 64, 1, False), (7, 96, 33, True)]
)
def test_forward_and_gradients_match_float64_on_the_dequantized_weight(
    qtype, feedforward, dtype, tokens, in_features, out_features, bias
):
    base = block_layer(out_features, in_features, qtype, bias, seed=tokens + in_features)
    layer = ia3_layer(base, feedforward, seed=tokens)
    assert layer.ia3_l["a"].dtype == torch.float32
    src = torch.randn(tokens, 2, in_features).to(dtype)
    view = lambda t: t.transpose(0, 1)  # noqa: E731 - a non-contiguous view [2, tokens, in]
    ours, dy = run(layer, src, view, dy_seed=1)
    ref, mag = reference(layer, base.dequantized_weight(torch.float64), view(src), dy)
    # roundings to the result's dtype: the intermediate (x ⊙ l or W x + b, dy ⊙ l or dy·W) and the
    # result's; the vector's cast to x's dtype is exact for float32 and float64 and one more rounding for
    # a 16-bit x. Its float32 gradient is compared in the dtype it was computed in (x's, or float32 for a
    # float64 x, whose sum is rounded to it once).
    roundings = 2 if dtype in (torch.float32, torch.float64) else 3
    grad_dtype = torch.float32 if dtype == torch.float64 else dtype
    ours = (*ours[:2], ours[2].to(grad_dtype))
    for name, got, want, size, n in zip(NAMES, ours, ref, mag, chains(layer, view(src)), strict=True):
        assert_within_rounding(name, got, want, size, terms=n, roundings=roundings)
    assert not base.blocks.requires_grad and base.blocks.grad is None


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("feedforward", [False, True])
def test_equals_ia3_over_an_nn_linear_holding_the_dequantized_weight(qtype, feedforward):
    base = block_layer(23, 64, qtype, True, seed=qtype)
    linear = nn.Linear(64, 23)
    with torch.no_grad():
        linear.weight.copy_(base.dequantized_weight(torch.float32))
        linear.bias.copy_(base.bias)
    layer = ia3_layer(base, feedforward, seed=qtype)
    twin = ia3_layer(linear, feedforward, seed=qtype)
    assert torch.equal(layer.ia3_l["a"], twin.ia3_l["a"])
    src = torch.randn(2, 5, 128)
    view = lambda t: t[..., ::2]  # noqa: E731 - a view with stride 2 along the features
    assert not view(src).is_contiguous()
    ours, dy = run(layer, src, view, dy_seed=2)
    theirs, _ = run(twin, src, view, dy_seed=2)
    _, mag = reference(layer, base.dequantized_weight(torch.float64), view(src), dy)
    # each within the reference test's bound of the float64 result, so within twice it of the other
    for name, got, other, size, n in zip(NAMES, ours, theirs, mag, chains(layer, view(src)), strict=True):
        assert_within_rounding(name, got, other, size, terms=2 * n, roundings=4)


def test_delta_weight_dequantizes_for_reports():
    base = block_layer(7, 32, gguf.Q4_1, False, seed=4)
    for feedforward in (False, True):
        layer = ia3_layer(base, feedforward, seed=4)
        w = base.dequantized_weight(torch.float64)
        want = w * (layer.ia3_l["a"].detach().double() - 1)
        got = layer.delta_weight("a")
        # W rounded to float32 once, then one product
        assert_within_rounding("ΔW", got, want, want, terms=0, roundings=2)


def test_get_peft_model_trains_only_the_vectors_and_refuses_merging():
    model = two_block_layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft = get_peft_model(model, IA3Config(target_modules=["up", "down"], feedforward_modules=["down"]))
    up, down = (peft.base_model.model.get_submodule(n) for n in ("up", "down"))
    assert isinstance(up, IA3Linear) and isinstance(down, IA3Linear)
    assert isinstance(up.base_layer, GGUFLinear) and not up.is_feedforward and down.is_feedforward
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in peft.named_parameters() if "ia3_l" in n} and len(trainable) == 2
    losses, after = fit_losses(peft, lr=0.5, steps=10)
    assert after < losses[0]
    assert all(not torch.equal(m.ia3_l["default"], torch.ones_like(m.ia3_l["default"])) for m in (up, down))
    for key, value in before.items():
        path, leaf = key.rsplit(".", 1)
        held = getattr(peft.base_model.model.get_submodule(path).base_layer, leaf)
        assert torch.equal(held, value), key  # blocks and bias, bit for bit
    with pytest.raises(ValueError, match="merge: the base is a GGUFLinear; merging the \\(IA\\)³ scales"):
        peft.merge_and_unload()
    assert up.merged_adapters == [] and down.merged_adapters == []


def test_a_refused_merge_changes_no_layer_of_a_mixed_model():
    model = nn.Sequential()
    model.add_module("first", nn.Linear(32, 32))
    model.add_module("second", block_layer(16, 32, gguf.Q4_0, False, 3))
    config = IA3Config(target_modules=["first", "second"], feedforward_modules=[], init_ia3_weights=False)
    peft = get_peft_model(model, config)
    weight = model.first.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="merge: the base is a GGUFLinear"):
        peft.merge_adapter()
    assert torch.equal(model.first.base_layer.weight, weight) and model.first.merged_adapters == []


def test_other_bases_are_named_in_the_refusal():
    with pytest.raises(ValueError, match="expected nn.Linear, transformers' Conv1D or GGUFLinear, got GELU"):
        IA3Linear(nn.GELU(), feedforward=False)
    model = nn.Sequential()
    model.add_module("act", nn.GELU())
    with pytest.raises(ValueError, match="matched, but \\(IA\\)³ takes only nn.Linear, transformers' Conv1D and GGUF"):
        get_peft_model(model, IA3Config(target_modules="act", feedforward_modules=[]))

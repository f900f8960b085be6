"""LoRA over a GGUF block base (GGUFLinear): the base product runs on the blocks, the update is added;
outputs and gradients against a float64 reference on the de-quantized weight; what it refuses. DoRA over
the blocks is in test_lora_gguf_dora.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyfastpeft import LoraConfig, get_peft_model, ops
from pyfastpeft.nn import GGUFLinear
from pyfastpeft.ops import gguf
from pyfastpeft.tuners import LoraLinear

from ..conftest import FLOAT_DTYPES, assert_within_rounding

QTYPES = [gguf.Q4_0, gguf.Q4_1, gguf.Q8_0]


def block_layer(out_features: int, in_features: int, qtype: int, bias: bool, seed: int) -> GGUFLinear:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    b = torch.randn(out_features, generator=g) if bias else None
    return GGUFLinear.from_float(weight, qtype, b)


def two_block_layers() -> nn.Sequential:
    """``up`` (Q4_1, 32 -> 64, bias) and ``down`` (Q8_0, 64 -> 32) around a GELU: a small block model."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", block_layer(64, 32, gguf.Q4_1, True, 1))
    model.add_module("act", nn.GELU())
    model.add_module("down", block_layer(32, 64, gguf.Q8_0, False, 2))
    return model


def fit_losses(peft: nn.Module, lr: float, steps: int) -> tuple[list[float], float]:
    """(the training losses, the loss after) of ``steps`` SGD steps on one random regression batch."""
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=lr)
    x, target = torch.randn(16, 32), torch.randn(16, 32)
    peft.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (peft(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    peft.eval()
    with torch.no_grad():
        after = (peft(x) - target).pow(2).mean().item()
    return losses, after


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64])
@pytest.mark.parametrize(
    "tokens, in_features, out_features, bias", [(0, 32, 5, True), (1, 64, 1, False), (7, 96, 33, True)]
)
def test_forward_and_gradients_match_float64_on_the_dequantized_weight(
    qtype, dtype, tokens, in_features, out_features, bias
):
    base = block_layer(out_features, in_features, qtype, bias, seed=tokens + in_features)
    layer = LoraLinear(base, r=3, lora_alpha=6)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    # a non-contiguous view [2, tokens, in]
    x = torch.randn(tokens, 2, in_features).to(dtype).transpose(0, 1)
    x.requires_grad_(True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    w = base.dequantized_weight(torch.float64)
    a = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    b_ = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    s = layer.scaling["default"]
    bias64 = None if base.bias is None else base.bias.detach().double()

    def ref(x_, w_, a_, b__, bias_):
        out = x_ @ w_.T + s * (x_ @ a_.T) @ b__.T
        return out if bias_ is None else out + bias_

    want = ref(x64, w, a, b_, bias64)
    want.backward(dy.double())
    # magnitudes: the same computation on absolute values bounds every sum's absolute terms
    with torch.no_grad():
        mag = ref(x64.abs(), w.abs(), a.abs(), b_.abs(), None if bias64 is None else bias64.abs())
        gmag = dy.double().abs()
        mag_dx = gmag @ w.abs() + s * (gmag @ b_.abs()) @ a.abs()
        mag_da = s * (b_.abs().T @ gmag.reshape(-1, out_features).T) @ x64.abs().reshape(-1, in_features)
        mag_db = s * gmag.reshape(-1, out_features).T @ (x64.abs().reshape(-1, in_features) @ a.abs().T)
    chain = tokens * 2 + in_features + out_features + 3 + 4
    # Roundings to x's dtype behind each result: the base product's and the rank-r intermediate's (u = A·x
    # forward, dy·B backward), and the result's. A 16-bit x adds A's and B's roundings to it (the float32
    # adapter is cast for the products; the reference uses the float32 values) and, in the backward, dx's
    # two products are each rounded before they are added. The float32 gradients of A and B are compared
    # in the dtype they were computed in: a 16-bit x's products cast up exactly, compared in x's dtype; a
    # float64 x's products rounded once to float32 (one of the two roundings), compared in float32.
    roundings = 2 if dtype in (torch.float32, torch.float64) else 6
    grad_dtype = torch.float32 if dtype == torch.float64 else dtype
    grad_a = layer.lora_A["default"].weight.grad.to(grad_dtype)
    grad_b = layer.lora_B["default"].weight.grad.to(grad_dtype)
    assert_within_rounding("y", y, want, mag, terms=chain, roundings=roundings)
    assert_within_rounding("dx", x.grad, x64.grad, mag_dx, terms=chain, roundings=roundings)
    assert_within_rounding("dA", grad_a, a.grad, mag_da, terms=chain, roundings=roundings)
    assert_within_rounding("dB", grad_b, b_.grad, mag_db, terms=chain, roundings=roundings)
    assert not base.blocks.requires_grad and base.blocks.grad is None


def test_get_peft_model_targets_block_layers_and_trains_only_the_adapter():
    model = two_block_layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["up", "down"]))
    assert all(isinstance(peft.base_model.model.get_submodule(n), LoraLinear) for n in ("up", "down"))
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    n_trainable, n_total = peft.get_nb_trainable_parameters()
    # the frozen weights held in blocks count as weights (64·32 + 32·64), plus the bias and the adapters
    assert n_total == 64 * 32 + 32 * 64 + 64 + n_trainable
    assert n_trainable == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    losses, after = fit_losses(peft, lr=0.05, steps=20)
    # B starts at zero, so an adapter that did not train would give exactly the first loss again
    assert after < losses[0]
    # the blocks themselves never change
    for key, value in before.items():
        if key.endswith("blocks"):
            path = key.rsplit(".", 1)[0]
            assert torch.equal(peft.base_model.model.get_submodule(path).base_layer.blocks, value)


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_block_base_refuses_pissa_merge_and_mixed_batches(use_dora):
    base = block_layer(8, 32, gguf.Q4_0, False, 3)
    with pytest.raises(ValueError, match="PiSSA needs a float base weight, since it rewrites W"):
        LoraLinear(base, r=2, init_lora_weights="pissa")
    layer = LoraLinear(base, r=2, use_dora=use_dora)
    with pytest.raises(ValueError, match="merge: the base is a GGUFLinear; merging a float update into quantized"):
        layer.merge()
    assert layer.merged_adapters == []
    with pytest.raises(ValueError, match="adapter_names: mixed-adapter batches"):
        layer(torch.randn(2, 3, 32), adapter_names=["default", "__base__"])


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_dropout_in_training_matches_float64_with_the_same_mask(qtype, tokens):
    """With dropout the backward recomputes the dropped input instead of keeping it: the output and
    every gradient equal the float64 formula under the very mask the forward drew."""
    in_features, out_features, p = 64, 33, 0.25
    base = block_layer(out_features, in_features, qtype, True, seed=11 + tokens)
    layer = LoraLinear(base, r=3, lora_alpha=6, lora_dropout=p)
    layer.train()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(tokens, 2, in_features).transpose(0, 1).requires_grad_(True)
    rng = torch.get_rng_state()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    after = torch.get_rng_state()
    torch.set_rng_state(rng)  # the forward's one draw: the Philox seed of its mask
    keep = ops.philox_dropout(torch.ones(x.shape, dtype=torch.float64), p)  # mask / (1 - p)
    torch.set_rng_state(after)

    w = base.dequantized_weight(torch.float64)
    a = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    b_ = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    s = layer.scaling["default"]
    bias64 = base.bias.detach().double()
    want = x64 @ w.T + s * ((x64 * keep) @ a.T) @ b_.T + bias64
    want.backward(dy.double())
    with torch.no_grad():
        ax, g = x64.abs() * keep, dy.double().abs()
        mag = x64.abs() @ w.abs().T + s * (ax @ a.abs().T) @ b_.abs().T + bias64.abs()
        mag_dx = g @ w.abs() + s * ((g @ b_.abs()) @ a.abs()) * keep
        mag_da = s * (b_.abs().T @ g.reshape(-1, out_features).T) @ ax.reshape(-1, in_features)
        mag_db = s * g.reshape(-1, out_features).T @ (ax.reshape(-1, in_features) @ a.abs().T)
    chain = tokens * 2 + in_features + out_features + 3 + 4
    assert_within_rounding("y", y, want, mag, terms=chain, roundings=3)
    assert_within_rounding("dx", x.grad, x64.grad, mag_dx, terms=chain, roundings=3)
    assert_within_rounding("dA", layer.lora_A["default"].weight.grad, a.grad, mag_da, terms=chain, roundings=3)
    assert_within_rounding("dB", layer.lora_B["default"].weight.grad, b_.grad, mag_db, terms=chain, roundings=3)


def test_a_model_with_one_block_layer_refuses_merge_before_changing_any_layer():
    torch.manual_seed(3)
    model = nn.Sequential()
    model.add_module("first", nn.Linear(32, 32))
    model.add_module("second", block_layer(32, 32, gguf.Q8_0, False, 4))
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["first", "second"]))
    first = peft.base_model.model.get_submodule("first")
    with torch.no_grad():
        first.lora_B["default"].weight.normal_()
    before = first.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="merge: the base is a GGUFLinear"):
        peft.merge_adapter()
    assert torch.equal(first.base_layer.weight, before) and first.merged_adapters == []


def test_several_active_adapters_over_blocks_add_their_updates():
    # two plain adapters at once: the block kernel's W x + b once, then each adapter's s·B·A·x added
    base = block_layer(19, 64, gguf.Q4_1, True, seed=11)
    layer = LoraLinear(base, r=3, lora_alpha=6)
    layer.update_layer("second", 2, 8.0, 0.0, False, False, "gaussian")
    names = ["default", "second"]
    with torch.no_grad():
        for name in names:
            layer.lora_B[name].weight.normal_()
    layer.set_adapter(names)
    x = torch.randn(2, 5, 64).requires_grad_(True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    w = base.dequantized_weight(torch.float64)
    bias = base.bias.detach().double()
    out = {}
    for key, sign in (("ref", torch.clone), ("abs", torch.abs)):
        x64 = sign(x.detach().double()).requires_grad_(True)
        params = {
            n: (
                sign(layer.lora_A[n].weight.detach().double()).requires_grad_(True),
                sign(layer.lora_B[n].weight.detach().double()).requires_grad_(True),
            )
            for n in names
        }
        want = x64 @ sign(w).T + sign(bias)
        for n, (a, b_) in params.items():
            want = want + layer.scaling[n] * (x64 @ a.T) @ b_.T
        want.backward(sign(dy.double()))
        grads = [x64.grad] + [g.grad for n in names for g in params[n]]
        out[key] = (want.detach(), grads)
    got = [x.grad] + [p.grad for n in names for p in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
    # sums over in, the ranks and the 10 tokens (the adapter gradients); roundings to float32 of W x + b,
    # and of each adapter's A·x and of y after its addmm
    chain = 64 + 19 + 3 + 10 + 4
    assert_within_rounding("y", y, out["ref"][0], out["abs"][0], terms=chain, roundings=5)
    for i, (g, want, size) in enumerate(zip(got, out["ref"][1], out["abs"][1], strict=True)):
        assert_within_rounding(f"grad {i}", g, want, size, terms=chain, roundings=5)

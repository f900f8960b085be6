"""get_peft_model on the built-in model: injection rules, layer math against a float64 reference,
named adapters, merging, DoRA, PiSSA, bias modes, modules_to_save."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyfastpeft as pf
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.tuners import LoraEmbedding, LoraLinear
from tests.conftest import assert_as_accurate_as, assert_within_rounding, rounding_bound

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(seed: int = 0, **kw) -> TinyLlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = TinyLlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=32,
        **kw,
    )
    return TinyLlamaForCausalLM(cfg)


def ids(b=2, t=9, seed=1):
    return torch.randint(0, 32, (b, t), generator=torch.Generator().manual_seed(seed))


def lora_paths(model):
    return [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding))]


def test_list_targets_regex_layers_and_exclude():
    m = pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]))
    paths = lora_paths(m)
    assert paths == [
        f"base_model.model.model.layers.{i}.{p}" for i in (0, 2) for p in ("self_attn.q_proj", "mlp.down_proj")
    ]
    m = pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=r".*layers\.1\.self_attn\.(k|v)_proj"))
    assert [p.removeprefix("base_model.model.model.") for p in lora_paths(m)] == [
        "layers.1.self_attn.k_proj",
        "layers.1.self_attn.v_proj",
    ]
    m = pf.get_peft_model(tiny(), pf.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"]))
    names = {p.rsplit(".", 1)[1] for p in lora_paths(m)}
    assert names == set(ALL) - {"o_proj"}  # lm_head (the output layer) is never in all-linear


def test_pattern_matching_nothing_lists_near_names():
    with pytest.raises(ValueError, match=r"nearest names: .*q_proj"):
        pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=["q_prj"]))
    with pytest.raises(ValueError, match="layers_to_transform"):
        pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(ValueError, match="RMSNorm"):
        pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=r".*input_layernorm"))
    with pytest.raises(ValueError, match="modules_to_save"):
        pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_haed"]))


def test_failed_injection_leaves_model_untouched():
    model = tiny()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError):
        pf.get_peft_model(model, pf.LoraConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())


def test_rank_and_alpha_patterns_and_rslora():
    cfg = pf.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        use_rslora=True,
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    m = pf.get_peft_model(tiny(), cfg)
    q1 = m.base_model.model.model.layers[1].self_attn.q_proj
    v0 = m.base_model.model.model.layers[0].self_attn.v_proj
    q0 = m.base_model.model.model.layers[0].self_attn.q_proj
    assert q1.r["default"] == 2 and q1.scaling["default"] == pytest.approx(8 / 2**0.5)
    assert q0.r["default"] == 4 and q0.scaling["default"] == pytest.approx(8 / 2)
    assert v0.scaling["default"] == pytest.approx(3 / 2)


def reference_linear(x, w, b, a, bb, s, magnitude=None, norm=None):
    """float64 LoRA / DoRA (PEFT's formula, dropout off). ``norm`` given: used instead of ‖W + s·B·A‖
    (the run on absolute values, which measures the sums' terms, takes the true norm)."""
    x, w, a, bb = (t.double() for t in (x, w, a, bb))
    out = x @ w.T + s * (x @ a.T) @ bb.T
    if magnitude is not None:
        if norm is None:
            norm = torch.linalg.norm(w + s * bb @ a, dim=1).detach()
        out = out * (magnitude.double() / norm)
    return out if b is None else out + b.double()


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_linear_layer_matches_reference_forward_and_backward(use_dora, conv1d):
    torch.manual_seed(0)
    base = nn.Linear(13, 7)
    if conv1d:
        transformers = pytest.importorskip("transformers")
        conv = transformers.pytorch_utils.Conv1D(7, 13)
        conv.weight.data.copy_(base.weight.data.t())
        conv.bias.data.copy_(base.bias.data)
        layer_base = conv
    else:
        layer_base = base
    layer = LoraLinear(layer_base)
    layer.update_layer("default", 3, 5.0, 0.0, False, use_dora, False)
    layer.set_adapter(["default"])
    if use_dora:
        layer.lora_magnitude_vector["default"].weight.data.mul_(torch.rand(7) + 0.5)
    x = torch.randn(2, 5, 13, requires_grad=True)
    y = layer(x)
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight if use_dora else None
    g = torch.randn_like(y)
    y.backward(g)
    results = {}
    for key, sign in (("ref", lambda t: t), ("abs", torch.abs)):
        # float64 on the same values, and on their absolute values: each result's sum of |terms|
        x64 = sign(x.detach().double()).requires_grad_()
        a64, b64 = sign(a.detach().double()).requires_grad_(), sign(bb.detach().double()).requires_grad_()
        m64 = sign(mag.detach().double()).requires_grad_() if use_dora else None
        w64 = base.weight.double()
        norm = torch.linalg.norm(w64 + 5.0 / 3 * b64.detach() @ a64.detach(), dim=1) if key == "abs" else None
        out = reference_linear(x64, sign(w64), sign(base.bias.double()), a64, b64, 5.0 / 3, m64, norm)
        out.backward(sign(g.double()))
        results[key] = [out.detach(), x64.grad, a64.grad, b64.grad] + ([m64.grad] if use_dora else [])
    ours = [y, x.grad, a.grad, bb.grad] + ([mag.grad] if use_dora else [])
    # the longest chain: a sum over rows of products that each sum over out, in and r (the DoRA norm and
    # scale add a few more); two roundings to float32 (x·Aᵀ is kept in float32, then the result)
    terms = x.numel() // 13 + 13 + 7 + 3 + 4
    names = ["y", "dx", "dA", "dB", "dm"][: len(ours)]
    for name, o, r, m in zip(names, ours, results["ref"], results["abs"], strict=True):
        assert_within_rounding(name, o, r, m, terms=terms, roundings=2)
    assert layer_base.weight.grad is None


def test_embedding_layer_matches_reference():
    torch.manual_seed(0)
    emb = nn.Embedding(11, 6, padding_idx=0)
    layer = LoraEmbedding(emb)
    layer.update_layer("default", 2, 4.0, 0.0, False, False, False)
    layer.set_adapter(["default"])
    idx = torch.tensor([[0, 3, 10], [5, 5, 1]])
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    ref = emb.weight.double()[idx] + 2.0 * (a.double().T[idx] @ b.double().T)
    magnitude = emb.weight.double().abs()[idx] + 2.0 * (a.double().abs().T[idx] @ b.double().abs().T)
    # the lookups are exact: a sum over the rank, the scale and the base added in float32
    assert_within_rounding("y", layer(idx), ref, magnitude, terms=2 + 2, roundings=1)


def test_named_adapters_set_delete_disable():
    model = tiny()
    x = ids()
    with torch.no_grad():
        base = model(x).logits
    m = pf.get_peft_model(model, pf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    m.add_adapter("b", pf.LoraConfig(r=2, target_modules=["v_proj", "q_proj"], init_lora_weights=False))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():
        out_default = m(x).logits
        m.set_adapter("b")
        out_b = m(x).logits
        with m.disable_adapter():
            torch.testing.assert_close(m(x).logits, base, rtol=0, atol=0)
    assert all(".b." in n for n, p in m.named_parameters() if p.requires_grad)
    assert (out_default - out_b).abs().max() > 1e-4 and (out_default - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("b", pf.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no adapter named"):
        m.set_adapter("c")
    m.delete_adapter("b")
    assert m.active_adapter == "default" and list(m.peft_config) == ["default"]
    assert not any(".b." in n for n, _ in m.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, out_default, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_restores_base_and_merge_and_unload(use_dora):
    model = tiny()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids()
    m = pf.get_peft_model(model, pf.LoraConfig(target_modules=ALL, use_dora=use_dora, init_lora_weights=False))
    if use_dora:
        for n, p in m.named_parameters():
            if "magnitude" in n:
                p.data.mul_(torch.rand_like(p) + 0.5)
    m.eval()
    # |W| + |s|·|B|·|A| per target weight: the terms of the merged weight, whatever the rounding of B·A
    merged_magnitude = {}
    for name, layer in m.named_modules():
        if isinstance(layer, LoraLinear):
            a, b = (t.weight.detach().double().abs() for t in (layer.lora_A["default"], layer.lora_B["default"]))
            key = name.removeprefix("base_model.model.") + ".weight"
            merged_magnitude[key] = base_state[key].double().abs() + abs(layer.scaling["default"]) * b @ a
    with torch.no_grad():
        adapted = m(x).logits
        adapted64 = copy.deepcopy(m).double()(x).logits
        m.merge_adapter()
        # the merged weights are rounded once more than the unmerged path's: judged against float64
        assert_as_accurate_as("merged", m(x).logits, adapted, adapted64)
        m.unmerge_adapter()
        assert_as_accurate_as("unmerged", m(x).logits, adapted, adapted64)
    restored = {k.replace("base_layer.", ""): v for k, v in m.base_model.model.state_dict().items() if "lora_" not in k}
    for k, v in base_state.items():
        # unmerge subtracts the very ΔW that merge added, so only the two roundings of W + ΔW and of
        # (W + ΔW) − ΔW remain; DoRA also scales by m/‖W + ΔW‖ and divides it back out (two more)
        if k in merged_magnitude:
            magnitude, roundings = merged_magnitude[k], 4 if use_dora else 2
            assert_within_rounding(k, restored[k], v.double(), magnitude, terms=0, roundings=roundings)
        else:
            assert torch.equal(restored[k], v), k
    merged = m.merge_and_unload()
    assert not any(isinstance(mod, LoraLinear) for mod in merged.modules())
    with torch.no_grad():
        assert_as_accurate_as("merged and unloaded", merged(x).logits, adapted, adapted64)


def test_pissa_keeps_the_output_and_moves_the_top_of_w_into_the_adapter():
    model = tiny()
    x = ids()
    with torch.no_grad():
        base = model(x).logits
        base64 = copy.deepcopy(model).double()(x).logits
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    m = pf.get_peft_model(model, pf.LoraConfig(r=4, lora_alpha=4, target_modules=ALL, init_lora_weights="pissa"))
    layer = m.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    residual = layer.base_layer.weight.detach()
    # W_res = W − s·B·A rounded: the stored parts add back to W up to that rounding and the product's
    # (a sum over the rank in float32)
    scale = layer.scaling["default"]
    err = (residual.double() + scale * b @ a - w.double()).abs()
    bound = rounding_bound(w.double().abs() + abs(scale) * b.abs() @ a.abs(), torch.float32, terms=4 + 1)
    assert (err <= bound).all(), f"W_res + s·B·A off W by {(err - bound).max().item():.3g} past the bound"
    with torch.no_grad():
        assert_as_accurate_as("logits", m(x).logits, base, base64)
    # W_res's top singular values are W's after the first r (measured in float64). Weyl: each moves by at
    # most ‖E‖₂, E the float32 SVD's backward error (a backward-stable SVD: about max(out, in) roundings of
    # ‖W‖₂), the rounding of W_res and that of the float32 copy compared here
    s = torch.linalg.svdvals(w.double())
    residual_s = torch.linalg.svdvals(residual.double())
    assert_within_rounding("σ", residual_s[:4].float(), s[4:8], s[0].expand(4), terms=max(w.shape), roundings=2)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes(bias):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    )
    m = pf.get_peft_model(model, pf.LoraConfig(target_modules=["c_attn"], bias=bias))
    trainable_bias = {n for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias")}
    if bias == "none":
        assert not trainable_bias
    elif bias == "lora_only":
        assert trainable_bias == {"base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"}
    else:
        assert len(trainable_bias) > 3 and "base_model.model.transformer.ln_f.bias" in trainable_bias


def test_modules_to_save_trains_a_copy():
    model = tiny()
    m = pf.get_peft_model(model, pf.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    wrapper = m.base_model.model.lm_head
    assert wrapper.modules_to_save["default"].weight.requires_grad
    assert not wrapper.original_module.weight.requires_grad
    loss = m(ids()).logits.square().mean()
    loss.backward()
    assert wrapper.modules_to_save["default"].weight.grad is not None


def test_print_trainable_parameters(capsys):
    m = pf.get_peft_model(tiny(), pf.LoraConfig(r=2, target_modules=["q_proj"]))
    m.print_trainable_parameters()
    line = capsys.readouterr().out.splitlines()[0]
    trainable = 3 * 2 * (32 + 32)
    total = sum(p.numel() for p in m.parameters())
    assert (
        line == f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )


def test_gaussian_and_default_init_start_at_the_identity():
    for init in (True, "gaussian"):
        m = pf.get_peft_model(tiny(), pf.LoraConfig(r=8, target_modules=["up_proj"], init_lora_weights=init))
        layer = m.base_model.model.model.layers[0].mlp.up_proj
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        a = layer.lora_A["default"].weight
        if init == "gaussian":
            assert abs(a.std().item() - 1 / 8) < 0.03
        else:  # Kaiming-uniform(a=√5): bound 1/√in
            assert a.abs().max() <= 1 / 32**0.5 + 1e-6


@settings(max_examples=50, deadline=None)
@given(
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    r=st.integers(1, 8),
    rows=st.integers(0, 12),
    use_dora=st.booleans(),
    use_rslora=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_layer_random_shapes_match_reference(
    in_features, out_features, r, rows, use_dora, use_rslora, bias, seed
):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias)
    layer = LoraLinear(base)
    layer.update_layer("default", r, 3.0, 0.0, use_rslora, use_dora, False)
    layer.set_adapter(["default"])
    if use_dora:
        layer.lora_magnitude_vector["default"].weight.data.mul_(torch.rand(out_features) + 0.5)
    x = torch.randn(rows, in_features)
    s = 3.0 / (r**0.5 if use_rslora else r)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight if use_dora else None
    ref = reference_linear(x, base.weight, base.bias, a, b, s, mag)
    norm = torch.linalg.norm(base.weight.double() + s * b.double() @ a.double(), dim=1)
    absolute = [None if t is None else t.detach().abs() for t in (x, base.weight, base.bias, a, b)]
    magnitude = reference_linear(*absolute, s, None if mag is None else mag.detach().abs(), norm)
    # in, then r, products summed (and the DoRA norm's in + r); x·Aᵀ kept in float32, then the result
    assert_within_rounding("y", layer(x), ref, magnitude, terms=2 * (in_features + r) + 4, roundings=2)
    layer.merge()
    # merged: W + s·B·A (for DoRA times m / ‖·‖) rounded to float32: a few roundings more, each within
    # one unit of |W| + s·|B|·|A| (times m / ‖·‖), which the same magnitude sums over
    assert_within_rounding(
        "merged y", layer.base_layer(x), ref, magnitude, terms=2 * (in_features + r) + 4, roundings=4
    )


def test_wrapped_modules_keep_their_attributes():
    m = pf.get_peft_model(tiny(), pf.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    q = m.base_model.model.model.layers[0].self_attn.q_proj
    assert q.weight is q.base_layer.weight and q.bias is None
    assert q.out_features == 32 and q.base_layer.in_features == 32
    head = m.base_model.model.lm_head
    assert head.weight is head.modules_to_save["default"].weight
    assert head.out_features == 32
    with pytest.raises(AttributeError):
        _ = q.no_such_attribute

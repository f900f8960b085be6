"""model(..., adapter_names=[...]): one adapter per sequence in one batch, forward and backward, equal to
running each adapter on its own sequences."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import pyfastpeft as pf
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.tuners import LoraLinear
from tests.conftest import assert_within_rounding, low_precision_error_bound

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def two_adapter_model(second_targets=TARGETS, second_r=2):
    torch.manual_seed(0)
    cfg = TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    model = pf.get_peft_model(TinyLlamaForCausalLM(cfg), pf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "a")
    model.add_adapter("b", pf.LoraConfig(r=second_r, lora_alpha=3, target_modules=second_targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    # train both adapters: PEFT leaves only the active one trainable
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    return model


def separate(model, ids, names):
    """Each sequence through its own adapter, one at a time; losses summed."""
    outs, total = [], 0.0
    for i, name in enumerate(names):
        seq = ids[i : i + 1]
        if name == "__base__":
            with model.disable_adapter():
                out = model(input_ids=seq, labels=seq)
        else:
            model.set_adapter(name)
            for _, p in adapter_params(model):  # set_adapter may freeze the other adapter
                p.requires_grad_(True)
            out = model(input_ids=seq, labels=seq)
        outs.append(out.logits)
        total = total + out.loss
    return torch.cat(outs), total


@pytest.mark.parametrize("second_targets", [TARGETS, ["q_proj", "v_proj"]])
def test_mixed_batch_equals_separate_runs(second_targets):
    model = two_adapter_model(second_targets)
    model.eval()
    ids = torch.randint(0, 64, (4, 9))
    names = ["a", "b", "__base__", "b"]
    # labels make a per-sequence mean loss; sum them to compare with the separate runs
    mixed_loss = sum(
        model(input_ids=ids[i : i + 1], labels=ids[i : i + 1], adapter_names=[names[i]]).loss for i in range(4)
    )
    _, sep_loss = separate(model, ids, names)
    _, ref_loss = separate(copy.deepcopy(model).double(), ids, names)
    # a float32 loss against float64: within twice the separate runs' error plus roundings of its size
    err, bound = low_precision_error_bound(mixed_loss.detach(), sep_loss.detach(), ref_loss.detach())
    assert err <= bound, (err, bound)
    # logits, and the gradients of both adapters against a float64 reference (both adapters receive some)
    assert_mixed_equals_separate(model, ids, names)


def lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def adapter_params(model):
    """Every tensor an adapter trains: LoRA matrices, DoRA magnitudes and modules_to_save copies."""
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n or ".modules_to_save." in n]


def test_two_adapters_train_together_in_one_batch():
    model = two_adapter_model()
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    before = {n: p.detach().clone() for n, p in lora_params(model)}
    opt = torch.optim.AdamW([p for _, p in lora_params(model)], lr=1e-2)
    ids = torch.randint(0, 64, (4, 9))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids, adapter_names=["a", "b", "a", "b"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for adapter in ("a", "b"):
        assert any(not torch.equal(p, before[n]) for n, p in lora_params(model) if f".{adapter}." in n)


def test_mixed_batch_errors():
    model = two_adapter_model()
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        model(input_ids=ids, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="2 names for a batch of shape"):
        model(input_ids=torch.randint(0, 64, (3, 5)), adapter_names=["a", "b"])
    model.train()
    model.base_model.model.model.layers[0].self_attn.q_proj.dropout_p["b"] = 0.3
    with pytest.raises(ValueError, match="must share lora_dropout"):
        model(input_ids=ids, adapter_names=["a", "b"])


def test_mixed_batch_compiles_without_graph_breaks():
    model = two_adapter_model()
    model.eval()
    ids = torch.randint(0, 64, (4, 9))
    names = ["a", "b", "__base__", "b"]
    expected = model(input_ids=ids, adapter_names=names).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    # aot_eager runs the same kernels in the same order as eager mode: bit-identical
    torch.testing.assert_close(compiled(input_ids=ids, adapter_names=names).logits, expected, rtol=0, atol=0)


def assert_mixed_equals_separate(model, ids, names):
    """Logits and the gradients of every adapter tensor from one mixed batch equal those of running each
    sequence through its own adapter (or the base) on its own. Checked in two parts, each with a bound
    derived from the computation:

    - every LoRA layer of the float32 model, where the mixed batch does its own sums (the multi-adapter
      kernel): its output and its adapters' gradients, given the input and output gradient it saw in the
      mixed run, within the rounding of those sums of the float64 formula run per sequence
      (assert_layer_matches_formula);
    - the routing through the whole network, in float64: the mixed run as close to the separate runs as
      the float32 separate runs are. A sequence sent through the wrong adapter (or a gradient to the
      wrong tensor) is off by the adapter's whole effect, which no rounding reaches.

    Comparing whole float32 networks with each other (or each with float64) would need a bound on how
    the roundings of every sum grow through the nonlinearities, which is not computable here; one
    sample of the separate runs' error can be small by luck, so "a few times that" is a judgement."""
    params = adapter_params(model)
    for _, p in params:
        p.requires_grad_(True)
    seen = capture_lora_layers(model)
    try:
        mixed = model(input_ids=ids, adapter_names=names).logits
        mixed_grads = torch.autograd.grad(mixed.square().sum(), [p for _, p in params])
    finally:
        for handle in seen.pop("handles"):
            handle.remove()
    grad_of = {id(p): g for (_, p), g in zip(params, mixed_grads, strict=True)}
    assert seen, "no LoRA layer ran the mixed batch"
    for path, record in seen.items():
        assert_layer_matches_formula(path, record, grad_of)
    sep32 = separate(model, ids, names)[0]
    sep32_grads = torch.autograd.grad(sep32.square().sum(), [p for _, p in params])
    ref_model = copy.deepcopy(model).double()
    ref_params = [p for _, p in adapter_params(ref_model)]
    for p in ref_params:
        p.requires_grad_(True)
    mixed64 = ref_model(input_ids=ids, adapter_names=names).logits
    mixed64_grads = torch.autograd.grad(mixed64.square().sum(), ref_params)
    sep64 = separate(ref_model, ids, names)[0]
    sep64_grads = torch.autograd.grad(sep64.square().sum(), ref_params)
    outputs = [("logits", mixed64, sep32, sep64)]
    outputs += [(n, *gs) for (n, _), *gs in zip(params, mixed64_grads, sep32_grads, sep64_grads, strict=True)]
    for name, m64, s32, s64 in outputs:
        err, bound = low_precision_error_bound(m64.detach(), s32.detach(), s64.detach(), factor=1.0)
        assert err <= bound, f"{name}: float64 mixed run off by {err:.3g} > the float32 runs' {bound:.3g}"
    for adapter in {n for n in names if n != "__base__"}:
        assert any(g.abs().sum() > 0 for (n, _), g in zip(params, mixed_grads, strict=True) if f".{adapter}." in n)
    return params, mixed_grads


def capture_lora_layers(model) -> dict:
    """Hooks on every LoRA linear layer that record, in the next mixed forward, the layer's input, its
    output, the adapters and sequence routing it used and (in the backward) its output gradient."""
    seen: dict = {"handles": []}

    def hook(layer, args, out, path):
        if layer.mixed_batch is None:
            return
        record = seen[path] = {"layer": layer, "x": args[0].detach(), "y": out.detach(), "mixed": layer.mixed_batch}
        if out.requires_grad:
            out.register_hook(lambda g: record.__setitem__("dy", g.detach()))

    for path, layer in model.named_modules():
        if isinstance(layer, LoraLinear):
            seen["handles"].append(layer.register_forward_hook(functools.partial(hook, path=path)))
    return seen


def assert_layer_matches_formula(path, record, grad_of):
    """One layer's mixed-batch output and its adapters' gradients within ``rounding_bound`` of the float64
    formula run per sequence on the same input and output gradient. Longest chain of sums behind an
    element: the tokens of the batch (a gradient sums over them), in_features (x·Wᵀ, x·Aᵀ, the DoRA
    norm), out_features (dy·B) and the rank, plus a few single operations (scaling, bias, DoRA's
    factor); two roundings to the dtype (the result, and x·Aᵀ held between the two products)."""
    layer, x, dy = record["layer"], record["x"], record["dy"]
    names, seq_indices = record["mixed"]
    trained = {n: p for n, p in layer.named_parameters() if "lora_" in n and p.requires_grad}
    routed = [names[i] if i >= 0 else "__base__" for i in seq_indices]
    ref64 = layer_formula(layer, routed, x, dy, trained, lambda t: t.double())
    magnitude = layer_formula(layer, routed, x, dy, trained, lambda t: t.double().abs(), absolute=True)
    ours = [record["y"], *(grad_of[id(p)] for p in trained.values())]
    r_max = max(layer.r.values())
    terms = x[..., 0].numel() + layer.in_features + layer.out_features + r_max + 8
    for name, o, r, m in zip(["y", *trained], ours, ref64, magnitude, strict=True):
        if r is None:  # an adapter this batch does not use: no gradient reaches it
            assert o.abs().max() == 0, f"{path}.{name}"
            continue
        assert_within_rounding(f"{path}.{name}", o, r, m, terms=terms, roundings=2)


def layer_formula(layer, names, x, dy, trained, convert, absolute=False):
    """PEFT's LoRA / DoRA formula (lora_dora_reference) run on each sequence alone through its adapter
    (the base for "__base__"), on converted copies of the layer's tensors; the output and the gradients
    of ``trained`` for output gradient ``dy``. ``absolute``: run on absolute values with the true DoRA
    norm, giving each element's sum of absolute terms."""
    leaves = {n: convert(p.detach()).requires_grad_() for n, p in trained.items()}
    base = layer.base_layer
    w = convert(layer.weight_oi().detach())
    bias = None if base.bias is None else convert(base.bias.detach())
    xs = convert(x)
    outs = []
    for i, name in enumerate(names):
        if name not in layer.r:  # the base alone
            outs.append(xs[i] @ w.T + (0 if bias is None else bias))
            continue
        a, bb = leaves[f"lora_A.{name}.weight"], leaves[f"lora_B.{name}.weight"]
        m = leaves.get(f"lora_magnitude_vector.{name}.weight")
        norm = None
        if absolute and m is not None:  # the true norm, not that of |W| + |s·B·A|
            w64, a64, b64 = (
                t.detach().double() for t in (layer.weight_oi(), layer.lora_A[name].weight, layer.lora_B[name].weight)
            )
            norm = torch.linalg.norm(w64 + layer.scaling[name] * b64 @ a64, dim=1)
        outs.append(lora_dora_reference(xs[i], w, bias, a, bb, layer.scaling[name], m, norm))
    out = torch.stack(outs)
    return [out, *torch.autograd.grad(out, list(leaves.values()), convert(dy), allow_unused=True)]


def tiny_llama():
    torch.manual_seed(0)
    return TinyLlamaForCausalLM(TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2))


@pytest.mark.parametrize("b_uses_dora", [False, True])
def test_mixed_batch_with_dora_equals_separate_runs(b_uses_dora):
    model = pf.get_peft_model(
        tiny_llama(), pf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True), "a"
    )
    model.add_adapter("b", pf.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], use_dora=b_uses_dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))  # m ≠ ‖W + s·B·A‖: the scale matters
    model.eval()
    ids = torch.randint(0, 64, (4, 9))
    params, grads = assert_mixed_equals_separate(model, ids, ["a", "b", "__base__", "a"])
    magnitudes = [g for (n, _), g in zip(params, grads, strict=True) if "lora_magnitude_vector" in n]
    assert magnitudes and all(g.abs().sum() > 0 for g in magnitudes[:1])


def test_mixed_batch_with_dora_trains_with_dropout():
    model = pf.get_peft_model(
        tiny_llama(), pf.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, use_dora=True), "a"
    )
    model.add_adapter("b", pf.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    model.train()
    ids = torch.randint(0, 64, (2, 7))
    loss = model(input_ids=ids, labels=ids, adapter_names=["a", "b"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "magnitude" in n)


def test_mixed_batch_with_lora_embedding_equals_separate_runs():
    model = pf.get_peft_model(
        tiny_llama(), pf.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), "a"
    )
    model.add_adapter("b", pf.LoraConfig(r=2, lora_alpha=3, target_modules=["embed_tokens", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name or "lora_B" in name:
                p.normal_(std=0.5)  # PEFT starts A (embeddings) and B (linears) at zero
    model.eval()
    ids = torch.randint(0, 64, (5, 6))
    assert_mixed_equals_separate(model, ids, ["b", "a", "__base__", "b", "a"])


def test_mixed_batch_with_modules_to_save_equals_separate_runs():
    model = pf.get_peft_model(
        tiny_llama(), pf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"]), "a"
    )
    # b has its own lm_head copy too; c has none, so its sequences use the original lm_head
    model.add_adapter("b", pf.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("c", pf.LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    ids = torch.randint(0, 64, (5, 6))
    params, grads = assert_mixed_equals_separate(model, ids, ["b", "a", "__base__", "c", "a"])
    copies = {n: g for (n, _), g in zip(params, grads, strict=True) if ".modules_to_save." in n}
    assert any(".a." in n and g.abs().sum() > 0 for n, g in copies.items())
    assert any(".b." in n and g.abs().sum() > 0 for n, g in copies.items())
    # the original module stays frozen: no gradient reaches it from the __base__ and c sequences
    original = model.base_model.model.lm_head.original_module.weight
    assert not original.requires_grad


def test_mixed_batch_with_dora_embedding_and_modules_to_save_compiles_without_graph_breaks():
    # a: LoRA on the embedding; b: DoRA on the linears and its own lm_head copy
    model = pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]), "a")
    model.add_adapter(
        "b", pf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name or "lora_B" in name:
                p.normal_(std=0.5)
    model.eval()
    ids = torch.randint(0, 64, (3, 5))
    names = ["b", "a", "__base__"]
    expected = model(input_ids=ids, adapter_names=names).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    # aot_eager runs the same kernels in the same order as eager mode: bit-identical
    torch.testing.assert_close(compiled(input_ids=ids, adapter_names=names).logits, expected, rtol=0, atol=0)


def test_mixed_batch_inference_stack_is_kept_and_follows_updates():
    """With autograd off the stacked adapters are kept (in the layout the CPU kernels read in place)
    until an adapter changes: same logits as the training path, and an in-place update is seen."""
    model = two_adapter_model()
    model.eval()
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(3))
    names = ["a", "b", "__base__", "b"]
    trained = model(input_ids=ids, adapter_names=names).logits.detach()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        first = model(input_ids=ids, adapter_names=names).logits
        stack = layer._mixed_stack_cache[1]
        assert model(input_ids=ids, adapter_names=names).logits.equal(first)
        assert layer._mixed_stack_cache[1][0] is stack[0]  # kept, not rebuilt
        assert stack[1].transpose(1, 2).is_contiguous()  # B held as Bᵀ
        # the same kernel sums in the same order whatever the layout it reads B in: bit-identical
        torch.testing.assert_close(first, trained, rtol=0, atol=0)
        for name, p in model.named_parameters():
            if "lora_B.b" in name:
                p.mul_(2.0)  # in place, as an optimizer step would
        second = model(input_ids=ids, adapter_names=names).logits
    assert second[0].equal(first[0]) and second[2].equal(first[2])  # adapter a and the base: unchanged
    assert not torch.allclose(second[1], first[1])
    torch.testing.assert_close(second, model(input_ids=ids, adapter_names=names).logits.detach(), rtol=0, atol=0)


def lora_dora_reference(x, w, b, a, bb, s, magnitude=None, norm=None):
    """PEFT's LoRA / DoRA in the inputs' dtype (dropout off): ``c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`` with
    c = m / ‖W + s·B·A‖ per output row, the norm a constant (detached), c = 1 for plain LoRA. ``norm``
    given: used instead (the absolute-value run that measures the terms' sizes takes the true norm)."""
    out = x @ w.T + s * (x @ a.T) @ bb.T
    if magnitude is not None:
        if norm is None:
            norm = torch.linalg.norm(w + s * bb @ a, dim=1).detach()
        out = out * (magnitude / norm)
    return out if b is None else out + b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b_uses_dora", [False, True])
def test_mixed_dora_layer_against_float64_reference(dtype, b_uses_dora):
    """A mixed batch through one layer (DoRA adapter a, LoRA or DoRA adapter b, the base alone), outputs and
    every gradient against the float64 formula run per sequence, within twice plain PyTorch's error in the
    same dtype plus two roundings of the sums' absolute terms."""
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(13, 7).to(dtype))
    layer.update_layer("a", 4, 8.0, 0.0, False, True, False)
    layer.update_layer("b", 2, 3.0, 0.0, False, b_uses_dora, False)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    trained = {n: p.requires_grad_(True) for n, p in layer.named_parameters() if "lora_" in n}
    names, seq_indices = ["a", "b", "__base__", "a"], [0, 1, -1, 0]
    x = torch.randn(4, 5, 13, dtype=torch.float64).to(dtype).requires_grad_()
    dy = torch.randn(4, 5, 7, dtype=torch.float64).to(dtype)
    layer.mixed_batch = (["a", "b"], seq_indices)
    try:
        y = layer(x)
    finally:
        layer.mixed_batch = None
    ours = [y, *torch.autograd.grad(y, [x, *trained.values()], dy)]

    def per_sequence(convert, absolute=False):
        """The formula run on each sequence alone, and its gradients, on converted leaves."""
        leaves = {n: convert(p.detach()).requires_grad_() for n, p in trained.items()}
        w, bias = (convert(t.detach()) for t in (layer.base_layer.weight, layer.base_layer.bias))
        xs = convert(x.detach()).requires_grad_()
        outs = []
        for i, name in enumerate(names):
            if name == "__base__":
                outs.append(xs[i] @ w.T + bias)
                continue
            a, bb = leaves[f"lora_A.{name}.weight"], leaves[f"lora_B.{name}.weight"]
            m = leaves.get(f"lora_magnitude_vector.{name}.weight")
            norm = None
            if absolute and m is not None:  # the true norm, not that of |W| + |s·B·A|
                p = dict(layer.named_parameters())
                w64, a64, b64 = (
                    t.detach().double()
                    for t in (layer.base_layer.weight, p[f"lora_A.{name}.weight"], p[f"lora_B.{name}.weight"])
                )
                norm = torch.linalg.norm(w64 + layer.scaling[name] * b64 @ a64, dim=1)
            outs.append(lora_dora_reference(xs[i], w, bias, a, bb, layer.scaling[name], m, norm))
        out = torch.stack(outs)
        return [out, *torch.autograd.grad(out, [xs, *leaves.values()], convert(dy), allow_unused=True)]

    ref64 = per_sequence(lambda t: t.double())
    lowp = per_sequence(lambda t: t.clone())
    magnitude = per_sequence(lambda t: t.double().abs(), absolute=True)
    for name, o, t, r, m in zip(["y", "dx", *trained], ours, lowp, ref64, magnitude, strict=True):
        assert o.dtype == dtype and o.shape == r.shape, name
        err, bound = low_precision_error_bound(o, t, r, magnitude=m)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"

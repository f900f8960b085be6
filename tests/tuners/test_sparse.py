"""SparseConfig / SparseModel: a sparse delta on the target linears through the PEFT frame."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyfastpeft as pf
from pyfastpeft.nn import SparseDeltaLinear
from pyfastpeft.tuners import SparseConfig, SparseModel
from tests.conftest import assert_as_accurate_as

from .tiny_task import VOCAB, tiny_llama


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def sparse(model=None, **kw) -> pf.PeftModel:
    kw.setdefault("target_modules", ["q_proj", "up_proj"])
    kw.setdefault("density", 0.05)
    return pf.get_peft_model(model if model is not None else tiny_llama(), SparseConfig(**kw))


def set_delta(m: pf.PeftModel) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in m.modules():
            if isinstance(layer, SparseDeltaLinear):
                layer.delta.copy_(torch.randn(layer.delta.shape, generator=gen))


def test_targets_and_trainable():
    m = sparse()
    assert isinstance(m.base_model, SparseModel)
    layers = [(n, l) for n, l in m.named_modules() if isinstance(l, SparseDeltaLinear)]
    assert len(layers) == 2 * 3
    k = round(0.05 * 32 * 32) * 3 + round(0.05 * 48 * 32) * 3
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [n + ".delta" for n, _ in layers]
    assert m.get_nb_trainable_parameters()[0] == k
    x = ids()
    torch.testing.assert_close(m(x).logits, tiny_llama()(x).logits, rtol=0, atol=0)  # Δ starts at zero


def test_selection_matches_the_layer_rule():
    base = tiny_llama()
    q = base.model.layers[0].self_attn.q_proj
    expected = SparseDeltaLinear.from_linear(q, density=0.05, strategy="magnitude").indices
    m = sparse(base)
    assert torch.equal(m.base_model.model.model.layers[0].self_attn.q_proj.indices, expected)
    a = sparse(selection="random", seed=5)
    b = sparse(selection="random", seed=5)
    c = sparse(selection="random", seed=6)
    path = "model.layers.1.mlp.up_proj"
    assert torch.equal(a.get_base_model().get_submodule(path).indices, b.get_base_model().get_submodule(path).indices)
    assert not torch.equal(
        a.get_base_model().get_submodule(path).indices, c.get_base_model().get_submodule(path).indices
    )


def test_disable_merge_unmerge_unload():
    x = ids()
    plain = tiny_llama()(x).logits
    m = sparse()
    set_delta(m)
    y = m(x).logits
    assert not torch.allclose(y, plain)
    with m.disable_adapter():
        torch.testing.assert_close(m(x).logits, plain, rtol=0, atol=0)
    torch.testing.assert_close(m(x).logits, y, rtol=0, atol=0)
    with torch.no_grad():
        y64 = copy.deepcopy(m).double()(x).logits
    m.merge_adapter()
    # W₀ + Δ rounded to float32, then the dense product, against the sparse op's product: judged by
    # their errors against the float64 run
    assert_as_accurate_as("merged", m(x).logits, y, y64)
    r = pf.report(m, with_disk_size=False)  # merged, ΔW is still the adapter's
    assert len(r.matrices) == 6 and r.changed_entries == m.get_nb_trainable_parameters()[0]
    m.unmerge_adapter()
    assert_as_accurate_as("unmerged", m(x).logits, y, y64)
    merged = m.merge_and_unload()
    assert not any(isinstance(l, SparseDeltaLinear) for l in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert_as_accurate_as("merged and unloaded", merged(x).logits, y, y64)
    m2 = sparse()
    set_delta(m2)
    restored = m2.unload()
    # unload puts the untouched W₀ back: the base model's kernels on the base model's weights
    torch.testing.assert_close(restored(x).logits, plain, rtol=0, atol=0)


def test_report_rows_are_the_deltas():
    m = sparse(density=0.1)
    set_delta(m)
    r = pf.report(m)
    k = {row.name: row.changed_entries for row in r.matrices}
    assert k["model.layers.0.self_attn.q_proj.weight"] == round(0.1 * 32 * 32)
    assert r.changed_entries == sum(k.values())
    assert r.adapter_bytes_on_disk is not None


def test_training_moves_only_the_delta():
    m = sparse()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(ids(), labels=ids()).loss.backward()
    opt.step()
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.endswith(".delta") for n in changed)


def test_config_errors():
    with pytest.raises(ValueError, match="target_modules: expected a list of module names, got None"):
        SparseConfig()
    with pytest.raises(ValueError, match=r"density: expected a fraction in \(0, 1\], got 0"):
        SparseConfig(target_modules=["q_proj"], density=0)
    with pytest.raises(ValueError, match="selection: expected one of"):
        SparseConfig(target_modules=["q_proj"], selection="gradient")
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] matched no nn.Linear"):
        sparse(target_modules=["nope"])
    with pytest.raises(ValueError, match="unknown sparse fields"):
        SparseConfig.from_dict({"target_modules": ["q_proj"], "dense": 1})

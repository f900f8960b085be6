"""BiasOnlyLinear and bitfit_: BitFit on a single layer and on the built-in model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM, make_batch
from pyfastpeft.nn import BiasOnlyLinear, bitfit_
from tests.conftest import assert_within_rounding


@pytest.mark.parametrize("has_bias", [True, False])
def test_from_linear_matches_linear(device, has_bias):
    torch.manual_seed(0)
    linear = nn.Linear(19, 11, bias=has_bias, device=device, dtype=torch.float64)
    weight_before = linear.weight.detach().clone()
    layer = BiasOnlyLinear.from_linear(linear)
    assert layer.weight is linear.weight and not layer.weight.requires_grad and layer.bias.requires_grad
    if not has_bias:
        assert torch.equal(layer.bias, torch.zeros(11, device=device, dtype=torch.float64))
    x = torch.randn(2, 7, 19, device=device, dtype=torch.float64, requires_grad=True)
    ref_bias = layer.bias.detach().clone().requires_grad_(True)
    ref = nn.functional.linear(x, weight_before, ref_bias)
    y = layer(x)
    # float64 both, summed in any order: each result within its sum's roundings (19 products and the
    # bias for y, 11 products for dx, the 14 rows for db), at the size of the sum of absolute terms
    w = weight_before.abs()
    assert_within_rounding("y", y, ref, x.detach().abs() @ w.t() + ref_bias.detach().abs(), terms=19 + 1)
    gy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, layer.bias), gy)
    dx_ref, db_ref = torch.autograd.grad(ref, (x, ref_bias), gy)
    assert_within_rounding("dx", dx, dx_ref, gy.abs() @ w, terms=11)
    assert_within_rounding("db", db, db_ref, gy.abs().sum((0, 1)), terms=2 * 7)


def test_new_module_shapes_and_repr():
    layer = BiasOnlyLinear(5, 3)
    assert layer.weight.shape == (3, 5) and not layer.weight.requires_grad
    assert layer.bias.shape == (3,) and layer.bias.requires_grad
    assert "in_features=5, out_features=3" in repr(layer)
    assert layer(torch.randn(4, 5)).shape == (4, 3)


def test_from_linear_rejects_other_modules():
    with pytest.raises(ValueError, match="linear: expected an nn.Linear"):
        BiasOnlyLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_bitfit_keeps_layer_norm_bias_trainable():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2, bias=False), nn.Embedding(3, 4))
    names = bitfit_(model)
    assert sorted(names) == ["0.bias", "1.bias", "2.bias"]
    assert isinstance(model[0], BiasOnlyLinear) and isinstance(model[2], BiasOnlyLinear)
    assert not model[1].weight.requires_grad and not model[3].weight.requires_grad
    assert sorted(bitfit_(model)) == sorted(names)  # a second call changes nothing
    with pytest.raises(ValueError, match="model: a bare nn.Linear"):
        bitfit_(nn.Linear(2, 2))


def test_bitfit_trains_tiny_llama_and_leaves_frozen_parameters_bit_identical():
    torch.manual_seed(0)
    cfg = TinyLlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model = TinyLlamaForCausalLM(cfg)
    names = bitfit_(model)
    linear_count = sum(isinstance(m, BiasOnlyLinear) for m in model.modules())
    assert linear_count == 2 * 7 + 1  # q, k, v, o, gate, up, down per block, plus lm_head
    assert len(names) == linear_count and all(n.endswith(".bias") for n in names)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        batch = make_batch("copy", 16, 6, cfg.vocab_size, gen)
        loss = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # from ~ln(vocab) toward the entropy of the random answer symbols, the floor for a random-init base
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05 and max(losses[-5:]) < losses[0] - 0.15, losses
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert params[name].grad is None
        assert torch.equal(params[name].detach(), before), name
    assert all(not torch.equal(params[n].detach(), before) for n, before in trainable.items())

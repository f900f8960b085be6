"""SparseDeltaLinear + SparseAdamW, index selection, regrowth and pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfastpeft  # noqa: F401
from pyfastpeft.nn import SparseDeltaLinear, gradient_scores, prune_magnitude_, select_indices
from pyfastpeft.nn.pruning import magnitude_mask
from pyfastpeft.ops import reference
from pyfastpeft.optim import FusedAdamW, SparseAdamW
from tests.conftest import assert_as_accurate_as, assert_within_rounding


def make_linear(device, out_f=24, in_f=40, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f).to(device, dtype)


def batch(step, n, in_f, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, in_f, generator=g).to(device, dtype), torch.randn(n, 24, generator=g).to(device, dtype)


def test_training_matches_dense_reference_and_changes_exactly_k(device):
    base = make_linear(device)
    w0 = base.weight.detach().clone()
    layer = SparseDeltaLinear.from_linear(
        base, density=0.1, strategy="random", generator=torch.Generator().manual_seed(1)
    )
    k = layer.delta.numel()
    assert k == round(0.1 * w0.numel())
    # the same training on the reference formula with torch's AdamW, in float32 and in float64: ours is
    # judged by its distance from the float64 run against the plain float32 run's
    refs = {dtype: nn.Parameter(torch.zeros(k, device=device, dtype=dtype)) for dtype in (torch.float32, torch.float64)}
    opt = SparseAdamW([layer.delta], lr=1e-2)
    ref_opts = [torch.optim.AdamW([p], lr=1e-2) for p in refs.values()]
    x0, _ = batch(0, 5, 40, device)
    torch.testing.assert_close(layer(x0), base(x0), rtol=0, atol=0)  # Δ = 0 at the start: W₀'s product
    for step in range(20):
        x, target = batch(step, 9, 40, device)
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for (dtype, ref_delta), ref_opt in zip(refs.items(), ref_opts, strict=True):
            w, b = w0.to(dtype), base.bias.detach().to(dtype)
            out = reference.sparse_delta_linear(x.to(dtype), w, b, ref_delta, layer.indices)
            ref_loss = (out - target.to(dtype)).pow(2).mean()
            ref_opt.zero_grad()
            ref_loss.backward()
            ref_opt.step()
    assert_as_accurate_as("delta", layer.delta, refs[torch.float32], refs[torch.float64])
    assert torch.equal(layer.weight, w0) and base.weight.grad is None  # W₀ never changes, no dense grad
    state = opt.state[layer.delta]
    assert state["exp_avg"].shape == (k,) and state["exp_avg_sq"].shape == (k,)
    assert layer.report() == {"trainable": k, "changed": k, "total": w0.numel()}
    x, _ = batch(99, 4, 40, device)
    y = layer(x)
    delta64 = layer.delta.detach().double()  # merge moves Δ into W and zeroes it
    merged = layer.merge()
    # both against float64 on the same Δ: sums over in (and the bias); the merged weight W₀ + Δ is one
    # more rounding to float32
    w64, b64, x64 = w0.double(), base.bias.detach().double(), x.double()
    expected = reference.sparse_delta_linear(x64, w64, b64, delta64, layer.indices)
    magnitude = reference.sparse_delta_linear(x64.abs(), w64.abs(), b64.abs(), delta64.abs(), layer.indices)
    assert_within_rounding("y", y, expected, magnitude, terms=40 + 1, roundings=1)
    assert_within_rounding("merged", merged(x), expected, magnitude, terms=40 + 1, roundings=2)
    assert int((merged.weight != w0).sum()) == k


def test_select_indices_strategies():
    w = torch.randn(16, 12)
    idx = select_indices(w, 20, "magnitude")
    assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
    threshold = w.abs().flatten().sort(descending=True).values[19]
    assert bool((w.flatten()[idx].abs() >= threshold).all())
    r1 = select_indices(w, 20, "random", generator=torch.Generator().manual_seed(0))
    r2 = select_indices(w, 20, "random", generator=torch.Generator().manual_seed(1))
    assert r1.unique().numel() == 20 and not torch.equal(r1, r2)
    exclude = torch.zeros_like(w, dtype=torch.bool)
    exclude.view(-1)[idx] = True
    assert not set(select_indices(w, 20, "magnitude", exclude=exclude).tolist()) & set(idx.tolist())
    with pytest.raises(ValueError, match="scores"):
        select_indices(w, 3, "fisher")
    with pytest.raises(ValueError, match="strategy"):
        select_indices(w, 3, "largest")
    with pytest.raises(ValueError, match="k: expected"):
        select_indices(w, 1000, "magnitude")


@pytest.mark.parametrize("kind", ["gradient", "fisher"])
def test_gradient_scores_accumulate_dense_grads_only_during_selection(kind):
    lin = make_linear("cpu")
    lin.weight.requires_grad_(False)
    batches = [batch(s, 6, 40, "cpu") for s in range(3)]
    scores = gradient_scores([lin], lambda b: (lin(b[0]) - b[1]).pow(2).sum(), batches, kind=kind)[0]
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    expected = torch.zeros_like(w)
    magnitude = torch.zeros_like(w)
    for x, t in batches:
        x, t = x.double(), t.double()
        g = 2 * (x @ w.t() + b - t).t() @ x
        g_abs = 2 * (x.abs() @ w.abs().t() + b.abs() + t.abs()).t() @ x.abs()  # Σ|terms| of g
        expected += g.abs() if kind == "gradient" else g * g
        magnitude += g_abs if kind == "gradient" else g_abs * g_abs
    # g sums over in (the residual) and the 6 rows, the square doubles its relative error, then 3 batches
    terms = (40 + 2 + 6) * (1 if kind == "gradient" else 2) + 3
    assert_within_rounding("scores", scores, expected, magnitude, terms=terms, roundings=1)
    assert not lin.weight.requires_grad and lin.weight.grad is None
    layer = SparseDeltaLinear.from_linear(lin, k=30, strategy=kind, scores=scores)
    assert set(layer.indices.tolist()) == set(scores.flatten().topk(30).indices.tolist())


def test_regrow_keeps_k_and_carries_moments(device):
    layer = SparseDeltaLinear.from_linear(make_linear(device), k=50, strategy="magnitude")
    opt = SparseAdamW([layer.delta], lr=1e-2)
    for step in range(3):
        x, t = batch(step, 8, 40, device)
        opt.zero_grad()
        (layer(x) - t).pow(2).mean().backward()
        opt.step()
    old_idx, old_delta = layer.indices.clone(), layer.delta.detach().clone()
    old_m = opt.state[layer.delta]["exp_avg"].clone()
    scores = torch.rand(24, 40, device=device)
    assert layer.regrow(scores, fraction=0.2, optimizer=opt) == 10
    idx = layer.indices
    assert idx.numel() == 50 and bool((idx[1:] > idx[:-1]).all())
    assert len(set(old_idx.tolist()) & set(idx.tolist())) == 40
    for j, flat in enumerate(idx.tolist()):
        m = opt.state[layer.delta]["exp_avg"][j]
        if flat in old_idx.tolist():
            o = old_idx.tolist().index(flat)
            assert layer.delta[j] == old_delta[o] and m == old_m[o]
        else:
            assert layer.delta[j] == 0 and m == 0
    kept = old_delta.abs().topk(40).indices  # the smallest |Δ| were dropped
    assert set(old_idx[kept].tolist()) <= set(idx.tolist())
    x, t = batch(5, 8, 40, device)
    opt.zero_grad()
    (layer(x) - t).pow(2).mean().backward()
    opt.step()  # state and parameter sizes agree after the regrowth


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruned_weights_stay_exactly_zero(device, pattern):
    lin = make_linear(device)
    mask = prune_magnitude_(lin, 0.5, pattern)
    assert int((~mask).sum()) == lin.weight.numel() // 2
    if pattern == "2:4":
        assert bool((mask.view(-1, 4).sum(1) == 2).all())
    opt = FusedAdamW(lin.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(20):
        x, t = batch(step, 8, 40, device)
        opt.zero_grad()
        (lin(x) - t).pow(2).mean().backward()
        opt.step()
    w = lin.weight.detach()
    assert bool((w[~mask] == 0).all()) and bool((w[mask] != 0).all())


def test_pruned_base_excluded_from_delta():
    lin = make_linear("cpu")
    mask = prune_magnitude_(lin, 0.5)
    layer = SparseDeltaLinear.from_linear(lin, k=100, strategy="random", exclude=~mask)
    assert bool(mask.view(-1)[layer.indices].all())
    with pytest.raises(ValueError, match="2:4 pruning needs"):
        magnitude_mask(torch.randn(3, 6), pattern="2:4")


def test_bad_module_arguments():
    lin = make_linear("cpu")
    with pytest.raises(ValueError, match="density, k"):
        SparseDeltaLinear.from_linear(lin)
    with pytest.raises(ValueError, match="indices: expected strictly increasing"):
        SparseDeltaLinear(lin.weight, None, torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="indices: out of range"):
        SparseDeltaLinear(lin.weight, None, torch.tensor([0, 24 * 40]))

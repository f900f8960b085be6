"""Sampled-gradient op and sparse-delta linear against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpeft  # noqa: F401
from pyfastpeft.ops import reference, sampled_weight_grad, sparse_delta_linear
from tests.conftest import FLOAT_DTYPES, low_precision_error_bound


def random_indices(out_f, in_f, k, seed=0, dtype=torch.int64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(out_f * in_f, generator=g)[:k].sort().values.to(device, dtype)


def randn(*shape, device, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 700),
    out_f=st.integers(1, 23),
    in_f=st.integers(1, 29),
    frac=st.floats(0.0, 1.0),
    int32=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sampled_grad_matches_dense_gather_float64(n, out_f, in_f, frac, int32, seed):
    k = int(frac * out_f * in_f)
    idx = random_indices(out_f, in_f, k, seed, torch.int32 if int32 else torch.int64)
    gy, x = randn(n, out_f, device="cpu", seed=seed), randn(n, in_f, device="cpu", seed=seed + 1)
    ours = sampled_weight_grad(gy, x, idx, in_f)
    ref = reference.sampled_weight_grad(gy, x, idx, in_f)
    # each of the two sums of n products, in its own order, is within n roundings of the sum of |terms|
    bound = 2 * max(n, 1) * torch.finfo(torch.float64).eps * reference.sampled_weight_grad(gy.abs(), x.abs(), idx, in_f)
    assert ours.shape == ref.shape and ((ours - ref).abs() <= bound).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sampled_grad_low_precision(device, dtype):
    out_f, in_f, k = 37, 53, 400
    idx = random_indices(out_f, in_f, k, device=device)
    gy64 = randn(3, 41, out_f, device=device)[:, ::2]  # non-contiguous, 3-D
    x64 = randn(3, 21, in_f, device=device, seed=1)
    gy, x = gy64.to(dtype), x64.to(dtype)
    ours = sampled_weight_grad(gy, x, idx, in_f)
    assert ours.dtype == dtype and ours.shape == (k,)
    ref = reference.sampled_weight_grad(gy.double(), x.double(), idx, in_f)
    magnitude = reference.sampled_weight_grad(gy.double().abs(), x.double().abs(), idx, in_f)
    err, bound = low_precision_error_bound(
        ours, reference.sampled_weight_grad(gy, x, idx, in_f), ref, magnitude=magnitude
    )
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sparse_delta_linear_forward_backward(device, dtype):
    out_f, in_f, k = 19, 33, 150
    idx = random_indices(out_f, in_f, k, device=device)
    x64 = randn(2, 7, in_f, device=device).requires_grad_()
    w64 = randn(out_f, in_f, device=device, seed=1)
    b64 = randn(out_f, device=device, seed=2).requires_grad_()
    d64 = randn(k, device=device, seed=3).requires_grad_()
    gy64 = randn(2, 7, out_f, device=device, seed=4)
    low = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in (x64, w64, b64, d64)]
    lowp_ref = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in (x64, w64, b64, d64)]
    y = sparse_delta_linear(*low[:3], low[3], idx)
    y.backward(gy64.to(dtype))
    y_ref = reference.sparse_delta_linear(x64, w64, b64, d64, idx)
    y_ref.backward(gy64)
    y_lowp = reference.sparse_delta_linear(*lowp_ref[:3], lowp_ref[3], idx)
    y_lowp.backward(gy64.to(dtype))
    # the same sums over absolute values: the size of the terms each result adds up
    absolute = [t.detach().abs().requires_grad_(t.requires_grad) for t in (x64, w64, b64, d64)]
    y_abs = reference.sparse_delta_linear(*absolute[:3], absolute[3], idx)
    y_abs.backward(gy64.abs())
    pairs = [(y, y_lowp, y_ref, y_abs)] + [
        (a.grad, b.grad, c.grad, m.grad)
        for a, b, c, m in zip(low, lowp_ref, (x64, w64, b64, d64), absolute, strict=True)
        if c.requires_grad
    ]
    for ours, torch_lowp, ref, magnitude in pairs:
        err, bound = low_precision_error_bound(ours.detach(), torch_lowp.detach(), ref.detach(), magnitude=magnitude)
        assert err <= bound, (err, bound)


def test_gradcheck_float64(device):
    out_f, in_f, k = 6, 5, 11
    idx = random_indices(out_f, in_f, k, device=device)
    x = randn(4, in_f, device=device).requires_grad_()
    w = randn(out_f, in_f, device=device, seed=1)
    b = randn(out_f, device=device, seed=2).requires_grad_()
    d = randn(k, device=device, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b, d: sparse_delta_linear(x, w, b, d, idx), (x, b, d))
    # the backward is its own op, without a derivative: a second derivative is refused, never silently 0
    (g,) = torch.autograd.grad(sparse_delta_linear(x, w, b, d, idx).square().sum(), d, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(g.sum(), d)


def test_opcheck(device):
    out_f, in_f, k = 9, 7, 20
    idx = random_indices(out_f, in_f, k, device=device, dtype=torch.int32)
    x = randn(5, in_f, device=device, dtype=torch.float32).requires_grad_()
    w = randn(out_f, in_f, device=device, dtype=torch.float32, seed=1)
    b = randn(out_f, device=device, dtype=torch.float32, seed=2).requires_grad_()
    d = randn(k, device=device, dtype=torch.float32, seed=3).requires_grad_()
    gy = randn(5, out_f, device=device, dtype=torch.float32, seed=4)
    ops = torch.ops.pyfastpeft
    torch.library.opcheck(ops.sparse_delta_linear.default, (x, w, b, d, idx))
    torch.library.opcheck(
        ops.sparse_delta_linear_backward.default, (gy, x.detach(), w, d.detach(), idx, [True, True, True])
    )
    torch.library.opcheck(ops.sampled_weight_grad.default, (gy, x.detach(), idx, in_f))


def test_bad_indices_rejected(device):
    gy, x = randn(4, 3, device=device), randn(4, 5, device=device)
    with pytest.raises(ValueError, match="indices: entry 1 is 15, out of range"):
        sampled_weight_grad(gy, x, torch.tensor([0, 15], device=device), 5)
    with pytest.raises(ValueError, match="out of range"):
        sampled_weight_grad(gy, x, torch.tensor([-1, 3], device=device), 5)
    # sampled_weight_grad takes any order (tests/ops/test_bad_inputs.py); the sparse delta does not
    w15 = randn(3, 5, device=device)
    with pytest.raises(ValueError, match=r"strictly increasing.*entry 2 \(4\) follows 4"):
        sparse_delta_linear(x, w15, None, randn(3, device=device), torch.tensor([1, 4, 4], device=device))
    with pytest.raises(ValueError, match="strictly increasing"):
        sparse_delta_linear(x, w15, None, randn(2, device=device), torch.tensor([3, 1], device=device))
    with pytest.raises(ValueError, match="indices: expected an int64 or int32"):
        sampled_weight_grad(gy, x, torch.tensor([1.0], device=device), 5)
    with pytest.raises(ValueError, match="x: expected size 4 in dimension 1"):
        sampled_weight_grad(gy, x, torch.tensor([1], device=device), 4)
    w = randn(3, 5, device=device)
    with pytest.raises(ValueError, match="delta: expected size 2"):
        sparse_delta_linear(x, w, None, randn(3, device=device), torch.tensor([0, 1], device=device))
    with pytest.raises(ValueError, match="weight: W₀ must not require grad"):
        sparse_delta_linear(x, w.requires_grad_(), None, randn(2, device=device), torch.tensor([0, 1], device=device))


def test_torch_compile_fullgraph(device):
    out_f, in_f, k = 8, 12, 30
    idx = random_indices(out_f, in_f, k, device=device)
    w = randn(out_f, in_f, device=device, dtype=torch.float32)
    d = randn(k, device=device, dtype=torch.float32, seed=1).requires_grad_()
    x = randn(3, in_f, device=device, dtype=torch.float32, seed=2)
    compiled = torch.compile(lambda x, d: sparse_delta_linear(x, w, None, d, idx), fullgraph=True, backend="eager")
    y = compiled(x, d)
    (g,) = torch.autograd.grad(y.sum(), d)
    # against the float64 reference, within twice plain PyTorch's float32 error plus two roundings of Σ|terms|
    lowp = [reference.sparse_delta_linear(x, w, None, d, idx)]
    lowp.append(torch.autograd.grad(lowp[0].sum(), d)[0])
    d64 = d.detach().double().requires_grad_()
    ref = [reference.sparse_delta_linear(x.double(), w.double(), None, d64, idx)]
    ref.append(torch.autograd.grad(ref[0].sum(), d64)[0])
    d_abs = d64.detach().abs().requires_grad_()
    mag = [reference.sparse_delta_linear(x.double().abs(), w.double().abs(), None, d_abs, idx)]
    mag.append(torch.autograd.grad(mag[0].sum(), d_abs)[0])
    for ours, torch_lowp, ref64, magnitude in zip([y, g], lowp, ref, mag, strict=True):
        err, bound = low_precision_error_bound(ours.detach(), torch_lowp.detach(), ref64.detach(), magnitude=magnitude)
        assert err <= bound, (err, bound)

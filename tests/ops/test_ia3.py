"""(IA)³ scaling op (y = x ⊙ l over the last dimension) against float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpeft  # noqa: F401
from pyfastpeft.ops import ia3_scale, reference
from tests.conftest import FLOAT_DTYPES, assert_within_rounding

_OP = torch.ops.pyfastpeft


def randn(*shape, device="cpu", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


def run(fn, x, scale, grad_y):
    """Output and (dx, dl) of fn for the given upstream gradient."""
    x = x.detach().requires_grad_(True)
    scale = scale.detach().requires_grad_(True)
    y = fn(x, scale)
    dx, dl = torch.autograd.grad(y, (x, scale), grad_y)
    return y, dx, dl


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(0, 7), min_size=0, max_size=2),
    n=st.integers(0, 300),  # past several 64-row slabs of the CPU backward
    d=st.integers(1, 70),  # a zero-size feature dimension is refused today
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float64(lead, n, d, seed):
    shape = (*lead, n, d)
    x, scale, gy = randn(*shape, seed=seed), randn(d, seed=seed + 1), randn(*shape, seed=seed + 2)
    ours = run(ia3_scale, x, scale, gy)
    ref = run(reference.ia3_scale, x, scale, gy)
    magnitude = run(reference.ia3_scale, x.abs(), scale.abs(), gy.abs())  # Σ|terms| of dl's column sums
    rows = x.numel() // d if d else 0
    for name, o, r, m, terms in zip(["y", "dx", "dl"], ours, ref, magnitude, [1, 1, rows + 1], strict=True):
        assert_within_rounding(name, o, r, m, terms=terms)  # any summation order of the column sums


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_dtype_batched_non_contiguous(device, dtype):
    d = 45
    # strided views with two leading dims; 3·350 = 1050 rows: several slabs, a partial last one
    x64 = randn(3, 700, d + 5, device=device)[:, ::2, 3 : 3 + d]
    gy64 = randn(3, 350, d * 2, device=device, seed=1)[..., ::2]
    l64 = 0.5 + randn(d, device=device, seed=2).abs()
    assert not x64.is_contiguous() and not gy64.is_contiguous()
    x, gy, scale = (t.to(dtype) for t in (x64, gy64, l64))
    ours = run(ia3_scale, x, scale, gy)
    # the reference on the rounded inputs: only the op's own roundings are then left to bound
    ref = run(reference.ia3_scale, x.double(), scale.double(), gy.double())
    magnitude = run(reference.ia3_scale, x.double().abs(), scale.double().abs(), gy.double().abs())
    # y and dx: one product, rounded once; dl: a column sum over all 1050 rows of products
    rows = x.numel() // d
    for name, o, r, m, terms in zip(["y", "dx", "dl"], ours, ref, magnitude, [1, 1, rows + 1], strict=True):
        assert o.dtype == dtype
        assert_within_rounding(name, o, r, m, terms=terms)


def test_gradcheck_float64(device):
    x = randn(2, 5, 7, device=device).requires_grad_(True)
    scale = randn(7, device=device, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(ia3_scale, (x, scale))


def test_only_the_needed_gradient(device):
    x = randn(4, 6, device=device)
    scale = randn(6, device=device, seed=1).requires_grad_(True)
    gy = randn(4, 6, device=device, seed=2)
    (dl,) = torch.autograd.grad(ia3_scale(x, scale), (scale,), gy)
    assert_within_rounding("dl", dl, (gy * x).sum(0), (gy.abs() * x.abs()).sum(0), terms=x.shape[0] + 1)
    dx, dl_empty = _OP.ia3_scale_backward(gy, x, scale.detach(), [True, False])
    assert_within_rounding("dx", dx, gy * scale.detach(), gy.abs() * scale.detach().abs())
    assert dl_empty.numel() == 0


def test_saves_x_only_when_the_scale_trains(device):
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    x = randn(8, 6, device=device).requires_grad_(True)
    frozen = randn(6, device=device, seed=1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ia3_scale(x, frozen)
    assert saved == [torch.Size([6])]  # the scale only


def test_opcheck(device):
    x = randn(3, 5, 7, device=device).requires_grad_(True)
    scale = randn(7, device=device, seed=1).requires_grad_(True)
    torch.library.opcheck(_OP.ia3_scale, (x, scale))
    gy = randn(3, 5, 7, device=device, seed=2)
    torch.library.opcheck(_OP.ia3_scale_backward, (gy, x.detach(), scale.detach(), [True, True]))


def test_compiles_fullgraph(device):
    x = randn(3, 7, device=device, dtype=torch.float32).requires_grad_(True)
    scale = randn(7, device=device, seed=1, dtype=torch.float32).requires_grad_(True)
    compiled = torch.compile(ia3_scale, fullgraph=True, backend="aot_eager")
    compiled(x, scale).sum().backward()
    x64 = x.detach().double()
    assert_within_rounding("dl", scale.grad, x64.sum(0), x64.abs().sum(0), terms=x.shape[0] + 1)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: (randn(3, 4, device=d), randn(5, device=d)), "scale: expected size 4"),
        (lambda d: (randn(3, 4, device=d), randn(1, 4, device=d)), "scale: expected a 1-D tensor"),
        (lambda d: (randn(3, 4, device=d), randn(4, device=d, dtype=torch.float32)), "scale: expected dtype"),
        (lambda d: (torch.ones(3, 4, dtype=torch.int64, device=d), torch.ones(4, dtype=torch.int64, device=d)), "x:"),
    ],
)
def test_bad_input_names_the_argument(device, make, match):
    x, scale = make(device)
    with pytest.raises(ValueError, match=match):
        _OP.ia3_scale(x, scale)


def test_bad_backward_input(device):
    x, scale = randn(3, 4, device=device), randn(4, device=device)
    with pytest.raises(ValueError, match="grad_y: expected the shape of x"):
        _OP.ia3_scale_backward(randn(4, 4, device=device), x, scale, [True, True])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_does_not_depend_on_the_thread_count(dtype):
    """dl is summed in fixed slabs of rows added in slab order: 1 and 2 threads give the same bits."""
    dy, x, l = randn(5000, 33, dtype=dtype), randn(5000, 33, dtype=dtype, seed=1), randn(33, dtype=dtype, seed=2)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_OP.ia3_scale_backward(dy, x, l, [True, True]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])

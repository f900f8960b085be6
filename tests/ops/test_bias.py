"""BitFit linear op (y = x·Wᵀ + b, W frozen) against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpeft  # noqa: F401
from pyfastpeft.ops import bias_only_linear, reference
from tests.conftest import FLOAT_DTYPES, assert_within_rounding

_OP = torch.ops.pyfastpeft


def randn(*shape, device="cpu", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


def run(fn, x, weight, bias, grad_y):
    """Output and (dx, db) of fn for the given upstream gradient."""
    x = x.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True)
    y = fn(x, weight, bias)
    dx, db = torch.autograd.grad(y, (x, bias), grad_y)
    return y, dx, db


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(0, 9), min_size=0, max_size=2),
    n=st.integers(0, 300),  # past one 128-row slab of the CPU backward
    in_f=st.integers(1, 40),
    out_f=st.integers(1, 40),  # a zero-size feature dimension is refused today
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float64(lead, n, in_f, out_f, seed):
    shape = (*lead, n)
    x, w, b = randn(*shape, in_f, seed=seed), randn(out_f, in_f, seed=seed + 1), randn(out_f, seed=seed + 2)
    gy = randn(*shape, out_f, seed=seed + 3)
    ours = run(bias_only_linear, x, w, b, gy)
    ref = run(reference.bias_only_linear, x, w, b, gy)
    magnitude = run(reference.bias_only_linear, x.abs(), w.abs(), b.abs(), gy.abs())  # Σ|terms| of each sum
    rows = x.numel() // in_f
    for name, o, r, m, terms in zip(["y", "dx", "db"], ours, ref, magnitude, [in_f + 1, out_f, rows], strict=True):
        assert_within_rounding(name, o, r, m, terms=terms)  # any summation order


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_dtype_batched_non_contiguous(device, dtype):
    in_f, out_f = 67, 45
    # x and dy are strided views with two leading dims; 3·350 = 1050 rows: the CPU backward's per-thread
    # GEMM blocks, with a partial last slab
    x64 = randn(3, 700, in_f + 5, device=device)[:, ::2, 3 : 3 + in_f]
    gy64 = randn(3, 350, out_f * 2, device=device, seed=1)[..., ::2]
    w64, b64 = randn(out_f, in_f, device=device, seed=2) * 0.1, randn(out_f, device=device, seed=3)
    assert not x64.is_contiguous() and not gy64.is_contiguous()
    x, gy, w, b = (t.to(dtype) for t in (x64, gy64, w64, b64))
    y, dx, db = run(bias_only_linear, x, w, b, gy)
    assert y.dtype == dx.dtype == db.dtype == dtype
    assert y.shape == (3, 350, out_f) and dx.shape == x.shape and db.shape == (out_f,)
    refs = run(reference.bias_only_linear, x.double(), w.double(), b.double(), gy.double())
    magnitudes = run(reference.bias_only_linear, *(t.double().abs() for t in (x, w, b, gy)))
    # y: in_f products and the bias; dx: out_f products; db: a sum over the 1050 rows
    terms = [in_f + 1, out_f, x.numel() // in_f]
    for name, ours, ref, m, n in zip(["y", "dx", "db"], (y, dx, db), refs, magnitudes, terms, strict=True):
        assert_within_rounding(name, ours, ref, m, terms=n)


@pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True), (False, False)])
def test_backward_op_output_mask(device, mask):
    gy, w = randn(5, 300, 9, device=device), randn(9, 13, device=device, seed=1)
    dx, db = _OP.bias_only_linear_backward(gy, w, list(mask))
    if mask[0]:
        assert_within_rounding("dx", dx, gy @ w, gy.abs() @ w.abs(), terms=w.shape[0])
    else:
        assert dx.numel() == 0
    if mask[1]:
        assert_within_rounding("db", db, gy.sum((0, 1)), gy.abs().sum((0, 1)), terms=gy.shape[0] * gy.shape[1])
    else:
        assert db.numel() == 0


def test_bias_grad_of_16bit_accumulates_in_float32(device):
    # 4096 rows of 1 + 2⁻⁸: a bfloat16 running sum would stall at 256, the float32 one does not
    gy = torch.full((4096, 3), 1 + 2**-8, device=device, dtype=torch.bfloat16)
    _, db = _OP.bias_only_linear_backward(gy, torch.ones(3, 2, device=device, dtype=torch.bfloat16), [False, True])
    assert db.float().tolist() == [torch.tensor(4096 * (1 + 2**-8), dtype=torch.bfloat16).item()] * 3


def test_bias_grad_is_deterministic(device):
    gy, w = randn(1000, 17, device=device, dtype=torch.float32), randn(17, 5, device=device, dtype=torch.float32)
    first = _OP.bias_only_linear_backward(gy, w, [True, True])
    for _ in range(3):
        again = _OP.bias_only_linear_backward(gy, w, [True, True])
        assert torch.equal(first[1], again[1])


def test_empty_rows(device):
    x, w, b = randn(0, 4, device=device), randn(3, 4, device=device), randn(3, device=device)
    y, dx, db = run(bias_only_linear, x, w, b, torch.zeros(0, 3, device=device, dtype=torch.float64))
    assert y.shape == (0, 3) and dx.shape == (0, 4)
    assert torch.equal(db, torch.zeros_like(db))


def test_gradcheck_float64():
    x = randn(2, 5, 7).requires_grad_(True)
    w, b = randn(4, 7, seed=1), randn(4, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, b: bias_only_linear(x, w, b), (x, b))


def test_opcheck(device):
    x = randn(3, 150, 6, device=device, dtype=torch.float32).requires_grad_(True)
    w = randn(5, 6, device=device, dtype=torch.float32, seed=1)
    b = randn(5, device=device, dtype=torch.float32, seed=2).requires_grad_(True)
    torch.library.opcheck(_OP.bias_only_linear.default, (x, w, b))
    gy = randn(3, 150, 5, device=device, dtype=torch.float32, seed=3)
    for mask in ([True, True], [False, True], [True, False]):
        torch.library.opcheck(_OP.bias_only_linear_backward.default, (gy, w, mask))


def test_torch_compile_fullgraph(device):
    x = randn(4, 9, 8, device=device, dtype=torch.float32)
    w, b = randn(6, 8, device=device, dtype=torch.float32, seed=1), randn(6, device=device, dtype=torch.float32, seed=2)
    compiled = torch.compile(lambda x, b: bias_only_linear(x, w, b).square().sum(), fullgraph=True, backend="aot_eager")
    one = torch.tensor(1.0, device=device, dtype=torch.float64)
    ours = run(lambda x, w, b: compiled(x, b), x, w, b, one.float())
    loss64 = lambda x, w, b: F.linear(x, w, b).square().sum()  # noqa: E731
    refs = run(loss64, x.double(), w.double(), b.double(), one)
    # on the absolute values every term is positive: the loss and its gradients are the sums of |terms|
    magnitudes = run(loss64, x.double().abs(), w.double().abs(), b.double().abs(), one)
    rows, (out_f, in_f) = x.numel() // x.shape[-1], w.shape
    # z = x·Wᵀ + b (in_f + 1), squared, then y sums every z²; dy = 2z feeds dx (out_f) and db (rows)
    terms = [in_f + 2 + rows * out_f, in_f + 2 + out_f, in_f + 2 + rows]
    for name, o, r, m, n in zip(["y", "dx", "db"], ours, refs, magnitudes, terms, strict=True):
        assert_within_rounding(name, o, r, m, terms=n)


def saved_tensor_sizes(fn, x, weight, bias) -> list[int]:
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, weight, bias).sum().backward()
    return sizes


def test_saves_no_input_activation(device):
    x = randn(4, 33, 10, device=device, dtype=torch.float32).requires_grad_(True)
    w = randn(12, 10, device=device, dtype=torch.float32, seed=1)
    b = randn(12, device=device, dtype=torch.float32, seed=2).requires_grad_(True)
    assert saved_tensor_sizes(bias_only_linear, x, w, b) == [w.numel()]
    # the check can fail: a linear whose weight trains saves x (as a [N, in] view)
    w_train = w.clone().requires_grad_(True)
    assert x.numel() in saved_tensor_sizes(F.linear, x, w_train, b)


def test_bad_inputs():
    x, w, b = randn(4, 6), randn(5, 6), randn(5)
    with pytest.raises(ValueError, match="x: expected size 6"):
        bias_only_linear(randn(4, 7), w, b)
    with pytest.raises(ValueError, match="bias: expected size 5"):
        bias_only_linear(x, w, randn(4))
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        bias_only_linear(x, randn(6), b)
    with pytest.raises(ValueError, match="bias: expected dtype"):
        bias_only_linear(x, w, b.float())
    with pytest.raises(ValueError, match="x: expected a float64"):
        bias_only_linear(x.long(), w.long(), b.long())
    with pytest.raises(ValueError, match="weight: bias_only_linear keeps W frozen"):
        bias_only_linear(x, w.clone().requires_grad_(True), b)
    with pytest.raises(ValueError, match="grad_y: expected size 5"):
        _OP.bias_only_linear_backward(randn(4, 6), w, [True, True])
    with pytest.raises(ValueError, match="weight: expected dtype"):
        _OP.bias_only_linear_backward(randn(4, 5), w.float(), [True, True])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_grad_does_not_depend_on_the_thread_count(dtype):
    gy, w = randn(5000, 33, dtype=dtype), randn(33, 5, dtype=dtype, seed=1)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_OP.bias_only_linear_backward(gy, w, [False, True])[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])

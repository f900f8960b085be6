"""Repros of four CUDA defects found by reading the kernels. Each test runs on every available device:
on the CPU it pins the semantics the CUDA kernel must match, on CUDA it is the repro."""

from __future__ import annotations

import pytest
import torch

import pyfastpeft
from pyfastpeft.ops import reference
from tests.conftest import requires_cuda

OP = torch.ops.pyfastpeft


# ---- kd: the cross-entropy term read s[label] after its owner may have overwritten it --------------


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "js"])
def test_fused_linear_kd_loss_with_gradient_equals_forward_only(device, divergence):
    """The fused linear KD loss overwrites the student logits with their gradient in place. With the
    defaults (T = 1, α = 0.5, labels given), the thread that owns s[label] writes its gradient in the
    sweep after the one where thread 0 read s[label] for the cross-entropy: a race. The loss computed
    with the gradient must equal, bit for bit, the loss computed without it (no aliasing then), on
    every repetition, and both must match the float64 reference."""
    g = torch.Generator().manual_seed(0)
    n, v, h = 512, 2048, 16  # 2048 / 256 threads: each thread owns 8 logits of a row
    hs = torch.randn(n, h, generator=g, dtype=torch.float64)
    ws = torch.randn(v, h, generator=g, dtype=torch.float64)
    ht = torch.randn(n, h, generator=g, dtype=torch.float64)
    wt = torch.randn(v, h, generator=g, dtype=torch.float64)
    # labels owned by threads of warps 1..7, each the first logit its owner writes
    labels = torch.randint(32, 256, (n,), generator=g)
    ref = reference.fused_linear_kd_loss(hs, ws, ht, wt, labels, divergence=divergence)
    args = [t.to(device) for t in (hs, ws, ht, wt, labels)]
    forward_only = pyfastpeft.ops.fused_linear_kd_loss(*args, divergence=divergence)
    torch.testing.assert_close(forward_only.cpu(), ref, rtol=1e-12, atol=1e-12)
    hs_d = args[0].requires_grad_()
    for _ in range(10 if device == "cuda" else 1):
        with_grad = pyfastpeft.ops.fused_linear_kd_loss(hs_d, *args[1:], divergence=divergence)
        assert torch.equal(with_grad.detach(), forward_only), (with_grad.item(), forward_only.item())


# ---- ia3: zero rows left dscale uninitialised ------------------------------------------------------


def _poison_small_blocks(device: str) -> None:
    """Leave NaN in freed allocator blocks of the sizes the next small tensors will reuse."""
    if device == "cuda":
        blocks = [torch.full((128,), float("nan"), device=device) for _ in range(64)]
        del blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(0, 7), (3, 0, 7), (0, 300)])
def test_ia3_backward_of_zero_rows_is_zero(device, dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device)
    scale = torch.randn(shape[-1], dtype=dtype, device=device)
    _poison_small_blocks(device)
    dx, dscale = OP.ia3_scale_backward(torch.ones_like(x), x, scale, [True, True])
    assert dx.shape == x.shape
    assert torch.equal(dscale.cpu(), torch.zeros(shape[-1], dtype=dtype))
    _poison_small_blocks(device)
    xr = x.clone().requires_grad_()
    sr = scale.clone().requires_grad_()
    pyfastpeft.ops.ia3_scale(xr, sr).sum().backward()
    assert torch.equal(sr.grad.cpu(), torch.zeros(shape[-1], dtype=dtype))


# ---- fused AdamW: the increment of a step tensor shared by several entries was lost -----------------


@pytest.mark.parametrize("n_entries", [2, 7, 300])  # 300: over one launch's 256 tensors on CUDA
def test_fused_adamw_shared_step_counts_every_entry(device, n_entries):
    """Entries sharing one step tensor are stepped in order: entry i sees the count i + 1 and the
    tensor ends at n. The same update with a separate step per entry, started at i, is the reference,
    bit for bit (the CPU semantics; CUDA once incremented the shared tensor once, racily)."""
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(3, generator=g) for _ in range(n_entries)]
    grads = [torch.randn(3, generator=g).to(device) for _ in range(n_entries)]
    lr = torch.tensor(1e-1, dtype=torch.float64, device=device)

    def run(steps):
        params = [p.clone().to(device) for p in init]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        pyfastpeft.ops.fused_adamw_(params, grads, m, v, steps, lr)
        return params

    shared = torch.zeros((), device=device)
    ours = run([shared] * n_entries)
    separate = [torch.full((), float(i), device=device) for i in range(n_entries)]
    expected = run(separate)
    assert shared.item() == n_entries
    assert [s.item() for s in separate] == [float(i + 1) for i in range(n_entries)]
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a, b)


# ---- sparse: the forward's index check synchronised with the host, breaking graph capture -----------


def _sparse_inputs(device: str):
    g = torch.Generator().manual_seed(2)
    out_f, in_f, k = 24, 40, 50
    x = torch.randn(6, in_f, generator=g).to(device)
    weight = torch.randn(out_f, in_f, generator=g).to(device)
    bias = torch.randn(out_f, generator=g).to(device)
    indices = torch.randperm(out_f * in_f, generator=g)[:k].sort().values.to(device)
    delta = torch.randn(k, generator=g).to(device)
    return x, weight, bias, delta, indices


@requires_cuda
def test_sparse_forward_and_sampled_grad_capture_in_a_cuda_graph():
    x, weight, bias, delta, indices = _sparse_inputs("cuda")
    gy = torch.randn(x.shape[0], weight.shape[0], device="cuda")
    eager_y = pyfastpeft.ops.sparse_delta_linear(x, weight, bias, delta, indices)
    eager_g = pyfastpeft.ops.sampled_weight_grad(gy, x, indices, x.shape[1])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capturing stream (cuBLAS workspaces), as torch advises
        for _ in range(2):
            pyfastpeft.ops.sparse_delta_linear(x, weight, bias, delta, indices)
            pyfastpeft.ops.sampled_weight_grad(gy, x, indices, x.shape[1])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = pyfastpeft.ops.sparse_delta_linear(x, weight, bias, delta, indices)
        gd = pyfastpeft.ops.sampled_weight_grad(gy, x, indices, x.shape[1])
    torch.cuda.current_stream().wait_stream(stream)
    for scale in (2.0, -0.5):
        x.mul_(scale)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, pyfastpeft.ops.sparse_delta_linear(x, weight, bias, delta, indices))
        torch.testing.assert_close(gd, pyfastpeft.ops.sampled_weight_grad(gy, x, indices, x.shape[1]))
    assert not torch.equal(y, eager_y) and not torch.equal(gd, eager_g)


@pytest.mark.parametrize(
    "bad, match",
    [(lambda i, n: i.flip(0), "strictly increasing"), (lambda i, n: torch.where(i == i.max(), n, i), "out of range")],
)
def test_sparse_eager_index_errors_stay_value_errors(device, bad, match):
    x, weight, bias, delta, indices = _sparse_inputs(device)
    with pytest.raises(ValueError, match=match):
        pyfastpeft.ops.sparse_delta_linear(x, weight, bias, delta, bad(indices, weight.numel()))


@requires_cuda
def test_sampled_grad_kernel_never_reads_out_of_bounds():
    """The backward op does not check the indices on CUDA; its kernel must not read outside the
    inputs for an out-of-range index (compute-sanitizer's memcheck watches this case too)."""
    x, weight, _, delta, indices = _sparse_inputs("cuda")
    indices[-1] = weight.numel() + 10_000_000
    gy = torch.randn(x.shape[0], weight.shape[0], device="cuda")
    try:
        _, _, ddelta = OP.sparse_delta_linear_backward(gy, x, weight, delta, indices, [False, False, True])
    except ValueError:
        return  # a check in the glue is fine too
    torch.cuda.synchronize()
    assert torch.isnan(ddelta[-1])
    good = reference.sampled_weight_grad(gy.double(), x.double(), indices[:-1], x.shape[1])
    terms = reference.sampled_weight_grad(gy.abs().double(), x.abs().double(), indices[:-1], x.shape[1])
    bound = x.shape[0] * torch.finfo(torch.float32).eps * terms  # a float32 sum of N products
    assert ((ddelta[:-1].double() - good).abs() <= bound).all()

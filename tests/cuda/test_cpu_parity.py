"""Every op family on CUDA against the CPU path and the float64 reference, forward and backward, on one
odd-shaped case each (the per-family tests cover the shapes and dtypes; these put the two devices side by
side). The bound for a sum of K products in dtype d is K·eps(d)·Σ|terms|, the terms computed by the
reference on the inputs' absolute values; CPU and CUDA are each within it of the float64 result, so they
are within twice it of each other."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import pyfastpeft
from pyfastpeft.ops import reference
from tests.conftest import requires_cuda

pytestmark = requires_cuda
TARGET = "cuda"


def _run(fn: Callable, inputs: dict, grad_names: tuple[str, ...], gy: torch.Tensor, device: str, dtype):
    """fn's output and the gradients of grad_names, on device in dtype."""
    args = {
        k: (v.detach().to(device, dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v)
        for k, v in inputs.items()
    }
    for k in grad_names:
        args[k] = args[k].clone().requires_grad_()
    y = fn(**args)
    y.backward(gy.to(device, y.dtype))
    return [y.detach().cpu().double()] + [args[k].grad.cpu().double() for k in grad_names]


def _abs_inputs(inputs: dict) -> dict:
    return {k: (v.abs() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def check_multilinear(ours: Callable, ref: Callable, inputs: dict, grad_names, terms: int, dtype=torch.float32):
    """For ops linear in each input: the float64 reference, its magnitude on |inputs| and |gy|, then
    CPU and CUDA each within terms·eps·magnitude of the reference."""
    g = torch.Generator().manual_seed(3)
    # round the inputs to dtype first, so the reference sees exactly what the kernels see
    inputs = {
        k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()
    }
    y_shape = ref(**inputs).shape
    gy = torch.randn(y_shape, generator=g, dtype=torch.float64).to(dtype).double()
    exact = _run(ref, inputs, grad_names, gy, "cpu", torch.float64)
    magnitude = _run(ref, _abs_inputs(inputs), grad_names, gy.abs(), "cpu", torch.float64)
    cpu = _run(ours, inputs, grad_names, gy, "cpu", dtype)
    gpu = _run(ours, inputs, grad_names, gy, TARGET, dtype)
    eps = torch.finfo(dtype).eps
    for name, e, m, c, d in zip(("y", *grad_names), exact, magnitude, cpu, gpu, strict=True):
        bound = terms * eps * m + 1e-30
        assert ((d - e).abs() <= bound).all(), f"{name}: CUDA off the float64 reference"
        assert ((c - e).abs() <= bound).all(), f"{name}: CPU off the float64 reference"
        assert ((d - c).abs() <= 2 * bound).all(), f"{name}: CUDA and CPU disagree"


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora(dtype):
    n, d_in, d_out, r = 37, 45, 29, 5
    inputs = dict(
        x=_randn(n, d_in, seed=1),
        weight=_randn(d_out, d_in, seed=2),
        bias=_randn(d_out, seed=3),
        lora_A=_randn(r, d_in, seed=4),
        lora_B=_randn(d_out, r, seed=5),
        scaling=0.7,
    )
    terms = d_in + r + 2  # the longest sum, plus the rounding of the intermediate x·Aᵀ and the add
    check_multilinear(
        pyfastpeft.ops.lora_linear, reference.lora_linear, inputs, ("x", "lora_A", "lora_B", "bias"), terms, dtype
    )


def test_lora_with_dropout_uses_the_cpu_mask():
    """Same seed, same mask on both devices: the CUDA result with dropout equals the CPU's within the bound."""
    n, d_in, d_out, r, p = 33, 40, 24, 4, 0.3
    inputs = dict(
        x=_randn(n, d_in, seed=1),
        weight=_randn(d_out, d_in, seed=2),
        bias=None,
        lora_A=_randn(r, d_in, seed=4),
        lora_B=_randn(d_out, r, seed=5),
    )
    mask = reference.philox_keep_mask(n * d_in, p, seed=8).view(n, d_in).double()

    def ours(**kw):
        return pyfastpeft.ops.lora_linear(**kw, scaling=1.5, dropout_p=p, seed=8)

    def ref(**kw):
        return reference.lora_linear(**kw, scaling=1.5, dropout_mask=mask.to(kw["x"].device), dropout_p=p)

    check_multilinear(ours, ref, inputs, ("x", "lora_A", "lora_B"), d_in + r + 3)


def test_philox_dropout_masks_are_bitwise_the_cpu_masks():
    for seed, shape in [(0, (1,)), (21, (513, 71)), (2**63 - 1, (4097,)), (12345, (3, 5, 7))]:
        x = torch.randn(shape)
        cpu = pyfastpeft.ops.philox_dropout(x, 0.3, seed=seed)
        gpu = pyfastpeft.ops.philox_dropout(x.to(TARGET), 0.3, seed=seed).cpu()
        assert torch.equal(cpu != 0, gpu != 0)
        assert torch.equal(cpu, gpu)  # x·mask/(1-p): one rounding, the same on both devices
        assert torch.equal(cpu != 0, reference.philox_keep_mask(x.numel(), 0.3, seed).view(shape))


def test_multi_lora():
    n, d_in, d_out, r, k = 41, 36, 27, 4, 3
    idx = torch.randint(-1, k, (n,), generator=torch.Generator().manual_seed(9))
    scalings = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    inputs = dict(
        x=_randn(n, d_in, seed=1),
        weight=_randn(d_out, d_in, seed=2),
        bias=_randn(d_out, seed=3),
        lora_A=_randn(k, r, d_in, seed=4),
        lora_B=_randn(k, d_out, r, seed=5),
    )

    def ours(**kw):
        return pyfastpeft.ops.multi_lora_linear(
            **kw, scalings=scalings.to(kw["x"].device), adapter_indices=idx.to(kw["x"].device)
        )

    def ref(**kw):
        return reference.multi_lora_linear(**kw, scalings=scalings, adapter_indices=idx.to(kw["x"].device))

    check_multilinear(ours, ref, inputs, ("x", "lora_A", "lora_B", "bias"), max(d_in, n) + r + 2)


def test_bias_only_linear():
    n, d_in, d_out = 53, 31, 47
    inputs = dict(x=_randn(n, d_in, seed=1), weight=_randn(d_out, d_in, seed=2), bias=_randn(d_out, seed=3))
    check_multilinear(
        pyfastpeft.ops.bias_only_linear, reference.bias_only_linear, inputs, ("x", "bias"), max(d_in, n) + 1
    )


@pytest.mark.parametrize("shape", [(3, 19, 33), (0, 33), (1, 1)])
def test_ia3(shape):
    inputs = dict(x=_randn(*shape, seed=1), scale=_randn(shape[-1], seed=2))
    check_multilinear(
        pyfastpeft.ops.ia3_scale, reference.ia3_scale, inputs, ("x", "scale"), max(1, torch.Size(shape[:-1]).numel())
    )


def test_sparse_delta_linear():
    n, d_in, d_out, k = 23, 40, 24, 60
    g = torch.Generator().manual_seed(4)
    indices = torch.randperm(d_in * d_out, generator=g)[:k].sort().values
    inputs = dict(
        x=_randn(n, d_in, seed=1),
        weight=_randn(d_out, d_in, seed=2),
        bias=_randn(d_out, seed=3),
        delta=_randn(k, seed=5),
        indices=indices,
    )

    def ours(**kw):
        kw["indices"] = kw["indices"].to(kw["x"].device)
        return pyfastpeft.ops.sparse_delta_linear(**kw)

    def ref(**kw):
        kw["indices"] = kw["indices"].to(kw["x"].device)
        return reference.sparse_delta_linear(**kw)

    check_multilinear(ours, ref, inputs, ("x", "delta", "bias"), max(d_in, n) + 2)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "js"])
def test_kd_loss_float64(divergence):
    """In float64 both devices land within a few roundings of the reference (relative to V)."""
    n, v = 19, 1000
    s, t = _randn(n, v, seed=1) * 3, _randn(n, v, seed=2) * 3
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    labels[4] = -100
    results = []
    for device in ("cpu", TARGET):
        sv = s.to(device).clone().requires_grad_()
        loss = pyfastpeft.ops.kd_loss(sv, t.to(device), labels.to(device), temperature=2.0, divergence=divergence)
        loss.backward()
        results.append((loss.detach().cpu(), sv.grad.cpu()))
    sr = s.clone().requires_grad_()
    ref_loss = reference.kd_loss(sr, t, labels, temperature=2.0, divergence=divergence)
    ref_loss.backward()
    tol = 8 * v * torch.finfo(torch.float64).eps
    for loss, grad in results:
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(grad, sr.grad, rtol=tol, atol=tol / n)


@pytest.mark.parametrize("group_size, axis", [(-1, 0), (-1, 1), (0, 0), (16, 0)])
def test_fake_quantize_float64(group_size, axis):
    """Float64 on both devices: the same codes, scales and straight-through gradient as the CPU."""
    x = _randn(24, 48, seed=1) * 2
    gy = _randn(24, 48, seed=2)
    outs = []
    for device in ("cpu", TARGET):
        xv = x.to(device).clone().requires_grad_()
        out, scale, zero = pyfastpeft.ops.fake_quantize(xv, 4, group_size, False, axis)
        out.backward(gy.to(device))
        outs.append([out.detach().cpu(), scale.cpu(), zero.cpu(), xv.grad.cpu()])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(torch.float64).eps, atol=0)


def test_fake_quantize_lsq_float64():
    x = _randn(16, 40, seed=1)
    scale0 = (torch.rand(16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5) / 8
    gy = _randn(16, 40, seed=3)
    outs = []
    for device in ("cpu", TARGET):
        xv, sv = x.to(device).clone().requires_grad_(), scale0.to(device).clone().requires_grad_()
        y = pyfastpeft.ops.fake_quantize_lsq(xv, sv, bits=4, group_size=-1, axis=0)
        y.backward(gy.to(device))
        outs.append([y.detach().cpu(), xv.grad.cpu(), sv.grad.cpu()])
    xr, sr = x.clone().requires_grad_(), scale0.clone().requires_grad_()
    factor = pyfastpeft.ops.quant.lsq_grad_factor(x, 4, -1, 0)
    yr = reference.fake_quantize_lsq(xr, sr, bits=4, group_size=-1, axis=0, grad_factor=factor)
    yr.backward(gy)
    tol = 40 * 8 * torch.finfo(torch.float64).eps  # the scale's gradient sums 40 terms per channel
    for ours in outs:
        for a, b in zip(ours, [yr.detach(), xr.grad, sr.grad], strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_and_l2_norm(dtype):
    """Three steps on both devices. The elementwise update is the same formula on both, differing only
    by FMA contraction: a few roundings per step of the parameter (|θ|) and of the moments that feed the
    update (at most about lr = 1e-2 per step), so 4·eps·(|θ| + 3·lr) per step bounds the gap. The norm is a
    float32 sum of all elements."""
    shapes = [(5, 7), (4097,), (1,)]
    g = torch.Generator().manual_seed(6)
    init = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(3)]
    results = []
    for device in ("cpu", TARGET):
        params = [p.clone().to(device) for p in init]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), device=device) for _ in params]
        lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
        for gs in grads:
            pyfastpeft.ops.fused_adamw_(params, [q.to(device) for q in gs], m, v, steps, lr)
        norm = pyfastpeft.ops.multi_tensor_l2_norm(params)
        results.append(([p.cpu().double() for p in params], norm.cpu().double()))
    (cpu_p, cpu_n), (gpu_p, gpu_n) = results
    eps = torch.finfo(dtype).eps
    for a, b in zip(cpu_p, gpu_p, strict=True):
        assert ((a - b).abs() <= 3 * 4 * eps * (a.abs() + 3e-2)).all()
    numel = sum(p.numel() for p in init)
    assert abs(cpu_n - gpu_n) <= numel * torch.finfo(torch.float32).eps * cpu_n

"""One small case per op family, forward and backward, for compute-sanitizer (memcheck, racecheck,
synccheck) to watch: every CUDA kernel of the extension is launched at least once, at sizes that leave
partial blocks and tails. Not a test: the pytest suite is far too slow under the sanitizer. It checks
only that each case finishes with finite results; the sanitizer's report is the verdict.

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_cases.py [--device cuda]

``--device cpu`` runs the same cases on the CPU (a check of the script itself). Under memcheck, set
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that each tensor is its own allocation and an overrun past a
tensor's end is seen rather than landing in the allocator's pool.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

import pyfastpeft
import pyfastpeft.ops as ops

CASES: dict[str, Callable[[str], list[torch.Tensor]]] = {}


def case(fn: Callable[[str], list[torch.Tensor]]) -> Callable[[str], list[torch.Tensor]]:
    CASES[fn.__name__] = fn
    return fn


def _backward(y: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    y.backward(torch.randn_like(y))
    return [y.detach()] + [t.grad for t in leaves]


@case
def lora(device: str) -> list[torch.Tensor]:
    x = torch.randn(37, 45, device=device, requires_grad=True)
    w, b = torch.randn(29, 45, device=device), torch.randn(29, device=device)
    a = torch.randn(5, 45, device=device, requires_grad=True)
    bb = torch.randn(29, 5, device=device, requires_grad=True)
    out = _backward(ops.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.1, seed=3), x, a, bb)
    out += _backward(
        ops.lora_linear(
            x.detach().bfloat16().requires_grad_(),
            w.bfloat16(),
            None,
            a.detach().bfloat16().requires_grad_(),
            bb.detach().bfloat16().requires_grad_(),
        )
    )
    return out + [ops.philox_dropout(torch.randn(1001, device=device), 0.3, seed=5)]


@case
def multi_lora(device: str) -> list[torch.Tensor]:
    n, k = 67, 5
    x = torch.randn(n, 36, device=device, requires_grad=True)
    w = torch.randn(27, 36, device=device)
    a = torch.randn(k, 4, 36, device=device, requires_grad=True)
    b = torch.randn(k, 27, 4, device=device, requires_grad=True)
    idx = torch.randint(-1, k, (n,), device=device)
    y = ops.multi_lora_linear(x, w, None, a, b, [0.5] * k, idx, dropout_p=0.2, seed=1)
    return _backward(y, x, a, b)


@case
def optim(device: str) -> list[torch.Tensor]:
    params = [torch.randn(s, device=device) for s in [(5, 7), (4097,), (1,)]]
    grads = [torch.randn_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    shared = torch.zeros((), device=device)
    steps = [shared, torch.zeros((), device=device), shared]
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    ops.fused_adamw_(params, grads, m, v, steps, lr, max_exp_avg_sqs=[torch.zeros_like(p) for p in params])
    halves = [p.bfloat16() for p in params]
    ops.fused_adamw_(
        halves,
        [g.bfloat16() for g in grads],
        [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params],
        [torch.zeros((), device=device) for _ in params],
        lr,
        masters=[p.clone() for p in params],
    )
    return params + halves + [ops.multi_tensor_l2_norm(params)]


@case
def sparse(device: str) -> list[torch.Tensor]:
    x = torch.randn(23, 40, device=device, requires_grad=True)
    w = torch.randn(24, 40, device=device)
    idx = torch.randperm(960, device=device)[:61].sort().values
    delta = torch.randn(61, device=device, requires_grad=True)
    out = _backward(ops.sparse_delta_linear(x, w, None, delta, idx), x, delta)
    return out + [ops.sampled_weight_grad(torch.randn(23, 24, device=device), x.detach(), idx.int(), 40)]


@case
def quant(device: str) -> list[torch.Tensor]:
    out = []
    for group_size, axis in [(-1, 0), (-1, 1), (0, 0), (16, 0)]:
        x = torch.randn(24, 48, device=device, requires_grad=True)
        y, scale, zero = ops.fake_quantize(x, 4, group_size, False, axis)
        out += _backward(y, x) + [scale, zero.float()]
    x = torch.randn(16, 40, device=device, requires_grad=True)
    s = (torch.rand(16, device=device) + 0.5).div(8).requires_grad_()
    z = torch.zeros(16, device=device, requires_grad=True)
    return out + _backward(ops.fake_quantize_lsq(x, s, z, bits=4, group_size=-1, axis=0), x, s, z)


@case
def ia3(device: str) -> list[torch.Tensor]:
    x = torch.randn(3, 19, 33, device=device, requires_grad=True)
    s = torch.randn(33, device=device, requires_grad=True)
    out = _backward(ops.ia3_scale(x, s), x, s)
    empty = torch.randn(0, 33, device=device)
    return out + list(torch.ops.pyfastpeft.ia3_scale_backward(empty, empty, s.detach(), [True, True]))


@case
def bias(device: str) -> list[torch.Tensor]:
    x = torch.randn(53, 31, device=device, requires_grad=True)
    w = torch.randn(47, 31, device=device)
    b = torch.randn(47, device=device, requires_grad=True)
    return _backward(ops.bias_only_linear(x, w, b), x, b)


@case
def distill(device: str) -> list[torch.Tensor]:
    out = []
    labels = torch.randint(0, 1000, (19,), device=device)
    labels[3] = -100
    for divergence in ("forward_kl", "reverse_kl", "js"):
        s = torch.randn(19, 1000, device=device, requires_grad=True)
        loss = ops.kd_loss(s, torch.randn(19, 1000, device=device), labels, temperature=2.0, divergence=divergence)
        out += _backward(loss, s)
    hs = torch.randn(19, 16, device=device, requires_grad=True)
    ws = torch.randn(1000, 16, device=device, requires_grad=True)
    loss = ops.fused_linear_kd_loss(
        hs, ws, torch.randn(19, 8, device=device), torch.randn(1000, 8, device=device), labels, chunk_size=7
    )
    out += _backward(loss, hs, ws)
    # the plain cross-entropy's own row kernel (no teacher), in float32 and bfloat16
    for dtype in (torch.float32, torch.bfloat16):
        hc = torch.randn(19, 16, device=device, dtype=dtype, requires_grad=True)
        wc = torch.randn(1000, 16, device=device, dtype=dtype, requires_grad=True)
        out += _backward(ops.fused_linear_cross_entropy(hc, wc, labels, chunk_size=7), hc, wc)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not pyfastpeft.cuda_available():
        print("gpu_sanitize_cases: CUDA kernels not built or no GPU", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        print(f"gpu_sanitize_cases: unknown case(s) {unknown}; known: {sorted(CASES)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bad = []
    for name in names:
        t0 = time.perf_counter()
        results = CASES[name](args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        finite = all(torch.isfinite(r.float()).all().item() for r in results if r is not None and r.numel())
        print(f"{name:12s} {'ok' if finite else 'NON-FINITE'}  {time.perf_counter() - t0:.2f} s", flush=True)
        if not finite:
            bad.append(name)
    if bad:
        print(f"gpu_sanitize_cases: non-finite results in {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

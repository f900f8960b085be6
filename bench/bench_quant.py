"""Fake quantization: forward+backward of pyfastpeft.ops.fake_quantize against PyTorch, and the cost of
one QAT training step.

    python -m bench.bench_quant            # 4096×4096 float32 weight; QAT step of a Llama-like MLP stack
    python -m bench.bench_quant --quick    # small smoke sizes

Baselines, each timed forward+backward in the same interleaved rounds as ours:
  - torch per channel: the MinMax observer's scale computation + torch.fake_quantize_per_channel_affine;
  - eager grouped int4: reshape to groups, absmax scale, round/clamp with a saved clipping mask (the
    composition torchao's QAT fake quantizer runs);
  - eager per-token int8 (asymmetric activations), and LSQ through torch's learnable per-channel op on the
    grouped view.
`clone` is one read + one write of the tensor: a forward+backward that streams it five times (read x,
write out; read dy, read x, write dx) costs at least 2.5 clones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import pyfastpeft as pf
from bench._timing import print_table, saved_activation_bytes, time_interleaved, write_results

EPS = torch.finfo(torch.float32).eps


def cpu_time_interleaved(fns, warmup, rounds):
    """Median process CPU time (ms, all threads) in interleaved rounds. On a shared, oversubscribed machine
    wall time also counts the time other processes hold the cores; CPU time does not."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            samples[name].append((time.process_time() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


class _MaskedRound(torch.autograd.Function):
    """Eager fake quantization that saves its clipping mask (as torchao's _GenericFakeQuantize)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x * (1.0 / scale)) + zero_point
        mask = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(mask)
        return (q.clamp(qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def torch_per_channel(w, bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    with torch.no_grad():
        amax = torch.maximum(-w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0))
        scale = (amax / ((qmax - qmin) / 2)).clamp(min=EPS)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qmin, qmax)


def eager_grouped(w, bits, group_size):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    xg = w.reshape(-1, group_size)
    with torch.no_grad():
        scale = (xg.abs().amax(dim=1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=EPS)
    return _MaskedRound.apply(xg, scale, 0.0, qmin, qmax).reshape(w.shape)


def eager_per_token_asym(x, bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    with torch.no_grad():
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=EPS)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return _MaskedRound.apply(x, scale, zp, qmin, qmax)


def torch_lsq_grouped(w, scale, bits, group_size):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    zero = torch.zeros(scale.numel(), device=w.device)
    out = torch._fake_quantize_learnable_per_channel_affine(
        w.reshape(-1, group_size), scale.reshape(-1), zero, 0, qmin, qmax, 1.0
    )
    return out.reshape(w.shape)


def fwd_bwd(make_out, inputs, dy):
    def run():
        for t in inputs:
            t.grad = None
        make_out().backward(dy)

    return run


def op_rows(n_out, n_in, tokens, rounds, warmup):
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in, requires_grad=True)
    dy = torch.randn(n_out, n_in)
    act = torch.randn(tokens, n_in, requires_grad=True)
    dy_act = torch.randn(tokens, n_in)
    _, s32, _ = pf.ops.fake_quantize(w.detach(), 4, 32, True)
    lsq_scale = (s32 * 0.8).requires_grad_()
    clone_w = lambda: w.detach().clone()  # noqa: E731
    cases = [
        (
            "per-channel int8 sym",
            [w],
            dy,
            lambda: pf.ops.fake_quantize(w, 8, -1, True)[0],
            lambda: torch_per_channel(w, 8),
            "torch per-channel",
        ),
        (
            "grouped int4 g32 sym",
            [w],
            dy,
            lambda: pf.ops.fake_quantize(w, 4, 32, True)[0],
            lambda: eager_grouped(w, 4, 32),
            "eager grouped",
        ),
        (
            "grouped int4 g128 sym",
            [w],
            dy,
            lambda: pf.ops.fake_quantize(w, 4, 128, True)[0],
            lambda: eager_grouped(w, 4, 128),
            "eager grouped",
        ),
        (
            "per-token int8 asym (activations)",
            [act],
            dy_act,
            lambda: pf.ops.fake_quantize(act, 8, n_in, False)[0],
            lambda: eager_per_token_asym(act, 8),
            "eager per-token",
        ),
        (
            "LSQ grouped int4 g32",
            [w, lsq_scale],
            dy,
            lambda: pf.ops.fake_quantize_lsq(w, lsq_scale, None, 4, 32, grad_factor=1.0),
            lambda: torch_lsq_grouped(w, lsq_scale, 4, 32),
            "torch learnable per-channel",
        ),
    ]
    rows = []
    for name, inputs, grad, ours, theirs, baseline in cases:
        fns = {
            "ours": fwd_bwd(ours, inputs, grad),
            "baseline": fwd_bwd(theirs, inputs, grad),
            "clone": clone_w,
        }
        times = time_interleaved(fns, warmup=warmup, rounds=rounds)
        cpu = cpu_time_interleaved(fns, warmup=1, rounds=rounds)
        rows.append(
            {
                "case": name,
                "shape": f"{tuple(inputs[0].shape)}",
                "baseline": baseline,
                "ours_ms": times["ours"],
                "baseline_ms": times["baseline"],
                "speedup": times["baseline"] / times["ours"],
                "clone_ms": times["clone"],
                "ours_in_clones": times["ours"] / times["clone"],
                "ours_cpu_ms": cpu["ours"],
                "baseline_cpu_ms": cpu["baseline"],
                "cpu_speedup": cpu["baseline"] / cpu["ours"],
                "ours_saved_MB": saved_activation_bytes(ours, exclude=tuple(inputs)) / 2**20,
                "baseline_saved_MB": saved_activation_bytes(theirs, exclude=tuple(inputs)) / 2**20,
            }
        )
    return rows


class MLPStack(nn.Module):
    """Llama-like MLP blocks (RMS-normalised input, SiLU-gated gate/up projections, down projection)."""

    def __init__(self, hidden, inter, layers):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "gate_proj": nn.Linear(hidden, inter, bias=False),
                    "up_proj": nn.Linear(hidden, inter, bias=False),
                    "down_proj": nn.Linear(inter, hidden, bias=False),
                }
            )
            for _ in range(layers)
        )

    def forward(self, h):
        for blk in self.layers:
            x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            h = h + blk["down_proj"](nn.functional.silu(blk["gate_proj"](x)) * blk["up_proj"](x))
        return h


def qat_rows(hidden, inter, layers, tokens, rounds, warmup):
    def make(config):
        torch.manual_seed(0)
        model = MLPStack(hidden, inter, layers)
        if config is not None:
            pf.quant.prepare_qat(model, config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(tokens, hidden)
        target = torch.randn(tokens, hidden)

        def step():
            loss = nn.functional.mse_loss(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    variants = {
        "float": make(None),
        "8da4w g32": make(pf.quant.QATConfig.int8_dynamic_activation_int4_weight(group_size=32)),
        "int4 weight-only g32": make(pf.quant.QATConfig.weight_only(bits=4, group_size=32)),
        "8da4w g32 LSQ": make(
            pf.quant.QATConfig.int8_dynamic_activation_int4_weight(group_size=32, learnable_scale=True)
        ),
    }
    times = time_interleaved(variants, warmup=warmup, rounds=rounds)
    cpu = cpu_time_interleaved(variants, warmup=1, rounds=rounds)
    return [
        {
            "step": name,
            "model": f"{layers}x MLP {hidden}->{inter}, {tokens} tokens",
            "ms": times[name],
            "overhead_pct": 100.0 * (times[name] - times["float"]) / times["float"],
            "cpu_ms": cpu[name],
            "cpu_overhead_pct": 100.0 * (cpu[name] - cpu["float"]) / cpu["float"],
        }
        for name in variants
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke sizes")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    parser.add_argument("--section", choices=["all", "op", "qat"], default="all")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        n, tokens, rounds, warmup = 512, 256, args.rounds or 5, 1
        hidden, inter, layers, qat_tokens = 128, 352, 2, 64
    else:
        n, tokens, rounds, warmup = 4096, 4096, args.rounds or 10, 2
        hidden, inter, layers, qat_tokens = 512, 1408, 4, 512
    columns = ["case", "baseline", "ours_ms", "baseline_ms", "speedup", "clone_ms", "ours_in_clones"]
    columns += ["ours_cpu_ms", "baseline_cpu_ms", "cpu_speedup", "ours_saved_MB", "baseline_saved_MB"]
    rows, qat = [], []
    if args.section in ("all", "op"):
        rows = op_rows(n, n, tokens, rounds, warmup)
        print_table(rows, columns)
    if args.section in ("all", "qat"):
        qat = qat_rows(hidden, inter, layers, qat_tokens, rounds, warmup)
        print()
        print_table(qat, ["step", "model", "ms", "overhead_pct", "cpu_ms", "cpu_overhead_pct"])
    name = "bench_quant" + ("_quick" if args.quick else "")
    name += ("" if args.section == "all" else f"_{args.section}") + (f"_t{args.threads}" if args.threads else "")
    command = "python -m bench.bench_quant " + " ".join(sys.argv[1:] if argv is None else argv)
    path = write_results(name, rows, command, {"qat_step": qat, "threads": torch.get_num_threads()})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

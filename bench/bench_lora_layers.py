"""The seven LoRA projections of one SmolLM2-135M decoder layer against their frozen linears, forward and
backward, at the real model's shapes: the per-layer cost that a training step on the real model pays 30
times, without the rest of the model's time (attention, norms, the LM head) and its run-to-run noise.

    python bench/bench_lora_layers.py [--threads N] [--rounds N] [--tokens N] [--dropout P] [--forward-only]
                                      [--cold] [--out NAME]

Shapes (hidden 576, intermediate 1536, 3 key-value heads of 64): q and o 576 → 576, k and v 576 → 192,
gate and up 576 → 1536, down 1536 → 576; 512 tokens (4 × 128), r = 16, alpha 32, float32. The LoRA
layer is ``pf.ops.lora_linear`` through autograd (the op a ``pf.get_peft_model`` layer calls), the
reference a frozen ``F.linear`` whose input requires grad (a step's backward runs through every layer).
``--forward-only``: the forward alone under ``torch.no_grad()`` (generation and evaluation: one token or a
few rows a call; use ``--dropout 0``, as eval mode does). Each shape's two candidates alternate in rounds;
a round times 5 calls; the figure is the fastest round (the least disturbed by a shared machine; medians
are recorded too). The layer total weighs each shape by how often a layer has it.

``--cold``: a step's worth of calls as a training step meets them, operands from memory rather than cache:
30 copies of the layer's seven projections, each with its own x, W, A, B and dy (about 190 MB in all),
swept in order by each candidate, the raw ops without autograd (``torch.ops.pyfastpeft.lora_linear`` and
``lora_linear_backward``) against the frozen products (``torch.mm``). Rows: the forward and the backward,
LoRA against frozen, and two forward references that split the forward's extra time: the frozen product
into a fresh y with beta = 1 (its read of y) and into a y written first (the write of y, then that read).
Medians of interleaved rounds, ms per 210 calls (a step of SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pyfastpeft as pf  # noqa: E402
from bench._timing import print_table, time_interleaved, write_results  # noqa: E402

# (name, in, out, how many of the layer's seven projections have this shape)
SHAPES = [("q, o", 576, 576, 2), ("k, v", 576, 192, 2), ("gate, up", 576, 1536, 2), ("down", 1536, 576, 1)]


def time_pair(fns: dict, rounds: int, calls: int = 5) -> dict[str, list[float]]:
    """Per-call µs of every round for each candidate, the candidates alternating."""
    for fn in fns.values():
        for _ in range(calls):
            fn()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out[name].append((time.perf_counter() - t0) / calls * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--forward-only", action="store_true", help="the forward alone, under torch.no_grad()")
    ap.add_argument("--cold", action="store_true", help="30 layers' operands swept from memory, raw ops (see above)")
    ap.add_argument("--out", default="lora_layers_cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.cold:
        return cold(args)
    rows = []
    total = {"frozen": 0.0, "lora": 0.0}
    for name, d_in, d_out, count in SHAPES:
        x = torch.randn(args.tokens, d_in, requires_grad=True)
        weight = torch.randn(d_out, d_in) / d_in**0.5
        lora_A = (torch.randn(16, d_in) / d_in**0.5).requires_grad_()
        lora_B = (torch.randn(d_out, 16) * 0.01).requires_grad_()
        dy = torch.randn(args.tokens, d_out)

        def frozen(x=x, weight=weight, dy=dy):
            F.linear(x, weight).backward(dy)
            x.grad = None

        def lora(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, dy=dy):
            pf.ops.lora_linear(x, weight, None, lora_A, lora_B, 2.0, args.dropout).backward(dy)
            x.grad = lora_A.grad = lora_B.grad = None

        @torch.no_grad()
        def frozen_forward(x=x, weight=weight):
            F.linear(x, weight)

        @torch.no_grad()
        def lora_forward(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B):
            pf.ops.lora_linear(x, weight, None, lora_A, lora_B, 2.0, args.dropout)

        pair = (
            {"frozen": frozen_forward, "lora": lora_forward} if args.forward_only else {"frozen": frozen, "lora": lora}
        )
        times = time_pair(pair, args.rounds)
        best = {k: min(v) for k, v in times.items()}
        for k in total:
            total[k] += count * best[k]
        rows.append(
            {
                "projection": name,
                "in": d_in,
                "out": d_out,
                "frozen_us": best["frozen"],
                "lora_us": best["lora"],
                "x_frozen": best["lora"] / best["frozen"],
                "x_frozen_median": statistics.median(times["lora"]) / statistics.median(times["frozen"]),
            }
        )
    rows.append(
        {
            "projection": "layer (7 projections)",
            "frozen_us": total["frozen"],
            "lora_us": total["lora"],
            "x_frozen": total["lora"] / total["frozen"],
            "extra_us": total["lora"] - total["frozen"],
        }
    )
    print(
        f"one SmolLM2-135M layer's LoRA projections, {'forward only, ' if args.forward_only else ''}"
        f"{args.tokens} tokens, "
        f"r=16, dropout {args.dropout}, float32, "
        f"{torch.get_num_threads()} threads, fastest of {args.rounds} rounds"
    )
    print_table(rows, ["projection", "in", "out", "frozen_us", "lora_us", "x_frozen", "x_frozen_median", "extra_us"])
    path = write_results(
        args.out,
        rows,
        "python bench/bench_lora_layers.py " + " ".join(sys.argv[1:]),
        extra={
            "threads": torch.get_num_threads(),
            "dropout": args.dropout,
            "tokens": args.tokens,
            "forward_only": args.forward_only,
        },
    )
    print(f"wrote {path}")


def cold(args) -> None:
    """``--cold``: every candidate sweeps the 210 calls of a step, each on its own operands."""
    op = torch.ops.pyfastpeft
    p, rows = args.dropout, args.tokens
    calls = []
    for layer in range(30):
        for _, d_in, d_out, count in SHAPES:
            for _ in range(count):
                x, dy = torch.randn(rows, d_in), torch.randn(rows, d_out)
                weight = torch.randn(d_out, d_in) / d_in**0.5
                lora_A, lora_B = torch.randn(16, d_in) / d_in**0.5, torch.randn(d_out, 16) * 0.01
                rng = torch.tensor([layer, 0], dtype=torch.int64) if p > 0 else None
                _, xa, keep = op.lora_linear(x, weight, None, lora_A, lora_B, 2.0, p, rng)
                calls.append((x, dy, weight, lora_A, lora_B, rng, xa, keep if p > 0 else None))

    def sweep(fn):
        def run():
            for c in calls:
                fn(*c)  # results dropped as they come: the sweep holds only its operands

        return run

    mask = [True, False, False, True, True]
    fns = {
        "frozen forward x·Wᵀ": sweep(lambda x, dy, w, a, b, rng, xa, keep: torch.mm(x, w.t())),
        "frozen forward into a fresh y, beta = 1": sweep(
            lambda x, dy, w, a, b, rng, xa, keep: torch.empty(x.shape[0], w.shape[0]).addmm_(x, w.t())
        ),
        "frozen forward into a y written first": sweep(
            lambda x, dy, w, a, b, rng, xa, keep: torch.zeros(x.shape[0], w.shape[0]).addmm_(x, w.t())
        ),
        "LoRA forward": sweep(lambda x, dy, w, a, b, rng, xa, keep: op.lora_linear(x, w, None, a, b, 2.0, p, rng)),
        "frozen backward dy·W": sweep(lambda x, dy, w, a, b, rng, xa, keep: torch.mm(dy, w)),
        "LoRA backward (dx, dA, dB)": sweep(
            lambda x, dy, w, a, b, rng, xa, keep: op.lora_linear_backward(dy, x, w, a, b, xa, 2.0, p, rng, keep, mask)
        ),
    }
    samples: dict[str, list[float]] = {}
    medians = time_interleaved(fns, warmup=1, rounds=args.rounds, samples=samples)

    # the candidate each extra time is taken over: the median of the rounds' differences
    references = {
        "frozen forward into a fresh y, beta = 1": "frozen forward x·Wᵀ",
        "frozen forward into a y written first": "frozen forward x·Wᵀ",
        "LoRA forward": "frozen forward x·Wᵀ",
        "LoRA backward (dx, dA, dB)": "frozen backward dy·W",
    }
    table = []
    for name, ms in medians.items():
        ref = references.get(name)
        extra = None
        if ref is not None:
            extra = statistics.median(a - b for a, b in zip(samples[name], samples[ref], strict=True))
        table.append({"candidate": name, "ms_per_step": ms, "over_frozen_ms": extra, "rounds_ms": samples[name]})
    print(
        f"one SmolLM2-135M training step's 210 projection calls, each on its own operands (30 layers), raw ops, "
        f"{rows} tokens, r=16, dropout {p}, float32, {torch.get_num_threads()} threads, medians of {args.rounds} "
        "interleaved rounds (the extra times: medians of the rounds' differences)"
    )
    print_table(table, ["candidate", "ms_per_step", "over_frozen_ms"])
    path = write_results(
        args.out,
        table,
        "python bench/bench_lora_layers.py " + " ".join(sys.argv[1:]),
        extra={"threads": torch.get_num_threads(), "dropout": p, "tokens": rows, "cold": True},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

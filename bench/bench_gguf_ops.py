"""GGUF block-quantized linear: forward+backward (dx only, the weight is frozen) and the one-token
forward of generation, of pyfastpeft's fused gguf_linear against F.linear on the dequantized float32
weight, at SmolLM2-135M's projection shapes. The fused op reads the blocks (0.16-0.27x the float
weight's bytes) and never builds the float weight; the baseline holds the float weight resident.

    python -m bench.bench_gguf_ops [--quick] [--rounds 11] [--tokens 512] [--qtype q4_1]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from bench._timing import print_table, time_interleaved, write_results
from pyfastpeft.ops import gguf_dequantize, gguf_linear, gguf_quantize
from pyfastpeft.ops.gguf import Q4_0, Q4_1, Q8_0

SHAPES = [(576, 576), (576, 1536), (1536, 576)]  # (in, out): attention, MLP up/gate, MLP down
QTYPES = {"q4_0": Q4_0, "q4_1": Q4_1, "q8_0": Q8_0}


def measure(in_f: int, out_f: int, qtype: int, tokens: int, rounds: int) -> list[dict]:
    """Rows of the table for one (in, out) shape."""
    blocks = gguf_quantize(torch.randn(out_f, in_f) * in_f**-0.5, qtype)
    weight = gguf_dequantize(blocks, qtype, in_f)  # the baseline's resident float weight
    x = torch.randn(tokens, in_f, requires_grad=True)
    gy = torch.randn(tokens, out_f)
    x1 = torch.randn(1, in_f)
    cases = {
        "fwd+bwd: gguf_linear": lambda: gguf_linear(x, blocks, qtype, in_f).backward(gy),
        "fwd+bwd: F.linear (float W)": lambda: F.linear(x, weight).backward(gy),
        "1-token fwd: gguf_linear": lambda: gguf_linear(x1, blocks, qtype, in_f),
        "1-token fwd: F.linear (float W)": lambda: F.linear(x1, weight),
    }
    times = time_interleaved(cases, warmup=3, rounds=rounds)
    rows = []
    for case in ("fwd+bwd", "1-token fwd"):
        ours, ref = times[f"{case}: gguf_linear"], times[f"{case}: F.linear (float W)"]
        rows.append(
            {
                "shape": f"{in_f}->{out_f}",
                "case": case,
                "gguf_ms": ours,
                "float_ms": ref,
                "ratio": ours / ref,
                "weight_bytes_ratio": blocks.numel() / (weight.numel() * weight.element_size()),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, few rounds: a smoke test")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--qtype", default="q4_1", choices=sorted(QTYPES))
    args = ap.parse_args()
    qtype = QTYPES[args.qtype]
    shapes = SHAPES[:1] if args.quick else SHAPES
    rounds = 3 if args.quick else args.rounds
    torch.manual_seed(0)
    rows = [row for in_f, out_f in shapes for row in measure(in_f, out_f, qtype, args.tokens, rounds)]
    print(
        f"gguf_linear {args.qtype}: {args.tokens} tokens (fwd+bwd), float32 activations, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    print_table(rows, ["shape", "case", "gguf_ms", "float_ms", "ratio", "weight_bytes_ratio"])
    name = f"gguf_ops_cpu_{args.qtype}" + ("_quick" if args.quick else "")
    path = write_results(
        name,
        rows,
        "python -m bench.bench_gguf_ops " + " ".join(sys.argv[1:]),
        {"tokens": args.tokens, "qtype": args.qtype, "load_average_1_5_15": os.getloadavg()},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

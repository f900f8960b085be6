"""BitFit linear (W frozen, only b trains): backward time and saved-activation bytes of
pyfastpeft.nn.BiasOnlyLinear against an nn.Linear whose weight is frozen and whose bias trains.

Cases, each timed in interleaved rounds:
  backward kernels   dx = dy·W and db = Σ_n dy[n, :]: our backward op against torch's `dy @ W` + `dy.sum(0)`
  backward (autograd) the backward pass alone through autograd, on a graph built outside the timing
  forward+backward   one forward and backward through the module

    python -m bench.bench_bias [--device cpu|cuda] [--quick] [--dtype float32]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

import pyfastpeft
from bench._timing import print_table, saved_activation_bytes, time_interleaved, write_results
from pyfastpeft.nn import BiasOnlyLinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if pyfastpeft.cuda_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="a small smoke size")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    n, in_f, out_f = (256, 256, 256) if args.quick else (2048, 1024, 1024)
    dev, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, device=dev, dtype=dtype)
    base.weight.requires_grad_(False)  # the baseline: frozen weight, trainable bias
    ours = BiasOnlyLinear.from_linear(copy.deepcopy(base))
    x = torch.randn(n, in_f, device=dev, dtype=dtype, requires_grad=True)  # an activation inside a network
    gy = torch.randn(n, out_f, device=dev, dtype=dtype)
    weight = ours.weight

    def backward_only(module):
        # autograd backward alone: the graph is built outside the clock, so run() times only .backward()
        def run():
            y = module(x)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()  # the forward's kernels must not run on the backward's clock
            t0 = time.perf_counter()
            y.backward(gy)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            run.ms.append((time.perf_counter() - t0) * 1e3)

        run.ms = []
        return run

    bw = {"BiasOnlyLinear": backward_only(ours), "nn.Linear (frozen W)": backward_only(base)}
    cases = {
        "kernels: pyfastpeft backward op": lambda: torch.ops.pyfastpeft.bias_only_linear_backward(
            gy, weight, [True, True]
        ),
        "kernels: torch dy@W + dy.sum(0)": lambda: (gy @ weight, gy.sum(0)),
        "fwd+bwd: BiasOnlyLinear": lambda: ours(x).backward(gy),
        "fwd+bwd: nn.Linear (frozen W)": lambda: base(x).backward(gy),
        **{f"bwd: {k}": v for k, v in bw.items()},
    }
    times = time_interleaved(cases, device=dev, warmup=3, rounds=args.rounds)
    for k, fn in bw.items():  # the wall time of those cases includes the forward; use the backward's own clock
        warm = fn.ms[3:]
        times[f"bwd: {k}"] = sorted(warm)[len(warm) // 2]
    # W (saved by both, by torch as a Wᵀ view that is not a Parameter) is a weight, not an activation
    saved = {
        "BiasOnlyLinear": saved_activation_bytes(lambda: ours(x), exclude=(ours.weight,)),
        "nn.Linear (frozen W)": saved_activation_bytes(lambda: base(x), exclude=(base.weight,)),
    }
    pairs = [
        ("kernels: pyfastpeft backward op", "kernels: torch dy@W + dy.sum(0)"),
        ("fwd+bwd: BiasOnlyLinear", "fwd+bwd: nn.Linear (frozen W)"),
        ("bwd: BiasOnlyLinear", "bwd: nn.Linear (frozen W)"),
    ]
    rows = []
    for mine, ref in pairs:
        for name in (mine, ref):
            module = "BiasOnlyLinear" if name == mine else "nn.Linear (frozen W)"
            row = {"case": name, "ms": times[name], "ratio_to_torch": times[name] / times[ref]}
            if not name.startswith("kernels"):
                row["saved_activation_bytes"] = saved[module]
            rows.append(row)
    print(
        f"BitFit linear: N = {n}, in = {in_f}, out = {out_f}, {args.dtype}, device {dev}, torch threads "
        f"{torch.get_num_threads()}; input activation x = {x.numel() * x.element_size()} bytes"
    )
    print_table(rows, ["case", "ms", "ratio_to_torch", "saved_activation_bytes"])
    name = f"bias_{dev}_{args.dtype}" + ("_quick" if args.quick else "")
    path = write_results(
        name,
        rows,
        "python -m bench.bench_bias " + " ".join(sys.argv[1:]),
        {
            "n_rows": n,
            "in_features": in_f,
            "out_features": out_f,
            "dtype": args.dtype,
            "load_average_1_5_15": os.getloadavg(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

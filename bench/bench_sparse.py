"""Sparse fine-tuning step at 1 % density on a 4096×4096 linear with N = 2048 rows: the weight gradient
at the k indices (sampled-gradient kernel) plus SparseAdamW on k-sized state, against the dense
dW = dyᵀ·x plus dense AdamW (torch foreach, and our FusedAdamW) on the whole weight.

    python -m bench.bench_sparse [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import pyfastpeft
from bench._timing import print_table, time_interleaved, write_results
from pyfastpeft.ops import sampled_weight_grad
from pyfastpeft.optim import FusedAdamW, SparseAdamW


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if pyfastpeft.cuda_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a small smoke size")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    out_f, in_f, n = (512, 512, 256) if args.quick else (4096, 4096, 2048)
    dev = args.device
    k = round(args.density * out_f * in_f)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(out_f * in_f, generator=gen)[:k].sort().values.to(dev)
    x = torch.randn(n, in_f, generator=gen).to(dev)
    gy = torch.randn(n, out_f, generator=gen).to(dev)

    delta = torch.zeros(k, device=dev, requires_grad=True)
    sparse_opt = SparseAdamW([delta], lr=1e-3)
    dense_w = [torch.randn(out_f, in_f, device=dev, requires_grad=True) for _ in range(2)]
    dense_opts = {
        "torch AdamW foreach": torch.optim.AdamW([dense_w[0]], lr=1e-3, foreach=True),
        "FusedAdamW": FusedAdamW([dense_w[1]], lr=1e-3),
    }

    def sparse_step():
        delta.grad = sampled_weight_grad(gy, x, idx, in_f)
        sparse_opt.step()

    def dense_step(w, opt):
        def run():
            w.grad = gy.t() @ x
            opt.step()

        return run

    cases = {
        "sparse: sampled dΔ + SparseAdamW": sparse_step,
        "sparse: sampled dΔ only": lambda: sampled_weight_grad(gy, x, idx, in_f),
        "dense: dW + torch AdamW foreach": dense_step(dense_w[0], dense_opts["torch AdamW foreach"]),
        "dense: dW + FusedAdamW": dense_step(dense_w[1], dense_opts["FusedAdamW"]),
        "dense: dW only": lambda: gy.t() @ x,
    }
    times = time_interleaved(cases, device=dev, warmup=2, rounds=args.rounds)
    ours = times["sparse: sampled dΔ + SparseAdamW"]
    dense_state = state_bytes(dense_opts["torch AdamW foreach"])
    rows = []
    for name, ms in times.items():
        row = {"case": name, "ms": ms, "ratio_to_sparse_step": ms / ours}
        if name == "sparse: sampled dΔ + SparseAdamW":
            row["state_MB"] = state_bytes(sparse_opt) / 1e6
            row["state_vs_dense"] = state_bytes(sparse_opt) / dense_state
        elif name.startswith("dense: dW + torch"):
            row["state_MB"] = dense_state / 1e6
            row["state_vs_dense"] = 1.0
        rows.append(row)
    print(
        f"sparse step: W [{out_f}, {in_f}], N = {n}, k = {k} ({args.density:.2%}), device {dev}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print_table(rows, ["case", "ms", "ratio_to_sparse_step", "state_MB", "state_vs_dense"])
    name = "sparse_quick" if args.quick else "sparse"
    path = write_results(
        name + ("" if dev == "cpu" else f"_{dev}"),
        rows,
        "python -m bench.bench_sparse " + " ".join(sys.argv[1:]),
        {
            "out_features": out_f,
            "in_features": in_f,
            "n_rows": n,
            "k": k,
            "load_average_1_5_15": os.getloadavg(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

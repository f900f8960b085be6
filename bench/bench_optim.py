"""FusedAdamW step against torch.optim.AdamW (foreach, for-loop, and fused where torch has it) over a
LoRA-sized parameter set: 256 tensors, 4.2 M parameters (128 adapters of A [16, 1024] and B [1024, 16]).

    python -m bench.bench_optim [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import pyfastpeft  # noqa: F401
from bench._timing import print_table, time_interleaved, write_results
from pyfastpeft.optim import FusedAdamW


def make_params(n_adapters: int, rank: int, width: int, device: str) -> list[torch.Tensor]:
    ps = []
    for _ in range(n_adapters):
        ps.append(torch.randn(rank, width, device=device).requires_grad_())
        ps.append(torch.randn(width, rank, device=device).requires_grad_())
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if pyfastpeft.cuda_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a small smoke size")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    n_adapters, rank, width = (8, 8, 256) if args.quick else (128, 16, 1024)

    candidates = {
        "pyfastpeft FusedAdamW": lambda ps: FusedAdamW(ps, lr=1e-3),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch AdamW for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    opts = {}
    for name, make in candidates.items():
        ps = make_params(n_adapters, rank, width, args.device)
        opts[name] = make(ps)
        opts[name].step()  # state allocated outside the timing
    n_params = sum(p.numel() for p in opts["pyfastpeft FusedAdamW"].param_groups[0]["params"])
    n_tensors = len(opts["pyfastpeft FusedAdamW"].param_groups[0]["params"])
    times = time_interleaved({k: o.step for k, o in opts.items()}, device=args.device, rounds=args.rounds)

    # float32 AdamW streams 7 tensors per parameter: read θ, g, m, v; write θ, m, v.
    bytes_moved = 7 * 4 * n_params
    ours = times["pyfastpeft FusedAdamW"]
    rows = []
    for name, ms in times.items():
        state_bytes = sum(
            t.numel() * t.element_size()
            for s in opts[name].state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        rows.append(
            {
                "candidate": name,
                "ms": ms,
                "speedup_of_ours": ms / ours,
                "GB/s": bytes_moved / (ms * 1e-3) / 1e9,
                "state_MB": state_bytes / 1e6,
            }
        )
    print(
        f"AdamW step, {n_tensors} tensors, {n_params / 1e6:.2f} M float32 parameters, device {args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print_table(rows, ["candidate", "ms", "speedup_of_ours", "GB/s", "state_MB"])
    name = "optim_quick" if args.quick else "optim"
    path = write_results(
        name + ("" if args.device == "cpu" else f"_{args.device}"),
        rows,
        "python -m bench.bench_optim " + " ".join(sys.argv[1:]),
        {"n_tensors": n_tensors, "n_params": n_params, "load_average_1_5_15": os.getloadavg()},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

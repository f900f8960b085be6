"""The LoRA linear layer users get (``pyfastpeft.tuners.LoraLinear``, the class get_peft_model installs,
built here with its single-adapter constructor): forward+backward time and saved activations against
the frozen base linear, the eager composition PEFT uses, and Hugging Face PEFT's own LoRA layer (when
installed).

    python bench/bench_lora.py [--device cpu|cuda] [--dtype float32|bfloat16] [--quick] [--threads 1 --cpu-time]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._timing import print_table, saved_activation_bytes, time_interleaved, write_results  # noqa: E402
from pyfastpeft.tuners import LoraLinear  # noqa: E402


class EagerLoRA(nn.Module):
    """The composition Hugging Face PEFT runs: base(x) + lora_B(lora_A(dropout(x))) * scaling."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, p: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=base.weight.dtype, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=base.weight.dtype, device=base.weight.device)
        self.dropout = nn.Dropout(p)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def hf_peft_layer(base: nn.Linear, r: int, alpha: float, p: float):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    model = get_peft_model(wrapper, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"]))
    return model


def bench(device: str, dtype: torch.dtype, n: int, d_in: int, d_out: int, r: int, p: float, rounds: int, clock):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, device=device, dtype=dtype)
    base.requires_grad_(False)
    x = torch.randn(n, d_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(n, d_out, device=device, dtype=dtype)
    layers = {
        "base linear (frozen)": base,
        "eager composition": EagerLoRA(copy.deepcopy(base), r, 2.0 * r, p).to(device),
        "pyfastpeft LoraLinear": LoraLinear(copy.deepcopy(base), r=r, lora_alpha=2.0 * r, lora_dropout=p),
    }
    peft_layer = hf_peft_layer(copy.deepcopy(base), r, 2.0 * r, p)
    if peft_layer is not None:
        layers["HF PEFT lora.Linear"] = peft_layer.to(device, dtype)  # PEFT makes its adapters in float32
    for layer in layers.values():
        layer.train()

    def step(layer):
        def run():
            x.grad = None
            for prm in layer.parameters():
                prm.grad = None
            layer(x).backward(dy)

        return run

    times = time_interleaved({k: step(v) for k, v in layers.items()}, device=device, rounds=rounds, clock=clock)
    params = tuple(prm for layer in layers.values() for prm in layer.parameters())
    saved = {
        name: saved_activation_bytes(lambda layer=layer: layer(x), exclude=params) for name, layer in layers.items()
    }
    # the budget: what the base saves, plus x, plus N·r elements, plus the 16-byte [seed, offset]; with
    # dropout on the CPU also the mask kept as bits for the backward (N·in/8 bytes and 8 of padding)
    keep_bits = (x.numel() + 7) // 8 + 8 if p > 0 and x.device.type == "cpu" else 0
    budget = saved["base linear (frozen)"] + x.numel() * x.element_size() + n * r * x.element_size() + 16 + keep_bits
    return [
        {
            "layer": name,
            "dropout": p,
            "ms": times[name],
            "x_base": times[name] / times["base linear (frozen)"],
            "saved_MiB": saved[name] / 2**20,
            "saved_within_budget": saved[name] <= budget,
        }
        for name in layers
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes, few rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU time (use with --threads 1 on a shared machine)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.quick:
        n, d, rounds = 256, 256, 5
    elif args.device.startswith("cuda"):
        n, d, rounds = 8192, 4096, 50
    else:
        n, d, rounds = 2048, 1024, 30
    rounds = args.rounds or rounds
    r = 16
    rows = []
    for p in (0.0, 0.1):
        rows += bench(args.device, dtype, n, d, d, r, p, rounds, clock)
    print(
        f"LoRA linear forward+backward, {args.device} {dtype}, N={n}, in=out={d}, r={r}, median of {rounds} rounds, "
        f"{torch.get_num_threads()} threads, {'process CPU' if args.cpu_time else 'wall'} time"
    )
    print_table(rows, ["layer", "dropout", "ms", "x_base", "saved_MiB", "saved_within_budget"])
    if not args.quick:
        name = f"lora_{args.device}_{str(dtype).split('.')[-1]}" + ("_t1_cpu_time" if args.cpu_time else "")
        path = write_results(
            name,
            rows,
            "python bench/bench_lora.py " + " ".join(sys.argv[1:]),
            {
                "N": n,
                "in": d,
                "out": d,
                "r": r,
                "dtype": str(dtype),
                "threads": torch.get_num_threads(),
                "clock": "process_time" if args.cpu_time else "perf_counter",
            },
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

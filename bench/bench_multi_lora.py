"""Mixed multi-adapter LoRA batches: pyfastpeft's op (through MultiLoRALinear, "ours", and through its
PEFT-style PeftModel, "ours_peft_model") against the base linear alone, Hugging Face PEFT's
``adapter_names`` path and the plain PyTorch composition (each adapter on its own tokens).

Forward (inference, one adapter per sequence, as PEFT's mixed batches are) and forward+backward
(training several adapters in one batch, which PEFT refuses), for 8 and 32 adapters.

    python bench/bench_multi_lora.py            # N=2048 tokens, in=out=1024, r=16, float32, CPU
    python bench/bench_multi_lora.py --quick    # a small smoke size
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._timing import print_table, saved_activation_bytes, time_interleaved, write_results  # noqa: E402
from pyfastpeft.nn import MultiLoRALinear  # noqa: E402
from pyfastpeft.ops import reference  # noqa: E402


class OneLinear(nn.Module):
    def __init__(self, in_f: int, out_f: int):
        super().__init__()
        self.lin = nn.Linear(in_f, out_f)

    def forward(self, x):
        return self.lin(x)


def build_peft(base: nn.Linear, layer: MultiLoRALinear, r: int, alpha: float, library: str = "peft"):
    """A PeftModel over a one-Linear model holding the same adapters (same weights) as `layer`, from
    Hugging Face PEFT (``library="peft"``) or pyfastpeft's PEFT-style API (``"pyfastpeft"``)."""
    if library == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from pyfastpeft import LoraConfig, get_peft_model

    model = OneLinear(base.in_features, base.out_features)
    model.lin.load_state_dict(base.state_dict())
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0)
    names = layer.adapter_names
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    with torch.no_grad():
        for name in names:
            peft_model.base_model.model.lin.lora_A[name].weight.copy_(layer.lora_A[name])
            peft_model.base_model.model.lin.lora_B[name].weight.copy_(layer.lora_B[name])
    return peft_model.eval()


def run(n_tokens: int, features: int, r: int, num_adapters: int, rounds: int, clock=time.perf_counter) -> list[dict]:
    torch.manual_seed(0)
    base = nn.Linear(features, features)
    layer = MultiLoRALinear(base)
    for k in range(num_adapters):
        layer.add_adapter(f"a{k}", r=r, alpha=2.0 * r)
        nn.init.normal_(layer.lora_B[f"a{k}"], std=0.02)
    seq_len = n_tokens // num_adapters  # one adapter per sequence, every adapter used once
    names = layer.adapter_names
    x = torch.randn(num_adapters, seq_len, features)
    idx = layer.indices_for(names, seq_len)
    A, B = (t.detach() for t in layer.stacked_weights())
    scalings = torch.tensor([layer.scaling[n] for n in names])
    peft_model = build_peft(base, layer, r, 2.0 * r)
    ours_peft = build_peft(base, layer, r, 2.0 * r, library="pyfastpeft")

    rows = []
    with torch.no_grad():
        # Same answer from all four before timing anything.
        y_ours = layer(x, adapter_names=names)
        y_peft = peft_model(x, adapter_names=names)
        y_ref = reference.multi_lora_linear(x, base.weight, base.bias, A, B, scalings, idx)
        y_ours_peft = ours_peft(x, adapter_names=names)
        assert torch.allclose(y_ours, y_peft, atol=1e-4) and torch.allclose(y_ours, y_ref, atol=1e-4)
        assert torch.allclose(y_ours_peft, y_peft, atol=1e-4)
        times = time_interleaved(
            {
                "base": lambda: base(x),
                "ours": lambda: layer(x, adapter_names=names),
                "peft": lambda: peft_model(x, adapter_names=names),
                "ours_peft_model": lambda: ours_peft(x, adapter_names=names),
                "torch": lambda: reference.multi_lora_linear(x, base.weight, base.bias, A, B, scalings, idx),
            },
            rounds=rounds,
            clock=clock,
        )
    rows.append(_row("forward", num_adapters, n_tokens, features, r, times))

    # Training: every adapter in one batch; x requires grad (as inside a network), W stays frozen.
    xg = x.clone().requires_grad_()
    A_t, B_t = A.clone().requires_grad_(), B.clone().requires_grad_()
    grad = torch.randn(num_adapters, seq_len, features)

    def ours_step():
        layer(xg, adapter_names=names).backward(grad)

    def base_step():
        base(xg).backward(grad)

    def torch_step():
        reference.multi_lora_linear(xg, base.weight, base.bias, A_t, B_t, scalings, idx).backward(grad)

    times = time_interleaved({"base": base_step, "ours": ours_step, "torch": torch_step}, rounds=rounds, clock=clock)
    row = _row("forward+backward", num_adapters, n_tokens, features, r, times)
    row["saved_MiB_ours"] = saved_activation_bytes(lambda: layer(xg, adapter_names=names)) / 2**20
    row["saved_MiB_torch"] = (
        saved_activation_bytes(
            lambda: reference.multi_lora_linear(xg, base.weight, base.bias, A_t, B_t, scalings, idx),
            exclude=(A_t, B_t),
        )
        / 2**20
    )
    rows.append(row)

    # Our op on a per-token random assignment (no run structure: the sorted path), forward only.
    idx_random = torch.randint(0, num_adapters, (n_tokens,))
    with torch.no_grad():
        times = time_interleaved(
            {
                "base": lambda: base(x),
                "ours": lambda: layer(x, adapter_indices=idx_random.view(x.shape[:-1])),
            },
            rounds=rounds,
            clock=clock,
        )
    rows.append(_row("forward, random per token", num_adapters, n_tokens, features, r, times))
    return rows


def _row(mode: str, num_adapters: int, n_tokens: int, features: int, r: int, times: dict) -> dict:
    row = {"mode": mode, "adapters": num_adapters, "tokens": n_tokens, "features": features, "r": r}
    row.update({f"{k}_ms": v for k, v in times.items()})
    row["ours/base"] = times["ours"] / times["base"]
    if "ours_peft_model" in times:
        row["ours_peft_model/base"] = times["ours_peft_model"] / times["base"]
    if "peft" in times:
        row["peft/base"] = times["peft"] / times["base"]
        row["peft/ours"] = times["peft"] / times["ours"]
    if "torch" in times:
        row["torch/ours"] = times["torch"] / times["ours"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke size")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU time (use with --threads 1 on a shared machine)",
    )
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    n_tokens, features, r = (256, 128, 8) if args.quick else (2048, 1024, 16)
    rounds = args.rounds or (5 if args.quick else 30)
    rows = []
    for num_adapters in (8, 32):
        rows += run(n_tokens, features, r, num_adapters, rounds, clock)
    columns = [
        "mode",
        "adapters",
        "base_ms",
        "ours_ms",
        "peft_ms",
        "torch_ms",
        "ours/base",
        "ours_peft_model/base",
        "peft/base",
        "peft/ours",
        "torch/ours",
        "saved_MiB_ours",
        "saved_MiB_torch",
    ]
    print_table(rows, columns)
    name = (
        "bench_multi_lora"
        + ("_quick" if args.quick else "")
        + (f"_t{args.threads}" if args.threads else "")
        + ("_cpu_time" if args.cpu_time else "")
    )
    # A shared machine's load moves absolute times a lot; the ratios come from interleaved rounds.
    extra = {
        "load_average": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "clock": "process_time" if args.cpu_time else "perf_counter",
    }
    path = write_results(name, rows, "python bench/bench_multi_lora.py " + " ".join(sys.argv[1:]), extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

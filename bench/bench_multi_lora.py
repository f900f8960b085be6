"""Mixed multi-adapter LoRA batches, as a user runs them: a pyfastpeft PeftModel holding several
adapters, called with ``adapter_names`` ("ours": the LoRA layer in its mixed-batch mode, one op call), and
the same layer called directly with ``adapter_names`` ("ours_layer"), against the base linear alone,
Hugging Face PEFT's ``adapter_names`` path and the plain PyTorch composition (each adapter on its own
tokens).

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
from pyfastpeft.ops import adapter_indices_from_names, reference  # noqa: E402


class OneLinear(nn.Module):
    def __init__(self, in_f: int, out_f: int):
        super().__init__()
        self.lin = nn.Linear(in_f, out_f)

    def forward(self, x):
        return self.lin(x)


def build_peft(base: nn.Linear, names: list[str], r: int, alpha: float, library: str, weights=None):
    """A PeftModel over a one-Linear model with adapters ``names``, from Hugging Face PEFT
    (``library="peft"``) or pyfastpeft (``"pyfastpeft"``); ``weights``: {name: (A, B)} to copy in."""
    if library == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from pyfastpeft import LoraConfig, get_peft_model

    model = OneLinear(base.in_features, base.out_features)
    model.lin.load_state_dict(base.state_dict())
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    if weights is not None:
        layer = peft_model.base_model.model.lin
        with torch.no_grad():
            for name, (a, b) in weights.items():
                layer.lora_A[name].weight.copy_(a)
                layer.lora_B[name].weight.copy_(b)
    return peft_model.eval()


def run(n_tokens: int, features: int, r: int, num_adapters: int, rounds: int, clock=time.perf_counter) -> list[dict]:
    torch.manual_seed(0)
    base = nn.Linear(features, features)
    names = [f"a{k}" for k in range(num_adapters)]
    ours = build_peft(base, names, r, 2.0 * r, "pyfastpeft")
    layer = ours.get_base_model().lin  # the LoRA layer get_peft_model installed
    for name in names:
        nn.init.normal_(layer.lora_B[name].weight, std=0.02)
    for p in layer.parameters():  # train every adapter in the mixed batch, not only the active one
        p.requires_grad_(p is not layer.base_layer.weight and p is not layer.base_layer.bias)
    weights = {n: (layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach()) for n in names}
    peft_model = build_peft(base, names, r, 2.0 * r, "peft", weights)
    seq_len = n_tokens // num_adapters  # one adapter per sequence, every adapter used once
    x = torch.randn(num_adapters, seq_len, features)
    idx = adapter_indices_from_names(names, names, seq_len)
    A = torch.stack([weights[n][0] for n in names])
    B = torch.stack([weights[n][1] for n in names])
    scalings = torch.tensor([layer.scaling[n] for n in names])

    rows = []
    with torch.no_grad():
        # Same answer from all four before timing anything.
        y_ours = ours(x, adapter_names=names)
        y_layer = layer(x, adapter_names=names)
        y_peft = peft_model(x, adapter_names=names)
        y_ref = reference.multi_lora_linear(x, base.weight, base.bias, A, B, scalings, idx)
        assert torch.allclose(y_ours, y_peft, atol=1e-4) and torch.allclose(y_ours, y_ref, atol=1e-4)
        assert torch.equal(y_layer, y_ours)
        times = time_interleaved(
            {
                "base": lambda: base(x),
                "ours": lambda: ours(x, adapter_names=names),
                "ours_layer": lambda: layer(x, adapter_names=names),
                "peft": lambda: peft_model(x, adapter_names=names),
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
        ours(xg, adapter_names=names).backward(grad)

    def base_step():
        base(xg).backward(grad)

    def torch_step():
        reference.multi_lora_linear(xg, base.weight, base.bias, A_t, B_t, scalings, idx).backward(grad)

    times = time_interleaved({"base": base_step, "ours": ours_step, "torch": torch_step}, rounds=rounds, clock=clock)
    row = _row("forward+backward", num_adapters, n_tokens, features, r, times)
    row["saved_MiB_ours"] = saved_activation_bytes(lambda: ours(xg, adapter_names=names)) / 2**20
    row["saved_MiB_torch"] = (
        saved_activation_bytes(
            lambda: reference.multi_lora_linear(xg, base.weight, base.bias, A_t, B_t, scalings, idx),
            exclude=(A_t, B_t),
        )
        / 2**20
    )
    rows.append(row)

    # A random adapter per token (no run structure: the op's sorted path), forward only: every token is a
    # sequence of length one, with its own adapter name.
    random_names = [names[i] for i in torch.randint(0, num_adapters, (n_tokens,)).tolist()]
    x_tokens = x.reshape(n_tokens, 1, features)
    with torch.no_grad():
        times = time_interleaved(
            {"base": lambda: base(x), "ours": lambda: ours(x_tokens, adapter_names=random_names)},
            rounds=rounds,
            clock=clock,
        )
    rows.append(_row("forward, random per token", num_adapters, n_tokens, features, r, times))
    return rows


def _row(mode: str, num_adapters: int, n_tokens: int, features: int, r: int, times: dict) -> dict:
    row = {"mode": mode, "adapters": num_adapters, "tokens": n_tokens, "features": features, "r": r}
    row.update({f"{k}_ms": v for k, v in times.items()})
    row["ours/base"] = times["ours"] / times["base"]
    if "ours_layer" in times:
        row["ours_layer/base"] = times["ours_layer"] / times["base"]
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
        "ours_layer/base",
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

"""One LoRA training step of a small Llama-shaped model: pyfastpeft's get_peft_model against Hugging Face
PEFT on the same model and against the frozen model's forward+backward (the floor a LoRA step approaches).

    python bench/bench_model.py [--device cpu|cuda] [--dtype float32|bfloat16] [--quick]

Default size (the one the targets are stated for): hidden 512, 4 layers, batch 4 × 256 tokens, float32,
LoRA r = 16, alpha 32, dropout 0.05 on every linear layer of the blocks (q, k, v, o, gate, up, down).
A step is forward, backward and AdamW over the trainable tensors: pyfastpeft's FusedAdamW for its step,
torch.optim.AdamW for PEFT's. All three candidates get
the same input embeddings, which require grad, so the floor's backward runs through every layer as a
LoRA step's must. Memory: the bytes autograd saves for backward in one forward ("saved"), and the peak
of training ("peak"): on CUDA the allocator's peak over a step, on the CPU the process's peak
resident set over three steps minus the resident set before them, each candidate alone in a fresh
process.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pyfastpeft as pf  # noqa: E402
from bench._timing import (  # noqa: E402
    peak_memory_bytes,
    print_table,
    saved_activation_bytes,
    time_interleaved,
    write_results,
)
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM  # noqa: E402
from pyfastpeft.optim import FusedAdamW  # noqa: E402
from pyfastpeft.train.progress import proc_status_bytes, reset_rss_peak  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args, dtype: torch.dtype, device: str) -> TinyLlamaForCausalLM:
    torch.manual_seed(0)
    cfg = TinyLlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq,
    )
    return TinyLlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def make_step(model, embeds: torch.Tensor, labels: torch.Tensor, optimizer, loss_fn=None):
    """One training step on ``embeds``; ``loss_fn(model, labels, inputs_embeds=x)`` in place of the
    model's own loss (``pf.causal_lm_loss``)."""

    def step():
        x = embeds.detach().requires_grad_()
        if loss_fn is None:
            loss = model(inputs_embeds=x, labels=labels).loss
        else:
            loss = loss_fn(model, labels, inputs_embeds=x)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            x.grad = None

    return step


def setup(args, dtype: torch.dtype, device: str):
    """The three candidates' step functions (and their models, the input embeddings and the labels)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model as peft_get_peft_model

    lora = dict(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=TARGETS)
    floor = build(args, dtype, device)
    for p in floor.parameters():
        p.requires_grad_(False)
    ours = pf.get_peft_model(build(args, dtype, device), pf.LoraConfig(**lora))
    theirs = peft_get_peft_model(build(args, dtype, device), PeftLoraConfig(**lora))
    for m in (floor, ours, theirs):
        m.train()
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g, device=device)
    embeds = floor.model.embed_tokens(ids).detach()
    # each library's own optimizer: pyfastpeft's fused AdamW, torch's AdamW (the one PEFT's docs use)
    opt_ours = FusedAdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)
    steps = {
        "floor (frozen fwd+bwd)": make_step(floor, embeds, ids, None),
        "pyfastpeft LoRA step": make_step(ours, embeds, ids, opt_ours),
        "HF PEFT LoRA step": make_step(theirs, embeds, ids, opt_theirs),
    }
    return (
        steps,
        {"floor (frozen fwd+bwd)": floor, "pyfastpeft LoRA step": ours, "HF PEFT LoRA step": theirs},
        embeds,
        ids,
    )


def step_rss_growth(step) -> int:
    """Peak resident set over three steps minus the resident set before the first (models built, inputs
    made): the memory training adds on the CPU (activations, gradients, optimizer state, allocator
    slack), process-wide, as the kernel counts it. The high-water mark is reset first (Linux
    clear_refs), so nothing before the steps counts."""
    gc.collect()
    if not reset_rss_peak():
        raise RuntimeError("step_rss_growth: needs Linux's /proc/self/clear_refs")
    before = proc_status_bytes("VmRSS")
    for _ in range(3):
        step()
    return max(0, proc_status_bytes("VmHWM") - before)


def child_peak_rss(name: str) -> int | None:
    """Run the step of ``name`` alone in a fresh process (so no other candidate's memory counts)."""
    cmd = [sys.executable, __file__, "--peak-rss-of", name, *[a for a in sys.argv[1:]]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(f"peak RSS child for {name!r} failed: {out.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="small smoke size")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is steadier on a loaded machine",
    )
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (the stated size uses 0.05)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU time (use with --threads 1 on a shared machine)",
    )
    ap.add_argument("--peak-rss-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.batch, args.seq = 128, 352, 2, 4, 2, 64
    else:
        args.hidden, args.intermediate, args.layers, args.heads, args.batch, args.seq = (
            512,
            1376,
            4,
            8,
            4,
            256,
        )
    args.vocab = 1024
    rounds = args.rounds or (5 if args.quick else 15)
    dtype, device = getattr(torch, args.dtype), args.device

    steps, models, embeds, ids = setup(args, dtype, device)
    if args.peak_rss_of:
        print(json.dumps({"peak_rss_growth": step_rss_growth(steps[args.peak_rss_of])}))
        return
    clock = time.process_time if args.cpu_time else time.perf_counter
    times = time_interleaved(steps, device=device, warmup=2, rounds=rounds, clock=clock)

    def saved(model):
        return saved_activation_bytes(
            lambda: model(inputs_embeds=embeds.detach().requires_grad_(), labels=ids).loss, exclude=(embeds,)
        )

    memory = {name: saved(model) for name, model in models.items()}
    if device == "cuda":
        peaks = {name: peak_memory_bytes(fn, device) for name, fn in steps.items()}
    else:
        peaks = {name: child_peak_rss(name) for name in steps}
    floor_ms = times["floor (frozen fwd+bwd)"]
    rows = []
    for name, ms in times.items():
        rows.append(
            {
                "candidate": name,
                "ms/step": ms,
                "steps/s": 1e3 / ms,
                "x floor": ms / floor_ms,
                "saved MiB": memory[name] / 2**20,
                "peak MiB": peaks[name] / 2**20 if peaks.get(name) is not None else None,
            }
        )
    speedup = times["HF PEFT LoRA step"] / times["pyfastpeft LoRA step"]
    tokens = args.batch * args.seq
    print(
        f"hidden {args.hidden}, {args.layers} layers, {args.batch}x{args.seq} tokens, {args.dtype}, "
        f"{device}, "
        f"LoRA r=16 dropout {args.dropout} on {TARGETS}; {torch.get_num_threads()} threads, {rounds} rounds, "
        f"{'process CPU' if args.cpu_time else 'wall'} time"
    )
    print_table(rows, ["candidate", "ms/step", "steps/s", "x floor", "saved MiB", "peak MiB"])
    print(
        f"pyfastpeft steps/s over HF PEFT: {speedup:.3f}x (goal >= 1.3x); pyfastpeft step over the floor: "
        f"{times['pyfastpeft LoRA step'] / floor_ms:.3f}x (goal <= 1.15x); {tokens} tokens per step"
    )
    suffix = (
        ("_quick" if args.quick else "")
        + ("" if args.dropout == 0.05 else f"_dropout{args.dropout:g}")
        + ("" if args.cpu_time else "_wall")
        + ("" if device == "cpu" else f"_{device}")
        + ("" if args.dtype == "float32" else f"_{args.dtype}")
    )
    path = write_results(
        f"bench_model{suffix}",
        rows,
        "python bench/bench_model.py " + " ".join(sys.argv[1:]),
        {
            "threads": torch.get_num_threads(),
            "clock": "process_time" if args.cpu_time else "perf_counter",
            "speedup_vs_peft": speedup,
            "ours_over_floor": times["pyfastpeft LoRA step"] / floor_ms,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""One training step of every ``pyfastpeft finetune --method`` on the built-in model, side by side.

A step is what the command's training loop does: forward, the method's loss (cross-entropy, or the
distillation loss with the teacher's forward), backward, and the method's optimizer step. Every
registered method runs on the same pretrained base, batch and seed, in interleaved rounds; the table
gives the median step time, its ratio to full fine-tuning (``full``) and to ``lora``, the trainable
parameters, the bytes autograd saves for backward, and the peak memory of one step (see
``peak_step_bytes``: activations, gradients and temporaries; weights and optimizer state live across
steps and are not in it).

    python -m bench.bench_methods [--device cpu] [--quick] [--threads 1] [--size medium] [--batch-size 32]

The distillation teacher is made with 1 full fine-tuning step here: its quality does not change the
step's cost. On the CPU, times are CPU time of this process (``time.process_time``) with ``--threads``
threads, steadier than wall time on a shared machine; on a GPU, wall time.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench._timing import print_table, saved_activation_bytes, time_interleaved, write_results
from pyfastpeft.cli import build_parser, to_config
from pyfastpeft.train.base import load_base, resolve_defaults
from pyfastpeft.train.checkpoint import trainable_state
from pyfastpeft.train.config import FinetuneConfig
from pyfastpeft.train.data import batch_to
from pyfastpeft.train.methods import METHODS, apply_method, training_parts
from pyfastpeft.train.trainer import token_loss


def _quiet(*args, **kwargs) -> None:
    pass


def make_step(method: str, argv: list[str], device: torch.device):
    flags = build_parser().parse_args(
        ["finetune", "--model", "tiny", "--method", method, "--distill-teacher-steps", "1", *argv]
    )
    args = resolve_defaults(to_config(FinetuneConfig, flags))  # --lr, --r, ...: the model's defaults
    base = load_base(args, _quiet)
    torch.manual_seed(args.seed)
    adapted = apply_method(method, base.model, args)
    base.model.to(device)
    parts = training_parts(method, adapted, args, base.source, device, _quiet)
    params = list(trainable_state(base.model).values())
    opt = (parts.optimizer or (lambda ps, lr, wd: torch.optim.AdamW(ps, lr=lr, weight_decay=wd)))(params, args.lr, 0.0)
    batch = batch_to(base.source.batch(args.batch_size, torch.Generator().manual_seed(0)), device)
    count = int((batch.labels[:, 1:] != -100).sum())
    adapted.train()
    model = base.model  # what the command's training loop calls (prompt methods route it through their tokens)

    def loss():
        return token_loss(model, batch, count, 1, parts.summed_loss)[0]

    def step():
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return step, loss, sum(p.numel() for p in params)


def peak_step_bytes(step, device: str) -> int:
    """Peak bytes a step allocates beyond what was live when it started. CUDA: the allocator's peak. CPU:
    the torch profiler's memory events (allocations minus frees, in time order); frees of blocks allocated
    before the step (last step's gradients) are invisible to it and not subtracted."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            running += e.nbytes()
            peak = max(peak, running)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small model, small batch, few rounds")
    ap.add_argument("--size", default="medium")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--methods", default=",".join(sorted(METHODS)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size, batch, rounds = ("small", 8, 3) if args.quick else (args.size, args.batch_size, args.rounds)
    argv = ["--size", size, "--batch-size", str(batch)] + (["--pretrain-steps", "20"] if args.quick else [])
    methods = [m for m in args.methods.split(",") if m]
    steps, trainable, saved, peak = {}, {}, {}, {}
    for m in methods:
        step, loss, trainable[m] = make_step(m, argv, torch.device(args.device))
        steps[m] = step
        saved[m] = saved_activation_bytes(loss)
    # CPU time of this process on the CPU (steady on a shared machine); wall time with a GPU
    clock = time.process_time if args.device == "cpu" else time.perf_counter
    for m in methods:
        peak[m] = peak_step_bytes(steps[m], args.device)
    times = time_interleaved(steps, device=args.device, warmup=2, rounds=rounds, clock=clock)
    rows = [
        {
            "method": m,
            "ms/step": times[m],
            "x full": times[m] / times["full"] if "full" in times else None,
            "x lora": times[m] / times["lora"] if "lora" in times else None,
            "trainable": trainable[m],
            "saved MiB": saved[m] / 2**20,
            "peak MiB": peak[m] / 2**20,
            "peak x full": peak[m] / peak["full"] if "full" in peak else None,
        }
        for m in methods
    ]
    print_table(rows, ["method", "ms/step", "x full", "x lora", "trainable", "saved MiB", "peak MiB", "peak x full"])
    command = "python -m bench.bench_methods " + " ".join(sys.argv[1:])
    path = write_results(
        "methods_quick" if args.quick else "methods",
        rows,
        command,
        {"size": size, "batch_size": batch, "threads": args.threads, "clock": clock.__name__, "rounds": rounds},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

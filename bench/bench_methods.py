"""One training step of the built-in model per PEFT method: time, peak memory, trainable parameters.

The methods are those of the command line (``pyfastpeft.train.methods.METHODS``, with the command line's
default knobs), so a method registered there appears here by itself. A step is: forward with labels,
backward, AdamW step over the trainable tensors (``zero_grad(set_to_none=True)`` first, as the trainer
does). Every method's model is built from the same random initialisation; the steps of all methods run
in interleaved rounds after warm-up (bench/_timing.py) and the table gives medians and ratios against
``full`` (every parameter trains) measured in the same run.

Memory (CPU): ``peak step`` is the peak, during one step after warm-up, of the bytes torch's CPU
allocator handed out during that step and had not yet taken back (the torch profiler's memory events,
allocations minus frees, in time order; frees of blocks allocated before the step, such as last step's
gradients, are not visible to the profiler and are not subtracted). It covers activations, gradients
and temporaries, not the weights or the optimizer state, which live across steps; ``optimizer state``
is the AdamW state after warm-up.

On a machine shared with other work, ``--threads 1 --cpu-time`` keeps OpenMP threads from waiting on
busy cores, which otherwise slows small steps by an order of magnitude and swamps the comparison.

    python -m bench.bench_methods [--quick] [--methods full,lora,...] [--rounds 30] [--threads 1] [--cpu-time]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench._timing import print_table, time_interleaved, write_results
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.models.data import make_batch
from pyfastpeft.train.methods import METHODS, add_method_arguments, apply_method


def build(method: str, cfg: TinyLlamaConfig):
    torch.manual_seed(0)
    model = TinyLlamaForCausalLM(cfg)
    knobs = argparse.ArgumentParser(add_help=False)
    add_method_arguments(knobs)
    adapted = apply_method(method, model, knobs.parse_args([]))
    params = list({id(p): p for p in adapted.parameters() if p.requires_grad}.values())
    return adapted, params


def make_step(model, params, batch):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        out.loss.backward()
        opt.step()

    step.optimizer = opt
    return step


def peak_step_bytes(step) -> int:
    """Peak of (allocated - freed) bytes on the CPU during one call of ``step``, from profiler events."""
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


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small smoke size")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the registered methods")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true", help="time with process_time (steadier on a shared machine)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        batch_size, length, rounds = 8, 8, min(args.rounds, 5)
    else:  # the built-in model at its default size (the command line's --size medium), batch 32
        sizes = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        batch_size, length, rounds = 32, 16, args.rounds
    cfg = TinyLlamaConfig(max_position_embeddings=2 * length + 3, **sizes)
    names = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; registered: {list(METHODS)}")
    names = ["full"] + [m for m in names if m != "full"]  # the reference first
    batch = make_batch("reverse", batch_size, length, cfg.vocab_size, torch.Generator().manual_seed(0))

    steps, rows, failed = {}, {}, {}
    for name in names:
        try:
            model, params = build(name, cfg)
        except Exception as err:  # a method that cannot apply with the default knobs is reported, not fatal
            failed[name] = f"{type(err).__name__}: {err}"
            continue
        steps[name] = make_step(model, params, batch)
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        trainable = sum(p.numel() for p in params)
        rows[name] = {"method": name, "trainable": trainable, "trainable %": 100.0 * trainable / total}
    clock = time.process_time if args.cpu_time else time.perf_counter
    times = time_interleaved(steps, warmup=args.warmup, rounds=rounds, clock=clock)
    for name, step in steps.items():
        row = rows[name]
        row["step ms"] = times[name]
        row["peak step MiB"] = peak_step_bytes(step) / 2**20
        row["optimizer state MiB"] = state_bytes(step.optimizer) / 2**20
    ref = rows["full"]
    for row in rows.values():
        row["time vs full"] = row["step ms"] / ref["step ms"]
        row["peak vs full"] = row["peak step MiB"] / ref["peak step MiB"]
    table = list(rows.values())
    print(
        f"built-in TinyLlama {sizes}, batch {batch_size} x {2 * length + 3} tokens, "
        f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds "
        f"({'process CPU time' if args.cpu_time else 'wall time'})"
    )
    columns = ["method", "trainable", "trainable %", "step ms", "time vs full", "peak step MiB", "peak vs full"]
    print_table(table, columns + ["optimizer state MiB"])
    for name, err in failed.items():
        print(f"{name}: not measured ({err})")
    command = "python -m bench.bench_methods " + " ".join(sys.argv[1:])
    extra = {
        "model": {**sizes, "vocab_size": cfg.vocab_size},
        "batch": [batch_size, 2 * length + 3],
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "clock": "process_time" if args.cpu_time else "perf_counter",
        "memory": "peak step bytes: torch profiler CPU memory events (allocated - freed) during one step",
        "not_measured": failed,
    }
    if not args.quick:
        path = write_results("methods_cpu", table, command.strip(), extra)
        print(f"written to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()

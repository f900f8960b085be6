"""Where an op's autograd rule lives: what a C++ autograd kernel saves over a Python
``torch.library.register_autograd`` rule on the LoRA linear's forward+backward.

Variants, timed in interleaved rounds on the same tensors:
  python rule     the op with a Python ``register_autograd`` rule (the forward and backward ops are the
                  same C++ kernels; only the autograd glue is Python)
  c++ rule        the op with a C++ autograd kernel (torch::autograd::Function), when this build has one
  ops, no graph   the forward op and the backward op called directly, no autograd at all: the floor that
                  no autograd glue, C++ or Python, can beat

The "python − floor" column bounds from above what any C++ rule could save per layer call; "python /
c++" is the measured ratio. Shapes: the real model's (SmolLM2-135M) projections at 512 tokens, the
hot path of a training step, and at 8 tokens, where the dispatcher and interpreter dominate.

    python -m bench.bench_autograd [--threads 1] [--wall] [--rounds 15]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time

import torch

import pyfastpeft  # noqa: F401  (loads the operators)
from bench._timing import print_table, time_interleaved, write_results

_OP = torch.ops.pyfastpeft
# x is an activation inside a network (its gradient flows on), W and b frozen, A and B train.
_MASK = [True, False, False, True, True]


def has_cpp_autograd() -> bool:
    """Whether the op's Autograd kernel was registered from a C++ file (a build from before the
    project's one rule) rather than from Python."""
    dump = torch._C._dispatch_dump("pyfastpeft::lora_linear").splitlines()
    return any(line.startswith("Autograd") and ".cpp:" in line for line in dump)


@contextlib.contextmanager
def python_rule():
    """The op's Python rule (pyfastpeft/ops/lora.py's) for the duration: over the C++ kernel when the
    build has one (the dispatcher restores it when the registration goes), else the op's own."""
    if not has_cpp_autograd():
        yield
        return
    lib = torch.library.Library("pyfastpeft", "FRAGMENT")
    with _quiet_override():
        lib.impl("lora_linear", _python_kernel(), "Autograd", with_keyset=True)
    try:
        yield
    finally:
        lib._destroy()


# The Python rule the op had before its C++ Autograd kernel (csrc/ops/lora/lora_autograd.cpp), kept here
# as what the C++ kernel is timed against.
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng_state = inputs
    _, xa, keep = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, rng_state, keep)
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
    ctx.mark_non_differentiable(xa, keep)
    ctx.set_materialize_grads(False)  # xa's gradient is never made, so none is allocated


def _backward(ctx, grad_y, _grad_xa, _grad_keep):
    # one gradient per input: x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng_state
    if grad_y is None:
        return (None,) * 8
    x, weight, lora_A, lora_B, xa, rng_state, keep = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], ctx.has_bias and need[2], need[3], need[4]]
    grads = _OP.lora_linear_backward(
        grad_y, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, rng_state, keep, mask
    )
    return (*(g if m else None for g, m in zip(grads, mask, strict=True)), None, None, None)


@functools.cache
def _python_kernel():
    # what torch.library.register_autograd installs, made once so that switching it in and out per call
    # times the same autograd.Function class every round
    op = torch._library.utils.lookup_op("pyfastpeft::lora_linear")
    return torch._library.autograd.make_autograd_impl(op, torch._library.autograd.Info(_backward, _setup_context))


@contextlib.contextmanager
def _quiet_override():
    # the dispatcher warns once about overriding a kernel; that override is this benchmark's point
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def make_case(n_tokens: int, in_f: int, out_f: int, rank: int, dropout_p: float):
    torch.manual_seed(0)
    x = torch.randn(n_tokens, in_f, requires_grad=True)
    weight = torch.randn(out_f, in_f) / in_f**0.5
    lora_A = (torch.randn(rank, in_f) / in_f**0.5).requires_grad_()
    lora_B = (torch.randn(out_f, rank) * 0.01).requires_grad_()
    gy = torch.randn(n_tokens, out_f)
    rng = torch.tensor([7, 0], dtype=torch.int64) if dropout_p > 0 else None
    params = (x, lora_A, lora_B)

    def through_autograd():
        for t in params:
            t.grad = None
        y, _, _ = _OP.lora_linear(x, weight, None, lora_A, lora_B, 2.0, dropout_p, rng)
        y.backward(gy)

    def floor():
        with torch.no_grad():
            _, xa, keep = _OP.lora_linear(x, weight, None, lora_A, lora_B, 2.0, dropout_p, rng)
            _OP.lora_linear_backward(gy, x, weight, lora_A, lora_B, xa, 2.0, dropout_p, rng, keep, _MASK)

    return through_autograd, floor


def run_python(fn):
    def run():
        with python_rule():
            fn()  # one call after each switch, off the clock: the first call after a registration is slower
            t0 = run.clock()
            fn()
            run.ms.append((run.clock() - t0) * 1e3)

    run.ms = []
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true", help="wall time (default: this process's CPU time)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="few rounds, a smoke run")
    ap.add_argument("--out", default="autograd_cpu_float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    rounds = 5 if args.quick else args.rounds
    cpp = has_cpp_autograd()
    rank = 16
    cases = [
        # (tokens, in, out, dropout): the real model's widest projections, then decode-sized calls
        (512, 576, 1536, 0.0),
        (512, 576, 1536, 0.05),
        (8, 576, 1536, 0.0),
        (8, 576, 576, 0.0),
    ]
    rows = []
    for n_tokens, in_f, out_f, p in cases:
        through_autograd, floor = make_case(n_tokens, in_f, out_f, rank, p)
        fns = {"python rule": None, "ops, no graph": floor}
        if cpp:
            fns["c++ rule"] = through_autograd
        # the Python variant switches its rule in and out around each call; its own clock excludes that
        python = run_python(through_autograd)
        python.clock = clock
        fns["python rule"] = python
        times = time_interleaved(fns, warmup=5, rounds=rounds, clock=clock)
        py_ms = statistics.median(python.ms[5:])  # the warm-up calls' times are dropped
        row = {
            "tokens": n_tokens,
            "in": in_f,
            "out": out_f,
            "r": rank,
            "dropout": p,
            "python_ms": py_ms,
            "floor_ms": times["ops, no graph"],
            "python_minus_floor_us": (py_ms - times["ops, no graph"]) * 1e3,
            "python_over_floor": py_ms / times["ops, no graph"],
        }
        if cpp:
            row["cpp_ms"] = times["c++ rule"]
            row["python_over_cpp"] = py_ms / times["c++ rule"]
            row["python_minus_cpp_us"] = (py_ms - times["c++ rule"]) * 1e3
        rows.append(row)
        print_table([row], list(row))
        sys.stdout.flush()
    columns = ["tokens", "in", "out", "dropout", "python_ms", "floor_ms", "python_minus_floor_us", "python_over_floor"]
    if cpp:
        columns += ["cpp_ms", "python_over_cpp", "python_minus_cpp_us"]
    print()
    print_table(rows, columns)
    if not args.quick:
        path = write_results(
            args.out,
            rows,
            " ".join(["python -m bench.bench_autograd", *sys.argv[1:]]),
            extra={
                "clock": "wall" if args.wall else "process cpu time",
                "threads": args.threads,
                "rounds": rounds,
                "build_has_cpp_autograd_for_lora": cpp,
            },
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

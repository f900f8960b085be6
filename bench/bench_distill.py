"""Distillation loss: pyfastpeft's fused kernels against the eager PyTorch composition.

Variants (forward + backward, float32 unless --dtype, T = 2, α = 0.5, forward KL, 1/8 of the labels ignored):
  kd_eager    reference.kd_loss on given logits [N, V]          (log_softmax/kl_div/cross_entropy)
  kd_fused    pyfastpeft.ops.kd_loss on the same logits
  linear_eager reference.fused_linear_kd_loss: h·Wᵀ for student and teacher, then the eager loss
  linear_fused pyfastpeft.ops.fused_linear_kd_loss (chunked over tokens)
  ce_eager    reference.fused_linear_cross_entropy: h·Wᵀ, then cross_entropy (a language model's head and loss)
  ce_fused    pyfastpeft.ops.fused_linear_cross_entropy (chunked over tokens)

Time: medians of interleaved rounds after warm-up (bench/_timing.py), in one process.

Peak memory on the CPU: each variant runs once in a fresh subprocess. After the inputs are built and a
tiny warm-up has loaded every library, the process resets the kernel's resident-set high-water mark
(`echo 5 > /proc/self/clear_refs`), records its resident set (VmRSS), runs forward + backward once and
reads the high-water mark (VmHWM). The difference is the extra memory the step touched at its peak,
input gradients included. The child runs with MALLOC_MMAP_THRESHOLD_=65536, so every block of 64 KiB or
more is its own mapping, given back to the kernel when freed, and the resident set follows live memory
(with glibc's default dynamic threshold, freed chunk buffers stay resident and the figure varies by tens
of MiB between runs). On CUDA the child uses torch.cuda.max_memory_allocated.

    python bench/bench_distill.py            # N=4096, V=32000 (H=256 for the linear variants)
    python bench/bench_distill.py --quick    # small smoke size
    python bench/bench_distill.py --dtype bfloat16
    python bench/bench_distill.py --families ce --n 512 --v 49152 --h 576 --frozen-head --name NAME
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyfastpeft as pf  # noqa: E402
from bench._timing import print_table, saved_activation_bytes, time_interleaved, write_results  # noqa: E402
from pyfastpeft.ops import reference  # noqa: E402
from pyfastpeft.train.progress import proc_status_bytes, reset_rss_peak  # noqa: E402

KW = dict(temperature=2.0, alpha=0.5, divergence="forward_kl")
MIB = 2**20


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(
    variant: str, n: int, v: int, h: int, device: str, dtype: torch.dtype = torch.float32, frozen_head: bool = False
):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::8] = -100
    labels = labels.to(device)
    if variant.startswith("kd"):
        s = (torch.randn(n, v, generator=g) * 2).to(device, dtype).requires_grad_()
        t = (torch.randn(n, v, generator=g) * 2).to(device, dtype)
        return (s, t, labels), (s,)
    hs = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    ws = (torch.randn(v, h, generator=g) * h**-0.5).to(device, dtype).requires_grad_(not frozen_head)
    trained = (hs, ws) if not frozen_head else (hs,)
    if variant.startswith("ce"):
        return (hs, ws, labels), trained
    ht = torch.randn(n, h, generator=g).to(device, dtype)
    wt = (torch.randn(v, h, generator=g) * h**-0.5).to(device, dtype)
    return (hs, ws, ht, wt, labels), trained


FNS = {
    "kd_eager": lambda a: reference.kd_loss(*a, **KW),
    "kd_fused": lambda a: pf.ops.kd_loss(*a, **KW),
    "linear_eager": lambda a: reference.fused_linear_kd_loss(*a, **KW),
    "linear_fused": lambda a: pf.ops.fused_linear_kd_loss(*a, **KW),
    "ce_eager": lambda a: reference.fused_linear_cross_entropy(*a),
    "ce_fused": lambda a: pf.ops.fused_linear_cross_entropy(*a),
}
FAMILIES = ("kd", "linear", "ce")


def step(variant: str, args, params) -> None:
    for p in params:
        p.grad = None
    FNS[variant](args).backward()


def measure_peak_child(
    variant: str, n: int, v: int, h: int, device: str, dtype: torch.dtype, frozen_head: bool
) -> None:
    """Runs in a fresh process: prints the step's peak extra bytes as JSON."""
    small_args, small_params = make_inputs(variant, 16, 64, 8, device, dtype, frozen_head)
    step(variant, small_args, small_params)  # loads and initialises every library the step uses
    args, params = make_inputs(variant, n, v, h, device, dtype, frozen_head)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(variant, args, params)
        torch.cuda.synchronize()
        print(json.dumps({"peak_extra": torch.cuda.max_memory_allocated() - base}))
        return
    gc.collect()
    # Writing 5 to clear_refs resets the kernel's high-water mark (VmHWM) to the current resident set, so
    # building the inputs (with their temporaries) cannot hide the step's own peak.
    if not reset_rss_peak():
        raise RuntimeError("bench_distill: the CPU peak needs Linux's /proc/self/clear_refs")
    base = proc_status_bytes("VmRSS")
    step(variant, args, params)
    peak = proc_status_bytes("VmHWM")
    print(json.dumps({"peak_extra": peak - base}))


def measure_peak(variant: str, n: int, v: int, h: int, device: str, dtype: str, frozen_head: bool = False) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--n",
        str(n),
        "--v",
        str(v),
        "--h",
        str(h),
        "--device",
        device,
        "--dtype",
        dtype,
        *(["--frozen-head"] if frozen_head else []),
    ]
    # A fixed mmap threshold makes glibc serve every block of 64 KiB or more with its own mapping and
    # unmap it on free; with the default (dynamic) threshold, freed chunk buffers stay resident in the
    # heap arenas and the measured peak varies by tens of MiB from run to run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    return json.loads(out)


def run_family(family: str, a: argparse.Namespace) -> list[dict]:
    """Times the eager and fused variants of one family against each other and measures their peaks."""
    names = [f"{family}_eager", f"{family}_fused"]
    inputs = {name: make_inputs(name, a.n, a.v, a.h, a.device, DTYPES[a.dtype], a.frozen_head) for name in names}
    fns = {name: functools.partial(step, name, *inputs[name]) for name in names}
    times = time_interleaved(fns, device=a.device, warmup=1, rounds=a.rounds)
    rows = []
    for name in names:
        args, params = inputs[name]
        saved = saved_activation_bytes(functools.partial(FNS[name], args), exclude=tuple(params))
        peak = measure_peak(name, a.n, a.v, a.h, a.device, a.dtype, a.frozen_head)
        rows.append(
            {
                "variant": name,
                "N": a.n,
                "V": a.v,
                "H": None if family == "kd" else a.h,
                "fwd_bwd_ms": times[name],
                "saved_MiB": saved / MIB,
                "peak_extra_MiB": peak["peak_extra"] / MIB,
            }
        )
    eager, fused = rows
    fused["speedup"] = eager["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
    fused["peak_vs_eager"] = fused["peak_extra_MiB"] / eager["peak_extra_MiB"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke size")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--h", type=int, default=256, help="hidden size of the linear variants")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if pf.cuda_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    ap.add_argument("--frozen-head", action="store_true", help="the head's weight gets no gradient (LoRA training)")
    ap.add_argument("--name", default=None, help="the results file's name (default: distill[_quick][_dtype])")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        measure_peak_child(a.child, a.n, a.v, a.h, a.device, DTYPES[a.dtype], a.frozen_head)
        return
    if a.quick:
        a.n, a.v, a.h, a.rounds = 256, 2000, 64, 3

    families = a.families.split(",")
    if not families or set(families) - set(FAMILIES):
        ap.error(f"--families: expected a comma-separated subset of {FAMILIES}, got {a.families!r}")
    rows = []
    for family in families:
        rows += run_family(family, a)

    # The fused linear loss at twice the vocabulary: its peak should grow only by the weight-sized
    # buffers (the dW output, V·H floats), not by anything N×V.
    for v in (a.v, 2 * a.v) if "linear" in families else ():
        peak = measure_peak("linear_fused", a.n, v, a.h, a.device, a.dtype)
        # dW is accumulated in float32 (4 bytes per head element) whatever the weights' dtype.
        weight_bytes = v * a.h * 4
        rows.append(
            {
                "variant": "linear_fused (V sweep)",
                "N": a.n,
                "V": v,
                "H": a.h,
                "peak_extra_MiB": peak["peak_extra"] / MIB,
                "peak_minus_dW_MiB": (peak["peak_extra"] - weight_bytes) / MIB,
            }
        )

    columns = [
        "variant",
        "N",
        "V",
        "H",
        "fwd_bwd_ms",
        "speedup",
        "saved_MiB",
        "peak_extra_MiB",
        "peak_vs_eager",
        "peak_minus_dW_MiB",
    ]
    print_table(rows, columns)
    name = a.name or ("distill_quick" if a.quick else "distill") + ("" if a.dtype == "float32" else f"_{a.dtype}")
    command = " ".join(["python bench/bench_distill.py", *sys.argv[1:]])
    path = write_results(
        name,
        rows,
        command,
        extra={
            "peak_method": "CPU: fresh subprocess per variant with MALLOC_MMAP_THRESHOLD_=65536; VmHWM "
            "reset via /proc/self/clear_refs, then VmHWM after one forward+backward minus VmRSS just before "
            "it; CUDA: max_memory_allocated minus allocated",
            "settings": {**KW, "dtype": a.dtype, "ignored_labels": "1 in 8", "frozen_head": a.frozen_head},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

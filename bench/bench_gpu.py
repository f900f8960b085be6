"""The GPU figures in one short run (about a minute on an H200), each reported as a fraction of a ceiling
measured in the same process: the device-to-device copy bandwidth (bytes read plus bytes written) for
memory-bound ops, the bf16 matrix-product rate for matmul-bound ones; and each next to its PyTorch (and
HF PEFT, when installed) baseline from the same interleaved rounds.

    python -m bench.bench_gpu [--device cuda] [--tiny] [--rounds 20]

Times are medians of interleaved rounds, timed with CUDA events after warm-up, on random data (never
zeros). ``--tiny`` shrinks every size (a check of the script's code paths, on the CPU too); its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import pyfastpeft
import pyfastpeft.ops as ops
from bench._timing import print_table, write_results
from pyfastpeft.ops import reference
from pyfastpeft.optim import FusedAdamW


class Timer:
    """Median milliseconds of interleaved rounds: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str, warmup: int, rounds: int):
        self.device, self.warmup, self.rounds = device, warmup, rounds

    def __call__(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        cuda = self.device.startswith("cuda")
        for fn in fns.values():
            for _ in range(self.warmup):
                fn()
        if cuda:
            torch.cuda.synchronize()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(self.rounds):
            for name, fn in fns.items():
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    samples[name].append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1e3)
        return {k: statistics.median(v) for k, v in samples.items()}


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def kernel_launches(fn: Callable[[], object], device: str) -> int | None:
    """CUDA kernels one call launches, from the profiler (None on the CPU or where CUPTI is unavailable)."""
    if not device.startswith("cuda"):
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # noqa: BLE001 - a missing profiler must not cost the timings
        print(f"kernel count unavailable: {type(e).__name__}: {e}")
        return None


def ceilings(device: str, tiny: bool, timer: Timer) -> dict[str, float]:
    n_copy = (1 << 16) if tiny else (1 << 29)  # 2 GiB of float32: far past the 60 MB L2
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer({"copy": lambda: dst.copy_(src)})["copy"]
    n = 256 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = timer({"mm": lambda: a @ b})["mm"]
    return {
        "copy_GBps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
        "bf16_matmul_TFLOPs": 2 * n**3 / mm_ms / 1e9,
    }


def _row(figure, name, ms, base_ms=None, gbytes=None, tflop=None, ceil=None, **extra):
    row = {"figure": figure, "candidate": name, "ms": ms}
    if base_ms is not None:
        row["vs_baseline"] = ms / base_ms
    if gbytes is not None:
        row["GBps"] = gbytes / ms * 1e3
        row["of_copy_bw"] = row["GBps"] / ceil["copy_GBps"]
    if tflop is not None:
        row["TFLOPs"] = tflop / ms * 1e3
        row["of_bf16_matmul"] = row["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
    row.update(extra)
    return row


def lora_rows(device, tiny, timer, ceil):
    n, d, r = (64, 128, 8) if tiny else (8192, 4096, 16)
    dt = torch.bfloat16
    base = nn.Linear(d, d, device=device, dtype=dt).requires_grad_(False)
    a = (torch.randn(r, d, device=device, dtype=dt) / d**0.5).requires_grad_()
    b = torch.randn(d, r, device=device, dtype=dt).requires_grad_()
    x = torch.randn(n, d, device=device, dtype=dt, requires_grad=True)
    gy = torch.randn(n, d, device=device, dtype=dt)

    def step(fn, wrt):
        def run():  # fresh gradients: no accumulation pass into .grad in any candidate
            torch.autograd.grad(fn(), wrt, gy)

        return run

    fns = {
        "frozen base linear": step(lambda: base(x), (x,)),
        "pyfastpeft lora_linear": step(lambda: ops.lora_linear(x, base.weight, base.bias, a, b, 2.0), (x, a, b)),
        "eager composition": step(lambda: reference.lora_linear(x, base.weight, base.bias, a, b, 2.0), (x, a, b)),
    }
    try:
        from peft import LoraConfig, get_peft_model

        wrapper = nn.Sequential()
        wrapper.add_module("proj", copy.deepcopy(base))
        model = get_peft_model(wrapper, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])).to(device, dt)
        trainable = tuple(p for p in model.parameters() if p.requires_grad)
        for p in trainable:  # PEFT starts B at zero; random values, as for the other candidates
            nn.init.normal_(p, std=d**-0.5)
        fns["HF PEFT lora.Linear"] = step(lambda: model(x), (x, *trainable))
    except ImportError as e:
        print(f"HF PEFT baseline skipped: {e}")
    times = timer(fns)
    flop = 4 * n * d * d / 1e12  # y = x·Wᵀ and dx = dy·W; the rank-r terms add (8/d) of this
    base_ms = times["frozen base linear"]
    fig = f"LoRA fwd+bwd bf16 N={n} D={d} r={r}"
    return [_row(fig, k, v, base_ms, tflop=flop, ceil=ceil) for k, v in times.items()]


def multi_lora_rows(device, tiny, timer, ceil):
    n, d, r = (64, 128, 8) if tiny else (8192, 4096, 16)
    dt = torch.bfloat16
    w = torch.randn(d, d, device=device, dtype=dt) / d**0.5
    x = torch.randn(n, d, device=device, dtype=dt)
    rows = []
    for k in (8, 32):
        a = torch.randn(k, r, d, device=device, dtype=dt) / d**0.5
        b = torch.randn(k, d, r, device=device, dtype=dt)
        scal = torch.full((k,), 2.0, device=device)
        idx = torch.randint(0, k, (n,), device=device)
        with torch.no_grad():
            times = timer(
                {
                    "base linear": lambda: torch.nn.functional.linear(x, w),
                    "pyfastpeft multi_lora_linear": lambda a=a, b=b, scal=scal, idx=idx: ops.multi_lora_linear(
                        x, w, None, a, b, scal, idx
                    ),
                }
            )
        fig = f"multi-LoRA forward bf16 N={n} D={d} r={r} adapters={k}"
        rows += [
            _row(fig, name, ms, times["base linear"], tflop=2 * n * d * d / 1e12, ceil=ceil)
            for name, ms in times.items()
        ]
    return rows


def optim_rows(device, tiny, timer, ceil):
    n_adapters, rank, width = (4, 8, 64) if tiny else (128, 16, 4096)

    def make():
        ps = []
        for _ in range(n_adapters):
            ps += [
                torch.randn(rank, width, device=device).requires_grad_(),
                torch.randn(width, rank, device=device).requires_grad_(),
            ]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    opts = {
        "pyfastpeft FusedAdamW": FusedAdamW(make(), lr=1e-3),
        "torch AdamW foreach": torch.optim.AdamW(make(), lr=1e-3, foreach=True),
    }
    if device.startswith("cuda"):
        opts["torch AdamW fused"] = torch.optim.AdamW(make(), lr=1e-3, fused=True)
    for o in opts.values():
        o.step()
    times = timer({k: o.step for k, o in opts.items()})
    numel = 2 * n_adapters * rank * width
    gbytes = 7 * 4 * numel / 1e9  # read θ, g, m, v; write θ, m, v (float32)
    ref = times.get("torch AdamW fused", times["torch AdamW foreach"])
    fig = f"AdamW step, {2 * n_adapters} float32 tensors, {numel / 1e6:.1f} M parameters"
    launches = {k: kernel_launches(o.step, device) for k, o in opts.items()}
    return [_row(fig, k, v, ref, gbytes=gbytes, ceil=ceil, kernels=launches[k]) for k, v in times.items()]


def quant_rows(device, tiny, timer, ceil):
    rows_, cols = (256, 128) if tiny else (16384, 4096)
    dt = torch.bfloat16
    x = torch.randn(rows_, cols, device=device, dtype=dt, requires_grad=True)
    gy = torch.randn(rows_, cols, device=device, dtype=dt)
    scale = torch.rand(rows_, device=device) / 16 + 1e-2

    zero = torch.zeros(rows_, dtype=torch.int32, device=device)

    def ours():
        torch.autograd.grad(ops.fake_quantize(x, 8, -1, True, 0)[0], x, gy)

    def torch_ref():
        torch.autograd.grad(torch.fake_quantize_per_channel_affine(x, scale, zero, 0, -128, 127), x, gy)

    times = timer({"pyfastpeft fake_quantize": ours, "torch fake_quantize_per_channel_affine": torch_ref})
    # forward reads x, writes out; backward reads dy and x, writes dx: 5 passes over a bf16 tensor
    gbytes = 5 * x.numel() * x.element_size() / 1e9
    fig = f"fake-quant fwd+bwd bf16 [{rows_}, {cols}] per channel int8"
    return [
        _row(fig, k, v, times["torch fake_quantize_per_channel_affine"], gbytes=gbytes, ceil=ceil)
        for k, v in times.items()
    ]


def reduction_rows(device, tiny, timer, ceil):
    n, d = (256, 128) if tiny else (16384, 4096)
    dt = torch.bfloat16
    gy = torch.randn(n, d, device=device, dtype=dt)
    x = torch.randn(n, d, device=device, dtype=dt)
    w = torch.randn(d, d, device=device, dtype=dt)
    scale = torch.randn(d, device=device, dtype=dt)
    elt = gy.element_size()
    rows = []
    times = timer(
        {
            "pyfastpeft bias grad": lambda: torch.ops.pyfastpeft.bias_only_linear_backward(gy, w, [False, True]),
            "torch sum(0)": lambda: gy.sum(0),
        }
    )
    fig = f"bias gradient (column sum) bf16 [{n}, {d}]"
    rows += [_row(fig, k, v, times["torch sum(0)"], gbytes=n * d * elt / 1e9, ceil=ceil) for k, v in times.items()]
    times = timer(
        {
            "pyfastpeft ia3 backward": lambda: torch.ops.pyfastpeft.ia3_scale_backward(gy, x, scale, [True, True]),
            "torch mul + (gy·x).sum(0)": lambda: (gy * scale, (gy * x).sum(0)),
        }
    )
    fig = f"ia3 backward (dx and dscale) bf16 [{n}, {d}]"  # reads dy and x, writes dx
    rows += [
        _row(fig, k, v, times["torch mul + (gy·x).sum(0)"], gbytes=3 * n * d * elt / 1e9, ceil=ceil)
        for k, v in times.items()
    ]
    return rows


def kd_rows(device, tiny, timer, ceil):
    n, v = (32, 512) if tiny else (4096, 128256)
    dt = torch.bfloat16
    s = torch.randn(n, v, device=device, dtype=dt, requires_grad=True)
    t = torch.randn(n, v, device=device, dtype=dt)
    labels = torch.randint(0, v, (n,), device=device)

    def ours():
        torch.autograd.grad(ops.kd_loss(s, t, labels), s)

    def eager():
        torch.autograd.grad(reference.kd_loss(s, t, labels), s)

    # one pass reads student and teacher and writes the gradient: 3 bf16 tensors of n·v
    gbytes = 3 * n * v * s.element_size() / 1e9
    candidates = {"pyfastpeft kd_loss": ours, "eager": eager}
    return _rows_against_eager(f"KD loss fwd+bwd bf16 N={n} V={v}", candidates, device, timer, ceil, gbytes=gbytes)


def _rows_against_eager(fig, candidates, device, timer, ceil, **work):
    """Rows of ``candidates`` (one of them "eager"): time, peak memory, both against eager's; ``work``
    (gbytes or tflop) gives the rate."""
    times = timer(candidates)
    peaks = {k: peak_bytes(fn, device) for k, fn in candidates.items()}
    rows = []
    for k, ms in times.items():
        extra = {"peak_MiB": None if peaks[k] is None else peaks[k] / 2**20}
        if peaks[k] is not None and peaks["eager"]:
            extra["peak_vs_eager"] = peaks[k] / peaks["eager"]
        rows.append(_row(fig, k, ms, times["eager"], ceil=ceil, **work, **extra))
    return rows


def lm_loss_rows(device, tiny, timer, ceil):
    # a Llama-3-sized head: hidden 2048, vocabulary 128,256, 16k tokens a step
    n, h, v = (32, 16, 512) if tiny else (16384, 2048, 128256)
    dt = torch.bfloat16
    hidden = torch.randn(n, h, device=device, dtype=dt, requires_grad=True)
    weight = torch.randn(v, h, device=device, dtype=dt) * h**-0.5
    labels = torch.randint(0, v, (n,), device=device)

    def ours():
        torch.autograd.grad(ops.fused_linear_cross_entropy(hidden, weight, labels), hidden)

    def eager():  # transformers' head and loss: bf16 logits, the loss over their float32 copy
        torch.autograd.grad(reference.fused_linear_cross_entropy(hidden, weight, labels, upcast=True), hidden)

    candidates = {"pyfastpeft fused_linear_cross_entropy": ours, "eager": eager}
    fig = f"LM head + cross-entropy fwd+bwd (dh) bf16 N={n} H={h} V={v}"
    # the logits' and dh's products: 2 · 2·n·h·v
    return _rows_against_eager(fig, candidates, device, timer, ceil, tflop=4 * n * h * v / 1e12)


SECTIONS = {
    "lora": lora_rows,
    "multi_lora": multi_lora_rows,
    "optim": optim_rows,
    "quant": quant_rows,
    "reductions": reduction_rows,
    "kd": kd_rows,
    "lm_loss": lm_loss_rows,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: checks the code paths, numbers mean nothing")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not pyfastpeft.cuda_available():
        print(
            "bench_gpu: CUDA kernels not built or no GPU (use --device cpu --tiny to check the script)", file=sys.stderr
        )
        return 2
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or args.rounds < 1:
        print(f"bench_gpu: unknown section(s) {unknown} (known: {list(SECTIONS)}) or rounds < 1", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    timer = Timer(args.device, warmup=3, rounds=args.rounds)
    ceil = ceilings(args.device, args.tiny, timer)
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.1f} TFLOP/s")
    rows, failed = [], {}
    for name in sections:
        t0 = time.perf_counter()
        try:
            new = SECTIONS[name](args.device, args.tiny, timer, ceil)
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others' figures
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"section {name} FAILED: {failed[name]}", flush=True)
            continue
        rows += new
        print(f"section {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    columns = ["figure", "candidate", "ms", "vs_baseline", "of_copy_bw", "of_bf16_matmul", "peak_vs_eager", "kernels"]
    print_table(rows, columns)
    name = "bench_gpu" + ("_tiny" if args.tiny else "") + ("" if args.device == "cuda" else f"_{args.device}")
    command = "python -m bench.bench_gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    path = write_results(name, rows, command, {"ceilings": ceil, "failed_sections": failed})
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

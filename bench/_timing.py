"""The one timing helper every benchmark uses: median of many runs after warm-up, peak memory, and
saved-activation bytes, with results written as JSON under bench/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("PYFASTPEFT_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str = "cpu", warmup: int = 3, repeat: int = 20) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _faults_and_system_ms() -> tuple[int, float]:
    """This process's minor page faults and system CPU time (ms) so far; zeros where getrusage is missing."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime * 1e3


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: str = "cpu",
    warmup: int = 3,
    rounds: int = 20,
    clock: Callable[[], float] = time.perf_counter,
    samples: dict[str, list[float]] | None = None,
    kernel: dict[str, dict[str, list[float]]] | None = None,
):
    """Median times (ms) of several candidates, run in interleaved rounds so that machine noise
    (frequency changes, a neighbour's load) hits all of them alike. Each round starts one candidate later
    than the last, so that none always runs after the same other one (what a candidate leaves behind, its
    freed heap, its caches, affects the next: in one run on the real model the same LoRA step measured
    1.154x the frozen step's time when it ran right after it, 1.086x right after another LoRA step).
    ``clock=time.process_time`` measures this process's CPU time instead of wall time (steadier on a
    shared machine with one thread).
    ``samples``, when given, receives every round's time per candidate (for ratios paired by round);
    ``kernel``, each round's minor page faults and system CPU time (ms) per candidate (what the kernel's
    side of a step cost: where faults are expensive, as in virtual machines, they spread the rounds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    per_round = {} if samples is None else samples
    per_round.update({k: [] for k in fns})
    if kernel is not None:
        kernel.update({k: {"minor_faults": [], "system_ms": []} for k in fns})
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            faults0, system0 = _faults_and_system_ms()
            t0 = clock()
            fn()
            _sync(device)
            per_round[name].append((clock() - t0) * 1e3)
            if kernel is not None:
                faults1, system1 = _faults_and_system_ms()
                kernel[name]["minor_faults"].append(faults1 - faults0)
                kernel[name]["system_ms"].append(round(system1 - system0, 3))
    return {k: statistics.median(per_round[k]) for k in fns}


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running ``fn`` (parameters and
    the tensors in ``exclude`` are not activations and are not counted)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and not isinstance(t, torch.nn.Parameter):
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak allocated bytes during ``fn`` (CUDA allocator stats; on the CPU, the peak resident-set growth
    is too noisy, so CPU benchmarks report saved-activation bytes instead)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    raise ValueError("peak_memory_bytes: CUDA only; use saved_activation_bytes on the CPU")


def _cpu_model() -> str | None:
    """The CPU's name as the kernel reports it (Linux), else platform.processor() or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict:
    import pyfastpeft

    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        # the level pyfastpeft's CPU kernels run at (avx512, avx2 or default; PYFASTPEFT_CPU_CAPABILITY)
        "cpu_capability": pyfastpeft.build_info()["cpu_capability"],
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(name: str, rows: list[dict], command: str, extra: dict | None = None) -> Path:
    """Write ``bench/results/<name>.json`` (atomically) with the rows, the command and the environment."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"command": command, "environment": environment(), "rows": rows, **(extra or {})}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)

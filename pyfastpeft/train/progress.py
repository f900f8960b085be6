"""Progress display and run measurements: a bar on a terminal, plain log lines otherwise; peak memory."""

from __future__ import annotations

import os
import resource
import sys
import time

import torch


def _format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def use_tqdm() -> bool:
    """tqdm draws the bar only when asked (PYFASTPEFT_TQDM=1) and installed; the built-in one-line bar
    needs nothing and is the default."""
    if os.environ.get("PYFASTPEFT_TQDM") != "1":
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """``update(step, loss, tokens)`` once per step. On a terminal: a one-line bar redrawn in place
    (tqdm's with PYFASTPEFT_TQDM=1); when stdout is not a terminal (a log file, CI): one line every
    ``log_every`` steps. ``enabled=False`` (ranks other than 0) prints nothing."""

    def __init__(self, total: int, start: int, label: str, log_every: int, enabled: bool = True, stream=None):
        self.total, self.start, self.label, self.log_every = total, start, label, max(1, log_every)
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.bar = None  # a tqdm bar, when enabled (see use_tqdm)
        if self.tty and use_tqdm():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=label, file=self.stream, dynamic_ncols=True)

    def training_seconds(self) -> float:
        """Seconds since the start, less the time spent in ``exclude``d work (evaluations)."""
        return time.perf_counter() - self.t0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation between steps) out of the throughput and the ETA."""
        self.t0 += seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(1e-9, self.training_seconds())

    def eta(self, step: int) -> float:
        done = step - self.start
        return self.training_seconds() / max(1, done) * (self.total - step)

    def update(self, step: int, loss: float, tokens: int) -> None:
        self.tokens += tokens
        if not self.enabled:
            return
        rate = self.tokens_per_second
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            return
        text = (
            f"[{self.label}] step {step}/{self.total}  loss {loss:.4f}  {rate:,.0f} tokens/s  "
            f"ETA {_format_seconds(self.eta(step))}"
        )
        if self.tty:
            width = 24
            filled = int(width * step / max(1, self.total))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}  ")
            self.stream.flush()
        elif step % self.log_every == 0 or step == self.total or step == self.start + 1:
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A message between updates (an evaluation result) that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            if self.tty:
                self.stream.write("\n")
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            self.stream.write("\n")
            self.stream.flush()


class PeakMemory:
    """Peak memory of the training phase.

    CUDA: the allocator's peak above what was allocated at the start. CPU on Linux: the resident set's
    high-water mark is reset when training starts (``/proc/self/clear_refs``), so the peak is this
    phase's own, even after an earlier, larger one (model loading, pretraining, another method of one
    ``compare`` process), and the growth is that peak over the resident set at the start. Elsewhere:
    the process's high-water mark from ``getrusage``, which never falls, and its growth during
    training (0 when training stayed below an earlier peak).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.phase = False  # a high-water mark of this phase alone (Linux)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        elif reset_rss_peak():
            self.phase = True
            self.base = proc_status_bytes("VmRSS")
        else:
            self.base = self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB

    def summary(self) -> dict[str, float]:
        mib = 1024 * 1024
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"peak_mib": peak / mib, "growth_mib": (peak - self.base) / mib, "kind": "cuda allocated"}
        if self.phase:
            peak = proc_status_bytes("VmHWM")
            return {"peak_mib": peak / mib, "growth_mib": (peak - self.base) / mib, "kind": "process RSS, training"}
        peak = self._maxrss()
        return {"peak_mib": peak / mib, "growth_mib": (peak - self.base) / mib, "kind": "process RSS"}

    def describe(self) -> str:
        s = self.summary()
        if s["kind"] == "cuda allocated":
            return f"peak CUDA memory {s['peak_mib']:.1f} MiB (+{s['growth_mib']:.1f} MiB during training)"
        if s["kind"] == "process RSS, training":
            return (
                f"peak memory {s['peak_mib']:.1f} MiB process RSS during training "
                f"(+{s['growth_mib']:.1f} MiB over its start; CPU figure from /proc/self/status)"
            )
        return (
            f"peak memory {s['peak_mib']:.1f} MiB process RSS high-water mark "
            f"(+{s['growth_mib']:.1f} MiB during training; CPU figure from getrusage)"
        )


def reset_rss_peak() -> bool:
    """Resets this process's resident-set high-water mark (Linux 4.0+); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        proc_status_bytes("VmHWM")
        return True
    except (OSError, ValueError):
        return False


def proc_status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/self/status has no {key} field")

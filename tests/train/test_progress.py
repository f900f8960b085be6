"""Throughput bookkeeping of the training progress display."""

import io
import mmap
import sys
import time

import pytest
import torch

from pyfastpeft.train.progress import PeakMemory, Progress, proc_status_bytes


def test_excluded_time_is_left_out_of_tokens_per_second():
    p = Progress(total=4, start=0, label="t", log_every=1, stream=io.StringIO())
    time.sleep(0.05)
    p.update(1, 1.0, 1000)
    with_eval = p.tokens_per_second
    elapsed = p.training_seconds()
    p.exclude(0.9 * elapsed)  # as if nine tenths of it had been an evaluation
    assert p.training_seconds() < elapsed
    assert p.tokens_per_second > with_eval


def test_eta_counts_training_time_only():
    p = Progress(total=3, start=0, label="t", log_every=1, stream=io.StringIO())
    time.sleep(0.05)
    p.update(1, 1.0, 10)
    before = p.eta(1)
    p.exclude(p.training_seconds())  # everything so far was excluded work
    assert p.eta(1) < before


def _touch(mib: int) -> mmap.mmap:
    """``mib`` MiB of fresh anonymous pages, every page written so that it is resident (an mmap, not a
    malloc: a long test process's allocator may serve a buffer from pages that are resident already)."""
    buf = mmap.mmap(-1, mib * 1024 * 1024)
    for offset in range(0, len(buf), 4096):
        buf[offset] = 1
    return buf


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-phase mark is Linux's /proc/self/clear_refs")
def test_cpu_peak_is_the_training_phase_own():
    mib = 1024 * 1024
    # an earlier, larger peak (model loading, another method of one compare process) does not count
    big = _touch(256)
    peak_before = proc_status_bytes("VmHWM")
    big.close()
    memory = PeakMemory(torch.device("cpu"))
    assert memory.phase
    small = _touch(64)
    resident = proc_status_bytes("VmRSS")
    s = memory.summary()
    small.close()
    assert s["kind"] == "process RSS, training"
    # the phase's mark covers what the phase touched, and not the larger peak before it (memory that a
    # long test process frees meanwhile lowers the resident set, so the growth itself may be below 64 MiB)
    assert s["peak_mib"] * mib >= resident, s
    assert s["peak_mib"] * mib < peak_before - 128 * mib, (s, peak_before / mib)
    assert s["growth_mib"] >= 0
    assert "during training" in memory.describe()

"""Throughput bookkeeping of the training progress display."""

import io
import sys
import time

import pytest
import torch

from pyfastpeft.train.progress import PeakMemory, Progress


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


def _touch(mib: int) -> bytearray:
    """A buffer of ``mib`` MiB with every page written, so that it is resident."""
    buf = bytearray(mib * 1024 * 1024)
    buf[::4096] = b"\x01" * len(range(0, len(buf), 4096))
    return buf


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-phase mark is Linux's /proc/self/clear_refs")
def test_cpu_peak_is_the_training_phase_own():
    # an earlier, larger peak (model loading, another method of one compare process) does not count
    big = _touch(256)
    del big
    memory = PeakMemory(torch.device("cpu"))
    assert memory.phase
    small = _touch(64)
    s = memory.summary()
    del small
    assert s["kind"] == "process RSS, training"
    assert 60 <= s["growth_mib"] < 200, s  # the 64 MiB touched in the phase, not the 256 MiB before it
    assert s["peak_mib"] >= s["growth_mib"]
    assert "during training" in memory.describe()

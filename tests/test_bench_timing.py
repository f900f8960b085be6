"""bench/_timing.py's interleaved timer: every round's time per candidate, and (on Unix) each round's
minor page faults and system CPU time."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._timing import time_interleaved  # noqa: E402


def touch_fresh_pages():
    # 16 MiB of new anonymous pages, each written once: 4096 faults at 4 KiB a page (no huge pages, which
    # a kernel with transparent huge pages always on would otherwise give)
    with mmap.mmap(-1, 16 << 20) as m:
        m.madvise(mmap.MADV_NOHUGEPAGE)
        for offset in range(0, len(m), 4096):
            m[offset] = 1


def nothing():
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="getrusage's fault counts (Linux)")
def test_rounds_record_time_faults_and_system_time():
    samples, kernel = {}, {}
    medians = time_interleaved(
        {"faults": touch_fresh_pages, "none": nothing}, warmup=1, rounds=4, samples=samples, kernel=kernel
    )
    assert set(medians) == set(samples) == set(kernel) == {"faults", "none"}
    for name in ("faults", "none"):
        assert len(samples[name]) == 4 and all(t >= 0 for t in samples[name])
        assert len(kernel[name]["minor_faults"]) == len(kernel[name]["system_ms"]) == 4
    # each round of the first maps fresh pages; the second touches none
    assert min(kernel["faults"]["minor_faults"]) >= 4096 * 0.9
    assert max(kernel["none"]["minor_faults"]) < 100
    assert medians["faults"] > medians["none"]

"""Throughput bookkeeping of the training progress display."""

import io
import time

from pyfastpeft.train.progress import Progress


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

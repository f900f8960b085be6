"""The main job end to end, shortened by flags (same code path as the default run)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_finetune_runs_and_loss_falls():
    out = subprocess.run(
        [sys.executable, "-m", "pyfastpeft", "finetune", "--pretrain-steps", "40", "--steps", "40", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+", out.stdout)
    first, last = map(float, re.search(r"loss: ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert last < first


def test_bad_argument_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "pyfastpeft", "finetune", "--task", "nope"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "invalid choice: 'nope'" in out.stderr

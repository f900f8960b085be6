"""Checkpoints: an interrupted run resumed ends bit-identical to an uninterrupted one on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from .conftest import TINY, adapter, run_cli

# dropout > 0, so the resumed run must also restore torch's generator to match
COMMON = ["--method", "lora", "--dropout", "0.1", "--eval-every", "2", *TINY]


def _history(out):
    return json.loads((out / "summary.json").read_text())["history"]


@pytest.mark.parametrize("method", ["lora", "sparse"])
def test_stop_and_resume_is_bit_identical(tmp_path, method):
    # sparse: its own optimizer (SparseAdamW) and data-dependent (gradient) selection of its entries
    common = [*COMMON, "--method", method]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli("finetune", "--steps", "7", "--out", full, *common) == 0
    assert run_cli("finetune", "--steps", "7", "--stop-after", "3", "--out", part, *common) == 130
    assert (part / "checkpoint.safetensors").is_file()
    # nothing final is written by an interrupted run
    assert not (part / "adapter.safetensors").exists() and not (part / "adapter_model.safetensors").exists()
    assert run_cli("finetune", "--steps", "7", "--resume", "--out", part, *common) == 0
    a, b = adapter(full), adapter(part)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _history(full)["loss"] == _history(part)["loss"]
    assert _history(full)["metric"] == _history(part)["metric"]


def test_resume_checks_settings_and_steps(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("finetune", "--steps", "4", "--stop-after", "2", "--out", out, *COMMON) == 130
    assert run_cli("finetune", "--steps", "4", "--resume", "--lr", "1e-4", "--out", out, *COMMON) == 2
    assert "lr: checkpoint 0.003 vs now 0.0001" in capsys.readouterr().err
    assert run_cli("finetune", "--steps", "4", "--resume", "--out", tmp_path / "none", *COMMON) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert run_cli("finetune", "--steps", "2", "--resume", "--out", out, *COMMON) == 2
    assert "already at step 2" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path):
    out = tmp_path / "sig"
    cmd = [
        sys.executable,
        "-m",
        "pyfastpeft",
        "finetune",
        "--steps",
        "100000",
        "--out",
        str(out),
        *COMMON,
        "--log-every",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # wait until training runs
        if line.startswith("[finetune] step"):
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stdout and "Traceback" not in stderr
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        step = json.loads(f.metadata()["json"])["step"]
    assert 1 <= step < 100000
    # resume to step+2 and compare with a run that was never interrupted, on one thread like the
    # interrupted process (bit-identity holds for the same thread count: BLAS splits work by threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli("finetune", "--steps", step + 2, "--resume", "--out", out, *COMMON) == 0
        assert run_cli("finetune", "--steps", step + 2, "--out", tmp_path / "ref", *COMMON) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = adapter(out), adapter(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Two CPU processes (DDP, or FSDP2 with --fsdp, over gloo) train the same adapter as one process on the
same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from .conftest import TINY, adapter, run_cli

# no dropout: its masks come from each process's generator and would differ from one process's masks
ARGS = ["finetune", "--method", "lora", "--dropout", "0", "--steps", "4", "--eval-every", "4", *TINY]


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    assert run_cli(*ARGS, "--out", tmp_path / "single") == 0  # also fills the pretraining cache
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "pyfastpeft",
        *ARGS,
        "--out",
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter saved to") == 1  # rank 0 alone writes
    single, ddp = adapter(tmp_path / "single"), adapter(tmp_path / "ddp")
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
        assert not torch.equal(single[name], torch.zeros_like(single[name])) or "lora_B" not in name

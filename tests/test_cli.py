"""The main job end to end in a subprocess, shortened by flags (same code path as the default run)."""

from __future__ import annotations

import os
import re

import pytest

from .conftest import python_m_pyfastpeft


@pytest.fixture()
def env(tmp_path):
    return {**os.environ, "PYFASTPEFT_CACHE": str(tmp_path / "cache")}


def test_default_finetune_end_to_end(tmp_path, env):
    # the built-in model's run (pretraining, LoRA on the 'shift' task), with fewer steps
    first = "finetune --model tiny --pretrain-steps 60 --steps 60 --seed 1".split()
    out = python_m_pyfastpeft(*first, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+", out.stdout)
    first, last = map(float, re.search(r"loss: ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert last < first
    before, after = map(float, re.search(r"exact match: ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert after > before
    assert re.search(r"[\d,]+ tokens/s", out.stdout) and "peak memory" in out.stdout
    run_dir = tmp_path / "pyfastpeft_out" / "lora"
    for name in (
        "adapter_model.safetensors",  # Hugging Face PEFT's layout
        "adapter_config.json",
        "curves.csv",
        "summary.json",
        "checkpoint.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert f"adapter saved to {os.path.join('pyfastpeft_out', 'lora')} (PEFT layout)" in out.stdout
    # the second run reads the pretrained base from the cache
    second = "finetune --model tiny --pretrain-steps 60 --steps 2 --seed 1 --out second".split()
    again = python_m_pyfastpeft(*second, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "pretrained base model read from" in again.stdout


def test_curve_picture_or_a_note(tmp_path, env):
    pytest.importorskip("matplotlib")
    short = "finetune --model tiny --pretrain-steps 5 --steps 2 --size small".split()
    out = python_m_pyfastpeft(*short, "--out", tmp_path / "o", env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_argument_is_a_clear_error():
    out = python_m_pyfastpeft("finetune", "--model", "tiny", "--task", "nope", timeout=120)
    assert out.returncode == 2
    assert "invalid choice: 'nope'" in out.stderr
    out = python_m_pyfastpeft("finetune", "--no-such-flag", timeout=120)
    assert out.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in out.stderr

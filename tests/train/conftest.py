"""Fixtures for the command-line training tests: a private pretraining cache and tiny run settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

# a tiny built-in run: every test that trains uses these so the pretraining cache is shared
TINY = [
    "--model",
    "tiny",
    "--size",
    "small",
    "--pretrain-steps",
    "20",
    "--length",
    "4",
    "--batch-size",
    "8",
    "--log-every",
    "1000",
]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Pretrained weights go to a per-session folder, never the user's cache (subprocesses inherit it)."""
    old = os.environ.get("PYFASTPEFT_CACHE")
    os.environ["PYFASTPEFT_CACHE"] = str(tmp_path_factory.mktemp("pyfastpeft-cache"))
    yield
    if old is None:
        os.environ.pop("PYFASTPEFT_CACHE", None)
    else:
        os.environ["PYFASTPEFT_CACHE"] = old


def run_cli(*argv: str) -> int:
    from pyfastpeft.cli import main

    return main([str(a) for a in argv])


def adapter(out: Path) -> dict:
    """The trained tensors a run wrote: the PEFT-layout file for lora, pyfastpeft's own for the others."""
    peft_file = Path(out) / "adapter_model.safetensors"
    return load_file(str(peft_file if peft_file.is_file() else Path(out) / "adapter.safetensors"))

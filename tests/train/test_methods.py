"""Every registered method through the command line for a few steps, on the built-in model."""

from __future__ import annotations

import json

import pytest
import torch

from pyfastpeft.train import METHODS

from .conftest import TINY, adapter, run_cli


def _trained(tmp_path, method: str, *extra: str) -> tuple[dict, dict]:
    out = tmp_path / method
    assert run_cli("finetune", "--method", method, "--steps", "4", "--out", out, *TINY, *extra) == 0
    return adapter(out), json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_only_its_tensors(tmp_path, method):
    tensors, summary = _trained(tmp_path, method)
    names = set(tensors)
    assert summary["completed"] and summary["step"] == 4
    assert summary["trainable_params"] == sum(t.numel() for t in tensors.values())
    if method == "lora":
        assert names and all(".lora_A" in n or ".lora_B" in n for n in names)
        # B starts at zero: after 4 AdamW steps it must have moved
        assert any(t.abs().sum() > 0 for n, t in tensors.items() if ".lora_B" in n)
    elif method == "bitfit":
        assert names and all(n.endswith(".bias") for n in names)
        assert len(names) == 2 * 7  # 7 target linears per block, 2 blocks, one bias each
    elif method == "full":
        assert summary["trainable_params"] == summary["total_params"]
    elif method == "freeze":
        assert names and all(n.startswith("model.layers.1.") for n in names)
    assert len(summary["history"]["loss"]) == 4
    assert all(torch.isfinite(torch.tensor(summary["history"]["loss"])))


def test_freeze_last_layers_knob(tmp_path):
    tensors, _ = _trained(tmp_path, "freeze", "--train-last-layers", "2")
    assert {n.split(".")[2] for n in tensors} == {"0", "1"}


def test_lora_knobs_reach_the_layers(tmp_path):
    tensors, _ = _trained(tmp_path, "lora", "--r", "3", "--target-modules", "q_proj,v_proj")
    # PEFT layout: base_model.model.<path>.<module>.lora_A.weight
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in tensors} == {"q_proj", "v_proj"}
    assert all(t.shape[0] == 3 for n, t in tensors.items() if n.endswith("lora_A.weight"))


def test_unknown_method_lists_the_known_ones(tmp_path, capsys):
    assert run_cli("finetune", "--method", "nope", "--out", tmp_path / "x", *TINY) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err
    for m in METHODS:
        assert m in err
    assert not (tmp_path / "x").exists()


def test_targets_that_match_nothing(tmp_path, capsys):
    assert run_cli("finetune", "--target-modules", "c_attn", "--steps", "2", "--out", tmp_path / "x", *TINY) == 2
    assert "matched no nn.Linear" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_freeze_knob_out_of_range(tmp_path, capsys):
    assert run_cli("finetune", "--method", "freeze", "--train-last-layers", "5", "--out", tmp_path / "x", *TINY) == 2
    assert "--train-last-layers: expected 1..2" in capsys.readouterr().err

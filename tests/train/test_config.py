"""--config files (TOML or JSON) whose keys are flag names; command-line flags win."""

from __future__ import annotations

import json

from .conftest import TINY, adapter, run_cli


def test_toml_config_sets_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "lora"\nr = 2\ntarget-modules = ["q_proj", "k_proj"]\nsteps = 2\n')
    out = tmp_path / "out"
    assert run_cli("finetune", "--config", cfg, "--out", out, *TINY) == 0
    tensors = adapter(out)
    # PEFT layout: base_model.model.<path>.<module>.lora_A.weight
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in tensors} == {"q_proj", "k_proj"}
    assert all(t.shape[0] == 2 for n, t in tensors.items() if n.endswith("lora_A.weight"))


def test_json_config_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"method": "bitfit", "steps": 5}))
    out = tmp_path / "out"
    assert run_cli("finetune", "--config", cfg, "--steps", "2", "--out", out, *TINY) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "bitfit" and summary["step"] == 2


def test_config_errors(tmp_path, capsys):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("rank = 4\n")
    assert run_cli("finetune", "--config", bad_key, *TINY) == 2
    assert "unknown key 'rank'" in capsys.readouterr().err
    bad_syntax = tmp_path / "b.json"
    bad_syntax.write_text('{\n  "r": \n}')
    assert run_cli("finetune", "--config", bad_syntax, *TINY) == 2
    assert "b.json:3: not valid JSON" in capsys.readouterr().err
    assert run_cli("finetune", "--config", tmp_path / "missing.toml") == 2
    assert "no such file" in capsys.readouterr().err
    bad_choice = tmp_path / "c.toml"
    bad_choice.write_text('dtype = "float8"\n')
    assert run_cli("finetune", "--config", bad_choice) == 2
    assert "is not one of" in capsys.readouterr().err

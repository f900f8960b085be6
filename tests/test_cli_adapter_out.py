"""`pyfastpeft finetune --method lora --out DIR` writes a PEFT-layout adapter that loads back onto the base."""

from __future__ import annotations

import json

import torch

import pyfastpeft as pf
from pyfastpeft.cli import main
from pyfastpeft.train.base import load_base
from pyfastpeft.train.config import FinetuneConfig


def test_finetune_out_saves_a_loadable_adapter(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "adapter"
    argv = ["finetune", "--model", "tiny", "--pretrain-steps", "0", "--steps", "3", "--batch-size", "4"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    assert "adapter saved to" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert (out / "adapter_model.safetensors").is_file()

    # the command's base model, rebuilt the way the command builds it
    from pyfastpeft.cli import build_parser, to_config

    config = to_config(FinetuneConfig, build_parser().parse_args(argv))
    base = load_base(config, log=lambda *a: None).model
    model = pf.PeftModel.from_pretrained(base, out)
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.abs().max() > 0  # trained, and loaded
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids).logits
    with torch.no_grad():
        assert (model(input_ids=ids).logits - plain).abs().max() > 0

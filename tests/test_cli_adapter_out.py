"""`pyfastpeft finetune --out DIR` writes a PEFT-layout adapter that loads back onto the base model."""

from __future__ import annotations

import json

import torch

import pyfastpeft as pf
from pyfastpeft.cli import main
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM


def test_finetune_out_saves_a_loadable_adapter(tmp_path, capsys):
    out = tmp_path / "adapter"
    assert (
        main(["finetune", "--pretrain-steps", "0", "--steps", "3", "--batch-size", "4", "--out", str(out)])
        == 0
    )
    assert "adapter saved to" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    torch.manual_seed(0)  # the command's base model: seed 0, no pretraining
    base = TinyLlamaForCausalLM(TinyLlamaConfig())
    model = pf.PeftModel.from_pretrained(base, out)
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.abs().max() > 0  # trained, and loaded
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), model.disable_adapter():
        plain = model(ids).logits
    with torch.no_grad():
        assert (model(ids).logits - plain).abs().max() > 0

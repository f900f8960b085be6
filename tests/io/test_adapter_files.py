"""save_pretrained / from_pretrained: PEFT layout, atomic writes, validation with exact messages,
pickle refusal, nothing written or changed on failure."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyfastpeft as pf
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.tuners import LoraLinear


def tiny(seed: int = 0) -> TinyLlamaForCausalLM:
    torch.manual_seed(seed)
    return TinyLlamaForCausalLM(
        TinyLlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
        )
    )


def ids():
    return torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))


def adapted(**kw) -> pf.PeftModel:
    kw.setdefault("target_modules", ["q_proj", "down_proj"])
    return pf.get_peft_model(tiny(), pf.LoraConfig(init_lora_weights=False, **kw))


def listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_layout_keys_shapes_and_config(tmp_path):
    m = adapted(r=4, use_dora=True, modules_to_save=["lm_head"])
    m.save_pretrained(tmp_path)
    assert listing(tmp_path) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{q}.lora_B.weight"].shape == (32, 4)
    assert tensors[f"{q}.lora_magnitude_vector"].shape == (32,)
    assert tensors["base_model.model.lm_head.weight"].shape == (32, 32)
    assert len(tensors) == 2 * 2 * 3 + 1
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["down_proj", "q_proj"]


def test_roundtrip_named_adapters_and_outputs(tmp_path):
    m = adapted()
    m.add_adapter("second", pf.LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False))
    m.save_pretrained(tmp_path)
    assert listing(tmp_path) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "second/adapter_config.json",
        "second/adapter_model.safetensors",
    ]
    x = ids()
    m.eval()
    with torch.no_grad():
        want_default = m(x).logits
        m.set_adapter("second")
        want_second = m(x).logits
    loaded = pf.PeftModel.from_pretrained(tiny(), tmp_path)
    loaded.load_adapter(tmp_path, "second")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want_default, rtol=0, atol=0)
        loaded.set_adapter("second")
        torch.testing.assert_close(loaded(x).logits, want_second, rtol=0, atol=0)
    trainable = pf.PeftModel.from_pretrained(tiny(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_mismatched_file_gives_exact_message_and_leaves_model_unchanged(tmp_path):
    adapted(r=4).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key] = torch.zeros(32, 5)
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    tensors["base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path)
    model = tiny()
    before = {n: type(mod) for n, mod in model.named_modules()}
    with pytest.raises(ValueError) as err:
        pf.PeftModel.from_pretrained(model, tmp_path)
    msg = str(err.value)
    assert "missing keys (1): base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "unexpected keys (1): base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight" in msg
    assert f"shape mismatches (1): {key}: file [32, 5] vs model [32, 4]" in msg
    assert {n: type(mod) for n, mod in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())


def test_config_for_missing_module_is_a_clear_error(tmp_path):
    adapted(target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["qkv_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        pf.PeftModel.from_pretrained(tiny(), tmp_path)
    config["r"] = 0
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="r: expected a positive int"):
        pf.PeftModel.from_pretrained(tiny(), tmp_path)


def test_pickle_files_are_refused(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="refusing to read a pickle file"):
        pf.PeftModel.from_pretrained(tiny(), tmp_path)
    with pytest.raises(ValueError, match="refusing to read a pickle file"):
        pf.PeftModel.from_pretrained(tiny(), tmp_path / "adapter_model.bin")


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    adapted().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        pf.PeftModel.from_pretrained(tiny(), tmp_path)


def test_failed_save_writes_nothing(tmp_path, monkeypatch):
    m = adapted()
    m.add_adapter("second", pf.LoraConfig(target_modules=["v_proj"]))
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="selected_adapters"):
        m.save_pretrained(target, selected_adapters=["default", "nope"])
    assert not target.exists()
    # a failure while the files are being written: no partial file, no temporary left, folders removed
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(target)
    monkeypatch.undo()
    assert len(calls) == 3 and not target.exists()  # two files had been renamed into place: rolled back
    # an existing save is replaced whole or not at all: a second save over it succeeds cleanly
    m.save_pretrained(target)
    assert listing(target) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "second/adapter_config.json",
        "second/adapter_model.safetensors",
    ]
    # a failed save over an existing one restores the previous files
    old = {f: (target / f).read_bytes() for f in listing(target)}
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(1.0)
    calls.clear()
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(target)
    monkeypatch.undo()
    assert {f: (target / f).read_bytes() for f in listing(target)} == old


def test_saving_a_merged_adapter_saves_its_factors(tmp_path):
    m = adapted()
    before = {k: v.clone() for k, v in pf.io.adapter_state_dict(m).items()}
    m.merge_adapter()
    after = pf.io.adapter_state_dict(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(mod, LoraLinear) and mod.merged for mod in m.modules())

"""Same weights, same outputs as Hugging Face PEFT, in both directions of save/load."""

from __future__ import annotations

import json

import pytest
import torch

import pyfastpeft as pf
from tests.tuners.hf_tiny_models import VOCAB, assert_same_as, outputs, twin_models

peft = pytest.importorskip("peft")

VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (use_dora, use_rslora)


def config_kwargs(kind: str, use_dora: bool, use_rslora: bool) -> dict:
    common = dict(
        r=4, lora_alpha=8, lora_dropout=0.1, use_dora=use_dora, use_rslora=use_rslora, init_lora_weights=False
    )
    if kind == "llama":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if not use_dora:
            targets.append("embed_tokens")
        return dict(common, target_modules=targets, rank_pattern={"v_proj": 6}, alpha_pattern={"o_proj": 3})
    if kind == "gpt2":
        return dict(common, target_modules=["c_attn", "c_proj", "c_fc"], bias="lora_only")
    return dict(common, target_modules=["query", "value", "dense"], modules_to_save=["classifier"])


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Make every trainable tensor non-trivial (magnitudes, biases, modules_to_save copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif "lora_" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("use_dora,use_rslora", VARIANTS)
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_ours_loads_in_peft(kind, use_dora, use_rslora, tmp_path):
    ours_base, theirs_base = twin_models(kind)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    ours = pf.get_peft_model(ours_base, pf.LoraConfig(**config_kwargs(kind, use_dora, use_rslora)))
    perturb(ours, 3)
    ours.eval()
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] is use_dora
    theirs = peft.PeftModel.from_pretrained(theirs_base, str(tmp_path)).eval()
    with torch.no_grad():
        assert_same_as(ours, theirs, ids)
        # the adapter must actually change the output, or the comparison proves nothing
        with ours.disable_adapter():
            base = outputs(ours, ids)
        assert (base - outputs(theirs, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("use_dora,use_rslora", VARIANTS)
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_peft_loads_here(kind, use_dora, use_rslora, tmp_path):
    ours_base, theirs_base = twin_models(kind)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(**config_kwargs(kind, use_dora, use_rslora)))
    perturb(theirs, 3)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    ours = pf.PeftModel.from_pretrained(ours_base, tmp_path)
    with torch.no_grad():
        assert_same_as(ours, theirs, ids)
        with theirs.disable_adapter():
            base = outputs(theirs, ids)
        assert (base - outputs(ours, ids)).abs().max() > 1e-3
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference by default


def test_named_adapter_subfolder_roundtrip_with_peft(tmp_path):
    ours_base, theirs_base = twin_models("llama")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    ours = pf.get_peft_model(ours_base, pf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ours.add_adapter("other", pf.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(theirs_base, str(tmp_path))
    theirs.load_adapter(str(tmp_path / "other"), adapter_name="other")
    theirs.set_adapter("other")
    ours.set_adapter("other")
    with torch.no_grad():
        assert_same_as(ours.eval(), theirs.eval(), ids)


def test_file_keys_match_peft_exactly(tmp_path):
    from safetensors.torch import load_file

    ours_base, theirs_base = twin_models("llama")
    kwargs = dict(r=4, target_modules=["q_proj", "o_proj"], use_dora=True)
    pf.get_peft_model(ours_base, pf.LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(theirs_base, peft.LoraConfig(**kwargs)).save_pretrained(str(tmp_path / "theirs"))
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("direction", ["ours_to_peft", "peft_to_ours"])
def test_bias_all_with_modules_to_save_both_directions(direction, tmp_path):
    ours_base, theirs_base = twin_models("bert")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(r=4, target_modules=["query"], bias="all", modules_to_save=["classifier"], init_lora_weights=False)
    if direction == "ours_to_peft":
        source = pf.get_peft_model(ours_base, pf.LoraConfig(**kw))
        perturb(source, 3)
        source.eval().save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(theirs_base, str(tmp_path)).eval()
    else:
        source = peft.get_peft_model(theirs_base, peft.LoraConfig(**kw))
        perturb(source, 3)
        source.eval().save_pretrained(str(tmp_path))
        loaded = pf.PeftModel.from_pretrained(ours_base, tmp_path)
    with torch.no_grad():
        assert_same_as(loaded, source, ids) if direction == "peft_to_ours" else assert_same_as(source, loaded, ids)
        with source.disable_adapter():
            base = outputs(source, ids)
        assert (base - outputs(loaded, ids)).abs().max() > 1e-3

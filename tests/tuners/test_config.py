"""LoraConfig validation: every bad field fails at construction with a message naming it."""

from __future__ import annotations

import pytest

import pyfastpeft as pf


def test_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours, theirs = pf.LoraConfig(), peft.LoraConfig()
    for name in (
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "bias",
        "init_lora_weights",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "modules_to_save",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(r=0), "r"),
        (dict(r=2.5), "r"),
        (dict(r=True), "r"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_alpha=float("nan")), "lora_alpha"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules=["q_proj", ""]), "target_modules"),
        (dict(target_modules="q_proj(("), "target_modules"),
        (dict(target_modules=["q"], layers_to_transform=[-1]), "layers_to_transform"),
        (dict(target_modules=".*q", layers_to_transform=[0]), "layers_to_transform"),
        (dict(target_modules=["q"], layers_pattern="layers"), "layers_pattern"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(rank_pattern={"q((": 4}), "rank_pattern"),
        (dict(alpha_pattern={"q": -1}), "alpha_pattern"),
        (dict(bias="some"), "bias"),
        (dict(modules_to_save="lm_head"), "modules_to_save"),
        (dict(init_lora_weights="olora"), "init_lora_weights"),
        (dict(init_lora_weights="pissa", use_dora=True), "init_lora_weights"),
        (dict(use_dora="yes"), "use_dora"),
        (dict(peft_type="IA3"), "peft_type"),
    ],
)
def test_invalid_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        pf.LoraConfig(**kwargs)


def test_normalises_sets_and_single_layer_index():
    cfg = pf.LoraConfig(target_modules={"v_proj", "q_proj"}, layers_to_transform=1)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.layers_to_transform == [1]


def test_from_dict_refuses_unsupported_peft_features():
    with pytest.raises(ValueError, match="loftq_config"):
        pf.LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "loftq_config": {"loftq_bits": 4}})
    cfg = pf.LoraConfig.from_dict(
        {
            "peft_type": "LORA",
            "target_modules": ["q"],
            "loftq_config": {},
            "megatron_core": "megatron.core",
            "r": 4,
        }
    )
    assert cfg.r == 4

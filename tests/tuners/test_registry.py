"""The one method registry and the one frame: every registered peft_type builds a PeftModel through
get_peft_model and round-trips through save_pretrained / from_pretrained / load_adapter with the same
outputs; every command-line method name belongs to a registered method."""

from __future__ import annotations

import pytest
import torch

import pyfastpeft as pf
from pyfastpeft.tuners import registry

from .tiny_task import VOCAB, tiny_llama

CONFIGS = {
    "LORA": lambda: pf.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    "IA3": lambda: pf.IA3Config(),
    "BOTTLENECK": lambda: pf.AdapterConfig(config="pfeiffer"),
    "PROMPT_TUNING": lambda: pf.PromptTuningConfig(num_virtual_tokens=3),
    "P_TUNING": lambda: pf.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "PREFIX_TUNING": lambda: pf.PrefixTuningConfig(num_virtual_tokens=3),
    "BITFIT": lambda: pf.BitFitConfig(target_modules=["q_proj"]),
    "LAYER_FREEZE": lambda: pf.LayerFreezeConfig(last_layers=1),
    "SPARSE": lambda: pf.tuners.SparseConfig(target_modules=["q_proj", "down_proj"], density=0.1),
}
# methods that train the base model's own tensors (or one delta per layer) hold one adapter per model
SINGLE_ADAPTER = {"BITFIT", "LAYER_FREEZE", "SPARSE"}


def built_in_types() -> list[str]:
    return [m.peft_type for m in registry.methods() if m.model_cls.__module__.startswith("pyfastpeft.")]


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def trained(peft_model: pf.PeftModel, seed: int = 1) -> pf.PeftModel:
    """Move every trainable tensor away from its initial value (an untrained adapter is often the
    identity, which would hide a tensor that fails to load)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return peft_model


def test_every_built_in_method_is_covered():
    assert sorted(built_in_types()) == sorted(CONFIGS)


@pytest.mark.parametrize("peft_type", sorted(CONFIGS))
def test_get_peft_model_returns_the_one_peft_model(peft_type):
    m = pf.get_peft_model(tiny_llama(), CONFIGS[peft_type]())
    assert type(m) is pf.PeftModel
    assert type(m.base_model) is registry.classes_for_type(peft_type)[1]
    assert m.peft_type == peft_type and list(m.peft_config) == ["default"]
    trainable, total = m.get_nb_trainable_parameters()
    assert 0 < trainable < total


@pytest.mark.parametrize("peft_type", sorted(CONFIGS))
def test_save_and_load_round_trip(tmp_path, peft_type):
    m = trained(pf.get_peft_model(tiny_llama(), CONFIGS[peft_type]())).eval()
    x = ids()
    with torch.no_grad():
        y = m(x).logits
        with m.disable_adapter():
            base = m(x).logits
    assert not torch.equal(y, base)  # the adapter changes the output, so loading it is tested
    m.save_pretrained(tmp_path)
    raw, _, _ = pf.io.read_adapter(tmp_path)
    assert raw["peft_type"] == peft_type

    loaded = pf.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert type(loaded) is pf.PeftModel and type(loaded.base_model) is type(m.base_model)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, y, rtol=0, atol=0)
        with loaded.disable_adapter():
            torch.testing.assert_close(loaded(x).logits, base, rtol=0, atol=0)
    again = pf.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    # a P-tuning file holds the table its encoder computed, not the encoder: the loaded adapter trains the table
    expected = 3 * 32 if peft_type == "P_TUNING" else m.get_nb_trainable_parameters()[0]
    assert again.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize("peft_type", sorted(set(CONFIGS) - SINGLE_ADAPTER))
def test_load_adapter_adds_a_named_adapter(tmp_path, peft_type):
    m = trained(pf.get_peft_model(tiny_llama(), CONFIGS[peft_type]())).eval()
    x = ids()
    with torch.no_grad():
        y = m(x).logits
    m.save_pretrained(tmp_path)
    other = pf.get_peft_model(tiny_llama(), CONFIGS[peft_type]()).eval()
    other.load_adapter(tmp_path, "loaded")
    assert other.active_adapter == "default" and list(other.peft_config) == ["default", "loaded"]
    other.set_adapter("loaded")
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, y, rtol=0, atol=0)
    other.delete_adapter("loaded")
    assert list(other.peft_config) == ["default"]


@pytest.mark.parametrize("peft_type", sorted(SINGLE_ADAPTER))
def test_single_adapter_methods_refuse_a_second_adapter(peft_type):
    m = pf.get_peft_model(tiny_llama(), CONFIGS[peft_type]())
    with pytest.raises(ValueError, match="adapter_name: this model already holds adapter 'default'"):
        m.add_adapter("second", CONFIGS[peft_type]())


def test_a_config_of_another_method_is_refused():
    m = pf.get_peft_model(tiny_llama(), CONFIGS["IA3"]())
    with pytest.raises(ValueError, match="config: this model holds IA3Config adapters, got LoraConfig"):
        m.add_adapter("lora", CONFIGS["LORA"]())


def test_command_line_names_come_from_the_registry():
    import pyfastpeft.train.methods as methods

    declared = {n: m.peft_type for m in registry.methods() for n in m.cli_names}
    assert set(methods.METHODS) == set(declared) | set(registry.WITHOUT_ADAPTER)
    assert registry.cli_peft_type("dora") == "LORA" and registry.cli_peft_type("sparse") == "SPARSE"
    assert registry.cli_peft_type("full") is None
    with pytest.raises(ValueError, match="--method: unknown method 'nope'; known methods: adapter, bitfit"):
        registry.cli_peft_type("nope")
    with pytest.raises(ValueError, match="--method: unknown method 'nope'"):
        methods.register("nope", "not declared by any method")(lambda model, args: model)
    with pytest.raises(ValueError, match=r"cli_names: \['lora'\] already name another method"):
        registry.register_peft_type("OTHER", object, object, ("lora",))

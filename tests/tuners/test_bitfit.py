"""BitFitConfig / BitFitModel: only biases train, through BiasOnlyLinear; files, report, unload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import pyfastpeft as pf
from pyfastpeft.nn import BiasOnlyLinear
from pyfastpeft.tuners import BitFitModel
from tests.conftest import assert_as_accurate_as, low_precision_error_bound

from .tiny_task import (
    assert_learned,
    batch,
    changed,
    eval_ids,
    held_out_losses,
    pretrained_tiny,
    snapshot,
    tiny_llama,
    train_steps,
)

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bitfit(model=None, **kw):
    return pf.get_peft_model(model if model is not None else tiny_llama(), pf.BitFitConfig(**kw))


# ---- config -----------------------------------------------------------------------------------------
def test_config_defaults_and_round_trip():
    cfg = pf.BitFitConfig()
    assert cfg.peft_type == "BITFIT" and cfg.target_modules == "all-linear" and cfg.train_layer_norm_bias
    d = json.loads(json.dumps(pf.BitFitConfig(target_modules=["q_proj"], modules_to_save=["score"]).to_dict()))
    again = pf.tuners.config_from_dict(d)
    assert isinstance(again, pf.BitFitConfig) and again.to_dict() == d


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "("}, "target_modules"),
        ({"target_modules": None}, "target_modules"),
        ({"exclude_modules": [""]}, "exclude_modules"),
        ({"train_layer_norm_bias": "yes"}, "train_layer_norm_bias"),
        ({"modules_to_save": "score"}, "modules_to_save"),
        ({"peft_type": "LORA"}, "peft_type"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        pf.BitFitConfig(**kwargs)


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown BitFit fields.*'r'"):
        pf.BitFitConfig.from_dict({"peft_type": "BITFIT", "r": 8})


# ---- injection --------------------------------------------------------------------------------------
def test_targets_become_bias_only_linear_and_start_as_the_identity():
    base = tiny_llama()
    x = eval_ids()
    expected = base(input_ids=x).logits
    expected64 = copy.deepcopy(base).double()(input_ids=x).logits
    m = bitfit(base)
    assert isinstance(m, pf.PeftModel) and isinstance(m.base_model, BitFitModel)
    inner = m.base_model.model
    for layer in inner.model.layers:
        for name in LINEARS:
            module = layer.get_submodule(
                {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}.get(name, "self_attn")
            )
            lin = getattr(module, name)
            assert isinstance(lin, BiasOnlyLinear) and torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert type(inner.lm_head) is nn.Linear  # all-linear leaves the output head alone
    # zero biases: the same function, computed by other kernels
    assert_as_accurate_as("logits", m(input_ids=x).logits, expected, expected64)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert len(trainable) == 7 * 3


def test_target_patterns_and_exclusions():
    m = bitfit(target_modules=["q_proj", "down_proj"], exclude_modules="model\\.layers\\.0\\..*")
    trained = set(m.named_trained_biases())
    assert trained == {f"model.layers.{i}.{s}.bias" for i in (1, 2) for s in ("self_attn.q_proj", "mlp.down_proj")}


def test_nothing_matched_and_wrong_kind():
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="target_modules.*matched no nn.Linear.*q_proj"):
        bitfit(base, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="target_modules: model.layers.0.input_layernorm .RMSNorm."):
        bitfit(base, target_modules=r"model\.layers\.0\.input_layernorm")
    assert not changed(base, before) and all(isinstance(m, nn.Linear) for m in [base.model.layers[0].mlp.up_proj])
    assert all(p.requires_grad for p in base.parameters())  # a failed get_peft_model leaves it as it was


def test_one_adapter_per_model():
    m = bitfit()
    with pytest.raises(ValueError, match="adapter_name: this model already holds adapter 'default'"):
        m.add_adapter("other", pf.BitFitConfig())


def test_layer_norm_biases_on_a_hf_model():
    transformers = pytest.importorskip("transformers")
    from .hf_tiny_models import tiny_bert

    torch.manual_seed(0)
    bert = tiny_bert()
    norms = {n + ".bias" for n, mod in bert.named_modules() if isinstance(mod, nn.LayerNorm)}
    m = bitfit(bert, modules_to_save=["classifier"])
    trained = set(m.named_trained_biases())
    assert norms <= trained
    assert "bert.encoder.layer.0.attention.self.query.bias" in trained
    assert isinstance(transformers.BertForSequenceClassification, type)
    only_linear = bitfit(tiny_bert(), train_layer_norm_bias=False)
    assert not norms & set(only_linear.named_trained_biases())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_devices(device, dtype):
    base = tiny_llama().to(device=device, dtype=dtype)
    x = eval_ids().to(device)
    expected = base(input_ids=x).logits
    expected64 = copy.deepcopy(base).double()(input_ids=x).logits
    m = bitfit(base)
    out = m(input_ids=x).logits
    assert out.dtype == dtype
    assert_as_accurate_as("logits", out, expected, expected64)  # zero biases: the same function
    m(input_ids=x, labels=x).loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in m.named_parameters() if n.endswith(".bias")}
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# ---- training, report, files ------------------------------------------------------------------------
def test_loss_falls_and_only_biases_change():
    m = bitfit(pretrained_tiny())
    before = snapshot(m)
    held_out = batch(seed=10_000, size=64)
    losses_before = held_out_losses(m, held_out)
    train_steps(m, [p for p in m.parameters() if p.requires_grad], steps=30, lr=3e-2)
    assert_learned(losses_before, held_out_losses(m, held_out))  # against its noise, not a judged 0.8
    moved = changed(m, before)
    assert moved and all(n.endswith(".bias") for n in moved)
    assert moved == {n for n, p in m.named_parameters() if p.requires_grad}


def test_report_counts_the_biases():
    m = bitfit()
    r = pf.report(m)
    n_bias = sum(p.numel() for n, p in m.named_parameters() if n.endswith(".bias"))
    assert r.trainable == n_bias and r.in_place_trainable == n_bias
    assert r.changed_entries == 0 and r.matrices == []
    assert "trained in place" in str(r)
    assert r.adapter_bytes_on_disk > n_bias * 4


def _trained(seed=0, **kw):
    m = bitfit(tiny_llama(), **kw)
    train_steps(m, [p for p in m.parameters() if p.requires_grad], steps=3, lr=1e-2, seed=seed)
    return m


def test_save_load_gives_identical_outputs(tmp_path):
    m = _trained()
    x = eval_ids()
    m.eval()
    expected = m(input_ids=x).logits
    m.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == {"base_model.model." + n for n in m.named_trained_biases()}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BITFIT"
    loaded = pf.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded, pf.PeftModel) and isinstance(loaded.base_model, BitFitModel)
    assert torch.equal(loaded(input_ids=x).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = pf.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if n.endswith(".bias"))


def test_load_validates_keys_and_shapes(tmp_path):
    _trained().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    save_file({**tensors, key: torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match=f"shape mismatches.*{key}"):
        pf.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    del tensors[key]
    save_file(tensors, str(path))
    base = tiny_llama()
    with pytest.raises(ValueError, match=f"missing keys.*{key}"):
        pf.PeftModel.from_pretrained(base, tmp_path)
    assert all(type(mod) is not BiasOnlyLinear for mod in base.modules())  # the failed load undid itself


def test_disable_adapter_and_delete_restore_the_base():
    base = tiny_llama()
    x = eval_ids()
    expected = base(input_ids=x).logits
    expected64 = copy.deepcopy(base).double()(input_ids=x).logits
    m = _trained()
    trained = m(input_ids=x).logits
    # the trained biases move the output past the bound that the disabled model must meet
    err, bound = low_precision_error_bound(trained, expected, expected64)
    assert err > bound
    with m.disable_adapter():
        assert_as_accurate_as("disabled", m(input_ids=x).logits, expected, expected64)
    assert torch.equal(m(input_ids=x).logits, trained)
    m.delete_adapter("default")
    plain = m.base_model.model
    assert (
        type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
        and plain.model.layers[0].self_attn.q_proj.bias is None
    )
    assert_as_accurate_as("deleted", plain(input_ids=x).logits, expected, expected64)


def test_unload_keeps_the_trained_biases_in_plain_linears():
    m = _trained()
    x = eval_ids()
    m.eval()
    expected = m(input_ids=x).logits
    biases = {n: p.detach().clone() for n, p in m.base_model.model.named_parameters() if n.endswith(".bias")}
    plain = m.merge_and_unload()
    assert not any(isinstance(mod, BiasOnlyLinear) for mod in plain.modules())
    assert all(torch.equal(dict(plain.named_parameters())[n], b) for n, b in biases.items())
    # nn.Linear with the trained biases: the same function as the BitFit layers, computed by other kernels
    expected64 = copy.deepcopy(plain).double()(input_ids=x).logits
    assert_as_accurate_as("unloaded", expected, plain(input_ids=x).logits, expected64)


def test_unload_also_keeps_the_trained_biases():
    # the biases are the base model's own tensors, trained in place: unload has nothing else to return
    m = _trained(seed=1)
    x = eval_ids()
    m.eval()
    expected = m(input_ids=x).logits
    biases = {n: p.detach().clone() for n, p in m.base_model.model.named_parameters() if n.endswith(".bias")}
    plain = m.unload()
    assert not any(isinstance(mod, BiasOnlyLinear) for mod in plain.modules())
    params = dict(plain.named_parameters())
    assert all(torch.equal(params[n], b) for n, b in biases.items())
    expected64 = copy.deepcopy(plain).double()(input_ids=x).logits
    assert_as_accurate_as("unloaded", expected, plain(input_ids=x).logits, expected64)

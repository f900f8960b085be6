"""LayerFreezeConfig / LayerFreezeModel: selective layer tuning, schedules, report, files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyfastpeft as pf
from pyfastpeft.tuners import LayerFreezeModel

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


def freeze(model=None, **kw) -> LayerFreezeModel:
    return pf.get_peft_model(model if model is not None else tiny_llama(), pf.LayerFreezeConfig(**kw))


def trainable(m) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, p in m.named_parameters() if p.requires_grad}


def block_params(i: int) -> set[str]:
    return {f"model.layers.{i}.{n}" for n, _ in tiny_llama().model.layers[i].named_parameters()}


# ---- config -----------------------------------------------------------------------------------------
def test_config_round_trip_with_a_schedule():
    cfg = pf.LayerFreezeConfig(last_layers=1, unfreeze_schedule={5: {"layer_range": [0, 2]}})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["unfreeze_schedule"] == {"5": {"layer_range": [0, 2]}}  # JSON keys are strings
    again = pf.tuners.config_from_dict(d)
    assert isinstance(again, pf.LayerFreezeConfig) and again.unfreeze_schedule == {5: {"layer_range": [0, 2]}}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "nothing to train"),
        ({"layers_to_transform": [-1]}, "^layers_to_transform"),
        ({"layers_to_transform": []}, "^layers_to_transform"),
        ({"layer_range": [2, 1]}, "^layer_range"),
        ({"layer_range": [0]}, "^layer_range"),
        ({"first_layers": 0}, "^first_layers"),
        ({"last_layers": True}, "^last_layers"),
        ({"trainable_regex": "("}, "^trainable_regex"),
        ({"trainable_parameters": "*.weight"}, "^trainable_parameters"),
        ({"last_layers": 1, "layers_pattern": ""}, "^layers_pattern"),
        ({"unfreeze_schedule": {"x": {"last_layers": 1}}}, "^unfreeze_schedule"),
        ({"unfreeze_schedule": {3: {"r": 1}}}, r"^unfreeze_schedule\[3\]"),
        ({"unfreeze_schedule": {3: {"first_layers": 0}}}, r"^unfreeze_schedule\[3\]\.first_layers"),
        ({"last_layers": 1, "inference_mode": 1}, "^inference_mode"),
        ({"last_layers": 1, "peft_type": "LORA"}, "^peft_type"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pf.LayerFreezeConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"last_layers": 4}, r"last_layers: expected 1\.\.3"),
        ({"layers_to_transform": [3]}, r"layers_to_transform: \[3\] out of range"),
        ({"layer_range": [1, 9]}, "layer_range"),
        ({"trainable_regex": r".*\.lora_A"}, "trainable_regex: .* matches no parameter"),
        ({"trainable_parameters": ["*.c_attn.weight"]}, "trainable_parameters: .* matches no parameter"),
        ({"layers_pattern": "model.norm", "last_layers": 1}, "layers_pattern: 'model.norm' is not an nn.ModuleList"),
        ({"unfreeze_schedule": {2: {"last_layers": 9}}}, r"unfreeze_schedule\[2\]\.last_layers"),
    ],
)
def test_selections_that_do_not_fit_the_model(kwargs, message):
    base = tiny_llama()
    with pytest.raises(ValueError, match=message):
        freeze(base, **kwargs)
    assert all(p.requires_grad for p in base.parameters())  # left as it was


# ---- selections -------------------------------------------------------------------------------------
def test_block_selectors():
    assert trainable(freeze(last_layers=1)) == block_params(2)
    assert trainable(freeze(first_layers=2)) == block_params(0) | block_params(1)
    assert trainable(freeze(layer_range=[1, None])) == block_params(1) | block_params(2)
    assert trainable(freeze(layers_to_transform=[0, 2])) == block_params(0) | block_params(2)
    assert trainable(freeze(first_layers=1, last_layers=1)) == block_params(0) | block_params(2)


def test_parameter_selectors_and_their_intersection_with_blocks():
    down = {f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)}
    assert trainable(freeze(trainable_parameters=["*.mlp.down_proj.weight"])) == down
    assert trainable(freeze(trainable_regex=r"lm_head\.weight|model\.norm\.weight")) == {
        "lm_head.weight",
        "model.norm.weight",
    }
    both = freeze(last_layers=2, trainable_parameters=["*.down_proj.weight"])
    assert trainable(both) == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}


# ---- training, report -------------------------------------------------------------------------------
def test_loss_falls_and_only_the_chosen_tensors_change():
    m = freeze(pretrained_tiny(), trainable_parameters=["model.layers.2.*", "lm_head.weight"])
    chosen = {"base_model.model." + n for n in block_params(2) | {"lm_head.weight"}}
    before = snapshot(m)
    held_out = batch(seed=10_000, size=64)
    losses_before = held_out_losses(m, held_out)
    train_steps(m, [p for p in m.parameters() if p.requires_grad], steps=30, lr=1e-2)
    assert_learned(losses_before, held_out_losses(m, held_out))  # against its noise, not a judged 0.8
    assert changed(m, before) == chosen  # every other parameter is bit-identical


def test_report_counts_trained_tensors_and_changed_entries():
    m = freeze(trainable_parameters=["*.mlp.down_proj.weight", "*.input_layernorm.weight"])
    r = pf.report(m)
    assert r.trainable == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert len(r.matrices) == 6 and r.changed_entries == 0
    w = m.base_model.model.model.layers[1].mlp.down_proj.weight
    w0 = w.detach().clone()
    with torch.no_grad():
        w[:3, :5] += 1.0
        w[7, 0] += 0.5
        m.base_model.model.model.layers[0].input_layernorm.weight[:4] *= 2.0
    r = pf.report(m)
    assert r.changed_entries == 3 * 5 + 1 + 4
    rows = {row.name: row for row in r.matrices}
    expected_rank = int(torch.linalg.matrix_rank((w.detach() - w0).double()))  # float32 rounding: not 2
    assert rows["model.layers.1.mlp.down_proj.weight"].delta_rank == expected_rank >= 2
    assert rows["model.layers.0.input_layernorm.weight"].delta_rank == 1
    assert rows["model.layers.2.mlp.down_proj.weight"].changed_entries == 0
    assert set(m.delta_weights("default")) == set(rows)


def test_report_after_a_cast(device):
    m = freeze(trainable_parameters=["*.mlp.up_proj.weight"])
    m.base_model.model.to(device=device, dtype=torch.bfloat16)  # as the command line does after injection
    assert pf.report(m).changed_entries == 0
    with torch.no_grad():
        m.base_model.model.model.layers[0].mlp.up_proj.weight[1, :3] = 7.0
    assert pf.report(m).changed_entries == 3


# ---- schedule ---------------------------------------------------------------------------------------
def test_unfreeze_schedule_widens_the_trained_set():
    m = freeze(last_layers=1, unfreeze_schedule={3: {"last_layers": 2}, 6: {"trainable_regex": r"lm_head\.weight"}})
    assert trainable(m) == block_params(2)
    opt_params = m.schedule_parameters()
    assert len(opt_params) == len(block_params(1) | block_params(2)) + 1
    before = snapshot(m)
    opt = torch.optim.AdamW(opt_params, lr=1e-2)
    x = eval_ids()
    newly = {}
    for step in range(8):
        newly[step] = m.step_schedule(step)
        opt.zero_grad(set_to_none=True)
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        if step == 2:
            assert changed(m, before) == {"base_model.model." + n for n in block_params(2)}
    assert set(newly[3]) == block_params(1) and newly[6] == ["lm_head.weight"]
    assert all(not newly[s] for s in (0, 1, 2, 4, 5, 7))
    assert trainable(m) == block_params(1) | block_params(2) | {"lm_head.weight"}
    assert changed(m, before) == {"base_model.model." + n for n in trainable(m)}
    assert m.step_schedule(0) == [] and trainable(m) == block_params(2)  # back to the start
    with pytest.raises(ValueError, match="step"):
        m.step_schedule(-1)


# ---- files, disable, one adapter --------------------------------------------------------------------
def _trained(**kw):
    m = freeze(tiny_llama(), **kw)
    train_steps(m, m.schedule_parameters(), steps=3, lr=1e-2)
    return m


def test_save_load_gives_identical_outputs(tmp_path):
    m = _trained(trainable_parameters=["model.layers.2.*", "lm_head.weight"])
    m.eval()
    x = eval_ids()
    expected = m(input_ids=x).logits
    m.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == {"base_model.model." + n for n in block_params(2) | {"lm_head.weight"}}
    loaded = pf.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded, pf.PeftModel) and isinstance(loaded.base_model, LayerFreezeModel)
    assert torch.equal(loaded(input_ids=x).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    # the loaded model reports what the file changed against the base it was loaded into
    assert pf.report(loaded).changed_entries == pf.report(m).changed_entries > 0


def test_load_validates(tmp_path):
    _trained(last_layers=1).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.2.mlp.up_proj.weight"
    save_file({**tensors, key: torch.zeros(2, 2)}, str(path))
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="shape mismatches.*up_proj"):
        pf.PeftModel.from_pretrained(base, tmp_path)
    assert not changed(base, before)
    extra = {**tensors, "base_model.model.model.layers.0.mlp.up_proj.weight": tensors[key].clone()}
    save_file(extra, str(path))
    with pytest.raises(ValueError, match="unexpected keys.*layers.0.mlp.up_proj"):
        pf.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_disable_adapter_delete_and_unload():
    base = tiny_llama()
    x = eval_ids()
    expected = base(input_ids=x).logits
    m = _trained(layer_range=[1, None])
    trained = m(input_ids=x).logits
    with m.disable_adapter():
        assert torch.equal(m(input_ids=x).logits, expected)
    assert torch.equal(m(input_ids=x).logits, trained)
    with pytest.raises(ValueError, match="already holds adapter"):
        m.add_adapter("second", pf.LayerFreezeConfig(last_layers=1))
    plain = _trained(layer_range=[1, None]).unload()
    assert torch.equal(plain(input_ids=x).logits, trained)
    m.delete_adapter("default")
    assert torch.equal(m.base_model.model(input_ids=x).logits, expected)


def test_on_a_hugging_face_model(tmp_path):
    pytest.importorskip("transformers")
    from .hf_tiny_models import outputs, twin_models

    model, twin = twin_models("llama")
    x = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    m = freeze(model, last_layers=1, trainable_parameters=["*.mlp.*_proj.weight"])
    assert trainable(m) == {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    train_steps(m, m.schedule_parameters(), steps=2, lr=1e-2, loss_fn=lambda mm, b: mm(input_ids=x, labels=x).loss)
    assert not torch.equal(outputs(m, x), outputs(twin, x))
    m.save_pretrained(tmp_path)
    loaded = pf.PeftModel.from_pretrained(twin, tmp_path)
    assert torch.equal(outputs(loaded, x), outputs(m, x))


def _cli(method: str, *flags: str):
    import argparse

    from pyfastpeft.cli import to_config
    from pyfastpeft.cli.flags import add_method_arguments
    from pyfastpeft.train.config import FinetuneConfig
    from pyfastpeft.train.methods import apply_method

    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    return apply_method(method, tiny_llama(), to_config(FinetuneConfig, parser.parse_args(list(flags))))


def test_command_line_knobs():
    assert trainable(_cli("freeze")) == block_params(2)  # --train-last-layers 1, the default
    assert trainable(_cli("freeze", "--freeze-first", "1")) == block_params(1) | block_params(2)
    down = {f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)}
    assert trainable(_cli("freeze", "--train-regex", r".*down_proj\.weight")) == down
    both = _cli("freeze", "--freeze-first", "2", "--train-regex", r".*down_proj\.weight")
    assert trainable(both) == {"model.layers.2.mlp.down_proj.weight"}
    with pytest.raises(ValueError, match=r"--freeze-first: expected 0\.\.2"):
        _cli("freeze", "--freeze-first", "3")
    with pytest.raises(ValueError, match="--train-regex: trainable_regex: 'nothing' matches no parameter"):
        _cli("freeze", "--train-regex", "nothing")
    bitfit = _cli("bitfit", "--target-modules", "q_proj,v_proj")
    assert isinstance(bitfit.base_model, pf.tuners.BitFitModel) and len(bitfit.named_trained_biases()) == 2 * 3
    with pytest.raises(ValueError, match="--target-modules: target_modules .* matched no nn.Linear"):
        _cli("bitfit", "--target-modules", "c_attn")

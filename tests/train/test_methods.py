"""Every registered method through the command line for a few steps, on the built-in model."""

from __future__ import annotations

import json

import pytest
import torch

from pyfastpeft.train import METHODS
from pyfastpeft.train.methods import apply_method
from pyfastpeft.train.saved_adapter import load_base_model, read_saved_adapter, rebuild, run_arguments

from .conftest import TINY, adapter, run_cli


def _trained(tmp_path, method: str, *extra: str) -> tuple[dict, dict]:
    out = tmp_path / method
    assert run_cli("finetune", "--method", method, "--steps", "4", "--out", out, *TINY, *extra) == 0
    return adapter(out), json.loads((out / "summary.json").read_text())


def assert_changed_exactly_the_trainable_tensors(out) -> None:
    """The model the run started from (the base, the seed, the method applied: what training does) against
    the model the saved run rebuilds: every tensor that trains has moved, every other one is bit for bit
    the same (a frozen tensor that moves, or a trained one not saved, fails here)."""
    saved = read_saved_adapter(out)
    config = run_arguments(saved.run)
    start_base, _ = load_base_model(None, saved, lambda *a: None)
    torch.manual_seed(config.seed)
    start = apply_method(config.method, start_base, config)
    # by storage: the state dict names a tied tensor under each of its names
    trainable = {p.data_ptr() for p in start.parameters() if p.requires_grad}
    state = start.state_dict()
    trainable_keys = {k for k, v in state.items() if v.data_ptr() in trainable}
    initial = {k: v.detach().clone() for k, v in state.items()}
    trained = rebuild(load_base_model(None, saved, lambda *a: None)[0], saved).state_dict()
    assert trainable_keys and set(trained) == set(initial)
    # parameters only: buffers a method fills while setting up (a sparse method's chosen indices) are not weights
    params = {p.data_ptr() for p in start.parameters()}
    moved = {k for k, v in state.items() if v.data_ptr() in params and not torch.equal(initial[k], trained[k])}
    assert trainable_keys <= moved, f"trainable tensors that never moved: {sorted(trainable_keys - moved)[:5]}"
    assert moved <= trainable_keys, f"frozen tensors that moved: {sorted(moved - trainable_keys)[:5]}"


# knobs that keep a method's set-up as short as its 4 training steps
SHORT_SETUP = {"distill": ["--distill-teacher-steps", "4"]}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_only_its_tensors(tmp_path, method):
    tensors, summary = _trained(tmp_path, method, *SHORT_SETUP.get(method, []))
    names = set(tensors)
    assert summary["completed"] and summary["step"] == 4
    # sparse also saves the indices of its entries; P-tuning saves the table its encoder computes (PEFT's layout)
    if method not in ("sparse", "ptuning"):
        assert summary["trainable_params"] == sum(t.numel() for t in tensors.values())
    if method in ("prompt", "ptuning", "prefix"):
        assert names == {"prompt_embeddings"}
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
        assert names and all(n.startswith("base_model.model.model.layers.1.") for n in names)
    elif method == "dora":
        assert {n.rsplit(".", 2)[-2] if n.endswith(".weight") else n.rsplit(".", 1)[-1] for n in names} == {
            "lora_A",
            "lora_B",
            "lora_magnitude_vector",
        }
    elif method in ("qat-lora", "distill"):
        assert names and all(".lora_A" in n or ".lora_B" in n for n in names)
        assert any(t.abs().sum() > 0 for n, t in tensors.items() if ".lora_B" in n)
    elif method == "sparse":
        deltas = {n for n in names if n.endswith(".delta")}
        assert len(deltas) == 2 * 7 and names == deltas | {n[: -len("delta")] + "indices" for n in deltas}
        config = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert config["peft_type"] == "SPARSE" and config["density"] == 0.02
        assert summary["trainable_params"] == sum(tensors[n].numel() for n in deltas)
        assert any(tensors[n].abs().sum() > 0 for n in deltas)
    assert len(summary["history"]["loss"]) == 4
    assert all(torch.isfinite(torch.tensor(summary["history"]["loss"])))
    if method != "ptuning":  # P-tuning saves the table its encoder computes (PEFT's layout), not the encoder
        assert_changed_exactly_the_trainable_tensors(tmp_path / method)


def test_freeze_last_layers_knob(tmp_path):
    tensors, _ = _trained(tmp_path, "freeze", "--train-last-layers", "2")
    assert {n.removeprefix("base_model.model.").split(".")[2] for n in tensors} == {"0", "1"}


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


def test_sparse_density_and_selection_knobs(tmp_path):
    dense = _trained(tmp_path, "sparse", "--sparse-density", "0.1", "--sparse-selection", "magnitude")[0]
    # magnitude: the chosen entries are the largest |W| of each matrix
    from pyfastpeft.cli import build_parser, to_config
    from pyfastpeft.train.base import builtin_model
    from pyfastpeft.train.config import FinetuneConfig

    config = to_config(FinetuneConfig, build_parser().parse_args(["finetune", *TINY]))
    base = builtin_model(config, lambda *a: None).state_dict()
    for name, idx in dense.items():
        if name.endswith(".indices"):
            w = base[name.removeprefix("base_model.model.")[: -len("indices")] + "weight"].flatten().abs()
            assert idx.numel() == round(0.1 * w.numel())
            assert w[idx].min() >= w.topk(idx.numel()).values.min()
    assert run_cli("finetune", "--method", "sparse", "--sparse-density", "0", "--out", tmp_path / "x", *TINY) == 2


def test_qat_and_distill_knobs_are_checked(tmp_path, capsys):
    assert run_cli("finetune", "--method", "qat-lora", "--qat-group-size", "5", "--out", tmp_path / "x", *TINY) == 2
    assert "qat-lora" in capsys.readouterr().err
    # a flag out of its range is refused while the command line is parsed (argparse exits with status 2)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("finetune", "--method", "distill", "--distill-alpha", "2", "--out", tmp_path / "x", *TINY)
    assert exit_info.value.code == 2
    assert "--distill-alpha: expected a number in [0.0, 1.0], got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

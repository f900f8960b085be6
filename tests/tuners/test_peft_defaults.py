"""PEFT's default tables, task heads and modules_to_save rules, beyond the architecture matrix."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import pyfastpeft as pf
from pyfastpeft.tuners import peft_defaults
from tests.tuners.hf_tiny_models import assert_same_as, llama_config
from tests.tuners.tiny_archs import VOCAB, twins

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
constants = pytest.importorskip("peft.utils.constants")


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (peft_defaults.LORA_TARGET_MODULES, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
        (peft_defaults.IA3_TARGET_MODULES, "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING"),
        (peft_defaults.IA3_FEEDFORWARD_MODULES, "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING"),
    ],
)
def test_tables_equal_peft(ours, theirs):
    assert ours == getattr(constants, theirs)


def test_qwen2_ia3_targets_q_proj_like_peft():
    _, model = twins("qwen2")
    m = pf.get_peft_model(model, pf.IA3Config())
    assert sorted(m.peft_config["default"].target_modules) == ["down_proj", "q_proj", "v_proj"]
    assert any(p.endswith("q_proj") for p, _ in m._layers()) and not any(p.endswith("k_proj") for p, _ in m._layers())


def _bert(head: str):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, num_labels=3
    )
    return getattr(transformers, head)(cfg).eval()


def _llama_cls():
    cfg = llama_config(vocab_size=VOCAB, num_hidden_layers=1, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


HEADS = {
    "SEQ_CLS-llama": ("SEQ_CLS", _llama_cls, "score"),
    "SEQ_CLS-bert": ("SEQ_CLS", lambda: _bert("BertForSequenceClassification"), "classifier"),
    "TOKEN_CLS-bert": ("TOKEN_CLS", lambda: _bert("BertForTokenClassification"), "classifier"),
    "QUESTION_ANS-bert": ("QUESTION_ANS", lambda: _bert("BertForQuestionAnswering"), "qa_outputs"),
}


@pytest.mark.parametrize("case", sorted(HEADS))
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_task_type_trains_and_saves_the_head_like_peft(case, method, tmp_path):
    task, build, head = HEADS[case]
    torch.manual_seed(0)
    base = build()
    cls = "LoraConfig" if method == "lora" else "IA3Config"
    ours = pf.get_peft_model(copy.deepcopy(base), getattr(pf, cls)(task_type=task))
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(task_type=task))
    assert head in ours.peft_config["default"].modules_to_save
    assert ours.base_model.model.get_submodule(head).modules_to_save["default"].weight.requires_grad
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    layout = {k: tuple(v.shape) for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    expected = {k: tuple(v.shape) for k, v in load_file(tmp_path / "theirs" / "adapter_model.safetensors").items()}
    assert layout == expected


def test_unmatched_modules_to_save_in_code_is_an_error():
    _, model = twins("bert")
    with pytest.raises(ValueError, match=r"modules_to_save: \['clasifier'\] matched no module"):
        pf.get_peft_model(model, pf.LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]))


def test_task_head_names_missing_from_the_model_are_not_an_error():
    _, model = twins("bert")  # has "classifier", not "score"
    m = pf.get_peft_model(model, pf.LoraConfig(task_type="SEQ_CLS", modules_to_save=["classifier", "score"]))
    assert "classifier" in dict(m.base_model.model.named_children())


def test_unmatched_modules_to_save_from_a_file_warns_and_loads(tmp_path):
    theirs_base, ours_base = twins("bert")
    theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(task_type="SEQ_CLS", init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    d["modules_to_save"] = d["modules_to_save"] + ["pooler_head_that_is_gone"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="pooler_head_that_is_gone"):
        ours = pf.PeftModel.from_pretrained(ours_base, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    assert_same_as(ours.eval(), theirs.eval(), ids)


def test_modules_to_save_matches_by_plain_suffix_like_peft():
    _, model = twins("distilbert")
    m = pf.get_peft_model(model, pf.LoraConfig(target_modules=["q_lin"], modules_to_save=["classifier"]))
    wrapped = {p for p, w in m.base_model.model.named_modules() if isinstance(w, pf.tuners.ModulesToSaveWrapper)}
    assert wrapped == {"pre_classifier", "classifier"}


def test_targets_named_in_modules_to_save_are_not_adapted():
    _, model = twins("bert")
    m = pf.get_peft_model(model, pf.LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    assert not isinstance(m.base_model.model.classifier.original_module, pf.tuners.LoraLayer)

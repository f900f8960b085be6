"""--model with a local Hugging Face folder: a tiny random Llama saved into tmp_path (no downloads)."""

from __future__ import annotations

import json

import pytest

from tests.tuners.hf_tiny_models import llama_config

from .conftest import adapter, run_cli

transformers = pytest.importorskip("transformers")

SHORT = ["--steps", "2", "--batch-size", "4", "--length", "4", "--log-every", "1000"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    cfg = llama_config(vocab_size=300, intermediate_size=64, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["lora", "bitfit", "freeze"])
def test_hf_llama_on_the_builtin_task(tmp_path, llama_dir, method):
    out = tmp_path / method
    assert run_cli("finetune", "--model", llama_dir, "--method", method, "--out", out, *SHORT) == 0
    tensors = adapter(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and tensors
    if method == "lora":
        assert all(".lora_" in n for n in tensors)
        assert any(n.startswith("base_model.model.model.layers.0.self_attn.q_proj.") for n in tensors)


def test_hf_llama_on_a_text_file_without_tokenizer(tmp_path, llama_dir):
    data = tmp_path / "d.txt"
    data.write_text("hello world\nsecond line\n")
    assert run_cli("finetune", "--model", llama_dir, "--data", data, "--out", tmp_path / "o", *SHORT) == 0


def test_model_without_the_targeted_modules(tmp_path, capsys):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "o"
    assert run_cli("finetune", "--model", tmp_path / "gpt2", "--out", out, *SHORT) == 2
    err = capsys.readouterr().err
    assert "matched no nn.Linear, Conv1D or nn.Embedding in GPT2LMHeadModel" in err
    assert not out.exists()


def test_model_folder_errors(tmp_path, capsys):
    assert run_cli("finetune", "--model", tmp_path / "missing", *SHORT) == 2
    assert "no such folder" in capsys.readouterr().err
    assert run_cli("finetune", "--model", tmp_path, *SHORT) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err

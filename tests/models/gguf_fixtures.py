"""Test fixtures for the GGUF reader and writer: a tiny llama GGUF file written with ``gguf.GGUFWriter``,
and block-format test doubles built on the gguf package's numpy (de)quantizer (the reference the
project's kernels are held to; these doubles are not shipped code)."""

from __future__ import annotations

from pathlib import Path

import gguf  # the GGUF tests need it (`bash scripts/run.sh test` installs it): fail, never skip
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=96, context=128)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def tiny_tokens() -> list[str]:
    # byte-level BPE: printable ASCII maps to itself; one merge so the vocabulary has a merged token
    return SPECIALS + [chr(c) for c in range(33, 125)] + ["th"]


def dequantize(blocks: torch.Tensor, qtype: int, rows: int, cols: int) -> torch.Tensor:
    """float32 [rows, cols] of ``blocks`` (uint8 [rows, nbytes]) by the gguf package's numpy code."""
    values = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(rows, cols)


def quantize(weight: torch.Tensor, qtype: int) -> torch.Tensor:
    """uint8 [rows, nbytes] blocks of ``weight`` by the gguf package's numpy code."""
    values = weight.detach().to(torch.float32).contiguous().numpy()
    return torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType(qtype)))


class BlockLinear(nn.Module):
    """Stands in for the block-format linear: holds the blocks, de-quantizes them on each call."""

    def __init__(self, blocks, qtype, in_features, out_features, bias=None):
        super().__init__()
        self.register_buffer("blocks", blocks)
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.out_features, self.in_features)

    def forward(self, x):
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


class BlockEmbedding(nn.Module):
    def __init__(self, blocks, qtype, num_embeddings, embedding_dim):
        super().__init__()
        self.register_buffer("blocks", blocks)
        self.qtype, self.num_embeddings, self.embedding_dim = qtype, num_embeddings, embedding_dim

    def forward(self, ids):
        return F.embedding(ids, dequantize(self.blocks, self.qtype, self.num_embeddings, self.embedding_dim))


def hf_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K permutation of Hugging Face rows, written as the converter does it."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def random_hf_state(seed: int = 0, *, tied: bool = True, **overrides) -> dict[str, np.ndarray]:
    """Random float32 weights of the tiny llama under Hugging Face names (in Hugging Face row order)."""
    c = {**TINY, **overrides}
    rng = np.random.default_rng(seed)
    head_dim = c["hidden"] // c["heads"]

    def w(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)

    state = {"model.embed_tokens.weight": w(c["vocab"], c["hidden"]), "model.norm.weight": 1 + w(1, c["hidden"])[0]}
    if not tied:
        state["lm_head.weight"] = w(c["vocab"], c["hidden"])
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = w(c["heads"] * head_dim, c["hidden"])
        state[p + "self_attn.k_proj.weight"] = w(c["kv_heads"] * head_dim, c["hidden"])
        state[p + "self_attn.v_proj.weight"] = w(c["kv_heads"] * head_dim, c["hidden"])
        state[p + "self_attn.o_proj.weight"] = w(c["hidden"], c["heads"] * head_dim)
        state[p + "mlp.gate_proj.weight"] = w(c["ffn"], c["hidden"])
        state[p + "mlp.up_proj.weight"] = w(c["ffn"], c["hidden"])
        state[p + "mlp.down_proj.weight"] = w(c["hidden"], c["ffn"])
        state[p + "input_layernorm.weight"] = 1 + w(1, c["hidden"])[0]
        state[p + "post_attention_layernorm.weight"] = 1 + w(1, c["hidden"])[0]
    return state


def write_tiny_gguf(
    path: Path,
    state: dict[str, np.ndarray],
    *,
    qtypes: dict[str, int] | None = None,
    default_qtype: int = 3,
    arch: str = "llama",
    **overrides,
) -> dict[str, np.ndarray]:
    """Writes ``state`` (Hugging Face names and order) as a llama GGUF file the way llama.cpp's converter
    lays it out: GGUF names, Q/K rows permuted, 2-D weights in ``qtypes.get(name, default_qtype)``, 1-D in
    F32, with a tokenizer and chat template. Returns the GGUF tensors written, by GGUF name."""
    from pyfastpeft.models.gguf_file import gguf_tensor_name

    c = {**TINY, **overrides}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c["context"])
    w.add_embedding_length(c["hidden"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(c["vocab"])
    w.add_rope_dimension_count(c["hidden"] // c["heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = tiny_tokens()
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(["t h"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    written = {}
    for name, value in state.items():
        gname = gguf_tensor_name(name)
        if ".attn_q." in gname:
            value = hf_permute(value, c["heads"])
        elif ".attn_k." in gname:
            value = hf_permute(value, c["kv_heads"])
        qtype = (qtypes or {}).get(name, default_qtype) if value.ndim == 2 else 0
        if qtype == 0:
            data = value.astype(np.float32)
        elif qtype == 1:
            data = value.astype(np.float16)
        else:
            data = gguf.quants.quantize(value, gguf.GGMLQuantizationType(qtype))
        w.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType(qtype) if qtype > 1 else None)
        written[gname] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def dequantized_hf_state(state: dict[str, np.ndarray], qtypes: dict[str, int] | None, default_qtype: int = 3):
    """What the tiny file holds, de-quantized: each 2-D weight through its format's round trip."""
    out = {}
    for name, value in state.items():
        qtype = (qtypes or {}).get(name, default_qtype) if value.ndim == 2 else 0
        if qtype == 0:
            out[name] = torch.from_numpy(value.copy())
        elif qtype == 1:
            out[name] = torch.from_numpy(value.astype(np.float16).astype(np.float32))
        else:
            t = gguf.GGMLQuantizationType(qtype)
            out[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(value, t), t).copy())
    return out

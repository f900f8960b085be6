"""A float llama state dict written as a GGUF file llama.cpp, ollama and transformers read.

The file is laid out as llama.cpp's converter lays it out: llama-architecture metadata from the config,
GGUF tensor names, the rows of ``attn_q``/``attn_k`` permuted per head the way llama.cpp's rotary code
expects, 1-D tensors (the norms) in F32 and every 2-D weight in the chosen format. The tokenizer and
chat template (every ``tokenizer.*`` key) are copied from the source GGUF file.

Format choice: every 2-D weight, the token embedding included, gets the chosen format (llama.cpp's
quantizer would keep a tied embedding at a higher precision; ``embedding_quant`` does that when asked);
a weight whose input dimension is not a multiple of the 32-value block falls back to F16. The block
bytes come from the caller's ``quantize(weight [rows, cols] float32, qtype) -> uint8 [rows, nbytes]``,
so the project's own kernels do the quantization.

The file is written to a temporary file beside ``out_path`` and renamed: never half-written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .gguf_file import F16, F32, Q4_0, Q4_1, Q8_0, _require_gguf, gguf_tensor_name, open_gguf, rotary_row_order

QUANTS = {"f16": F16, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}
FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}  # gguf.LlamaFileType: the file's main format
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}  # per 32 weights
BLOCK = 32
QUANTIZATION_VERSION = 2  # ggml's block layout version, as llama.cpp writes it

Quantize = Callable[[torch.Tensor, int], torch.Tensor]


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"config: rope type {rope_type!r} is not written to GGUF yet; only the default rope is")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("config: no rope_theta")
    return float(theta)


def llama_metadata(config) -> dict[str, tuple[object, str]]:
    """The ``llama.*`` keys llama.cpp's converter writes, from a transformers llama config:
    key -> (value, gguf value type name)."""
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"config: expected a llama model, got model_type {getattr(config, 'model_type', None)!r}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    keys = {
        "llama.context_length": (config.max_position_embeddings, "UINT32"),
        "llama.embedding_length": (config.hidden_size, "UINT32"),
        "llama.block_count": (config.num_hidden_layers, "UINT32"),
        "llama.feed_forward_length": (config.intermediate_size, "UINT32"),
        "llama.attention.head_count": (heads, "UINT32"),
        "llama.attention.head_count_kv": (getattr(config, "num_key_value_heads", None) or heads, "UINT32"),
        "llama.rope.freq_base": (_rope_theta(config), "FLOAT32"),
        "llama.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), "FLOAT32"),
        "llama.vocab_size": (config.vocab_size, "UINT32"),
        "llama.rope.dimension_count": (head_dim, "UINT32"),
    }
    if head_dim * heads != config.hidden_size:  # llama.cpp derives it from the embedding size otherwise
        keys["llama.attention.key_length"] = (head_dim, "UINT32")
        keys["llama.attention.value_length"] = (head_dim, "UINT32")
    return keys


def expected_tensor_names(config) -> list[str]:
    """The Hugging Face names a llama GGUF file of ``config`` holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not getattr(config, "tie_word_embeddings", False):
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ):
            names.append(f"model.layers.{i}.{part}.weight")
    return names


def _tensor_qtype(name: str, cols: int, quant: str, embedding_quant: str | None) -> int:
    chosen = embedding_quant if (embedding_quant and name in ("model.embed_tokens.weight", "lm_head.weight")) else quant
    qtype = QUANTS[chosen]
    return F16 if qtype != F16 and cols % BLOCK else qtype


def _encode(name: str, weight: torch.Tensor, qtype: int, quantize: Quantize) -> np.ndarray:
    if qtype == F32:
        return weight.numpy().astype(np.float32)
    if qtype == F16:
        return weight.numpy().astype(np.float16)
    rows, cols = weight.shape
    blocks = quantize(weight, qtype)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        raise TypeError(
            f"quantize: expected a uint8 tensor for {name}, got {type(blocks).__name__} {getattr(blocks, 'dtype', '')}"
        )
    if tuple(blocks.shape) != (rows, cols // BLOCK * BLOCK_BYTES[qtype]):
        raise ValueError(
            f"quantize: {name} [{rows}, {cols}] gave blocks of shape {list(blocks.shape)}, "
            f"expected [{rows}, {cols // BLOCK * BLOCK_BYTES[qtype]}]"
        )
    return blocks.detach().cpu().contiguous().numpy()


def _copy_tokenizer(writer, source: Path) -> int:
    """Every ``tokenizer.*`` key of the GGUF file ``source`` into ``writer``; returns how many."""
    gguf = _require_gguf()
    reader = open_gguf(source)
    copied = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = None
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise ValueError(f"source_gguf: {name} is a nested array, which is not copied")
            sub_type = field.types[1]
        value = field.contents()
        if sub_type is not None and len(value) == 0:
            continue  # the format cannot hold an empty array; an absent key means the same
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
        copied += 1
    return copied


def write_gguf(
    out_path: str | Path,
    model_state: dict[str, torch.Tensor],
    config,
    *,
    quant: str,
    quantize: Quantize,
    source_gguf: str | Path | None = None,
    embedding_quant: str | None = None,
    name: str | None = None,
) -> Path:
    """Writes the float llama weights ``model_state`` (Hugging Face names and row order) as the GGUF file
    ``out_path`` in format ``quant`` (``f16``, ``q8_0``, ``q4_0`` or ``q4_1``), the tokenizer keys copied
    from ``source_gguf``. ``embedding_quant``: another format for the token embedding and output head.
    Returns ``out_path``."""
    gguf = _require_gguf()
    out_path = Path(out_path)
    for arg, value in (("quant", quant), ("embedding_quant", embedding_quant or quant)):
        if value not in QUANTS:
            raise ValueError(f"{arg}: expected one of {', '.join(QUANTS)}, got {value!r}")
    if out_path.is_dir():
        raise ValueError(f"out_path: {out_path} is a folder; expected a .gguf file path")
    metadata = llama_metadata(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = expected_tensor_names(config)
    missing = [n for n in expected if n not in model_state]
    extra = [n for n in model_state if n not in expected and not (tied and n == "lm_head.weight")]
    if missing or extra:
        raise ValueError(f"model_state: does not fit the config (missing {missing[:4]}, unexpected {extra[:4]})")
    source = Path(source_gguf) if source_gguf is not None else None
    if source is not None and not source.is_file():
        raise ValueError(f"source_gguf: no such file: {source}")

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name or (source.stem if source is not None else out_path.stem))
        writer.add_file_type(FILE_TYPES[quant])
        if quant != "f16" or (embedding_quant not in (None, "f16")):
            writer.add_quantization_version(QUANTIZATION_VERSION)
        for key, (value, vtype) in metadata.items():
            writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
        if source is not None:
            _copy_tokenizer(writer, source)
        for hf_name in expected:
            weight = model_state[hf_name].detach().to("cpu", torch.float32).contiguous()
            gguf_name = gguf_tensor_name(hf_name)
            if weight.dim() == 1:
                qtype = F32
            else:
                if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
                    n = heads if ".attn_q." in gguf_name else kv_heads
                    weight = weight[torch.from_numpy(rotary_row_order(weight.shape[0], n, to_gguf=True))]
                qtype = _tensor_qtype(hf_name, weight.shape[1], quant, embedding_quant)
            data = _encode(hf_name, weight, qtype, quantize)
            raw = gguf.GGMLQuantizationType(qtype) if qtype not in (F32, F16) else None
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path

"""A llama GGUF file read as it is: quantized blocks kept, names mapped to Hugging Face's.

``read_gguf_tensors`` yields every tensor under its Hugging Face name. Q4_0, Q4_1 and Q8_0 tensors stay
in the file's block format, as a ``uint8`` array of ``[rows, cols / 32 * block_bytes]``: each row holds
the blocks of one output feature, the blocks running along the input dimension. Any other quantized
type is de-quantized to float32 with a warning naming it; F32/F16 tensors (the norms) come as float32.

``load_gguf_quantized`` builds the transformers model from the file's config without allocating any
weight (on the meta device), then puts in the float tensors and, for every quantized projection and the
embedding, the modules that the caller's ``make_linear``/``make_embedding`` build from the blocks. The
model code never sees a float copy of those weights.

llama.cpp's converter stores the rows of ``attn_q``/``attn_k`` permuted per head (it interleaves the two
rotary halves of each head). That permutation moves whole rows, and a row is a whole number of blocks,
so it is undone on the block rows directly, with no de-quantization.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .cached_folders import write_folder

# ggml type ids (gguf.GGMLQuantizationType), the same ids the GGUF kernels take
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
KEPT_QTYPES = (Q4_0, Q4_1, Q8_0)  # stay in block format; the rest is de-quantized
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF name -> Hugging Face name; "{n}" is the layer index
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.([a-z_]+\.[a-z_]+|[a-z_]+)\.(weight|bias)$")
_HF_TO_GGUF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face llama name of the GGUF tensor ``gguf_name`` (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); a ValueError for a name llama has no place for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face llama name")


def gguf_tensor_name(hf_name: str) -> str:
    """The inverse of ``hf_tensor_name``."""
    for gguf_name, name in _GLOBAL_NAMES.items():
        if name == hf_name:
            return gguf_name
    match = _HF_LAYER_RE.match(hf_name)
    if match and match.group(2) in _HF_TO_GGUF_LAYER:
        layer, part, kind = match.groups()
        return f"blk.{layer}.{_HF_TO_GGUF_LAYER[part]}.{kind}"
    raise ValueError(f"tensor {hf_name!r} has no GGUF llama name")


def rotary_row_order(rows: int, heads: int, *, to_gguf: bool) -> np.ndarray:
    """Row indices that turn a Q/K projection's rows between Hugging Face's order and llama.cpp's.

    llama.cpp stores head h's rows as ``reshape(heads, 2, d, cols).swapaxes(1, 2)`` of the Hugging Face
    rows (d = rows / heads / 2): the first and second rotary halves interleaved. ``weight[order]`` with
    ``to_gguf=True`` applies that; with ``to_gguf=False`` it undoes it."""
    if heads <= 0 or rows % (2 * heads):
        raise ValueError(f"rows: {rows} rows do not split into {heads} heads of two rotary halves")
    half = rows // heads // 2
    order = np.arange(rows).reshape(heads, 2, half).swapaxes(1, 2).reshape(rows)
    return order if to_gguf else np.argsort(order)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file under its Hugging Face name.

    ``shape`` is the logical torch shape (``[out_features, in_features]`` for a projection). ``data`` is
    the ``uint8`` block array ``[rows, nbytes]`` when ``qtype`` is in ``KEPT_QTYPES``, else a float32
    tensor of ``shape`` (``qtype`` then says what the file held)."""

    hf_name: str
    qtype: int
    shape: tuple[int, ...]
    data: torch.Tensor

    @property
    def quantized(self) -> bool:
        return self.qtype in KEPT_QTYPES


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("reading a GGUF file needs the gguf package: pip install gguf") from None
    return gguf


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped: nothing is read yet), with clear errors for a
    missing file, a file that is not GGUF, and an architecture other than llama."""
    gguf = _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"path: no such GGUF file: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise UserError(f"path: {path} is not a readable GGUF file ({err})") from None
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"path: {path} holds a {arch!r} model; only {', '.join(SUPPORTED_ARCHITECTURES)} is supported")
    return reader


def _field(reader, key: str):
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def read_gguf_tensors(path: str | Path, reader=None) -> Iterator[GGUFTensor]:
    """Every tensor of the llama GGUF file ``path``, Hugging Face names and row order, blocks kept.

    Memory: the reader memory-maps the file, so its pages are only mapped, not copied; each tensor is
    then copied once (its Q/K row permutation applied in the same copy) into a torch tensor. Loading a
    model this way holds about the file's size of tensors (SmolLM2-135M Q4_1: ~100 MB, against ~540 MB
    de-quantized to float32), plus whatever of the mapping the kernel keeps in the page cache."""
    gguf = _require_gguf()
    reader = open_gguf(path) if reader is None else reader  # ``reader``: one open_gguf(path) already made
    heads = _field(reader, "llama.attention.head_count")
    kv_heads = _field(reader, "llama.attention.head_count_kv") or heads
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        qtype = int(t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        data = t.data  # numpy memmap: rows x bytes for a block type, the values otherwise
        order = None
        if ".attn_q." in t.name or ".attn_k." in t.name:
            order = rotary_row_order(shape[0], heads if ".attn_q." in t.name else kv_heads, to_gguf=False)
        if qtype in KEPT_QTYPES:
            blocks = np.take(data, order, axis=0) if order is not None else np.array(data)
            yield GGUFTensor(name, qtype, shape, torch.from_numpy(blocks))
            continue
        if qtype not in (F32, F16):
            warnings.warn(
                f"GGUF tensor {t.name} ({name}) is {t.tensor_type.name}, which has no block kernels: "
                "it is de-quantized to float32",
                stacklevel=2,
            )
        values = gguf.quants.dequantize(np.asarray(data), t.tensor_type).astype(np.float32, copy=False)
        values = values.reshape(shape)
        if order is not None:
            values = values[order]
        yield GGUFTensor(name, qtype, shape, torch.from_numpy(np.array(values, dtype=np.float32)))


def gguf_config(path: str | Path):
    """The transformers config of the GGUF file ``path`` (read from its metadata by transformers)."""
    from transformers import AutoConfig

    path = Path(path)
    open_gguf(path)  # the clear errors first
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def gguf_tokenizer(path: str | Path):
    """The tokenizer stored in the GGUF file ``path``."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


METADATA_MARK = "pyfastpeft_gguf_metadata.json"  # written last into a finished metadata folder


def metadata_cache_folder(path: str | Path, cache_dir: str | Path) -> Path:
    """Where the config and tokenizer of the GGUF file ``path`` are kept: keyed by the file's resolved
    path, size and modification time, so a replaced or different file is read again."""
    path = Path(path).resolve()
    st = path.stat()
    ident = json.dumps({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": 1})
    return Path(cache_dir) / "gguf-metadata" / f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def gguf_metadata(path: str | Path, cache_dir: str | Path | None = None):
    """``(config, tokenizer)`` of the GGUF file ``path``.

    transformers rebuilds both from the file's metadata on every call (parsing the file twice: about
    12 s for SmolLM2-135M on two cores). With ``cache_dir`` they are saved there once (config.json and
    the tokenizer's files, written into a temporary folder that is then renamed) and later loads read
    those in a fraction of a second; folders of files since replaced or removed are dropped then
    (:mod:`pyfastpeft.models.cached_folders`). A cache that cannot be written or read is skipped."""
    from transformers import AutoConfig, AutoTokenizer

    if cache_dir is None:
        return gguf_config(path), gguf_tokenizer(path)
    folder = metadata_cache_folder(path, cache_dir)
    if (folder / METADATA_MARK).is_file():
        try:
            return AutoConfig.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError):
            pass  # a damaged cache: read the file again, and write the cache again
    config, tokenizer = gguf_config(path), gguf_tokenizer(path)

    def fill(tmp: Path) -> None:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    try:
        write_folder(folder, METADATA_MARK, Path(path).resolve(), fill)
    except OSError:
        pass  # a read-only cache: nothing kept, the next load reads the file again
    return config, tokenizer


MakeLinear = Callable[[torch.Tensor, int, int, int, "torch.Tensor | None"], nn.Module]
MakeEmbedding = Callable[[torch.Tensor, int, int, int], nn.Module]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _module_name(hf_name: str) -> str:
    return hf_name.rpartition(".")[0]


def load_gguf_quantized(
    path: str | Path,
    *,
    make_linear: MakeLinear,
    make_embedding: MakeEmbedding,
    cache_dir: str | Path | None = None,
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` of the llama GGUF file ``path`` with its quantized weights kept in blocks.

    Every Q4_0/Q4_1/Q8_0 projection becomes ``make_linear(blocks, qtype, in_features, out_features,
    bias)`` and a quantized embedding ``make_embedding(blocks, qtype, num_embeddings, embedding_dim)``
    (``blocks``: ``uint8 [rows, nbytes]``). A file without an ``output`` tensor ties the head to the
    embedding: the head is then ``make_linear`` over the embedding's very blocks tensor (shared, not
    copied), and the model's ``tie_weights()`` checks that they still share it (transformers' own would
    look for an embedding ``weight`` parameter). Float tensors (norms, de-quantized types) go into the ordinary
    modules. ``cache_dir``: where the config and tokenizer are kept after the first load
    (:func:`gguf_metadata`); the blocks are always read from the file."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    reader = open_gguf(path)  # the clear errors first, whatever the cache holds
    config, tokenizer = gguf_metadata(path, cache_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = {t.hf_name: t for t in read_gguf_tensors(path, reader)}
    del reader  # its memory map and parsed fields
    expected = {name for name, _ in model.named_parameters()}
    tied = "lm_head.weight" not in tensors
    missing = expected - set(tensors) - ({"lm_head.weight"} if tied else set())
    unexpected = set(tensors) - expected
    if missing or unexpected:
        raise UserError(
            f"path: {path} does not fit its own config: "
            f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    for name, t in tensors.items():
        module_name = _module_name(name)
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) and t.quantized:
            bias = tensors.get(f"{module_name}.bias")
            bias = bias.data if bias is not None else None
            _set_module(model, module_name, make_linear(t.data, t.qtype, t.shape[1], t.shape[0], bias))
        elif isinstance(module, nn.Embedding) and t.quantized:
            _set_module(model, module_name, make_embedding(t.data, t.qtype, t.shape[0], t.shape[1]))
        elif (
            name.endswith(".bias") and f"{module_name}.weight" in tensors and tensors[f"{module_name}.weight"].quantized
        ):
            continue  # went into its quantized module
        else:
            leaf = name.rpartition(".")[2]
            setattr(module, leaf, nn.Parameter(t.data.reshape(t.shape)))
    if tied:
        embed = tensors["model.embed_tokens.weight"]
        if embed.quantized:
            model.lm_head = make_linear(embed.data, embed.qtype, embed.shape[1], embed.shape[0], None)
            # this model's tie_weights: the head is built over the embedding's blocks (transformers' own
            # looks for a float embedding weight and raises)
            model.tie_weights = types.MethodType(_tie_block_weights, model)
        else:
            model.lm_head.weight = model.get_input_embeddings().weight
    _materialize_buffers(model, config)
    model.eval()
    return model, tokenizer


def _tie_block_weights(model: nn.Module, missing_keys=None, recompute_mapping: bool = True) -> None:
    """``tie_weights`` of a model whose head was made over its embedding's blocks: they are tied already
    (one tensor); checks that they still are."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(head, "blocks", None) is not getattr(embed, "blocks", None):
        raise RuntimeError("tie_weights: the head no longer holds the embedding's blocks; rebuild the model")


def _materialize_buffers(model: nn.Module, config) -> None:
    """Computed buffers (the rotary inverse frequencies) were made on the meta device with the model:
    rebuild the modules holding them on the CPU. Any other meta tensor left is a loader bug."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and "Rotary" in type(module).__name__:
            _set_module(model, name, type(module)(config=config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"loading the GGUF model left tensors without data: {left[:4]}")


def from_gguf(
    path: str | Path,
    quantized: bool = False,
    *,
    make_linear: MakeLinear | None = None,
    make_embedding: MakeEmbedding | None = None,
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` of the llama GGUF file ``path``.

    ``quantized=False``: the float32 model (converted once into the Hugging Face cache folder, as
    ``--model FILE.gguf`` does). ``quantized=True``: the projections and embedding stay in the file's
    blocks, in the modules ``make_linear``/``make_embedding`` build (see ``load_gguf_quantized``)."""
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise UserError(f"path: expected a .gguf file, got {path}")
    if quantized:
        if make_linear is None or make_embedding is None:
            raise ValueError("quantized=True needs make_linear and make_embedding (the block-format modules)")
        from .pretrained import cache_root

        return load_gguf_quantized(path, make_linear=make_linear, make_embedding=make_embedding, cache_dir=cache_root())
    from .pretrained import load_pretrained

    open_gguf(path)  # the same clear errors as the quantized path
    model, tokenizer, _ = load_pretrained(path, log=lambda *a, **k: None)
    return model, tokenizer

"""The base model and the data source a fine-tuning run starts from.

No ``--model``: the real pretrained SmolLM2-135M-Instruct (:mod:`pyfastpeft.models.pretrained`),
fine-tuned on the dates task (:mod:`pyfastpeft.train.dates`) or on ``--data``.
``--model DIR`` / ``--model FILE.gguf``: a local Hugging Face folder, or a GGUF file converted once into
one (no downloads); its own tokenizer reads ``--data`` and makes the dates task when it has one.
``--model tiny``: the TinyLlama of :mod:`pyfastpeft.models`, pretrained on the ``copy`` task (cached),
fine-tuned on a different built-in task, or on ``--data`` through a byte-level tokenizer (the fast path
of the tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import UserError
from ..models import TinyLlamaConfig
from ..tuners import registry
from .config import FinetuneConfig
from .data import BYTE_SPECIALS, ByteTokenizer, FileSource, TaskSource
from .pretrain import pretrained_builtin

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# the built-in model's sizes, used by `finetune --size` and `compare`
SIZES = {
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "medium": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "large": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6),
}


TINY = "tiny"
# defaults of the flags whose best value depends on the model: the built-in model learns its symbol
# tasks from large batches at a high rate; the 135M real model learns the dates task from a few
# small batches, and its default run has to fit in a few minutes on two CPU cores
TINY_DEFAULTS = {"steps": 200, "batch_size": 32, "r": 8, "alpha": 16.0, "task": "shift", "distill_teacher_steps": 200}
# no task: the dates task when the model has a tokenizer, else the built-in one (see _load_real)
REAL_DEFAULTS = {"steps": 30, "batch_size": 8, "r": 16, "alpha": 32.0, "distill_teacher_steps": 30}
REAL_TASK = "dates"
# --lr per method on the built-in model (3e-3 for the others): methods with few trainable parameters
# need larger steps; measured on the built-in 'shift' task (docs/cli.md)
DEFAULT_LR = {"ia3": 1e-1, "adapter": 3e-2, "bitfit": 3e-2, "prompt": 3e-2, "ptuning": 3e-2, "prefix": 1e-1}
# --lr per method on the real model (a measured table is in docs/cli.md); others: 1e-3
REAL_LR = {"full": 5e-5, "freeze": 1e-4, "sparse": 1e-4, "ia3": 1e-2, "bitfit": 3e-3, "prompt": 3e-2, "prefix": 1e-2}


def is_tiny(config: FinetuneConfig) -> bool:
    return config.model == TINY


def default_lr(method: str) -> float:
    """``--lr``'s default for ``method`` on the built-in model."""
    return DEFAULT_LR.get(method, 3e-3)


def resolve_defaults(config: FinetuneConfig) -> FinetuneConfig:
    """A copy of ``config`` with the settings left unset (None) filled with the chosen model's defaults
    (a real model's task stays unset until its tokenizer is seen)."""
    defaults = TINY_DEFAULTS if is_tiny(config) else REAL_DEFAULTS
    filled = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    if config.lr is None:
        filled["lr"] = default_lr(config.method) if is_tiny(config) else REAL_LR.get(config.method, 1e-3)
    if config.out is None:
        filled["out"] = str(Path("pyfastpeft_out") / config.method)
    return replace(config, **filled)


@dataclass
class Base:
    model: torch.nn.Module
    source: object  # TaskSource, FileSource or DateTaskSource
    description: str
    folder: Path | None = None  # the Hugging Face folder of a real model
    tokenizer: object | None = None
    task: str | None = None  # the task the source was made for (a real model's default decided by its tokenizer)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available in this torch build or machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda[:N], got {name!r}")
    return device


def builtin_config(config: FinetuneConfig) -> TinyLlamaConfig:
    """The built-in model's config for these settings (bytes as the vocabulary with ``--data``)."""
    vocab = ByteTokenizer.vocab_size if config.data else TinyLlamaConfig.vocab_size
    return TinyLlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=max(config.max_length, 2 * config.length + 3),
        **SIZES[config.size],
    )


def builtin_model(config: FinetuneConfig, log=print) -> torch.nn.Module:
    """The pretrained built-in model (from the cache, or pretrained and cached)."""
    c = config
    return pretrained_builtin(builtin_config(c), c.pretrain_task, c.pretrain_steps, 32, c.length, 3e-3, c.seed, log)


def hf_model(folder: str | Path, seed: int = 0) -> torch.nn.Module:
    """A local Hugging Face causal LM folder, in float32, without downloads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--model: no such folder: {folder}")
    if not (folder / "config.json").is_file():
        raise UserError(f"--model: {folder} is not a Hugging Face model folder (no config.json)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("--model needs transformers: pip install 'pyfastpeft[hf]'") from None
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)


# The methods that leave the base weights alone and wrap its linear layers as they are: they train over a
# model whose projections stay in GGUF blocks (docs/gguf.md).
QUANTIZED_BASE_METHODS = ("lora", "dora", "ia3")


def load_base(config: FinetuneConfig, log=print) -> Base:
    """The base model and the data source of ``config`` (its unset settings resolved first)."""
    config = resolve_defaults(config)
    if config.quantized_base and is_tiny(config):
        raise UserError("--quantized-base: needs a GGUF model (the default or --model FILE.gguf), not --model tiny")
    if config.quantized_base and config.method in registry.cli_methods and config.method not in QUANTIZED_BASE_METHODS:
        raise UserError(
            f"--quantized-base: --method {config.method} needs the float base weights (it trains, prunes, "
            "fake-quantizes or sizes modules from them, or replaces the embedding); over the GGUF blocks run "
            f"{', '.join(QUANTIZED_BASE_METHODS)}, or drop --quantized-base"
        )
    if not is_tiny(config):
        return _load_real(config, log)
    if config.task == "dates":
        raise UserError("--task dates needs a model with a tokenizer; the built-in model (--model tiny) has none")
    cfg = builtin_config(config)
    model = builtin_model(config, log)
    n = sum(p.numel() for p in model.parameters())
    desc = (
        f"built-in model: TinyLlama ({config.size}), {n:,} parameters, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}"
    )
    if config.data:
        source = FileSource(config.data, ByteTokenizer(), config.max_length, BYTE_SPECIALS, pad_id=0)
    else:
        source = TaskSource(config.task, config.length, cfg.vocab_size, config.seed)
    return Base(model, source, desc, task=config.task)


def _load_blocks(config: FinetuneConfig, name: str):
    """``(model, tokenizer, description)`` of a GGUF model whose linear weights stay in the file's blocks.
    The converted float folder is still resolved by the caller: the saved adapter records it as its base
    (``generate``, ``report`` and PEFT load the adapter over it)."""
    from ..models.gguf_file import load_gguf_quantized
    from ..models.pretrained import cache_root, default_gguf
    from ..nn import GGUFEmbedding, GGUFLinear

    if config.model is None or config.model == "default":
        path = default_gguf()
    elif str(config.model).lower().endswith(".gguf"):
        path = Path(config.model)
    else:
        raise UserError(f"--quantized-base: needs a GGUF model (the default or --model FILE.gguf), got {config.model}")
    t0 = time.perf_counter()
    model, tok = load_gguf_quantized(path, make_linear=GGUFLinear, make_embedding=GGUFEmbedding, cache_dir=cache_root())
    model.eval()
    blocks = {id(m.blocks): m.blocks for m in model.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))}
    block_bytes = sum(b.numel() for b in blocks.values())
    floats = sum(p.numel() for p in model.parameters())
    cfg = model.config
    desc = (
        f"model: {name} ({type(model).__name__}), {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocabulary {cfg.vocab_size:,}; weights kept in the GGUF blocks ({block_bytes / 2**20:.1f} MiB) plus "
        f"{floats:,} float parameters (loaded from {path} in {time.perf_counter() - t0:.1f} s)"
    )
    return model, tok, desc


def _load_real(config: FinetuneConfig, log) -> Base:
    from ..models.pretrained import load_folder, resolve_folder

    folder, name = resolve_folder(config.model, log=log)
    torch.manual_seed(config.seed)
    if config.quantized_base:
        model, tok, desc = _load_blocks(config, name)
    else:
        model, tok, desc = load_folder(folder, name)
    if config.data:
        task = config.task or REAL_TASK  # recorded only: --data replaces the task
        if tok is not None:
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            source = FileSource(config.data, tok, config.max_length, None, pad_id=pad)
            return Base(model, source, desc, folder, tok, task)
        if model.config.vocab_size < ByteTokenizer.vocab_size:
            raise UserError(
                f"--model: {folder} has no tokenizer and a vocabulary of {model.config.vocab_size} < "
                f"{ByteTokenizer.vocab_size}, too small for byte-level tokens"
            )
        log(f"{folder} has no tokenizer: reading --data as bytes")
        source = FileSource(config.data, ByteTokenizer(), config.max_length, BYTE_SPECIALS, pad_id=0)
        return Base(model, source, desc, folder, task=task)
    task = config.task
    if task == "dates" and tok is None:
        raise UserError(f"--task dates needs a tokenizer; {folder} has none")
    if task is None:
        task = REAL_TASK if tok is not None else TINY_DEFAULTS["task"]
    if task == "dates":
        from .dates import DateTaskSource

        source = DateTaskSource(tok, seed=config.seed, held_out=config.held_out)
        return Base(model, source, desc, folder, tok, task)
    vocab = model.config.vocab_size
    task_vocab = min(vocab, TinyLlamaConfig.vocab_size)
    if task_vocab < 8:
        raise UserError(f"--model: vocabulary of {vocab} is too small for the built-in tasks; pass --data")
    return Base(model, TaskSource(task, config.length, task_vocab, config.seed), desc, folder, tok, task)

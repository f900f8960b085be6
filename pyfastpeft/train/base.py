"""The base model and the data source a fine-tuning run starts from.

Built-in (no ``--model``): the TinyLlama of :mod:`pyfastpeft.models`, pretrained on the ``copy`` task
(cached), fine-tuned on a different built-in task, or on ``--data`` through a byte-level tokenizer.
``--model DIR``: a local Hugging Face folder loaded with ``AutoModelForCausalLM`` (no downloads); its
own tokenizer reads ``--data`` when the folder has one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..models import TinyLlamaConfig
from .data import BYTE_SPECIALS, ByteTokenizer, FileSource, TaskSource
from .pretrain import pretrained_builtin

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# the built-in model's sizes, used by `finetune --size` and `compare`
SIZES = {
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "medium": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "large": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6),
}


@dataclass
class Base:
    model: torch.nn.Module
    source: object  # TaskSource or FileSource
    description: str


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available in this torch build or machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda[:N], got {name!r}")
    return device


def builtin_config(args: argparse.Namespace) -> TinyLlamaConfig:
    """The built-in model's config for these settings (bytes as the vocabulary with ``--data``)."""
    vocab = ByteTokenizer.vocab_size if args.data else TinyLlamaConfig.vocab_size
    return TinyLlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=max(args.max_length, 2 * args.length + 3),
        **SIZES[args.size],
    )


def builtin_model(args: argparse.Namespace, log=print) -> torch.nn.Module:
    """The pretrained built-in model (from the cache, or pretrained and cached)."""
    cfg = builtin_config(args)
    return pretrained_builtin(cfg, args.pretrain_task, args.pretrain_steps, 32, args.length, 3e-3, args.seed, log)


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


def load_base(args: argparse.Namespace, log=print) -> Base:
    if args.model:
        return _load_hf(args, log)
    cfg = builtin_config(args)
    model = builtin_model(args, log)
    n = sum(p.numel() for p in model.parameters())
    desc = (
        f"built-in model: TinyLlama ({args.size}), {n:,} parameters, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}"
    )
    if args.data:
        source = FileSource(args.data, ByteTokenizer(), args.max_length, BYTE_SPECIALS, pad_id=0)
    else:
        source = TaskSource(args.task, args.length, cfg.vocab_size, args.seed)
    return Base(model, source, desc)


def _load_hf(args: argparse.Namespace, log) -> Base:
    folder = Path(args.model)
    model = hf_model(folder, args.seed)
    from transformers import AutoTokenizer

    vocab = model.config.vocab_size
    n = sum(p.numel() for p in model.parameters())
    desc = f"Hugging Face model {folder} ({type(model).__name__}), {n:,} parameters"
    if not args.data:
        task_vocab = min(vocab, TinyLlamaConfig.vocab_size)
        if task_vocab < 8:
            raise UserError(f"--model: vocabulary of {vocab} is too small for the built-in tasks; pass --data")
        return Base(model, TaskSource(args.task, args.length, task_vocab, args.seed), desc)
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if has_tokenizer:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return Base(model, FileSource(args.data, tok, args.max_length, None, pad_id=pad), desc)
    if vocab < ByteTokenizer.vocab_size:
        raise UserError(
            f"--model: {folder} has no tokenizer and a vocabulary of {vocab} < "
            f"{ByteTokenizer.vocab_size}, too small for byte-level tokens"
        )
    log(f"{folder} has no tokenizer: reading --data as bytes")
    return Base(model, FileSource(args.data, ByteTokenizer(), args.max_length, BYTE_SPECIALS, pad_id=0), desc)

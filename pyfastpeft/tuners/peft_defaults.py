"""Hugging Face PEFT's per-model defaults and its modules_to_save rules, shared by every method.

- Default targets per transformers ``model_type`` for LoRA/DoRA and (IA)³, used when a config leaves
  ``target_modules`` (or ``feedforward_modules``) at None.
- The task head a ``task_type`` adds to ``modules_to_save`` (``SEQ_CLS``: classifier/score, ...).
- PEFT's modules_to_save matching: a name matches every module whose path *ends with* it as a plain
  string (so ``classifier`` also matches ``pre_classifier``), and a module so named is never an adapter
  target itself.
"""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Any

from torch import nn

# The tables below mirror PEFT 0.21's defaults (peft/utils/constants.py), as data users rely on.
LORA_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

IA3_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

# The heads PeftModelForSequenceClassification / ...TokenClassification / ...QuestionAnswering add.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

_PEFT_KEY_PREFIX = "base_model.model."  # PEFT matches modules_to_save against its own module keys


def model_type(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of ``model`` (None without one; the built-in model reads as Llama)."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt is None and any(p.endswith("mlp.down_proj") for p, _ in model.named_modules()):
        mt = "llama"
    return mt


def default_targets(table: dict[str, Any], model: nn.Module, field: str, method: str) -> Any:
    """PEFT's default for ``field`` on ``model``'s type, or a ValueError saying to give it."""
    mt = model_type(model)
    if mt not in table:
        raise ValueError(
            f"{field}: required for {method} on model type {mt!r}, which has no default in PEFT's table "
            f"(defaults exist for: {', '.join(sorted(table))})"
        )
    value = table[mt]
    return value if isinstance(value, str) else list(value)


def add_task_heads(config: Any) -> tuple[str, ...]:
    """Add the head of ``config.task_type`` to ``config.modules_to_save`` as PEFT does (once); returns the
    head names of the task type."""
    heads = TASK_HEADS.get(getattr(config, "task_type", None), ())
    if heads:
        names = list(config.modules_to_save or [])
        config.modules_to_save = names + [h for h in heads if h not in names]
    return heads


def matches_saved_name(path: str, names: list[str]) -> bool:
    """PEFT's modules_to_save rule: the module key ends with the name (plain suffix, no '.' boundary)."""
    key = _PEFT_KEY_PREFIX + path
    return any(key.endswith(n) for n in names)


def is_saved_module(path: str, names: list[str] | None) -> bool:
    """Whether ``path`` is (inside) a module ``names`` saves in full, by PEFT's rule for keeping adapter
    targets out of modules_to_save: the name at a '.' boundary."""
    return bool(names) and any(re.match(rf"(^|.*\.){re.escape(n)}($|\..*)", path) for n in names)


def find_modules_to_save(
    paths: list[str], names: list[str], task_heads: tuple[str, ...] = (), strict: bool = True
) -> list[str]:
    """The paths among ``paths`` that ``names`` selects (outermost only). A name matching nothing is an
    error when ``strict`` (a config written in code), a warning otherwise (a config read from a file, as
    PEFT ignores such names); a task head name matching nothing is fine while another head name matched."""
    found = [p for p in paths if p and matches_saved_name(p, names)]
    found = [p for p in found if not any(p.startswith(q + ".") for q in found)]
    unmatched = [n for n in names if not any((_PEFT_KEY_PREFIX + p).endswith(n) for p in found)]
    if not unmatched:
        return found
    head_matched = any(h not in unmatched for h in task_heads)
    other = [n for n in unmatched if n not in task_heads]
    heads_missing = [n for n in unmatched if n in task_heads and not head_matched]
    near = sorted({c for n in other + heads_missing for c in difflib.get_close_matches(n, paths, n=5, cutoff=0.3)})
    if other and strict:
        raise ValueError(f"modules_to_save: {other} matched no module; nearest names: {near or 'none'}")
    if other or heads_missing:
        warnings.warn(
            f"modules_to_save: {other + heads_missing} matched no module and are ignored (as in PEFT); "
            f"nearest names: {near or 'none'}",
            stacklevel=4,
        )
    return found

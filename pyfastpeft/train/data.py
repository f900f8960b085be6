"""Training data for the command line: the built-in synthetic tasks, or a local JSONL / text file.

A file is read whole and tokenized up front (by the model's own tokenizer for a Hugging Face folder
that has one, else by :class:`ByteTokenizer`); batches are then drawn by a ``torch.Generator``, whose
state alone says where the data stream stands, so a checkpoint resumes it exactly.

Accepted files:
  - ``.jsonl``: one JSON object per line, ``{"text": ...}`` (every token is predicted) or
    ``{"prompt": ..., "completion": ...}`` (only the completion is predicted); blank lines are skipped.
  - anything else: plain text, one example per non-blank line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..models.data import BOS, EOS, PAD, SEP, Batch, answer_accuracy, make_batch


class DataError(UserError):
    """A data file that cannot be used; the message names the file and the line."""


class ByteTokenizer:
    """UTF-8 bytes shifted past the four special ids of the built-in model (PAD, BOS, SEP, EOS)."""

    offset = 4
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where the token is not predicted


def read_records(path: str | Path) -> list[tuple[int, str, str | None]]:
    """``(line number, prompt or text, completion or None)`` for every non-blank line of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: no such file: {path}")
    records = []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    with path.open("r", encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            records.append((number, line.rstrip("\n"), None))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        if "text" in obj and isinstance(obj["text"], str):
            records.append((number, obj["text"], None))
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            records.append((number, obj["prompt"], obj["completion"]))
        else:
            raise DataError(
                f'{path}:{number}: expected {{"text": str}} or {{"prompt": str, "completion": str}}, '
                f"got keys {sorted(obj)}"
            )
    if not records:
        raise DataError(f"{path}: no examples (the file is empty or blank)")
    return records


def tokenize_records(records, tokenizer, max_length: int, specials: dict[str, int] | None) -> list[Example]:
    """Token ids and labels per record. ``specials`` (BOS/SEP/EOS ids) frame the example for the built-in
    byte tokenizer; a Hugging Face tokenizer adds its own special tokens and ``specials`` is None."""
    examples = []
    for number, first, completion in records:
        if specials is not None:
            prompt = [specials["bos"]] + tokenizer.encode(first)
            if completion is None:
                ids, labels = prompt + [specials["eos"]], prompt + [specials["eos"]]
            else:
                prompt = prompt + [specials["sep"]]
                answer = tokenizer.encode(completion) + [specials["eos"]]
                ids, labels = prompt + answer, [-100] * len(prompt) + answer
        else:
            prompt = tokenizer(first)["input_ids"]
            if completion is None:
                ids, labels = prompt, list(prompt)
            else:
                answer = tokenizer(completion, add_special_tokens=False)["input_ids"]
                ids, labels = prompt + answer, [-100] * len(prompt) + answer
        ids, labels = ids[:max_length], labels[:max_length]
        if len(ids) < 2 or all(t == -100 for t in labels[1:]):
            raise DataError(f"line {number}: nothing to predict within --max-length {max_length} tokens")
        examples.append(Example(ids, labels))
    return examples


def collate(examples: list[Example], pad_id: int = PAD) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(ids, labels, mask)


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    return Batch(batch.input_ids.to(device), batch.labels.to(device), batch.attention_mask.to(device))


class TaskSource:
    """Batches of a built-in synthetic task (see :mod:`pyfastpeft.models.data`)."""

    def __init__(self, task: str, length: int, vocab_size: int, seed: int, eval_size: int = 256):
        self.task, self.length, self.vocab_size = task, length, vocab_size
        self.eval_batch = make_batch(task, eval_size, length, vocab_size, torch.Generator().manual_seed(seed + 1))
        self.metric_name = "exact match"
        self.description = f"built-in '{task}' task ({length} symbols, vocabulary {vocab_size})"

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        return make_batch(self.task, batch_size, self.length, self.vocab_size, generator)

    def evaluate(self, model, device: torch.device | str = "cpu") -> dict[str, float]:
        token_acc, exact = answer_accuracy(model, batch_to(self.eval_batch, device))
        return {"exact match": exact, "token accuracy": token_acc}


class FileSource:
    """Batches drawn with replacement from a tokenized file; the last 10% (at least one example, none
    when the file has fewer than 10) is held out for the metric, which is the accuracy of the
    predicted tokens under teacher forcing."""

    def __init__(self, path: str | Path, tokenizer, max_length: int, specials: dict[str, int] | None, pad_id: int):
        examples = tokenize_records(read_records(path), tokenizer, max_length, specials)
        held = len(examples) // 10
        self.train = examples[: len(examples) - held] if held else examples
        self.held_out = examples[len(examples) - held :] if held else examples
        self.pad_id = pad_id
        self.metric_name = "token accuracy"
        where = f"{held} held out" if held else "evaluated on the training examples (fewer than 10)"
        self.description = f"{path}: {len(examples)} examples, {where}"

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.train), (batch_size,), generator=generator).tolist()
        return collate([self.train[i] for i in idx], self.pad_id)

    @torch.no_grad()
    def evaluate(self, model, device: torch.device | str = "cpu") -> dict[str, float]:
        batch = batch_to(collate(self.held_out, self.pad_id), device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        pred, target = logits[:, :-1].argmax(-1), batch.labels[:, 1:]
        mask = target != -100
        return {"token accuracy": ((pred == target) & mask).sum().item() / max(1, mask.sum().item())}


BYTE_SPECIALS = {"bos": BOS, "sep": SEP, "eos": EOS}

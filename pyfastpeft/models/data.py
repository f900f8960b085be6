"""Built-in synthetic tasks, generated on the fly from a seed (nothing is downloaded).

Every example is ``BOS a_1 … a_L SEP answer EOS`` over a small vocabulary; labels are -100 on the
prompt so the loss and the metric cover the answer only.
  - ``copy``:    answer = a_1 … a_L          (the pretraining task)
  - ``reverse``: answer = a_L … a_1          (a fine-tuning task)
  - ``sort``:    answer = sorted(a)          (a fine-tuning task)
  - ``shift``:   answer = a_i + 1 (mod)      (a fine-tuning task)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, BOS, SEP, EOS = 0, 1, 2, 3
FIRST_SYMBOL = 4
TASKS = ("copy", "reverse", "sort", "shift")


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 outside the answer
    attention_mask: torch.Tensor  # [B, T]


def answer(task: str, symbols: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if task == "copy":
        return symbols
    if task == "reverse":
        return symbols.flip(-1)
    if task == "sort":
        return symbols.sort(-1).values
    if task == "shift":
        n = vocab_size - FIRST_SYMBOL
        return (symbols - FIRST_SYMBOL + 1) % n + FIRST_SYMBOL
    raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")


def make_batch(task: str, batch_size: int, length: int, vocab_size: int, generator: torch.Generator) -> Batch:
    """A batch of ``batch_size`` examples with ``length`` symbols each (sequence length 2·length + 3)."""
    if vocab_size <= FIRST_SYMBOL + 1:
        raise ValueError(f"vocab_size: expected more than {FIRST_SYMBOL + 1}, got {vocab_size}")
    symbols = torch.randint(FIRST_SYMBOL, vocab_size, (batch_size, length), generator=generator)
    ans = answer(task, symbols, vocab_size)
    col = lambda v: torch.full((batch_size, 1), v, dtype=torch.long)  # noqa: E731
    ids = torch.cat([col(BOS), symbols, col(SEP), ans, col(EOS)], dim=1)
    labels = ids.clone()
    labels[:, : length + 2] = -100  # prompt and SEP are not predicted
    return Batch(ids, labels, torch.ones_like(ids))


@torch.no_grad()
def answer_accuracy(model, batch: Batch) -> tuple[float, float]:
    """(token accuracy, exact-match accuracy) of the answer under teacher forcing."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    pred = logits[:, :-1].argmax(-1)
    target = batch.labels[:, 1:]
    mask = target != -100
    correct = (pred == target) | ~mask
    token_acc = ((pred == target) & mask).sum().item() / max(1, mask.sum().item())
    exact = correct.all(dim=1).float().mean().item()
    return token_acc, exact

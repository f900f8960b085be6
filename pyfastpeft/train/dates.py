"""The real-text task of the default run: a date written in one of several styles, rewritten as ISO 8601.

``"the 5th of March, 2021"`` → ``"2021-03-05"``, the instruction in the system turn. The examples come
from a seeded generator in this file (nothing is read or fetched). The held-out dates are drawn first
and never appear in the training split (not in any style), so the held-out score measures the rule,
not memorised pairs.

Prompts go through the tokenizer's chat template (a user turn, then the assistant's turn opened); the
loss covers the answer and its end-of-turn token only. The metric is exact match of the answer the
model writes by greedy generation (batched, left-padded, with the KV cache).
"""

from __future__ import annotations

import datetime
import inspect
import random

import torch

from ..errors import UserError
from ..models.data import Batch
from ..tuners.prompt_learning.model import cache_argument
from .data import Example, batch_to, collate

MONTHS = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
INSTRUCTION = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Reply with the date only."


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# every style names the month or keeps the year first, so no date is ambiguous
STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {_ordinal(d.day)} {d.year}",
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3].upper()}-{d.year}",
    lambda d: f"{d.year}/{d.month}/{d.day}",
]


def date_examples(seed: int = 0, held_out: int = 64, train: int = 2000) -> tuple[list, list]:
    """``(train, held_out)`` lists of ``(prompt text, answer)``; the two splits share no date."""
    rng = random.Random(seed)
    first, days = datetime.date(1950, 1, 1).toordinal(), 100 * 365
    ordinals = rng.sample(range(first, first + days), held_out + train)
    pairs = []
    for i, o in enumerate(ordinals):
        d = datetime.date.fromordinal(o)
        style = STYLES[rng.randrange(len(STYLES))] if i >= held_out else STYLES[i % len(STYLES)]
        pairs.append((style(d), d.isoformat()))
    return pairs[held_out:], pairs[:held_out]


def chat_prompt_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    """The token ids of ``text`` as a user turn, the assistant's turn opened (the chat template where
    the tokenizer has one, else the plain text)."""
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "system", "content": system}] if system else []
        rendered = tokenizer.apply_chat_template(
            turns + [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text + "\n")["input_ids"]


class DateTaskSource:
    """The date task as a data source for the training loop (``batch``, ``evaluate``), plus
    ``answers`` for showing what a model writes."""

    metric_name = "exact match"
    name = "dates to ISO 8601"
    generates = True  # the metric generates answers (slow): the loop evaluates before and after only

    def __init__(self, tokenizer, seed: int = 0, held_out: int = 64, eval_batch_size: int = 64):
        if held_out < 1:
            raise UserError(f"--held-out: expected a positive number, got {held_out}")
        if tokenizer.eos_token_id is None:
            raise UserError("the dates task needs a tokenizer with an end-of-sequence token")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        train, held = date_examples(seed, held_out)
        self.train = [self._example(p, a) for p, a in train]
        self.held_out = held
        self.held_prompts = [chat_prompt_ids(tokenizer, p, INSTRUCTION) for p, _ in held]
        self.max_new_tokens = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in held) + 2
        self.eval_batch_size = eval_batch_size
        self.first_answers: list[str] | None = None  # the answers of the first and the latest evaluation
        self.last_answers: list[str] | None = None
        self.description = (
            f"{self.name}: dates in {len(STYLES)} styles rewritten as YYYY-MM-DD; {len(train)} training "
            f"examples, {len(held)} held out (no date shared), chat template, loss on the answer only"
        )

    def _example(self, prompt: str, answer: str) -> Example:
        p = chat_prompt_ids(self.tokenizer, prompt, INSTRUCTION)
        a = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos]
        return Example(p + a, [-100] * len(p) + a)

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.train), (batch_size,), generator=generator).tolist()
        return collate([self.train[i] for i in idx], self.pad_id)

    def answers(self, model, device: torch.device | str = "cpu", count: int | None = None) -> list[str]:
        """What ``model`` answers to the first ``count`` held-out prompts (all by default)."""
        prompts = self.held_prompts[: count if count is not None else len(self.held_prompts)]
        # a prompt-learning model routed through the base's forward adds its virtual tokens on every
        # call, so it cannot continue from a KV cache: it re-reads the sequence each step
        use_cache = "prompt_encoder" not in model._modules
        out = []
        for i in range(0, len(prompts), self.eval_batch_size):
            ids = greedy_generate(
                model,
                prompts[i : i + self.eval_batch_size],
                self.max_new_tokens,
                self.eos,
                self.pad_id,
                device,
                use_cache,
            )
            out += [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
        return out

    @torch.no_grad()
    def evaluate(self, model, device: torch.device | str = "cpu") -> dict[str, float]:
        answers = self.answers(model, device)
        if self.first_answers is None:
            self.first_answers = answers
        self.last_answers = answers
        right = sum(a == want for a, (_, want) in zip(answers, self.held_out, strict=True))
        return {"exact match": right / len(self.held_out)}


def _decoder_arguments(model) -> tuple[str, dict]:
    """The name the causal LM inside ``model`` (the first module whose ``forward`` names a KV cache, in
    pre-order, so the outermost) gives its cache (``cache`` from transformers 5, ``past_key_values``
    before and in the built-in model), and ``logits_to_keep=1`` where it takes that: greedy decoding
    reads only the last position's logits, and the vocabulary projection of every prompt position is
    the largest cost of the first step."""
    for module in model.modules():
        key = cache_argument(module)
        if key is not None:
            keeps = "logits_to_keep" in inspect.signature(module.forward).parameters
            return key, ({"logits_to_keep": 1} if keeps else {})
    return "past_key_values", {}


@torch.no_grad()
def greedy_generate(
    model, prompts: list[list[int]], max_new_tokens: int, eos: int, pad_id: int, device, use_cache: bool = True
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), batched with left padding; each row stops at
    ``eos`` (not included). With ``use_cache`` the prompt is encoded once and each step feeds one token
    through the KV cache; without it every step re-reads the whole sequence (for models whose forward
    adds its own positions, such as prompt-learning methods)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    batch = batch_to(Batch(ids, ids, mask), device)
    ids, mask = batch.input_ids, batch.attention_mask
    done = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    past, step_ids = None, ids
    cache_key, last_only = _decoder_arguments(model)
    for _ in range(max_new_tokens):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if use_cache:
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=position_ids[:, -step_ids.shape[1] :],
                use_cache=True,
                **{cache_key: past},
                **last_only,
            )
            past = getattr(out, cache_key)
        else:
            # not ``logits_to_keep``: prompt learning cuts its virtual positions off the logits after
            out = model(input_ids=ids, attention_mask=mask)
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        done |= token == eos
        if bool(done.all()):
            break
        step_ids = token[:, None]
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
    return [row[: row.index(eos)] if eos in row else row for row in rows]

"""A tiny built-in model and a few training steps on a built-in task, shared by the method tests."""

from __future__ import annotations

import copy
import functools

import torch

from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.models.data import make_batch

VOCAB = 24


def tiny_llama(layers: int = 3, seed: int = 0) -> TinyLlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = TinyLlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    return TinyLlamaForCausalLM(cfg)


@functools.lru_cache(maxsize=1)
def _pretrained() -> TinyLlamaForCausalLM:
    model = tiny_llama()
    train_steps(model, model.parameters(), steps=60, lr=1e-2, task="copy", seed=7)
    return model


def pretrained_tiny() -> TinyLlamaForCausalLM:
    """The tiny model after 60 full steps on ``copy`` (about a second, once per session): fine-tuning
    it on ``reverse`` then lowers the loss clearly within a few dozen steps of any method."""
    return copy.deepcopy(_pretrained())


def batch(seed: int = 0, size: int = 16, task: str = "reverse", length: int = 5):
    return make_batch(task, size, length, VOCAB, torch.Generator().manual_seed(seed))


def train_steps(
    model, params, steps: int = 30, lr: float = 1e-2, loss_fn=None, seed: int = 0, task: str = "reverse"
) -> list[float]:
    """``steps`` AdamW steps on fresh built-in batches; the losses before each step."""
    opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        b = batch(seed=seed * 1000 + step, task=task)
        loss = loss_fn(model, b) if loss_fn else model(input_ids=b.input_ids, labels=b.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of the parameters whose values differ from ``before`` (bit for bit)."""
    now = dict(model.named_parameters())
    return {n for n, t in before.items() if n in now and not torch.equal(now[n], t)}


def eval_ids(seed: int = 99):
    return batch(seed=seed, size=4).input_ids


def copy_task_losses(model, lr: float, steps: int = 30) -> list[float]:
    """``steps`` AdamW steps on the built-in ``copy`` task (batches of 8, 4 symbols, vocabulary 32) over
    the parameters that require grad; the losses before each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        b = make_batch("copy", 8, 4, 32, g)
        loss = model(b.input_ids, labels=b.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def held_out_losses(model, batch) -> torch.Tensor:
    """Each sequence's mean loss over its answer tokens (float64), without autograd. Models that return
    logits for virtual tokens before the real ones (prompt tuning) are read at the real positions."""
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels[:, 1:]
    logits = logits[:, -batch.input_ids.shape[1] :][:, :-1]
    token = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), labels, reduction="none")
    answer = (labels != -100).double()
    return (token * answer).sum(1) / answer.sum(1)


def assert_learned(before: torch.Tensor, after: torch.Tensor) -> None:
    """Training lowered the held-out loss by more than three standard errors of the per-sequence gains:
    a margin from the held-out batch's own noise, so a run that learned nothing fails at any seed and
    one that learned does not hang on a judged fraction of the loss."""
    gain = before - after
    assert gain.mean() > 3 * gain.std() / gain.numel() ** 0.5, (before.mean().item(), after.mean().item())

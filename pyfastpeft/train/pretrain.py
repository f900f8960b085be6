"""Pretraining of the built-in model, cached on disk.

The fine-tuning demo needs a base model that already knows something (the ``copy`` task), so that
a PEFT method has something to adapt. Pretraining takes seconds; its weights are cached under
``$PYFASTPEFT_CACHE`` (default ``~/.cache/pyfastpeft``) as a safetensors file whose name is a hash of
everything that determines them (model config, task, steps, batch size, lr, seed, torch version), so a
changed setting never reads a stale file.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..models import TinyLlamaConfig, TinyLlamaForCausalLM, make_batch
from ..models.pretrained import cache_root
from .checkpoint import load_tensors, save_tensors


def pretrain_key(
    cfg: TinyLlamaConfig, task: str, steps: int, batch_size: int, length: int, lr: float, seed: int
) -> str:
    spec = {
        "config": cfg.to_dict(),
        "task": task,
        "steps": steps,
        "batch_size": batch_size,
        "length": length,
        "lr": lr,
        "seed": seed,
        "torch": torch.__version__.split("+")[0],
        "version": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_model(
    model: TinyLlamaForCausalLM,
    task: str,
    steps: int,
    batch_size: int,
    length: int,
    lr: float,
    seed: int,
    log=print,
) -> list[float]:
    """Full-model AdamW on ``task``; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(1, steps + 1):
        batch = make_batch(task, batch_size, length, model.config.vocab_size, gen)
        loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 4) == 0 or step == steps:
            log(f"[pretrain] step {step}/{steps}  loss {losses[-1]:.4f}")
    return losses


def pretrained_builtin(
    cfg: TinyLlamaConfig,
    task: str = "copy",
    steps: int = 300,
    batch_size: int = 32,
    length: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    log=print,
) -> TinyLlamaForCausalLM:
    """The built-in model pretrained on ``task``: read from the cache, or trained and cached."""
    torch.manual_seed(seed)
    model = TinyLlamaForCausalLM(cfg)
    if steps <= 0:
        return model
    path = cache_root() / f"tinyllama-{task}-{pretrain_key(cfg, task, steps, batch_size, length, lr, seed)}.safetensors"
    if path.is_file():
        try:
            tensors, _ = load_tensors(path)
            model.load_state_dict(tensors)
            log(f"pretrained base model read from {path}")
            return model
        except Exception as err:  # a damaged cache file is rebuilt, never trusted
            log(f"ignoring unreadable cache file {path} ({err})")
    log(
        f"pretraining the built-in model on the '{task}' task ({steps} steps, full model); "
        f"cached afterwards in {path.parent}"
    )
    pretrain_model(model, task, steps, batch_size, length, lr, seed, log)
    save_tensors(path, model.state_dict(), {"task": task, "steps": steps, "config": cfg.to_dict(), "seed": seed})
    return model

"""The teacher of ``--method distill``: the same base model, fully fine-tuned on the training data.

A larger built-in model would need its own pretraining and minutes of fine-tuning on 2 CPU cores; the
fully fine-tuned model of the same size learns the built-in tasks in a few seconds and is the best
this base can do, so the demo shows a LoRA student pulled toward it. For the built-in model and task
the teacher is cached next to the pretrained base (named by a hash of everything that determines it);
a Hugging Face model or a ``--data`` file trains it afresh each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import builtin_config, builtin_model, hf_model
from .checkpoint import load_tensors, save_tensors
from .data import batch_to
from .pretrain import cache_dir, pretrain_key


def _quiet(*args, **kwargs) -> None:
    pass


def teacher_cache_path(args: argparse.Namespace, steps: int):
    if args.model or args.data:
        return None
    spec = {
        "base": pretrain_key(
            builtin_config(args), args.pretrain_task, args.pretrain_steps, 32, args.length, 3e-3, args.seed
        ),
        "task": args.task,
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "version": 1,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"teacher-{args.task}-{key}.safetensors"


def fine_tune_fully(model: torch.nn.Module, source, steps: int, batch_size: int, lr: float, seed: int, device) -> None:
    """Every parameter of ``model`` trains with AdamW on ``source`` (its own data stream)."""
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 7)
    model.train()
    for _ in range(steps):
        batch = batch_to(source.batch(batch_size, gen), device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch.labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def fine_tuned_teacher(
    args: argparse.Namespace, source, device: torch.device, dtype: torch.dtype, log=print
) -> torch.nn.Module:
    """The frozen teacher on ``device`` in ``dtype``, in eval mode. Torch's global RNG is left as it
    was, so a run with a teacher draws the same dropout masks whether it was cached or not."""
    if args.distill_teacher_steps < 1:
        raise UserError(f"--distill-teacher-steps: expected a positive number, got {args.distill_teacher_steps}")
    steps = args.distill_teacher_steps
    path = teacher_cache_path(args, steps)
    with torch.random.fork_rng(devices=[]):
        model = hf_model(args.model, args.seed) if args.model else builtin_model(args, _quiet)
        cached = False
        if path is not None and path.is_file():
            try:
                model.load_state_dict(load_tensors(path)[0])
                cached = True
            except Exception as err:  # a damaged cache file is rebuilt, never trusted
                log(f"ignoring unreadable cache file {path} ({err})")
        model.to(device=device, dtype=torch.float32)
        if not cached:
            fine_tune_fully(model, source, steps, args.batch_size, args.lr, args.seed, device)
            if path is not None:
                save_tensors(path, model.state_dict(), {"task": args.task, "steps": steps})
    model.to(dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    metric = source.evaluate(model, device)[source.metric_name]
    where = f"read from {path}" if cached else ("cached in " + str(path) if path is not None else "not cached")
    log(
        f"distill: teacher = the base model fully fine-tuned for {steps} steps ({where}); "
        f"its {source.metric_name}: {metric:.3f}"
    )
    return model

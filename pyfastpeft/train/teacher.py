"""The teacher of ``--method distill``: the same base model, fine-tuned on the training data.

On a real model (135M parameters on two CPU cores) full fine-tuning does not fit the run's budget:
the teacher is the base with a rank-16 LoRA on the seven projections trained for
``--distill-teacher-steps`` steps (default 30, as the default run), and the student is the LoRA of
``--r`` (a smaller rank makes it the classic small student). On the built-in model the teacher is
fully fine-tuned:
a larger built-in model would need its own pretraining and minutes of fine-tuning on 2 CPU cores; the
fully fine-tuned model of the same size learns the built-in tasks in a few seconds and is the best
this base can do, so the demo shows a LoRA student pulled toward it. For the built-in model and task
the teacher is cached next to the pretrained base (named by a hash of everything that determines it);
a Hugging Face model or a ``--data`` file trains it afresh each run.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.pretrained import cache_root
from .base import builtin_config, builtin_model, hf_model, is_tiny
from .checkpoint import load_tensors, save_tensors
from .config import LLAMA_TARGETS, FinetuneConfig
from .data import batch_to
from .pretrain import pretrain_key


def _quiet(*args, **kwargs) -> None:
    pass


def teacher_cache_path(config: FinetuneConfig, steps: int):
    if not is_tiny(config) or config.data:
        return None
    spec = {
        "base": pretrain_key(
            builtin_config(config), config.pretrain_task, config.pretrain_steps, 32, config.length, 3e-3, config.seed
        ),
        "task": config.task,
        "steps": steps,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "version": 1,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"teacher-{config.task}-{key}.safetensors"


def fine_tune_fully(model: torch.nn.Module, source, steps: int, batch_size: int, lr: float, seed: int, device) -> None:
    """The trainable parameters of ``model`` (every one unless a method froze some) train with AdamW on
    ``source`` (its own data stream)."""
    if not any(p.requires_grad is False for p in model.parameters()):
        for p in model.parameters():
            p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
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
    config: FinetuneConfig, source, device: torch.device, dtype: torch.dtype, log=print
) -> torch.nn.Module:
    """The frozen teacher on ``device`` in ``dtype``, in eval mode. Torch's global RNG is left as it
    was, so a run with a teacher draws the same dropout masks whether it was cached or not."""
    tiny = is_tiny(config)
    steps = config.distill_teacher_steps
    if steps is None:
        steps = 200 if tiny else 30
    if steps < 1:
        raise UserError(f"--distill-teacher-steps: expected a positive number, got {steps}")
    path = teacher_cache_path(config, steps)
    lr = config.lr
    with torch.random.fork_rng(devices=[]):
        model = builtin_model(config, _quiet) if tiny else hf_model(config.base_folder, config.seed)
        if not tiny:
            from ..tuners import LoraConfig, get_peft_model

            lora = LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS)
            model = get_peft_model(model, lora).base_model.model  # the base, LoRA layers injected
            lr = 1e-3
        cached = False
        if path is not None and path.is_file():
            try:
                model.load_state_dict(load_tensors(path)[0])
                cached = True
            except Exception as err:  # a damaged cache file is rebuilt, never trusted
                log(f"ignoring unreadable cache file {path} ({err})")
        model.to(device=device, dtype=torch.float32)
        if not cached:
            fine_tune_fully(model, source, steps, config.batch_size, lr, config.seed, device)
            if path is not None:
                save_tensors(path, model.state_dict(), {"task": config.task, "steps": steps})
    model.to(dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    metric = source.evaluate(model, device)[source.metric_name]
    where = f"read from {path}" if cached else ("cached in " + str(path) if path is not None else "not cached")
    how = "fully fine-tuned" if tiny else "with a rank-16 LoRA trained"
    log(f"distill: teacher = the base model {how} for {steps} steps ({where}); its {source.metric_name}: {metric:.3f}")
    return model

"""The fine-tuning loop: AdamW (pyfastpeft's FusedAdamW) over the trainable tensors, progress, evaluation,
checkpoints, resume.

Determinism: the data stream is a ``torch.Generator`` seeded once, dropout draws from torch's global
generator, and a checkpoint stores both states with the trainable tensors, the optimizer state and the
step, so on the CPU a run interrupted at step k and resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import inspect
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from ..errors import UserError
from ..lm_loss import fused_head
from ..ops import fused_linear_cross_entropy
from ..optim import FusedAdamW
from .checkpoint import (
    CHECKPOINT_NAME,
    load_tensors,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
    rng_tensors,
    save_tensors,
    trainable_state,
)
from .data import batch_to
from .distributed import DistInfo, all_reduce_sum, any_rank, barrier, gather_full, wrap_model
from .progress import PeakMemory, Progress


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    seed: int
    out: Path
    device: torch.device
    eval_every: int = 0  # 0: about ten evaluations per run
    log_every: int = 0  # 0: about ten log lines per run
    stop_after: int | None = None
    resume: Path | None = None
    weight_decay: float = 0.0
    fsdp: bool = False  # FSDP2 instead of DDP when several processes run
    run: dict = field(default_factory=dict)  # settings a resumed run must share with the checkpoint
    summed_loss: Callable | None = None  # (model, logits, batch) -> summed token loss; None: cross-entropy
    # the same from the predicted positions' hidden states, when the head is fused (methods.TrainingParts)
    summed_loss_from_hidden: Callable | None = None
    make_optimizer: Callable | None = None  # (params, lr, weight_decay) -> optimizer; None: FusedAdamW


@dataclass
class TrainResult:
    completed: bool
    step: int
    history: dict
    tokens_per_second: float
    step_seconds: float
    memory: PeakMemory
    checkpoint: Path | None = None
    trainable: dict | None = None  # the trained tensors, whole (gathered under FSDP2)


def logits_at_labels(model: torch.nn.Module) -> bool:
    """Whether ``model`` can be asked for its logits at chosen positions only: a transformers causal LM
    (its forward takes ``logits_to_keep``) whose calls are not routed through virtual tokens."""
    if "prompt_encoder" in model._modules:  # prompt learning: positions shift by the virtual tokens
        return False
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_loss(
    model,
    batch,
    global_count: int,
    world_size: int,
    summed_loss: Callable | None = None,
    at_labels: bool = False,
    fused: tuple | None = None,
    summed_loss_from_hidden: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, this rank's share of the global mean loss).

    The summed token loss over the global count of predicted tokens makes the ranks' shares add up to
    the global mean whatever the padding; ``world_size ×`` undoes DDP's gradient averaging. A method's
    ``summed_loss(model, logits, batch)`` replaces the cross-entropy sum (distillation).

    ``at_labels`` (see :func:`logits_at_labels`): the head runs only at the positions where some row's
    next token is labelled, the same sum: on a prompt-and-answer task most positions are prompt, and
    each skipped one saves the head's product, its backward and a vocabulary-sized row of several
    tensors (at 49,152 words, 192 KiB a position each).

    ``fused`` (``(backbone, head)`` from :func:`pyfastpeft.lm_loss.fused_head`): the backbone runs, and only
    the labelled positions' hidden states go to the fused head and loss
    (:func:`pyfastpeft.ops.fused_linear_cross_entropy`), which never holds their logits whole; a method's
    ``summed_loss_from_hidden`` then replaces the cross-entropy sum (distillation)."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if fused is not None and (summed_loss is None or summed_loss_from_hidden is not None):
        backbone, head = fused
        targets = batch.labels[:, 1:]
        keep = targets != -100
        hidden = backbone(**inputs)[0][:, :-1][keep]
        if summed_loss_from_hidden is not None:
            total = summed_loss_from_hidden(hidden, head.weight, targets[keep], keep, inputs)
        else:
            total = fused_linear_cross_entropy(hidden, head.weight, targets[keep]) * keep.sum()
    elif summed_loss is not None:
        total = summed_loss(model, model(**inputs).logits, batch)
    else:
        targets = batch.labels[:, 1:]
        if at_labels:
            keep = (targets != -100).any(dim=0).nonzero().flatten()
            logits = model(**inputs, logits_to_keep=keep).logits  # the logits predicting targets[:, keep]
            targets = targets[:, keep]
        else:
            logits = model(**inputs).logits[:, :-1]
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
    share = total / global_count
    return share * world_size, share.detach()


class _InterruptFlag:
    """SIGINT sets a flag the loop checks after each step; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.set = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave the default handler
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _default_optimizer(fsdp: bool) -> Callable:
    """FusedAdamW (one kernel for every trainable tensor); torch's AdamW under FSDP2, whose sharded
    parameters are DTensors, which the fused op does not take."""
    if fsdp:
        return lambda ps, lr, wd: torch.optim.AdamW(ps, lr=lr, weight_decay=wd)
    return lambda ps, lr, wd: FusedAdamW(ps, lr=lr, weight_decay=wd)


def train(model: torch.nn.Module, source, s: TrainSettings, info: DistInfo, log=print) -> TrainResult:
    """Fine-tune the trainable tensors of ``model`` (already on ``s.device``) on ``source``."""
    if s.batch_size % info.world_size:
        raise UserError(
            f"--batch-size {s.batch_size} must be divisible by the number of processes "
            f"({info.world_size}); it is the global batch"
        )
    if s.steps < 1:
        raise UserError(f"--steps: expected a positive number, got {s.steps}")
    sharded = s.fsdp and info.enabled
    if sharded and (s.resume is not None or s.stop_after is not None):
        raise UserError("--fsdp: checkpoints (--resume, --stop-after) are not supported with FSDP2 yet")
    if not trainable_state(model):
        raise UserError("the method left no trainable parameters")
    ddp_model = wrap_model(model, info, s.device, fsdp=s.fsdp)
    at_labels = logits_at_labels(model)
    # the head fused into the loss, where the model allows it; DDP and FSDP2 must see the whole forward
    fused = None
    if not info.enabled and (s.summed_loss is None or s.summed_loss_from_hidden is not None):
        fused = fused_head(model)
    params = list(trainable_state(model).values())
    gen = torch.Generator().manual_seed(s.seed)
    make = s.make_optimizer or _default_optimizer(s.fsdp)
    opt = make(params, s.lr, s.weight_decay)
    history = {"step": [], "loss": [], "eval_step": [], "metric": [], "metric_name": source.metric_name}
    start = 0
    if s.resume is not None:
        start, history = _load_checkpoint(s.resume, model, opt, gen, s.run, log)
    else:
        model.eval()
        history["before"] = source.evaluate(model, s.device)
        history["eval_step"].append(0)
        history["metric"].append(history["before"][source.metric_name])
    if start >= s.steps:
        raise UserError(f"--steps {s.steps}: the checkpoint is already at step {start}; ask for more steps")
    eval_every = s.eval_every or max(1, s.steps // 10)
    progress = Progress(s.steps, start, "finetune", s.log_every or max(1, s.steps // 10), enabled=info.is_main)
    memory = PeakMemory(s.device)
    local = s.batch_size // info.world_size
    rows = slice(info.rank * local, (info.rank + 1) * local)
    step, completed, t0 = start, True, time.perf_counter()
    evaluation_seconds = 0.0
    model.train()
    with _InterruptFlag() as interrupt:
        for step in range(start + 1, s.steps + 1):
            full = source.batch(s.batch_size, gen)
            count = int((full.labels[:, 1:] != -100).sum())
            batch = batch_to(type(full)(full.input_ids[rows], full.labels[rows], full.attention_mask[rows]), s.device)
            loss, share = token_loss(
                ddp_model, batch, count, info.world_size, s.summed_loss, at_labels, fused, s.summed_loss_from_hidden
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            global_loss = all_reduce_sum(share.float(), info).item()
            history["step"].append(step)
            history["loss"].append(global_loss)
            progress.update(step, global_loss, int(full.attention_mask.sum()))
            if step % eval_every == 0 or step == s.steps:
                # evaluations are not training: their time stays out of tokens/s and ms/step
                t_eval = time.perf_counter()
                model.eval()
                metric = source.evaluate(model, s.device)[source.metric_name]
                model.train()
                eval_seconds = time.perf_counter() - t_eval
                progress.exclude(eval_seconds)
                evaluation_seconds += eval_seconds
                history["eval_step"].append(step)
                history["metric"].append(metric)
                progress.note(f"[eval] step {step}: {source.metric_name} {metric:.3f}")
            stop = step == s.stop_after or interrupt.set
            if any_rank(stop, info, s.device) and step < s.steps:
                completed = False
                break
    progress.close()
    elapsed = time.perf_counter() - t0 - evaluation_seconds
    model.eval()
    ckpt = None
    trained = gather_full(trainable_state(model))
    if info.is_main and not sharded:
        ckpt = save_checkpoint(s.out / CHECKPOINT_NAME, model, opt, gen, step, history, s.run)
    barrier(info)
    seconds = elapsed / max(1, step - start)
    return TrainResult(completed, step, history, progress.tokens_per_second, seconds, memory, ckpt, trained)


def save_checkpoint(path: Path, model, opt, gen, step: int, history: dict, run: dict) -> Path:
    tensors = {f"model.{k}": v for k, v in trainable_state(model).items()}
    opt_tensors, opt_meta = optimizer_to_flat(opt)
    tensors.update(opt_tensors)
    tensors.update(rng_tensors(gen))
    return save_tensors(
        path,
        tensors,
        {
            "step": step,
            "history": history,
            "optimizer": opt_meta,
            "run": run,
            "format": "pyfastpeft-checkpoint-1",
        },
    )


def _load_checkpoint(path: Path, model, opt, gen, run: dict, log) -> tuple[int, dict]:
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        tensors, meta = load_tensors(path)
    except (SafetensorError, json.JSONDecodeError, OSError) as err:
        raise UserError(f"--resume: {path} is not a readable checkpoint ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != "pyfastpeft-checkpoint-1":
        raise UserError(f"--resume: {path} is not a pyfastpeft checkpoint")
    missing = [k for k in ("run", "step", "history", "optimizer") if k not in meta]
    if missing or not isinstance(meta["run"], dict):
        raise UserError(f"--resume: {path} is a damaged checkpoint (metadata without {', '.join(missing) or 'run'})")
    differ = sorted(k for k in set(run) | set(meta["run"]) if run.get(k) != meta["run"].get(k))
    if differ:
        detail = ", ".join(f"{k}: checkpoint {meta['run'].get(k)!r} vs now {run.get(k)!r}" for k in differ)
        raise UserError(f"--resume: the checkpoint was made with other settings ({detail})")
    state = trainable_state(model)
    saved = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    if set(saved) != set(state):
        raise UserError(
            f"--resume: trainable tensors differ from the checkpoint's ({sorted(set(saved) ^ set(state))[:5]} ...)"
        )
    with torch.no_grad():
        for name, p in state.items():
            p.copy_(saved[name])
    optimizer_from_flat(opt, tensors, meta["optimizer"])
    restore_rng(tensors, gen)
    log(f"resumed from {path} at step {meta['step']}")
    return meta["step"], meta["history"]

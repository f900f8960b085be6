"""``pyfastpeft finetune``: base model → PEFT method → training → adapter, curves and a summary."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import UserError
from ..tuners import trainable_parameters
from .allocator import keep_freed_memory
from .base import DTYPES, is_tiny, load_base, resolve_defaults, resolve_device
from .checkpoint import CHECKPOINT_NAME, RUN_INFO_NAME, atomic_write_text, save_tensors
from .config import FinetuneConfig
from .distributed import DistInfo, barrier, gather_full, init_distributed, shutdown
from .methods import METHOD_KNOBS, METHODS, apply_method, training_parts
from .plot import write_curves
from .trainer import TrainSettings, train

INTERRUPTED = 130  # the shell's code for a Ctrl-C exit
# the settings that determine the built-in base model (see base.builtin_config / builtin_model)
BUILTIN_KEYS = ["size", "length", "max_length", "pretrain_task", "pretrain_steps", "data"]


def run_settings(config: FinetuneConfig) -> dict:
    """What a resumed run must share with its checkpoint (``--steps`` may grow)."""
    keys = [
        "method",
        "model",
        "data",
        "task",
        "held_out",
        "size",
        "length",
        "max_length",
        "pretrain_task",
        "pretrain_steps",
        "batch_size",
        "lr",
        "seed",
        "dtype",
        *METHOD_KNOBS,
    ]
    return {k: getattr(config, k) for k in keys}


def run_info(config: FinetuneConfig) -> dict:
    """What rebuilds the adapted model from its base: the method, its knobs, the seed, and the base
    (a Hugging Face folder, or the built-in model's settings)."""
    tiny = is_tiny(config)
    return {
        "method": config.method,
        "base_model": f"builtin:{config.size}" if tiny else str(config.base_folder or config.model),
        "builtin": {k: getattr(config, k) for k in BUILTIN_KEYS} if tiny else None,
        "task": None if config.data else config.task,
        "seed": config.seed,
        **{k: getattr(config, k) for k in METHOD_KNOBS},
    }


def run_finetune(config: FinetuneConfig, log=print, keep_model: bool = False) -> dict:
    """Train and write ``config.out``; returns the summary (also written as ``summary.json``), with the
    trained model under ``"model"`` and the settings the run resolved (a FinetuneConfig) under
    ``"config"`` when ``keep_model``."""
    config = resolve_defaults(config)
    device = resolve_device(config.device)
    if config.keep_freed_memory and not keep_freed_memory():
        raise UserError("--keep-freed-memory: needs glibc's malloc (Linux with glibc); this C library has no mallopt")
    info = init_distributed(device)
    try:
        summary, model, config = _run(config, device, info, log if info.is_main else (lambda *a, **k: None))
        if keep_model:
            summary["model"] = model
            summary["config"] = config
        del model  # (unless kept) freed before the process group it communicates through is destroyed
        return summary
    finally:
        shutdown(info)


def _run(
    config: FinetuneConfig, device: torch.device, info: DistInfo, log
) -> tuple[dict, torch.nn.Module, FinetuneConfig]:
    out = Path(config.out)
    if config.method not in METHODS:  # before any slow work
        raise UserError(f"--method: unknown method {config.method!r}; known methods: {', '.join(sorted(METHODS))}")
    resume = None
    if config.resume is not None:
        resume = Path(config.resume) if config.resume else out / CHECKPOINT_NAME
        if not resume.is_file():
            raise UserError(f"--resume: no checkpoint at {resume}")
    base = load_base(config, log)
    config = replace(config, task=base.task, base_folder=str(base.folder) if base.folder is not None else None)
    log(base.description)
    log(f"task: {base.source.description}")
    model = base.model
    torch.manual_seed(config.seed)  # the same RNG state after the base model, cached or freshly pretrained
    base_keys = set(model.state_dict())
    adapted = apply_method(config.method, model, config)  # adapts `model` in place; a PeftModel for lora
    model.to(device=device, dtype=DTYPES[config.dtype])
    parts = training_parts(config.method, adapted, config, base.source, device, log)
    trainable, total = trainable_parameters(model)
    report = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    log(f"method: {config.method}; {report}")
    if info.enabled:
        how = "FSDP2, one sharded unit per decoder block" if config.fsdp else "DDP"
        log(f"distributed: {info.world_size} processes ({how}; gradients reduced for trainable tensors only)")
    settings = TrainSettings(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        out=out,
        device=device,
        # answers by generation are the slow metric: by default only before and after training
        eval_every=config.eval_every or (config.steps if getattr(base.source, "generates", False) else 0),
        log_every=config.log_every,
        stop_after=config.stop_after,
        resume=resume,
        fsdp=config.fsdp,
        run=run_settings(config),
        summed_loss=parts.summed_loss,
        summed_loss_from_hidden=parts.summed_loss_from_hidden,
        make_optimizer=parts.optimizer,
    )
    result = train(model, base.source, settings, info, log)
    hist = result.history
    metric = hist["metric_name"]
    summary = {
        "method": config.method,
        "completed": result.completed,
        "step": result.step,
        "metric_name": metric,
        "before": hist["before"][metric],
        "after": hist["metric"][-1],
        "loss_first": hist["loss"][0],
        "loss_last": hist["loss"][-1],
        "trainable_params": trainable,
        "total_params": total,
        "tokens_per_second": result.tokens_per_second,
        "step_seconds": result.step_seconds,
        "memory": result.memory.summary(),
        "world_size": info.world_size,
        "model": base.description,
        "task": base.source.description,
    }
    shown = _side_by_side(base.source)
    if shown:
        summary["examples"] = shown
    if not result.completed:
        log(
            f"interrupted at step {result.step}/{config.steps}: checkpoint saved to {result.checkpoint}; "
            f"continue with the same command and --resume"
            if result.checkpoint
            else f"interrupted at step {result.step}/{config.steps}; no checkpoint (not supported with --fsdp)"
        )
        summary["exit_code"] = INTERRUPTED
        return summary, model, config
    sharded = config.fsdp and info.enabled
    # under FSDP2 the model holds shards: every rank takes part in gathering the whole tensors
    state = gather_full(model.state_dict()) if sharded else model.state_dict()
    if info.is_main:
        # tensors the method added that do not train (a sparse delta's indices) are part of the adapter
        added = {k: v for k, v in state.items() if k not in base_keys and k not in result.trainable}
        tensors = {**result.trainable, **added}
        saver = _unsharded(config, tensors) if sharded else adapted
        summary.update(_write_outputs(out, tensors, sorted(added), config, hist, metric, log, saver))
        atomic_write_text(out / "summary.json", json.dumps({**summary, "history": hist}, indent=1) + "\n")
    barrier(info)
    log(f"loss: {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}")
    log(f"{base.source.description.split(':')[0]} {metric}: {summary['before']:.3f} -> {summary['after']:.3f}")
    log(report)
    log(
        f"{result.tokens_per_second:,.0f} tokens/s, {1e3 * result.step_seconds:.1f} ms/step, {result.memory.describe()}"
    )
    for i, ex in enumerate(shown or [], start=1):
        log(f"held-out example {i}: {ex['prompt']}")
        log(f"    expected: {ex['expected']:<14s} base: {ex['base']!r:<32s} tuned: {ex['tuned']!r}")
    summary["exit_code"] = 0
    return summary, model, config


def _side_by_side(source, count: int = 3) -> list[dict]:
    """The first held-out prompts with the base model's and the tuned model's answers (from the
    evaluations before and after training), for a source that answers by generation."""
    first, last = getattr(source, "first_answers", None), getattr(source, "last_answers", None)
    if not first or not last:
        return []
    return [
        {"prompt": prompt.splitlines()[-1], "expected": want, "base": a, "tuned": b}
        for (prompt, want), a, b in zip(source.held_out[:count], first, last, strict=False)
    ]


def _unsharded(config: FinetuneConfig, tensors: dict) -> torch.nn.Module:
    """The adapted model rebuilt unsharded, holding the trained tensors (by their names in the model),
    for the writers that read the model itself (save_pretrained's PEFT layout)."""
    base = load_base(config, lambda *a, **k: None)
    torch.manual_seed(config.seed)
    adapted = apply_method(config.method, base.model, config)
    missing = set(tensors) - set(base.model.state_dict())
    if missing:
        raise RuntimeError(f"the rebuilt model lacks the trained tensors {sorted(missing)[:5]}")
    base.model.load_state_dict(tensors, strict=False)
    return adapted


def _write_outputs(
    out: Path, tensors: dict, buffers: list, config: FinetuneConfig, hist: dict, metric: str, log, adapted
) -> dict:
    info = run_info(config)
    if hasattr(adapted, "save_pretrained") and hasattr(adapted, "peft_config"):
        # Hugging Face PEFT's layout: adapter_model.safetensors + adapter_config.json
        adapted.save_pretrained(out)
        atomic_write_text(out / RUN_INFO_NAME, json.dumps(info, indent=2) + "\n")
        adapter = out / "adapter_model.safetensors"
        log(f"adapter saved to {out} (PEFT layout)")
    else:
        # The method's tensors by their names in the adapted model, plus how to rebuild it.
        adapter_config = {**info, "buffers": buffers}
        adapter = save_tensors(out / "adapter.safetensors", tensors, adapter_config)
        atomic_write_text(out / "adapter_config.json", json.dumps(adapter_config, indent=2) + "\n")
        log(f"adapter written to {adapter} (+ adapter_config.json)")
    paths, note = write_curves(out, hist, metric)
    log("curves written to " + ", ".join(str(p) for p in paths))
    if note:
        log(note + "; the curves are in the CSV")
    return {"adapter": str(adapter), "curves": [str(p) for p in paths]}

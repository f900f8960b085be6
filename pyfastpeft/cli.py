"""The ``pyfastpeft`` command (also ``python -m pyfastpeft``)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .models import TASKS, TinyLlamaConfig, TinyLlamaForCausalLM, answer_accuracy, make_batch
from .tuners import LoraConfig, LoraLinear, get_peft_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train(model, task, steps, batch_size, length, lr, generator, log_every, label):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vocab = model.config.vocab_size
    losses = []
    t0 = time.perf_counter()
    tokens = 0
    for step in range(1, steps + 1):
        batch = make_batch(task, batch_size, length, vocab, generator)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens += batch.input_ids.numel()
        if log_every and (step % log_every == 0 or step == steps):
            rate = tokens / (time.perf_counter() - t0)
            print(f"[{label}] step {step:4d}/{steps}  loss {loss.item():.4f}  {rate:,.0f} tokens/s", flush=True)
    return losses


def cmd_finetune(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = TinyLlamaConfig()
    model = TinyLlamaForCausalLM(cfg)
    print(
        f"built-in model: TinyLlama, {model.num_parameters():,} parameters, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}"
    )
    if args.pretrain_steps:
        print(f"pretraining on the built-in '{args.pretrain_task}' task ({args.pretrain_steps} steps, full model)")
        _train(
            model,
            args.pretrain_task,
            args.pretrain_steps,
            args.batch_size,
            args.length,
            3e-3,
            gen,
            max(1, args.pretrain_steps // 4),
            "pretrain",
        )
    eval_batch = make_batch(args.task, 256, args.length, cfg.vocab_size, torch.Generator().manual_seed(args.seed + 1))
    model.eval()
    before = answer_accuracy(model, eval_batch)
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=LLAMA_TARGETS)
    model = get_peft_model(model, config)
    adapted = sum(1 for m in model.modules() if isinstance(m, LoraLinear))
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"LoRA r={args.r} alpha={args.alpha} dropout={args.dropout} on {adapted} linear layers: "
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
    model.train()
    losses = _train(
        model,
        args.task,
        args.steps,
        args.batch_size,
        args.length,
        args.lr,
        gen,
        max(1, args.steps // 10),
        "finetune",
    )
    model.eval()
    after = answer_accuracy(model, eval_batch)
    print(f"loss: {losses[0]:.4f} -> {min(losses[-5:]):.4f}")
    print(
        f"'{args.task}' answer token accuracy: {before[0]:.3f} -> {after[0]:.3f}; "
        f"exact match: {before[1]:.3f} -> {after[1]:.3f}"
    )
    if args.out:
        model.save_pretrained(args.out)
        print(f"adapter saved to {args.out} (adapter_model.safetensors + adapter_config.json, PEFT layout)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyfastpeft", description="Fast parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="LoRA fine-tune of the built-in model on a built-in task")
    ft.add_argument("--task", choices=TASKS, default="reverse")
    ft.add_argument("--pretrain-task", choices=TASKS, default="copy")
    ft.add_argument("--pretrain-steps", type=int, default=300)
    ft.add_argument("--steps", type=int, default=200)
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--length", type=int, default=8, help="symbols per example")
    ft.add_argument("--lr", type=float, default=3e-3)
    ft.add_argument("--r", type=int, default=8)
    ft.add_argument("--alpha", type=float, default=16.0)
    ft.add_argument("--dropout", type=float, default=0.05)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument(
        "--out", metavar="DIR", default=None, help="save the trained adapter here (Hugging Face PEFT layout)"
    )
    ft.set_defaults(func=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"pyfastpeft: error: {err}", file=sys.stderr)
        return 2

"""The PEFT methods the command line can apply, by name.

Each method is ``apply(model, args) -> model``: it decides which tensors train (freezing the rest) and
may replace modules. ``args`` is the parsed command line, so a method reads its own knobs from it
(``args.r``, ``args.alpha``, ``args.target_modules``, ``args.train_last_layers``, ...). A new method
registers itself with :func:`register` and its knobs with ``add_method_arguments``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from ..tuners import LoraConfig, get_peft_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# the flags add_method_arguments defines; a checkpoint records them so --resume can check them
METHOD_KNOBS = ["target_modules", "r", "alpha", "dropout", "rslora", "train_last_layers"]
METHOD_KNOBS += ["num_virtual_tokens", "encoder_hidden_size"]  # prompt, ptuning, prefix

MethodFn = Callable[[nn.Module, argparse.Namespace], nn.Module]
METHODS: dict[str, MethodFn] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str) -> Callable[[MethodFn], MethodFn]:
    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        DESCRIPTIONS[name] = description
        return fn

    return wrap


def apply_method(name: str, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    if name not in METHODS:
        raise ValueError(f"--method: unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](model, args)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("method knobs")
    g.add_argument(
        "--target-modules",
        default=",".join(LLAMA_TARGETS),
        help="comma-separated module-name suffixes (lora, bitfit) (default: %(default)s)",
    )
    g.add_argument("--r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / r (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: %(default)s)")
    g.add_argument("--rslora", action="store_true", help="LoRA scaling alpha / sqrt(r)")
    g.add_argument(
        "--train-last-layers",
        type=int,
        default=1,
        help="freeze: how many of the last decoder blocks train (default: %(default)s)",
    )
    g.add_argument(
        "--num-virtual-tokens",
        type=int,
        default=8,
        help="prompt, ptuning, prefix: virtual tokens (prompt length / prefix length) (default: %(default)s)",
    )
    g.add_argument(
        "--encoder-hidden-size",
        type=int,
        default=None,
        help="ptuning: prompt-encoder MLP width; prefix: reparameterisation MLP width, which turns "
        "prefix_projection on (default: the model's hidden size; prefix: no projection)",
    )


def _targets(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in str(args.target_modules).split(",") if t.strip()]


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


@register("lora", "low-rank update B·A on the target linears (fused pyfastpeft op)")
def apply_lora(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Adapts ``model`` in place through :func:`pyfastpeft.get_peft_model` and returns the PeftModel
    (which saves the adapter in Hugging Face PEFT's layout)."""
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        use_rslora=args.rslora,
        target_modules=_targets(args),
    )
    return get_peft_model(model, config)


@register("bitfit", "biases only; target linears without a bias get a zero-initialised one")
def apply_bitfit(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    # Llama-shaped models have no biases at all; a zero bias keeps the model's function unchanged at
    # the start and gives BitFit its usual parameters (one vector per linear layer).
    _freeze(model)
    targets = _targets(args)
    chosen = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    ]
    if not chosen:
        raise ValueError(f"--target-modules {targets} matched no nn.Linear in {type(model).__name__}")
    for _, m in chosen:
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
    return model


@register("full", "every parameter trains (the baseline PEFT is measured against)")
def apply_full(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the longest ``nn.ModuleList`` (``model.layers`` in Llama)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to freeze or train")
    return max(lists, key=lambda nm: len(nm[1]))


@register("freeze", "layer freezing: only the last --train-last-layers decoder blocks train")
def apply_freeze(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    _freeze(model)
    name, blocks = decoder_blocks(model)
    k = args.train_last_layers
    if not 1 <= k <= len(blocks):
        raise ValueError(f"--train-last-layers: expected 1..{len(blocks)} (blocks in {name}), got {k}")
    for block in list(blocks)[-k:]:
        for p in block.parameters():
            p.requires_grad_(True)
    return model


# ---- prompt learning: prompt tuning, P-tuning, prefix tuning -------------------------------------
def _prompt_learning(model: nn.Module, config) -> nn.Module:
    from ..tuners.prompt_learning import route_base_calls

    # the training loop calls the base model: route those calls through the virtual tokens
    return route_base_calls(get_peft_model(model, config))


@register("prompt", "prompt tuning: --num-virtual-tokens learned input embeddings prepended to the input")
def apply_prompt(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from ..tuners import PromptTuningConfig

    return _prompt_learning(model, PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens))


@register("ptuning", "P-tuning: virtual tokens produced by an MLP prompt encoder (--encoder-hidden-size)")
def apply_ptuning(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from ..tuners import PromptEncoderConfig

    config = PromptEncoderConfig(
        num_virtual_tokens=args.num_virtual_tokens, encoder_hidden_size=args.encoder_hidden_size
    )
    return _prompt_learning(model, config)


@register(
    "prefix", "prefix tuning: learned per-layer key/value prefixes (MLP-reparameterised with --encoder-hidden-size)"
)
def apply_prefix(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from ..tuners import PrefixTuningConfig

    config = PrefixTuningConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        encoder_hidden_size=args.encoder_hidden_size,
        prefix_projection=args.encoder_hidden_size is not None,
    )
    return _prompt_learning(model, config)

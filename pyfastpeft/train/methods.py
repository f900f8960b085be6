"""The PEFT methods the command line can apply, by name.

Each method is ``apply(model, args) -> model``: it decides which tensors train (freezing the rest) and
may replace modules. ``args`` is the parsed command line, so a method reads its own knobs from it
(``args.r``, ``args.alpha``, ``args.target_modules``, ``args.train_last_layers``, ...). A new method
registers itself with :func:`register` and its knobs with ``add_method_arguments``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from torch import nn

from ..tuners import LoraConfig, get_peft_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# the flags add_method_arguments defines; a checkpoint records them so --resume can check them
METHOD_KNOBS = ["target_modules", "r", "alpha", "dropout", "rslora", "train_last_layers", "freeze_first", "train_regex"]

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
        "--freeze-first",
        type=int,
        default=None,
        help="freeze: freeze the first N decoder blocks and train the others (replaces --train-last-layers)",
    )
    g.add_argument(
        "--train-regex",
        default=None,
        help="freeze: train the parameters whose full name matches this regex (within the blocks "
        "--freeze-first trains, if given; replaces --train-last-layers)",
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


# ---- BitFit and layer freezing, through their PEFT configs ------------------------------------------
@register("bitfit", "biases only (BitFitConfig); target linears without a bias get a zero-initialised one")
def apply_bitfit(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The target linears become BiasOnlyLinear (the bias-gradient op saves no input activation); layer
    norm biases train too (Llama's RMSNorm has none). Returns the BitFitModel."""
    from ..tuners import BitFitConfig

    try:
        return get_peft_model(model, BitFitConfig(target_modules=_targets(args)))
    except ValueError as err:
        raise ValueError(f"--target-modules: {err}") from None


@register("freeze", "layer freezing (LayerFreezeConfig): --train-last-layers, --freeze-first or --train-regex")
def apply_freeze(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from ..tuners import LayerFreezeConfig

    path, blocks = decoder_blocks(model)
    n = len(blocks)
    if args.freeze_first is not None:
        if not 0 <= args.freeze_first < n:
            raise ValueError(f"--freeze-first: expected 0..{n - 1} (blocks in {path}), got {args.freeze_first}")
        selection = {"layer_range": [args.freeze_first, None]}
    elif args.train_regex is None:
        if not 1 <= args.train_last_layers <= n:
            raise ValueError(f"--train-last-layers: expected 1..{n} (blocks in {path}), got {args.train_last_layers}")
        selection = {"last_layers": args.train_last_layers}
    else:
        selection = {}
    if args.train_regex is not None:
        selection["trainable_regex"] = args.train_regex
    try:
        config = LayerFreezeConfig(layers_pattern=path, **selection)
        return get_peft_model(model, config)
    except ValueError as err:
        flag = "--train-regex" if "trainable_regex" in str(err) else "--method freeze"
        raise ValueError(f"{flag}: {err}") from None

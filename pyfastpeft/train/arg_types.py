"""argparse ``type=`` parsers that refuse out-of-range values with a message argparse puts after the flag.

They also check config-file values (``--config``), which go through the same parsers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

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

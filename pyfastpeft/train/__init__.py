"""Training machinery behind the command line: data, PEFT methods by name, the loop, checkpoints."""

from .config import BenchConfig, CompareConfig, FinetuneConfig
from .methods import METHODS, apply_method, register

__all__ = ["METHODS", "BenchConfig", "CompareConfig", "FinetuneConfig", "apply_method", "register"]

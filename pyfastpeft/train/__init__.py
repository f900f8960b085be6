"""Training machinery behind the command line: data, PEFT methods by name, the loop, checkpoints."""

from .methods import METHODS, apply_method, register

__all__ = ["METHODS", "apply_method", "register"]

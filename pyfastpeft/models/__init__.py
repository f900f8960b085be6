"""The small built-in model and data used by the command line and the tests."""

from .data import TASKS, Batch, answer_accuracy, make_batch
from .llama import CausalLMOutput, TinyLlamaConfig, TinyLlamaForCausalLM

__all__ = [
    "TASKS",
    "Batch",
    "CausalLMOutput",
    "TinyLlamaConfig",
    "TinyLlamaForCausalLM",
    "answer_accuracy",
    "make_batch",
]

"""Prompt tuning, P-tuning and prefix tuning: their configs and the one tuner that adds virtual tokens;
the encoders are :mod:`pyfastpeft.nn.prompt_encoders`."""

from .config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig
from .model import PromptLearningModel, route_base_calls

__all__ = [
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptLearningModel",
    "PromptTuningConfig",
    "route_base_calls",
]

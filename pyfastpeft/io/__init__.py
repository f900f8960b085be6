"""Adapters on disk: Hugging Face PEFT's layout (safetensors + adapter_config.json), atomic writes."""

from .adapter_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_state_dict,
    load_adapter,
    load_into_new_model,
    read_adapter,
    save_adapters,
    serialize_adapter,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "adapter_state_dict",
    "load_adapter",
    "load_into_new_model",
    "read_adapter",
    "save_adapters",
    "serialize_adapter",
]

"""Adapters on disk: Hugging Face PEFT's layout (safetensors + adapter_config.json), atomic writes."""

from .adapter_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_state_dict,
    check_and_copy,
    find_adapter_dir,
    read_adapter,
    save_adapters,
    serialize_adapter,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "adapter_state_dict",
    "check_and_copy",
    "find_adapter_dir",
    "read_adapter",
    "save_adapters",
    "serialize_adapter",
]

"""The one registry of PEFT methods, by ``peft_type``: the config class, the tuner class
(:class:`~pyfastpeft.tuners.base.BaseTuner` subclass) and the command-line names that apply it.

``get_peft_model(model, config)`` picks the tuner from the config's class, ``PeftModel.from_pretrained``
from the ``peft_type`` written in ``adapter_config.json``, and ``pyfastpeft finetune --method`` from a
command-line name; the training package attaches to each command-line name the function that builds the
config from its flags (:func:`register_cli_method`).

A new method registers here once, below, with :func:`register_peft_type`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .adapter.config import AdapterConfig
from .adapter.model import AdapterModel
from .bitfit.config import BitFitConfig
from .bitfit.model import BitFitModel
from .ia3.config import IA3Config
from .ia3.model import IA3Model
from .layer_freeze.config import LayerFreezeConfig
from .layer_freeze.model import LayerFreezeModel
from .lora.config import LoraConfig
from .lora.model import LoraModel
from .prompt_learning.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from .prompt_learning.model import PromptLearningModel
from .sparse.config import SparseConfig
from .sparse.model import SparseModel


@dataclass(frozen=True)
class PeftMethod:
    peft_type: str
    config_cls: type
    model_cls: type
    cli_names: tuple[str, ...] = ()


_BY_TYPE: dict[str, PeftMethod] = {}
_CLI_APPLY: dict[str, Callable] = {}
_CLI_DESCRIPTION: dict[str, str] = {}
# command-line methods outside the PEFT frame: no adapter, every parameter trains (the baseline)
WITHOUT_ADAPTER = ("full",)

# name -> apply function and name -> description, filled by register_cli_method (read-only views)
cli_methods = MappingProxyType(_CLI_APPLY)
cli_descriptions = MappingProxyType(_CLI_DESCRIPTION)


def register_peft_type(peft_type: str, config_cls: type, model_cls: type, cli_names: tuple[str, ...] = ()) -> None:
    """Make ``config_cls`` (a dataclass with ``peft_type``, ``validate``, ``to_dict``, ``from_dict``) build
    a ``model_cls`` (a BaseTuner) in :func:`get_peft_model`, and ``cli_names`` name it on the command line."""
    taken = {n: m.peft_type for m in _BY_TYPE.values() if m.peft_type != peft_type for n in m.cli_names}
    clash = [n for n in cli_names if n in taken or n in WITHOUT_ADAPTER]
    if clash:
        raise ValueError(f"cli_names: {clash} already name another method")
    _BY_TYPE[peft_type] = PeftMethod(peft_type, config_cls, model_cls, tuple(cli_names))


def peft_types() -> list[str]:
    return sorted(_BY_TYPE)


def methods() -> list[PeftMethod]:
    return [_BY_TYPE[t] for t in peft_types()]


def model_class_for(config: Any) -> type:
    for method in _BY_TYPE.values():
        if type(config) is method.config_cls:
            return method.model_cls
    known = ", ".join(m.config_cls.__name__ for m in _BY_TYPE.values())
    raise ValueError(f"peft_config: expected one of {known}, got {type(config).__name__}")


def classes_for_type(peft_type: Any, source: str = "adapter_config.json") -> tuple[type, type]:
    if not isinstance(peft_type, str) or peft_type not in _BY_TYPE:
        raise ValueError(f"{source}: peft_type {peft_type!r} is not supported; known: {', '.join(peft_types())}")
    method = _BY_TYPE[peft_type]
    return method.config_cls, method.model_cls


def config_from_dict(d: dict[str, Any], source: str = "adapter_config.json") -> Any:
    """The config an ``adapter_config.json`` dict describes (``peft_type`` picks the class)."""
    config_cls, _ = classes_for_type(d.get("peft_type", "LORA"), source)
    return config_cls.from_dict(d)


def cli_peft_type(name: str) -> str | None:
    """The ``peft_type`` a command-line method name applies (None for a method without adapter)."""
    for method in _BY_TYPE.values():
        if name in method.cli_names:
            return method.peft_type
    if name in WITHOUT_ADAPTER:
        return None
    known = sorted([n for m in _BY_TYPE.values() for n in m.cli_names] + list(WITHOUT_ADAPTER))
    raise ValueError(f"--method: unknown method {name!r}; known methods: {', '.join(known)}")


def register_cli_method(name: str, description: str, apply: Callable) -> None:
    """Attach ``apply(model, options) -> model`` to the command-line name ``name``, which a registered
    method must list in its ``cli_names`` (or be one of :data:`WITHOUT_ADAPTER`)."""
    cli_peft_type(name)
    _CLI_APPLY[name] = apply
    _CLI_DESCRIPTION[name] = description


# ---- the built-in methods ----------------------------------------------------------------------------
register_peft_type("LORA", LoraConfig, LoraModel, ("lora", "dora", "qat-lora", "distill"))
register_peft_type("IA3", IA3Config, IA3Model, ("ia3",))
register_peft_type("BOTTLENECK", AdapterConfig, AdapterModel, ("adapter",))
register_peft_type("PROMPT_TUNING", PromptTuningConfig, PromptLearningModel, ("prompt",))
register_peft_type("P_TUNING", PromptEncoderConfig, PromptLearningModel, ("ptuning",))
register_peft_type("PREFIX_TUNING", PrefixTuningConfig, PromptLearningModel, ("prefix",))
register_peft_type("BITFIT", BitFitConfig, BitFitModel, ("bitfit",))
register_peft_type("LAYER_FREEZE", LayerFreezeConfig, LayerFreezeModel, ("freeze",))
register_peft_type("SPARSE", SparseConfig, SparseModel, ("sparse",))

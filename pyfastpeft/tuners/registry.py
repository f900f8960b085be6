"""PEFT methods by ``peft_type``: the config class and the model class that applies it.

LoRA is :class:`~pyfastpeft.tuners.PeftModel`; every other method is a
:class:`~pyfastpeft.tuners.base.TunerModel` subclass that registers itself here, so
``get_peft_model(model, config)`` and ``PeftModel.from_pretrained(model, dir)`` pick the right class from
the config's type or from the ``peft_type`` written in ``adapter_config.json``.
"""

from __future__ import annotations

from typing import Any

_BY_TYPE: dict[str, tuple[type, type]] = {}


def register_peft_type(peft_type: str, config_cls: type, model_cls: type) -> None:
    """Make ``config_cls`` (a dataclass with ``peft_type``, ``validate``, ``to_dict``, ``from_dict``) build
    a ``model_cls`` in :func:`get_peft_model`."""
    _BY_TYPE[peft_type] = (config_cls, model_cls)


def peft_types() -> list[str]:
    return sorted(_BY_TYPE)


def model_class_for(config: Any) -> type:
    for config_cls, model_cls in _BY_TYPE.values():
        if type(config) is config_cls:
            return model_cls
    known = ", ".join(c.__name__ for c, _ in _BY_TYPE.values())
    raise ValueError(f"peft_config: expected one of {known}, got {type(config).__name__}")


def classes_for_type(peft_type: Any, source: str = "adapter_config.json") -> tuple[type, type]:
    if not isinstance(peft_type, str) or peft_type not in _BY_TYPE:
        raise ValueError(f"{source}: peft_type {peft_type!r} is not supported; known: {', '.join(peft_types())}")
    return _BY_TYPE[peft_type]


def config_from_dict(d: dict[str, Any], source: str = "adapter_config.json") -> Any:
    """The config an ``adapter_config.json`` dict describes (``peft_type`` picks the class)."""
    config_cls, _ = classes_for_type(d.get("peft_type", "LORA"), source)
    return config_cls.from_dict(d)

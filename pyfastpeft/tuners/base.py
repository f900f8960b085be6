"""BaseTuner: what one PEFT method supplies to the one frame, :class:`~pyfastpeft.tuners.PeftModel`.

The frame owns the adapter lifecycle (add, delete, set, disable, merge, unload, save, load) and the
modules_to_save copies, once for every method. A method is a package ``tuners/<method>/`` with its
config (``config.py``), the layer it injects (``layer.py``) and a :class:`BaseTuner` subclass
(``model.py``) registered by ``peft_type`` in :mod:`pyfastpeft.tuners.registry`. The tuner is the PEFT
model's ``base_model`` and holds the user's model as ``.model``, so parameter paths read
``base_model.model.<path>`` as in Hugging Face PEFT.

Hooks (``name`` is an adapter name):
    _inject(name, config)      add the adapter's modules/parameters; validate everything before changing
                               the model, so a bad config leaves it untouched
    _remove(name)              take the adapter out again
    _activate(names)           make forward use ``names`` (empty: the base model alone)
    adapter_tensors(name)      the adapter's live tensors under their file keys (what is saved/loaded)
optional:
    adapter_parameters(name)   what trains (default: the Parameters among adapter_tensors)
    _merge(names) / _unmerge() / _unload()   for methods that fold into the base weights
    _disable() / _enable()     switch every adapter off and on again (default: unmerge, activate none)
    delta_weights(name)        ``{path: ΔW}`` per base matrix that merging changes, for the report
    adapter_matrices(name)     the report's rows: (path, ΔW, rank budget r or 0, low-rank factors or None)
    config_for_loading(config, tensors, source)   the config to inject before a file's tensors are copied
    _prepare_load(name) / _finish_load(name, file_config)   around copying a file's tensors in
    also_loadable(name)        further tensors a file of this method may hold (PEFT writes some)
    mixed_batch_forward(...)   one adapter per sequence in one batch, where the method supports it
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .matching import find_modules_to_save


class BaseTuner(nn.Module):
    """One method's adapters on ``model``. Attributes the tuner lacks are the model's."""

    # layer classes of this method: name matching does not descend into them
    layer_types: tuple[type, ...] = ()
    # where PEFT keys this method's modules_to_save copies: ``<prefix><path>.<param>``
    saved_module_prefix = "base_model.model."

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        self.active_adapter: str | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def active_peft_config(self) -> Any:
        return self.peft_config[self.active_adapter]

    def saved_module_paths(self, config: Any) -> list[str]:
        """Paths of the modules ``config.modules_to_save`` names, plus the head its ``task_type`` implies
        (added to the config, as PEFT does) and the head of a task model (``with_task_head``), which
        trains with every method."""
        given = list(getattr(config, "modules_to_save", None) or [])
        extra = [n for n in getattr(self.model, "task_head_names", ()) if n not in given]
        probe = _SaveProbe(given + extra, getattr(config, "task_type", None), getattr(config, "_from_file", False))
        paths = find_modules_to_save(self.model, probe, self.layer_types)
        if probe.modules_to_save and hasattr(config, "modules_to_save"):
            config.modules_to_save = [n for n in probe.modules_to_save if n not in extra] or config.modules_to_save
        return paths

    # ---- hooks ------------------------------------------------------------------------------------
    def _inject(self, name: str, config: Any) -> None:
        raise NotImplementedError

    def _remove(self, name: str) -> None:
        raise NotImplementedError

    def _activate(self, names: list[str]) -> None:
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> Iterable[nn.Parameter]:
        return [t for t in self.adapter_tensors(name).values() if isinstance(t, nn.Parameter)]

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        return {}

    def adapter_matrices(self, name: str) -> list[tuple[str, torch.Tensor, int, Any]]:
        return [(path, delta, 0, None) for path, delta in self.delta_weights(name).items()]

    def _merge(self, names: list[str]) -> None:
        raise ValueError(f"{type(self).__name__}: this method cannot be merged into the base weights")

    def _unmerge(self) -> None:
        pass

    def _disable(self) -> None:
        self._unmerge()
        self._activate([])

    def _enable(self) -> None:
        self._activate(self.active_adapters)

    def _unload(self) -> nn.Module:
        for n in list(self.peft_config):
            self._remove(n)
        return self.model

    @classmethod
    def config_for_loading(cls, config: Any, tensors: dict[str, torch.Tensor], source: Any) -> Any:
        return config

    def _prepare_load(self, name: str) -> None:
        pass

    def _finish_load(self, name: str, file_config: Any) -> None:
        pass

    def also_loadable(self, name: str) -> dict[str, torch.Tensor]:
        return {}

    def mixed_batch_forward(self, adapter_names: list[str], wrappers: list[nn.Module], *args, **kwargs):
        raise ValueError(f"adapter_names: {type(self).__name__} does not mix adapters in one batch")


class _SaveProbe:
    """The fields of a config that modules_to_save matching reads (and may extend)."""

    def __init__(self, modules_to_save: list[str], task_type: Any, from_file: bool):
        self.modules_to_save = modules_to_save
        self.task_type = task_type
        self._from_file = from_file

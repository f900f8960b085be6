"""TunerModel: the common frame of every PEFT method other than LoRA.

A method subclasses :class:`TunerModel`, defines the hooks below, and registers its config and model
class with :func:`~pyfastpeft.tuners.registry.register_peft_type`; it then works through
``get_peft_model``, ``PeftModel.from_pretrained``, ``save_pretrained`` (safetensors + adapter_config.json,
atomic), ``pyfastpeft.report`` and the command line like LoRA does.

Hooks (``name`` is an adapter name):
    _inject(name, config)      add the adapter's modules/parameters; validate everything before changing
                               the model, so a bad config leaves it untouched
    _remove(name)              take the adapter out again
    _activate(names)           make forward use ``names`` (empty: the base model alone)
    adapter_tensors(name)      the adapter's live tensors under their file keys (what is saved/loaded)
optional:
    adapter_parameters(name)   what trains (default: the Parameters among adapter_tensors)
    _merge(names) / _unmerge() / _unload()   for methods that fold into the base weights
    _load_tensors(name, tensors, source)     put loaded file tensors in place (default: validate every
                               key and shape against adapter_tensors, then copy)
    delta_weights(name)        ``{path: ΔW}`` per base matrix that merging changes, for the report

modules_to_save: the frame itself wraps the modules a config's ``modules_to_save`` names (and a task
model's head, see :mod:`pyfastpeft.heads`) in PEFT's ModulesToSaveWrapper, so a full trainable copy per
adapter trains and is saved under ``base_model.model.<path>.<param>`` with every method.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..nn.multi_lora_linear import BASE_ADAPTER  # the one name for "no adapter"


class BaseModelHolder(nn.Module):
    """Holds the user's model as ``.model``, so parameter paths read ``base_model.model.<path>`` as in
    Hugging Face PEFT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModelMixin:
    """What every PEFT model class shares (LoRA's PeftModel and TunerModel): the user's model as
    ``base_model.model``, attribute passthrough to it, named-adapter bookkeeping checks."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def active_adapters(self) -> list[str]:
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def active_peft_config(self) -> Any:
        return self.peft_config[self.active_adapter]

    def _check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or "/" in adapter_name:
            raise ValueError(f"adapter_name: expected a non-empty name without '.' or '/', got {adapter_name!r}")
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"adapter_name: {BASE_ADAPTER!r} is reserved for 'no adapter'")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")

    def _check_name(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name: no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter: forward uses it and only its parameters train."""
        self._check_name(adapter_name)
        self.active_adapter = adapter_name
        self._mark_trainable()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        from .inject import trainable_parameters

        return trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        """PEFT's line: trainable / all parameters and the percent."""
        self._print_trainable_line()

    def _print_trainable_line(self):
        from ..report import report

        r = report(self, with_disk_size=False)
        print(
            f"trainable params: {r.trainable:,d} || all params: {r.total:,d} || trainable%: {r.trainable_percent:.4f}"
        )
        return r


class TunerModel(PeftModelMixin, nn.Module):
    """``model`` with every base parameter frozen and named adapters of one method added. Calls pass
    through to the model; attributes the wrapper lacks are the model's."""

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, TunerModel) or hasattr(model, "peft_config"):
            raise ValueError("model: already a PEFT model; use add_adapter to add another adapter")
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.base_model = BaseModelHolder(model)
        self.peft_config: dict[str, Any] = {}
        self.active_adapter: str | None = None
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
            raise

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

    def _merge(self, names: list[str]) -> None:
        raise ValueError(f"{type(self).__name__}: this method cannot be merged into the base weights")

    def _unmerge(self) -> None:
        pass

    def _load_tensors(self, name: str, tensors: dict[str, torch.Tensor], source: Any) -> None:
        from ..io.adapter_files import copy_into

        copy_into(self, name, tensors, source)

    def _unload(self) -> nn.Module:
        for n in list(self.peft_config):
            self._remove(n)
        return self.base_model.model

    def forward(self, *args, **kwargs):
        return self.base_model.model(*args, **kwargs)

    # ---- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: Any) -> None:
        """Add adapter ``adapter_name`` (inactive unless it is the first) configured by ``config``."""
        self._check_new_name(adapter_name)
        if self.peft_config:
            kind = type(next(iter(self.peft_config.values())))
            if type(config) is not kind:
                raise ValueError(f"config: this model holds {kind.__name__} adapters, got {type(config).__name__}")
        config.validate()
        saves = self._modules_to_save_paths(config)  # validated before the model changes
        self._inject(adapter_name, config)
        self._wrap_modules_to_save(adapter_name, saves)
        self.peft_config[adapter_name] = config
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        self._remove(adapter_name)
        self._unwrap_modules_to_save(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self._activate(self.active_adapters)
        for _, wrapper in self._save_wrappers():
            wrapper.set_adapter(self.active_adapters)  # makes the active copy trainable
        if self.active_adapter is None or getattr(self.active_peft_config, "inference_mode", False):
            for p in self.parameters():
                p.requires_grad_(False)
            return
        for p in self.adapter_parameters(self.active_adapter):
            p.requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block."""
        self._unmerge()
        self._activate([])
        wrappers = [w for _, w in self._save_wrappers()]
        for w in wrappers:
            w.disable_adapters = True
        try:
            yield
        finally:
            for w in wrappers:
                w.disable_adapters = False
            self._activate(self.active_adapters)

    # ---- merging ----------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        for n in names:
            self._check_name(n)
        self._merge(names)

    def unmerge_adapter(self) -> None:
        self._unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        self.merge_adapter(adapter_names)
        self._unwrap_modules_to_save(None, keep_trained_copy=True)
        return self._unload()

    def unload(self) -> nn.Module:
        self._unmerge()
        self._unwrap_modules_to_save(None, keep_trained_copy=False)
        return self._unload()

    # ---- modules_to_save --------------------------------------------------------------------------
    def _modules_to_save_paths(self, config: Any) -> list[str]:
        """Paths of the modules ``config.modules_to_save`` names, plus the head its ``task_type`` implies
        (added to the config, as PEFT does) and the head of a task model (``with_task_head``), which
        trains with every method."""
        from .inject import _find_modules_to_save

        model = self.base_model.model
        given = list(getattr(config, "modules_to_save", None) or [])
        extra = [n for n in getattr(model, "task_head_names", ()) if n not in given]
        probe = SimpleNamespace(
            modules_to_save=given + extra,
            task_type=getattr(config, "task_type", None),
            _from_file=getattr(config, "_from_file", False),
        )
        paths = _find_modules_to_save(model, probe)
        if probe.modules_to_save and hasattr(config, "modules_to_save"):
            config.modules_to_save = [n for n in probe.modules_to_save if n not in extra] or config.modules_to_save
        return paths

    def _save_wrappers(self):
        from .inject import save_wrappers

        return list(save_wrappers(self.base_model.model))

    def _wrap_modules_to_save(self, adapter_name: str, paths: list[str]) -> None:
        from .inject import wrap_modules_to_save

        wrap_modules_to_save(self.base_model.model, paths, adapter_name)

    def _unwrap_modules_to_save(self, adapter_name: str | None, keep_trained_copy: bool = False) -> None:
        """Drop ``adapter_name``'s copies (``None``: put every wrapper's module back: the active adapter's
        trained copy when ``keep_trained_copy``, else the original)."""
        from .inject import _set_submodule

        model = self.base_model.model
        for path, wrapper in self._save_wrappers():
            if adapter_name is not None:
                wrapper.delete_adapter(adapter_name)
                if len(wrapper.modules_to_save):
                    continue
            active = wrapper.active_adapter
            keep = keep_trained_copy and active is not None and active in wrapper.modules_to_save
            _set_submodule(model, path, wrapper.modules_to_save[active] if keep else wrapper.original_module)

    def modules_to_save_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's modules_to_save copies under PEFT's keys ``base_model.model.<path>.<param>``
        (saved and loaded with the method's own tensors)."""
        out = {}
        for path, wrapper in self._save_wrappers():
            if adapter_name in wrapper.modules_to_save:
                for name, t in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    out[f"base_model.model.{path}.{name}"] = t
        return out

    # ---- files ------------------------------------------------------------------------------------
    def config_json(self, adapter_name: str) -> dict:
        d = self.peft_config[adapter_name].to_dict()
        d["inference_mode"] = True
        return d

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Every adapter (or ``selected_adapters``): "default" in ``save_directory``, any other in a
        subfolder named after it. Atomic: all files or none."""
        from ..io import save_adapters

        save_adapters(self, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> TunerModel:
        from ..io.adapter_files import _find_dir, read_adapter
        from .registry import model_class_for

        config, tensors, source = read_adapter(_find_dir(model_id, adapter_name))
        model_cls = model_class_for(config)
        if cls is not TunerModel and not issubclass(model_cls, cls):
            raise ValueError(f"{source}: holds a {type(config).__name__} adapter, not one {cls.__name__} loads")
        config.inference_mode = not is_trainable
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        peft_model = model_cls(model, config, adapter_name)
        try:
            peft_model._load_tensors(adapter_name, tensors, source)
        except BaseException:
            peft_model.unload()
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (not made active)."""
        from ..io.adapter_files import _find_dir, read_adapter

        config, tensors, source = read_adapter(_find_dir(model_id, adapter_name))
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        try:
            self._load_tensors(adapter_name, tensors, source)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

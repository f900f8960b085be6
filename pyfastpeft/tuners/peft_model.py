"""PeftModel: one frame over any PEFT method, with Hugging Face PEFT's API and parameter names.

``PeftModel -> <Method>Model (a BaseTuner, the ``base_model``) -> the method's layers``: the frame owns
the adapter lifecycle and the modules_to_save copies; the tuner supplies injection, activation, merging
and the adapter's tensors (see :mod:`pyfastpeft.tuners.base`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import io
from ..ops import BASE_ADAPTER
from ..report import report, trainable_parameters
from .base import BaseTuner
from .matching import save_wrappers, set_submodule, wrap_modules_to_save
from .registry import config_from_dict, model_class_for


class PeftModel(nn.Module):
    """``model`` with every base parameter frozen and named adapters of one method added (in place).
    Calls pass through to the model; attributes the wrapper lacks are the tuner's, then the model's."""

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, (PeftModel, BaseTuner)) or hasattr(model, "peft_config"):
            raise ValueError("model: already a PEFT model; use add_adapter to add another adapter")
        tuner_cls = model_class_for(peft_config)
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.base_model = tuner_cls(model)
        self._input_grad_hook = None
        try:
            self.add_adapter(adapter_name, peft_config)
        except BaseException:
            for p, flag in requires_grad.items():  # injection validates before it changes any module
                p.requires_grad_(flag)
            raise
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            self._make_inputs_require_grad()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(
                f"adapter_names: expected a list of adapter names, one per sequence, got {adapter_names!r}"
            )
        known = list(self.peft_config)
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in known})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; adapters: {known} (or {BASE_ADAPTER!r})")
        wrappers = [w for _, w in self._save_wrappers()]
        return self.base_model.mixed_batch_forward(adapter_names, wrappers, *args, **kwargs)

    # ---- state shared with the tuner --------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, Any]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | None:
        return self.base_model.active_adapter

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        self.base_model.active_adapter = name

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> Any:
        return self.peft_config[self.active_adapter]

    @property
    def peft_type(self) -> str:
        return next(iter(self.peft_config.values())).peft_type

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # ---- adapters ---------------------------------------------------------------------------------
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

    def add_adapter(self, adapter_name: str, peft_config: Any) -> None:
        """Add adapter ``adapter_name`` (inactive unless it is the first) configured by ``peft_config``."""
        self._check_new_name(adapter_name)
        tuner_cls = model_class_for(peft_config)
        if tuner_cls is not type(self.base_model) or (
            self.peft_config and type(peft_config) is not type(next(iter(self.peft_config.values())))
        ):
            kind = type(next(iter(self.peft_config.values()))) if self.peft_config else type(self.base_model)
            raise ValueError(f"config: this model holds {kind.__name__} adapters, got {type(peft_config).__name__}")
        peft_config.validate()
        saves = self.base_model.saved_module_paths(peft_config)  # validated before the model changes
        self.base_model._inject(adapter_name, peft_config)
        wrap_modules_to_save(self.base_model.model, saves, adapter_name)
        self.peft_config[adapter_name] = peft_config
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        self.base_model._remove(adapter_name)
        self._unwrap_modules_to_save(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._mark_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter: forward uses it and only its parameters train."""
        self._check_name(adapter_name)
        self.active_adapter = adapter_name
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.base_model._activate(self.active_adapters)
        for _, wrapper in self._save_wrappers():
            wrapper.set_adapter(self.active_adapters)  # makes the active copy trainable
        if self.active_adapter is None or getattr(self.active_peft_config, "inference_mode", False):
            for p in self.parameters():
                p.requires_grad_(False)
            return
        for p in self.base_model.adapter_parameters(self.active_adapter):
            p.requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged first)."""
        self.base_model._disable()
        wrappers = [w for _, w in self._save_wrappers()]
        for w in wrappers:
            w.disable_adapters = True
        try:
            yield
        finally:
            for w in wrappers:
                w.disable_adapters = False
            self.base_model._enable()

    # ---- merging ----------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters (default: the active one) into the base weights; forward then costs what the
        base model costs."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for n in names:
            self._check_name(n)
        self.base_model._merge(names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights again."""
        self.base_model._unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, then return the plain model with every adapter layer replaced by its (merged) base layer
        and every modules_to_save wrapper by the active adapter's trained copy."""
        self.merge_adapter(adapter_names)
        self._unwrap_modules_to_save(None, keep_trained_copy=True)
        return self._unload()

    def unload(self) -> nn.Module:
        """Return the plain model without merging (unmerging first if needed)."""
        self.base_model._unmerge()
        self._unwrap_modules_to_save(None, keep_trained_copy=False)
        return self._unload()

    def _unload(self) -> nn.Module:
        if self._input_grad_hook is not None:
            self._input_grad_hook.remove()
            self._input_grad_hook = None
        return self.base_model._unload()

    # ---- modules_to_save --------------------------------------------------------------------------
    def _save_wrappers(self):
        return list(save_wrappers(self.base_model.model))

    def _unwrap_modules_to_save(self, adapter_name: str | None, keep_trained_copy: bool = False) -> None:
        """Drop ``adapter_name``'s copies (``None``: put every wrapper's module back: the active adapter's
        trained copy when ``keep_trained_copy``, else the original)."""
        model = self.base_model.model
        for path, wrapper in self._save_wrappers():
            if adapter_name is not None:
                wrapper.delete_adapter(adapter_name)
                if len(wrapper.modules_to_save):
                    continue
            active = wrapper.active_adapter
            keep = keep_trained_copy and active is not None and active in wrapper.modules_to_save
            set_submodule(model, path, wrapper.modules_to_save[active] if keep else wrapper.original_module)

    def saved_module_copies(self, adapter_name: str) -> list[tuple[nn.Module, nn.Module]]:
        """(original, the adapter's trained copy) of every modules_to_save module."""
        return [
            (w.original_module, w.modules_to_save[adapter_name])
            for _, w in self._save_wrappers()
            if adapter_name in w.modules_to_save
        ]

    def modules_to_save_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's modules_to_save copies under PEFT's keys (saved and loaded with the method's own
        tensors)."""
        prefix = self.base_model.saved_module_prefix
        out = {}
        for path, wrapper in self._save_wrappers():
            if adapter_name in wrapper.modules_to_save:
                for name, t in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    out[f"{prefix}{path}.{name}"] = t
        return out

    # ---- training-loop integration ----------------------------------------------------------------
    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """The model's gradient checkpointing, plus a hook making the input embeddings' output require grad,
        so that reentrant checkpoints (whose inputs would otherwise not require grad) reach the adapters."""
        self.base_model.model.gradient_checkpointing_enable(**kwargs)
        self._make_inputs_require_grad()

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """transformers' newer name for gradient_checkpointing_enable; the same input hook is added."""
        self.base_model.model.activation_checkpointing_enable(**kwargs)
        self._make_inputs_require_grad()

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad (needed by reentrant ``torch.utils.checkpoint``
        around frozen layers, whose inputs would otherwise not require grad)."""
        self._make_inputs_require_grad()

    def _make_inputs_require_grad(self) -> None:
        get = getattr(self.base_model.model, "get_input_embeddings", None)
        embeddings = get() if callable(get) else None
        if embeddings is None or self._input_grad_hook is not None:
            return

        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and not output.requires_grad:
                output.requires_grad_(True)

        self._input_grad_hook = embeddings.register_forward_hook(hook)

    # ---- accounting -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        """PEFT's line (trainable / all / percent), then what the adapter changes in the base model."""
        r = report(self, with_disk_size=False)
        print(
            f"trainable params: {r.trainable:,d} || all params: {r.total:,d} || trainable%: {r.trainable_percent:.4f}"
        )
        print(
            f"changes the base model in {r.changed_entries:,d} entries; rank of ΔW per matrix: "
            f"max {r.max_delta_rank}, over {len(r.matrices)} matrices"
        )

    def delta_weights(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return self.base_model.delta_weights(adapter_name)

    def adapter_matrices(self, adapter_name: str) -> list[tuple[str, torch.Tensor, int, Any]]:
        return self.base_model.adapter_matrices(adapter_name)

    # ---- files ------------------------------------------------------------------------------------
    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's live tensors under their file keys (PEFT's where PEFT has the method)."""
        out = dict(self.base_model.adapter_tensors(adapter_name))
        out.update(self.modules_to_save_tensors(adapter_name))
        return out

    def config_json(self, adapter_name: str) -> dict:
        d = self.peft_config[adapter_name].to_dict()
        d["inference_mode"] = True  # as PEFT writes it: the file describes a trained adapter
        base_config = getattr(self.base_model.model, "config", None)
        name = getattr(base_config, "_name_or_path", None) or getattr(base_config, "name_or_path", None)
        if "base_model_name_or_path" in d and d["base_model_name_or_path"] is None and name:
            d["base_model_name_or_path"] = name
        return d

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write every adapter (or ``selected_adapters``) in PEFT's layout: "default" at the top of
        ``save_directory``, any other in a subfolder named after it. Atomic: all or nothing."""
        io.save_adapters(self, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> PeftModel:
        """Wrap ``model`` and load the adapter saved in ``model_id`` (ours or Hugging Face PEFT's), of any
        method (its ``peft_type`` in adapter_config.json picks it)."""
        config, tensors, source = _read(model_id, adapter_name)
        inject = model_class_for(config).config_for_loading(config, tensors, source)
        inject.inference_mode = not is_trainable
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        peft_model = cls(model, inject, adapter_name)
        try:
            peft_model.load_adapter_tensors(adapter_name, tensors, source)
        except BaseException:
            peft_model.unload()  # leave the caller's model as it was
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
            raise
        peft_model.base_model._finish_load(adapter_name, config)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (not made active)."""
        config, tensors, source = _read(model_id, adapter_name)
        inject = model_class_for(config).config_for_loading(config, tensors, source)
        inject.inference_mode = not is_trainable
        self.add_adapter(adapter_name, inject)
        try:
            self.load_adapter_tensors(adapter_name, tensors, source)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self.base_model._finish_load(adapter_name, config)

    def load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: Any) -> None:
        """Copy a file's ``tensors`` into adapter ``adapter_name`` after checking every key and shape."""
        self.base_model._prepare_load(adapter_name)
        self._mark_trainable()
        expected = self.adapter_tensors(adapter_name)
        extras = self.base_model.also_loadable(adapter_name)
        expected.update({k: extras[k] for k in tensors if k not in expected and k in extras})
        io.check_and_copy(expected, tensors, source)


def _read(model_id: str | os.PathLike, adapter_name: str) -> tuple[Any, dict[str, torch.Tensor], Path]:
    raw, tensors, source = io.read_adapter(io.find_adapter_dir(model_id, adapter_name))
    config = config_from_dict(raw, str(source.parent / io.CONFIG_NAME))
    config._from_file = True  # names PEFT wrote that match nothing warn instead of failing (as in PEFT)
    return config, tensors, source


def get_peft_model(model: nn.Module, peft_config: Any, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model``, add adapter ``adapter_name`` of the method ``peft_config`` configures, and return
    the :class:`PeftModel` wrapping it (the model is modified in place)."""
    return PeftModel(model, peft_config, adapter_name)

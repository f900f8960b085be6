"""PeftModel: a model with named LoRA adapters, with Hugging Face PEFT's API and parameter names."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .base import BASE_ADAPTER, BaseModelHolder, PeftModelMixin
from .config import LoraConfig
from .inject import inject_adapter, lora_layers, save_wrappers
from .lora_layers import LoraLayer
from .modules_to_save import ModulesToSaveWrapper
from .registry import model_class_for, register_peft_type


class PeftModel(PeftModelMixin, nn.Module):
    """``model`` with LoRA adapters injected in place (the modules it targets are wrapped) and every base
    parameter frozen. Calls pass through to the model; attributes the wrapper lacks are the model's."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError("model: already a PeftModel; use add_adapter to add another adapter")
        if not isinstance(config, LoraConfig):
            raise ValueError(f"config: expected a pyfastpeft.LoraConfig, got {type(config).__name__}")
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.base_model = BaseModelHolder(model)
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = adapter_name
        self._input_grad_hook = None
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            for p, flag in requires_grad.items():  # injection validates before it changes any module
                p.requires_grad_(flag)
            raise
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            self._make_inputs_require_grad()

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is not None:
            return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)
        return self.base_model.model(*args, **kwargs)

    def _mixed_batch_forward(self, *args, adapter_names: list[str], **kwargs):
        """One adapter per sequence (``"__base__"`` for none) in one batch, forward and backward: every
        LoRA linear runs the multi-adapter op over the tokens of all adapters at once, so several
        adapters can be trained together in one mixed batch."""
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(
                f"adapter_names: expected a list of adapter names, one per sequence, got {adapter_names!r}"
            )
        known = list(self.peft_config)
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in known})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; adapters: {known} (or {BASE_ADAPTER!r})")
        if any(layer.merged_adapters for _, layer in lora_layers(self.base_model.model)):
            raise ValueError("adapter_names: unmerge the adapters first (unmerge_adapter())")
        index = {n: i for i, n in enumerate(known)}
        seq_indices = [index.get(n, -1) for n in adapter_names]
        # LoRA linears and embeddings mix per token; modules_to_save split the batch by adapter.
        layers = [layer for _, layer in lora_layers(self.base_model.model)]
        layers += [wrapper for _, wrapper in save_wrappers(self.base_model.model)]
        for layer in layers:
            layer.mixed_batch = (known, seq_indices)
        try:
            return self.base_model.model(*args, **kwargs)
        finally:
            for layer in layers:
                layer.mixed_batch = None

    # ---- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Add adapter ``adapter_name`` (inactive unless it is the first) configured by ``config``."""
        self._check_new_name(adapter_name)
        if not isinstance(config, LoraConfig):
            raise ValueError(f"config: expected a pyfastpeft.LoraConfig, got {type(config).__name__}")
        config.validate()
        inject_adapter(self.base_model.model, config, adapter_name)
        self.peft_config[adapter_name] = config
        if self.active_adapter is None or self.active_adapter not in self.peft_config:
            self.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        for _, layer in lora_layers(self.base_model.model):
            if adapter_name in layer.merged_adapters:
                raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
        for _, layer in lora_layers(self.base_model.model):
            layer.delete_adapter(adapter_name)
        for _, wrapper in save_wrappers(self.base_model.model):
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        model = self.base_model.model
        for p in model.parameters():
            p.requires_grad_(False)
        active = self.active_adapters
        for _, layer in lora_layers(model):
            layer.set_adapter(active)
        for _, wrapper in save_wrappers(model):
            wrapper.set_adapter(active)
        if self.active_adapter is None:
            return
        config = self.peft_config[self.active_adapter]
        if config.inference_mode:
            for p in model.parameters():
                p.requires_grad_(False)
            return
        if config.bias == "all":
            for _, p in self.named_bias_parameters():
                p.requires_grad_(True)
        elif config.bias == "lora_only":
            for _, layer in lora_layers(model):
                if self.active_adapter in layer.r and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)

    def named_bias_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Biases that ``bias='all'`` trains (those of the model, not of adapter copies)."""
        for name, p in self.named_parameters():
            if name.endswith(".bias") and ".modules_to_save." not in name and ".original_module." not in name:
                yield name, p

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged first)."""
        layers = [m for m in self.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
        for m in layers:
            if isinstance(m, LoraLayer) and m.merged_adapters:
                m.unmerge()
            m.disable_adapters = True
        try:
            yield
        finally:
            for m in layers:
                m.disable_adapters = False

    # ---- merging ----------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters (default: the active one) into the base weights; forward then costs what the
        base model costs."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for n in names:
            self._check_name(n)
        for _, layer in lora_layers(self.base_model.model):
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights again."""
        for _, layer in lora_layers(self.base_model.model):
            layer.unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, then return the plain model with every LoRA layer replaced by its (merged) base layer and
        every modules_to_save wrapper by the active adapter's trained copy."""
        self.merge_adapter(adapter_names)
        return self._unload(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """Return the plain model without merging (unmerging first if needed)."""
        self.unmerge_adapter()
        return self._unload(keep_trained_copies=False)

    def _unload(self, keep_trained_copies: bool) -> nn.Module:
        model = self.base_model.model
        if self._input_grad_hook is not None:
            self._input_grad_hook.remove()
            self._input_grad_hook = None
        for path, module in list(lora_layers(model)) + list(save_wrappers(model)):
            if isinstance(module, LoraLayer):
                new = module.base_layer
            elif keep_trained_copies and module.active_adapter is not None:
                new = module.modules_to_save[module.active_adapter]
            else:
                new = module.original_module
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        return model

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

    # ---- accounting and files ---------------------------------------------------------------------
    def print_trainable_parameters(self) -> None:
        """PEFT's line (trainable / all / percent), then what the adapter changes in the base model."""
        r = self._print_trainable_line()
        print(
            f"changes the base model in {r.changed_entries:,d} entries; rank of ΔW per matrix: "
            f"max {r.max_delta_rank}, over {len(r.matrices)} matrices"
        )

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's live tensors under Hugging Face PEFT's file keys."""
        from ..io.adapter_files import lora_adapter_tensors

        return lora_adapter_tensors(self, adapter_name)

    def config_json(self, adapter_name: str) -> dict:
        from ..io.adapter_files import lora_config_json

        return lora_config_json(self, adapter_name)

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write every adapter (or ``selected_adapters``) in PEFT's layout: "default" at the top of
        ``save_directory``, any other in a subfolder named after it. Atomic: all or nothing."""
        from ..io import save_adapters

        save_adapters(self, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> PeftModel:
        """Wrap ``model`` and load the adapter saved in ``model_id`` (ours or Hugging Face PEFT's); an
        adapter of another method (its ``peft_type`` in adapter_config.json) comes back as that method's
        model class."""
        from ..io import load_into_new_model
        from ..io.adapter_files import _find_dir, peek_peft_type
        from .base import TunerModel

        if peek_peft_type(_find_dir(model_id, adapter_name)) != "LORA":
            return TunerModel.from_pretrained(model, model_id, adapter_name, is_trainable)

        return load_into_new_model(cls, model, model_id, adapter_name, is_trainable)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (not made active)."""
        from ..io import load_adapter

        load_adapter(self, model_id, adapter_name, is_trainable)


register_peft_type("LORA", LoraConfig, PeftModel)


def get_peft_model(model: nn.Module, peft_config: Any, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model``, add adapter ``adapter_name`` of the method ``peft_config`` configures, and return
    the PEFT model wrapping it (the model is modified in place): a :class:`PeftModel` for a LoraConfig,
    the method's :class:`~pyfastpeft.tuners.base.TunerModel` subclass otherwise."""
    return model_class_for(peft_config)(model, peft_config, adapter_name)

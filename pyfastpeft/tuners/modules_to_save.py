"""modules_to_save: a module trained in full, one trainable copy per adapter, as in Hugging Face PEFT."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: a frozen ``original_module`` plus a trainable copy per adapter
    (``modules_to_save.<adapter>``), as in PEFT."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        # (adapter names of the model, adapter index per sequence) while PeftModel runs a mixed batch
        self.mixed_batch: tuple[list[str], list[int]] | None = None
        for p in module.parameters():
            p.requires_grad_(False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name in ("original_module", "modules_to_save") or "original_module" not in modules:
                raise
            active = self.__dict__.get("active_adapter")
            copies = modules.get("modules_to_save")
            target = copies[active] if copies is not None and active in copies else modules["original_module"]
            return getattr(target, name)

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def set_adapter(self, names: list[str]) -> None:
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)
        for name, module in self.modules_to_save.items():
            for p in module.parameters():
                p.requires_grad_(name == self.active_adapter)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        if self.mixed_batch is not None:
            return self._mixed_forward(*args, **kwargs)
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def _mixed_forward(self, *args, **kwargs):
        """One adapter per sequence: the batch is split by the module each sequence runs through (its
        adapter's copy, or the original for "__base__" and adapters without a copy), each part runs its
        module, and the outputs are put back in batch order (index_select both ways: differentiable).
        Tensor arguments whose first dimension is the batch are split; the others go to every part."""
        names, seq_indices = self.mixed_batch
        batch = len(seq_indices)
        groups: dict[str | None, list[int]] = {}
        for i, k in enumerate(seq_indices):
            name = names[k] if k >= 0 and names[k] in self.modules_to_save else None
            groups.setdefault(name, []).append(i)
        if len(groups) == 1:
            (name,) = groups
            module = self.original_module if name is None else self.modules_to_save[name]
            return module(*args, **kwargs)
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)

        def has_batch(value) -> bool:
            return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch

        def split(value, rows):
            return value.index_select(0, rows) if has_batch(value) else value

        if not any(has_batch(a) for a in (*args, *kwargs.values())):
            raise ValueError(
                f"adapter_names: {batch} names, but no tensor argument of this module in modules_to_save has "
                "the batch as its first dimension"
            )
        outputs, order = [], []
        for name, seqs in groups.items():
            rows = torch.tensor(seqs, dtype=torch.int64, device=device)
            module = self.original_module if name is None else self.modules_to_save[name]
            out = module(*(split(a, rows) for a in args), **{k: split(v, rows) for k, v in kwargs.items()})
            if not isinstance(out, torch.Tensor):
                raise ValueError(
                    f"adapter_names: a module in modules_to_save returned {type(out).__name__}; mixed-adapter "
                    "batches support modules_to_save whose output is one tensor"
                )
            outputs.append(out)
            order.extend(seqs)
        inverse = torch.empty(batch, dtype=torch.int64)
        inverse[torch.tensor(order, dtype=torch.int64)] = torch.arange(batch)
        return torch.cat(outputs).index_select(0, inverse.to(outputs[0].device))

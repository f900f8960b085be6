"""What BitFit and layer freezing share: they train tensors of the base model itself, in place.

There is no separate adapter tensor to switch off, so the model keeps a snapshot of the initial value
of every tensor the adapter trains, taken when the adapter is injected. The snapshot gives

    disable_adapter()   swap the initial values in, the trained ones back on exit
    delta_weights()     trained - initial, for the report's changed entries
    delete_adapter()    put the initial values back

The snapshot costs one copy of the trained tensors (not of the whole model). It is kept in
non-persistent buffers, so ``.to(device, dtype)`` moves it with the parameters and state_dict()
does not hold it.

A model holds one such adapter: a second one would train the same base tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BaseTuner


def _buffer_name(key: str) -> str:
    return key.replace(".", "__")  # buffer names cannot hold dots


class InitialValues(nn.Module):
    """Copies of tensors' values at one moment, by key."""

    def take(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            self.register_buffer(_buffer_name(key), t.detach().clone(), persistent=False)

    def get(self, key: str) -> torch.Tensor:
        return getattr(self, _buffer_name(key))

    def has(self, key: str) -> bool:
        return _buffer_name(key) in self._buffers


class InPlaceTuner(BaseTuner):
    """A tuner whose adapter tensors are the base model's own. Subclasses fill ``self._live`` (key →
    live tensor) in ``_inject`` and call :meth:`_snapshot`."""

    def _init_in_place(self) -> None:
        if "initial_values" not in self._modules:
            self.initial_values = InitialValues()
            self._live: dict[str, nn.Parameter] = {}
            self._stash: dict[str, torch.Tensor] | None = None  # trained values while disabled

    def _check_single(self, name: str) -> None:
        if self.peft_config:
            raise ValueError(
                f"adapter_name: this model already holds adapter {next(iter(self.peft_config))!r}; "
                f"{type(self).__name__} trains the base model's own tensors, so a model holds one adapter "
                f"(delete it first, or wrap another copy of the model)"
            )

    def _snapshot(self, tensors: dict[str, nn.Parameter]) -> None:
        self._live = dict(tensors)
        self.initial_values.take(tensors)

    @torch.no_grad()
    def _activate(self, names: list[str]) -> None:
        if not names and self._stash is None and self._live:
            self._stash = {k: t.detach().clone() for k, t in self._live.items()}
            for k, t in self._live.items():
                t.copy_(self.initial_values.get(k))
        elif names and self._stash is not None:
            for k, t in self._live.items():
                t.copy_(self._stash[k])
            self._stash = None

    @torch.no_grad()
    def _restore_initial(self) -> None:
        for k, t in self._live.items():
            t.copy_(self.initial_values.get(k))
        self._stash = None

    @torch.no_grad()
    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """``current - initial`` of every tensor the adapter trains, by its path in the user's model."""
        if name not in self.peft_config:
            return {}
        prefix = "base_model.model."
        out = {}
        for k, t in self._live.items():
            # the model may have been cast after injection (the command line does); compare like with like
            out[k[len(prefix) :]] = t.detach() - self.initial_values.get(k).to(device=t.device, dtype=t.dtype)
        return out

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self._live) if name in self.peft_config else {}

    def _merge(self, names: list[str]) -> None:
        pass  # already in the base model's tensors

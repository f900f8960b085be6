"""AdapterWrapper: a module with bottleneck adapters beside or after it."""

from __future__ import annotations

from torch import nn

from ...nn.bottleneck_adapter import BottleneckAdapter
from ..layers import is_conv1d


class AdapterWrapper(nn.Module):
    """``base_module`` plus named bottleneck adapters (serial after it, or parallel beside it); the adapter
    modules may be shared with other wrappers."""

    def __init__(self, base_module: nn.Module):
        super().__init__()
        self.base_module = base_module
        self.adapters = nn.ModuleDict()
        self.kind: dict[str, str] = {}  # adapter name -> "serial" | "parallel"
        self.scaling: dict[str, float] = {}
        self.residual: dict[str, bool] = {}
        self.active_adapters: list[str] = []

    # Code that reads the wrapped module's attributes (``self_attn.num_heads``, ``o_proj.weight``) keeps working.
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_module" or "base_module" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["base_module"], name)

    def add(self, name: str, adapter: BottleneckAdapter, kind: str, scaling: float, residual: bool) -> None:
        self.adapters[name] = adapter
        self.kind[name], self.scaling[name], self.residual[name] = kind, float(scaling), residual

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        for table in (self.kind, self.scaling, self.residual):
            table.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def forward(self, *args, **kwargs):
        out = self.base_module(*args, **kwargs)
        if not self.active_adapters:
            return out
        h = out[0] if isinstance(out, tuple) else out
        for name in self.active_adapters:
            adapter, s = self.adapters[name], self.scaling[name]
            if self.kind[name] == "parallel":
                x = args[0] if args else kwargs["hidden_states"]
                h = h + s * adapter(x)
            elif self.residual[name]:
                h = h + s * adapter(h)
            else:
                h = s * adapter(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def extra_repr(self) -> str:
        return f"adapters={[f'{n}:{self.kind[n]}' for n in self.adapters]}"


def features(module: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a projection, or of a block: its first and last linear."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    if not linears:
        raise ValueError(f"{type(module).__name__} holds no nn.Linear or Conv1D to size an adapter from")

    def dims(m: nn.Module) -> tuple[int, int]:
        return tuple(m.weight.shape) if is_conv1d(m) else (m.in_features, m.out_features)

    return dims(linears[0])[0], dims(linears[-1])[1]

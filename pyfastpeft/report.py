"""Parameter accounting of an adapted model: what trains, and what actually changes in the base model.

Beyond trainable / total / percent, this reports two numbers computed from the weights themselves:
the entries of the base model that merging the adapter changes (non-zero entries of ΔW, plus the
entries where a modules_to_save copy differs from the original) and the rank of ΔW per matrix. It also
gives AdamW's optimizer-state bytes (exp_avg and exp_avg_sq in each trainable tensor's dtype, plus a
float32 step per tensor, as torch.optim.AdamW keeps them) and the exact size of the adapter's files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .nn import FakeQuantLinear, LoRALinear, SparseDeltaLinear
from .tuners.inject import lora_layers, save_wrappers, trainable_parameters
from .tuners.lora_layers import LoraEmbedding, LoraLinear


@dataclass
class MatrixReport:
    name: str
    shape: tuple[int, ...]
    r: int
    delta_rank: int
    changed_entries: int

    @property
    def entries(self) -> int:
        return int(torch.tensor(self.shape).prod().item()) if self.shape else 1


@dataclass
class Report:
    adapter: str | None
    trainable: int
    total: int
    trainable_percent: float
    changed_entries: int
    in_place_trainable: int
    optimizer_state_bytes: int
    adapter_bytes_on_disk: int | None
    matrices: list[MatrixReport] = field(default_factory=list)

    @property
    def max_delta_rank(self) -> int:
        return max((m.delta_rank for m in self.matrices), default=0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_delta_rank"] = self.max_delta_rank
        return d

    def table(self) -> str:
        lines = [
            f"adapter: {self.adapter}",
            f"trainable params         {self.trainable:>14,d}",
            f"all params               {self.total:>14,d}",
            f"trainable %              {self.trainable_percent:>14.4f}",
            f"changed by merging       {self.changed_entries:>14,d}   (non-zero entries of ΔW)",
        ]
        if self.in_place_trainable:
            lines.append(f"trained in place         {self.in_place_trainable:>14,d}   (biases: no copy to compare)")
        lines.append(f"AdamW state bytes        {self.optimizer_state_bytes:>14,d}")
        if self.adapter_bytes_on_disk is not None:
            lines.append(f"adapter bytes on disk    {self.adapter_bytes_on_disk:>14,d}")
        if self.matrices:
            width = max(len(m.name) for m in self.matrices)
            lines.append("")
            lines.append(f"{'matrix'.ljust(width)}  {'shape':>12}  {'r':>4}  {'rank ΔW':>7}  {'changed':>10}")
            for m in self.matrices:
                shape = "x".join(str(d) for d in m.shape)
                r = str(m.r) if m.r else "-"  # methods other than LoRA have no rank parameter
                lines.append(
                    f"{m.name.ljust(width)}  {shape:>12}  {r:>4}  {m.delta_rank:>7}  {m.changed_entries:>10,d}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    __repr__ = __str__


def _adamw_state_bytes(model: nn.Module) -> int:
    seen = {id(p): p for p in model.parameters() if p.requires_grad}
    return sum(2 * p.numel() * p.element_size() + 4 for p in seen.values())


def _delta_rank(layer, name: str, delta: torch.Tensor) -> int:
    """``matrix_rank(ΔW)`` with its default tolerance (σ_max · max(m, n) · eps). For plain LoRA,
    ΔW = s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ has the singular values of the r×r core, so no SVD of the full
    matrix is needed; DoRA's ΔW rescales W's rows too and takes the full SVD."""
    if isinstance(layer, LoraLinear) and not layer.use_dora[name]:
        b, a = layer.lora_B[name].weight, layer.lora_A[name].weight
    elif isinstance(layer, LoraEmbedding):
        b, a = layer.lora_embedding_B[name], layer.lora_embedding_A[name]
    else:
        return int(torch.linalg.matrix_rank(delta).item())
    b, a = b.detach().to(delta.dtype), a.detach().to(delta.dtype)
    r_b = torch.linalg.qr(b).R
    r_a = torch.linalg.qr(a.t()).R
    singular = torch.linalg.svdvals(layer.scaling[name] * (r_b @ r_a.t()))
    tol = singular.max() * max(delta.shape) * torch.finfo(delta.dtype).eps
    return int((singular > tol).sum().item())


@torch.no_grad()
def report(model: nn.Module, adapter_name: str | None = None, with_disk_size: bool = True) -> Report:
    """Account for ``model`` (a :class:`pyfastpeft.PeftModel`, or any module with LoRA layers in it) and
    its adapter ``adapter_name`` (default: the active one).

    ``str(report)`` is a table for people, ``report.to_dict()`` a dict for programs."""
    trainable, total = trainable_parameters(model)
    name = adapter_name or getattr(model, "active_adapter", None)
    if name is None:
        name = next((n for _, layer in lora_layers(model) for n in layer.active_adapters), None)
    matrices = []
    for path, layer in lora_layers(model):
        if name not in layer.r:
            continue
        delta = layer.delta_weight(name)
        rank = _delta_rank(layer, name, delta) if delta.abs().max() > 0 else 0
        matrices.append(MatrixReport(path, tuple(delta.shape), layer.r[name], rank, int(torch.count_nonzero(delta))))
    delta_weights = getattr(model, "delta_weights", None)  # methods other than LoRA (TunerModel)
    if callable(delta_weights) and name is not None:
        for path, delta in delta_weights(name).items():
            # a vector (a norm's weight, a bias) counts as a 1×n matrix, a conv kernel as out × rest
            as_matrix = delta.double().reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.double()[None]
            rank = int(torch.linalg.matrix_rank(as_matrix).item()) if delta.abs().max() > 0 else 0
            matrices.append(MatrixReport(path, tuple(delta.shape), 0, rank, int(torch.count_nonzero(delta))))
    changed = sum(m.changed_entries for m in matrices)
    for _, wrapper in save_wrappers(model):
        if name in wrapper.modules_to_save:
            copy = dict(wrapper.modules_to_save[name].named_parameters())
            for pname, orig in wrapper.original_module.named_parameters():
                changed += int(torch.count_nonzero(copy[pname] != orig))
    in_place = 0
    for pname, p in model.named_parameters():
        if p.requires_grad and pname.endswith("bias") and ".modules_to_save." not in pname:
            in_place += p.numel()
    disk = None
    if with_disk_size and name is not None and hasattr(model, "peft_config"):
        from .io import serialize_adapter

        weights, config = serialize_adapter(model, name)
        disk = len(weights) + len(config)
    return Report(
        adapter=name,
        trainable=trainable,
        total=total,
        trainable_percent=100.0 * trainable / total if total else 0.0,
        changed_entries=changed,
        in_place_trainable=in_place,
        optimizer_state_bytes=_adamw_state_bytes(model),
        adapter_bytes_on_disk=disk,
        matrices=matrices,
    )


@torch.no_grad()
def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model computes with, by their names in the base model: LoRA (and DoRA) merged
    in, a sparse delta added, a fake-quantized weight as it is quantized."""
    skip = {id(m.delta) for m in model.modules() if isinstance(m, SparseDeltaLinear)}
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name or id(p) in skip:
            continue
        out[name.replace(".base_layer.", ".")] = p.detach().double()
    # the base layers first (a LoRA layer's base may be fake-quantized), then the LoRA updates
    for name, m in model.named_modules():
        key = f"{name}.weight".replace(".base_layer.", ".")
        if isinstance(m, FakeQuantLinear):
            out[key] = m.quantized_weight().detach().double()
        elif isinstance(m, SparseDeltaLinear):
            out[key] = out[key] + m.delta_weight().double()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and not m.merged:
            out[f"{name}.weight"] = out[f"{name}.weight"] + m.delta_weight().double()
        elif isinstance(m, LoraLinear):  # get_peft_model's layer; Conv1D stores [in, out]
            delta = sum(m.delta_weight(a).double() for a in m.active_adapters if a not in m.merged_adapters)
            if isinstance(delta, torch.Tensor):
                w = out[f"{name}.weight"]
                out[f"{name}.weight"] = w + (delta if w.shape == delta.shape else delta.t())
    return out

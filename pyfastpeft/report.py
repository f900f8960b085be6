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


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (p.numel(), p.requires_grad)
    for m in model.modules():  # frozen weights kept packed in a buffer (GGUF blocks) count as weights
        packed = getattr(m, "packed_weights", None)
        if callable(packed):
            buffer, count = packed()
            seen.setdefault(id(buffer), (count, False))
    total = sum(n for n, _ in seen.values())
    trainable = sum(n for n, t in seen.values() if t)
    return trainable, total


def _delta_rank(delta: torch.Tensor, factors) -> int:
    """``matrix_rank(ΔW)`` with its default tolerance (σ_max · max(m, n) · eps). Given as factors
    ΔW = s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ, ΔW has the singular values of the r×r core, so no SVD of the full
    matrix is needed; otherwise a vector (a norm's weight, a bias) counts as a 1×n matrix and a conv
    kernel as out × rest."""
    if factors is None:
        as_matrix = delta.double().reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.double()[None]
        return int(torch.linalg.matrix_rank(as_matrix).item())
    b, a, scaling = factors
    b, a = b.detach().to(delta.dtype), a.detach().to(delta.dtype)
    r_b = torch.linalg.qr(b).R
    r_a = torch.linalg.qr(a.t()).R
    singular = torch.linalg.svdvals(scaling * (r_b @ r_a.t()))
    tol = singular.max() * max(delta.shape) * torch.finfo(delta.dtype).eps
    return int((singular > tol).sum().item())


@torch.no_grad()
def report(model: nn.Module, adapter_name: str | None = None, with_disk_size: bool = True) -> Report:
    """Account for ``model`` (a :class:`pyfastpeft.PeftModel` of any method, or any module: then only the
    parameter counts) and its adapter ``adapter_name`` (default: the active one).

    ``str(report)`` is a table for people, ``report.to_dict()`` a dict for programs."""
    trainable, total = trainable_parameters(model)
    name = adapter_name or getattr(model, "active_adapter", None)
    matrices = []
    adapter_matrices = getattr(model, "adapter_matrices", None)  # a PeftModel: its tuner's ΔW per matrix
    if callable(adapter_matrices) and name is not None:
        for path, delta, r, factors in adapter_matrices(name):
            rank = _delta_rank(delta, factors) if delta.abs().max() > 0 else 0
            matrices.append(MatrixReport(path, tuple(delta.shape), r, rank, int(torch.count_nonzero(delta))))
    changed = sum(m.changed_entries for m in matrices)
    copies = getattr(model, "saved_module_copies", None)  # modules_to_save: trained copy vs original
    for original, copy in copies(name) if callable(copies) and name is not None else ():
        trained = dict(copy.named_parameters())
        for pname, orig in original.named_parameters():
            changed += int(torch.count_nonzero(trained[pname] != orig))
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

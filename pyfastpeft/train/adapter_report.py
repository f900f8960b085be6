"""``pyfastpeft report <adapter dir>``: the parameter report of a saved adapter, from its files.

From the files alone: the trainable parameters, the bytes on disk and, per adapted matrix of a LoRA
adapter, its rank r, the rank of ΔW = s·B·A (from the r×r core of the two factors' QR decompositions,
never the full SVD) and the non-zero entries of ΔW. With the base model (``--base DIR``, or the base
the adapter records: the built-in model, or its Hugging Face folder while it exists) the adapted model
is rebuilt, which adds the totals and the exact ΔW of every method (DoRA's rescaled rows, a sparse
delta, BitFit's biases, ...).
"""

from __future__ import annotations

import json
import re

import torch

from ..tuners import trainable_parameters
from ..tuners.effective import effective_weights
from .saved_adapter import SavedAdapter, load_base_model, read_saved_adapter, rebuild, recorded_base_folder


def _lora_scaling(config: dict, path: str, r: int) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", path):
            alpha = value
            break
    return alpha / (r**0.5 if config.get("use_rslora") else r)


@torch.no_grad()
def _factor_rank(b: torch.Tensor, a: torch.Tensor, scaling: float, shape: tuple[int, int]) -> int:
    """rank(s·B·A) with matrix_rank's default tolerance, from the r×r core R_B·R_Aᵀ."""
    core = scaling * (torch.linalg.qr(b).R @ torch.linalg.qr(a.t()).R.t())
    singular = torch.linalg.svdvals(core)
    if singular.numel() == 0 or singular.max() == 0:
        return 0
    tol = singular.max() * max(shape) * torch.finfo(core.dtype).eps
    return int((singular > tol).sum())


@torch.no_grad()
def lora_matrices(saved: SavedAdapter) -> list[dict]:
    """Per LoRA matrix of a PEFT-layout file: r, rank of ΔW and its non-zero entries (DoRA's magnitude
    rescaling needs the base weight; without it the row is the s·B·A part and says so)."""
    rows = []
    t = saved.tensors
    for key in sorted(t):
        for a_suffix, b_suffix, transpose in (
            (".lora_A.weight", ".lora_B.weight", False),
            (".lora_embedding_A", ".lora_embedding_B", True),
        ):
            if not key.endswith(a_suffix) or key[: -len(a_suffix)] + b_suffix not in t:
                continue
            path = key[: -len(a_suffix)]
            a, b = t[key].double(), t[path + b_suffix].double()
            r = a.shape[0]
            scaling = _lora_scaling(saved.config, path, r)
            delta = scaling * (b @ a)
            shape = tuple(delta.t().shape if transpose else delta.shape)
            row = {
                "name": path.removeprefix("base_model.model."),
                "shape": list(shape),
                "r": r,
                "delta_rank": _factor_rank(b, a, scaling, shape),
                "changed_entries": int(torch.count_nonzero(delta)),
            }
            if path + ".lora_magnitude_vector" in t:
                row["note"] = "DoRA: s·B·A only (the magnitude rescaling of W's rows needs --base)"
            rows.append(row)
    return rows


@torch.no_grad()
def _changed_matrices(base_state: dict, adapted) -> list[dict]:
    """Per weight the method changes: entries that differ from the base and the rank of the change
    (a tensor the method added counts against zeros)."""
    if hasattr(adapted, "peft_config"):  # a PeftModel of any method: pyfastpeft.report knows it
        from ..report import report

        rep = report(adapted, with_disk_size=False)
        return [
            {
                "name": m.name.removeprefix("base_model.model."),
                "shape": list(m.shape),
                "r": m.r or None,
                "delta_rank": m.delta_rank,
                "changed_entries": m.changed_entries,
            }
            for m in rep.matrices
        ]
    rows = []
    for name, w in effective_weights(adapted).items():
        delta = w - base_state[name].double() if name in base_state else w
        n = int(torch.count_nonzero(delta))
        if n:
            rank = int(torch.linalg.matrix_rank(delta)) if delta.dim() == 2 else None
            rows.append({"name": name, "shape": list(delta.shape), "r": None, "delta_rank": rank, "changed_entries": n})
    return rows


def adapter_report(directory, base: str | None = None, log=print) -> dict:
    saved = read_saved_adapter(directory)
    trainable = sum(t.numel() for t in saved.trainable_tensors().values())
    d = {
        "adapter": str(saved.directory),
        "layout": "Hugging Face PEFT" if saved.layout == "peft" else "pyfastpeft",
        "peft_type": saved.peft_type,
        "method": saved.method or (saved.peft_type or "").lower() or None,
        "trainable": trainable,
        "bytes_on_disk": saved.bytes_on_disk,
        "tensors": len(saved.tensors),
    }
    if base is None and not (saved.run and saved.run.get("builtin")):
        folder = recorded_base_folder(saved)  # the Hugging Face folder it was trained on, while it exists
        if folder is None:
            d["matrices"] = lora_matrices(saved) if saved.peft_type == "LORA" else []
            d["base"] = None
            d["changed_entries"] = sum(m["changed_entries"] for m in d["matrices"]) if d["matrices"] else None
            return d
        base = str(folder)
    model, description = load_base_model(base, saved, log=lambda *a, **k: None)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_total = sum(p.numel() for p in model.parameters())
    adapted = rebuild(model, saved)
    trainable_now, total = trainable_parameters(adapted)
    if trainable_now == 0:  # loaded for inference: count what the method trains
        trainable_now = trainable
    d.update(
        base=description,
        base_params=base_total,
        total=total,
        trainable=trainable_now,
        trainable_percent=100.0 * trainable_now / total if total else 0.0,
        matrices=_changed_matrices(base_state, adapted),
    )
    d["changed_entries"] = sum(m["changed_entries"] for m in d["matrices"])
    return d


def format_report(d: dict) -> str:
    lines = [f"adapter: {d['adapter']} ({d['layout']} layout; method {d['method']})"]
    lines.append(f"base: {d['base'] or 'not loaded (pass --base DIR for the totals)'}")
    lines.append(f"trainable params         {d['trainable']:>14,d}")
    if d.get("total") is not None:
        lines.append(f"all params               {d['total']:>14,d}")
        lines.append(f"trainable %              {d['trainable_percent']:>14.4f}")
    if d.get("changed_entries") is not None:
        lines.append(f"changed by merging       {d['changed_entries']:>14,d}   (non-zero entries of ΔW)")
    lines.append(f"adapter bytes on disk    {d['bytes_on_disk']:>14,d}")
    if d["matrices"]:
        width = max(len(m["name"]) for m in d["matrices"])
        lines += ["", f"{'matrix'.ljust(width)}  {'shape':>12}  {'r':>4}  {'rank ΔW':>7}  {'changed':>10}"]
        for m in d["matrices"]:
            shape = "x".join(str(s) for s in m["shape"])
            rank = "-" if m["delta_rank"] is None else str(m["delta_rank"])
            note = f"  {m['note']}" if m.get("note") else ""
            r, changed = m["r"] or "-", m["changed_entries"]
            lines.append(f"{m['name'].ljust(width)}  {shape:>12}  {r:>4}  {rank:>7}  {changed:>10,d}{note}")
    return "\n".join(lines)


def run_report(adapter: str, base: str | None = None, as_json: bool = False, log=print) -> int:
    d = adapter_report(adapter, base, log)
    log(json.dumps(d, indent=1) if as_json else format_report(d))
    return 0

"""``pyfastpeft compare``: every method on the same task with the same step budget, batch and seed,
through the same code as ``finetune``: on the built-in model at several sizes (``--model tiny``, the
default), or on one real model (``--model default`` for SmolLM2-135M-Instruct, a folder or a GGUF file)
on the dates task.

Per method and size: the task metric after training (and before, which all methods share), trainable
parameters, how many entries of the model's effective weights differ from the pretrained ones, the
largest rank of a changed weight matrix, peak memory and time per step.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import UserError
from ..tuners.effective import effective_weights
from .base import SIZES
from .checkpoint import atomic_write, atomic_write_text
from .config import CompareConfig, FinetuneConfig
from .plot import NO_MATPLOTLIB, markdown_table, pyplot_or_none


@torch.no_grad()
def change_report(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(entries that differ from the base, largest rank of a changed matrix). Tensors the method added
    (a BitFit bias) count against zeros. The rank is numerical at float32 resolution: singular values
    below 1e-5 of the largest one count as zero (merging in float64 leaves ~1e-16 noise)."""
    changed, rank = 0, 0
    for name, w in tuned.items():
        delta = w - base[name].double() if name in base else w
        n = int((delta != 0).sum())
        changed += n
        if n and delta.dim() == 2:
            rank = max(rank, int(torch.linalg.matrix_rank(delta, rtol=1e-5)))
    return changed, rank


def run_compare(config: CompareConfig) -> int:
    from ..models import TinyLlamaConfig
    from .finetune import run_finetune
    from .methods import METHODS
    from .pretrain import pretrained_builtin

    methods = [m.strip() for m in config.methods.split(",") if m.strip()] or sorted(METHODS)
    real = config.model != "tiny"
    sizes = ["real"] if real else [s.strip() for s in config.sizes.split(",") if s.strip()]
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; known methods: {', '.join(sorted(METHODS))}")
    for s in [] if real else sizes:
        if s not in SIZES:
            raise UserError(f"--sizes: unknown size {s!r}; known sizes: {', '.join(SIZES)}")
    out = Path(config.out)
    results: dict[str, list[dict]] = {}
    lr = "per method (--lr default)" if config.lr is None else config.lr
    task = "dates" if real else config.task
    steps = config.steps or (30 if real else 150)
    batch = config.batch_size or (8 if real else 32)
    kept = ", freed memory kept (--keep-freed-memory)" if config.keep_freed_memory else ""
    md = [f"# PEFT comparison: '{task}' task, {steps} steps, batch {batch}, lr {lr}, seed {config.seed}{kept}\n"]
    # what every run shares; the method, the model and the output folder change per run
    shared = FinetuneConfig(
        task=task,
        steps=steps,
        batch_size=batch,
        lr=config.lr,
        seed=config.seed,
        log_every=10**9,
        keep_freed_memory=config.keep_freed_memory,
    )
    for size in sizes:
        results[size] = []
        if real:
            model = {} if config.model == "default" else {"model": config.model}
        else:
            model = {"model": "tiny", "size": size, "pretrain_steps": config.pretrain_steps}
        for method in methods:
            ft = replace(shared, method=method, out=str(out / size / method), **model)
            print(f"[compare] {size} / {method}", flush=True)
            summary = run_finetune(ft, log=lambda *a, **k: None, keep_model=True)
            ft = summary.pop("config")  # with the settings the run resolved
            if real:
                from .base import hf_model

                base = hf_model(ft.base_folder).state_dict()
            else:
                cfg = TinyLlamaConfig(max_position_embeddings=max(ft.max_length, 2 * ft.length + 3), **SIZES[size])
                base = pretrained_builtin(
                    cfg, ft.pretrain_task, ft.pretrain_steps, 32, ft.length, 3e-3, ft.seed, log=lambda *a, **k: None
                ).state_dict()
            changed, rank = change_report(base, effective_weights(summary.pop("model")))
            row = {
                "method": method,
                summary["metric_name"] + " before": summary["before"],
                summary["metric_name"] + " after": summary["after"],
                "trainable": summary["trainable_params"],
                "changed": changed,
                "rank of change": rank,
                # CUDA: the allocator's peak while the method trained. CPU: the process's resident
                # high-water mark while it trained (reset per run on Linux; see PeakMemory), which also
                # counts what earlier methods of this process left resident: an upper bound per method
                "peak MiB": round(summary["memory"]["peak_mib"], 1),
                "ms/step": round(1e3 * summary["step_seconds"], 2),
            }
            results[size].append(row)
            print("  " + ", ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
        title = f"{config.model} model" if real else f"{size} ({SIZES[size]})"
        md.append(f"\n## {title}\n\n" + markdown_table(results[size], list(results[size][0])))
    text = "".join(md)
    print("\n" + text)
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.json", json.dumps(results, indent=1) + "\n")
    note = _chart(out / "compare.png", results, sizes, methods)
    print(note or f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    if note:
        print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}")
    return 0


def _chart(path: Path, results: dict, sizes: list[str], methods: list[str]) -> str | None:
    plt = pyplot_or_none()
    if plt is None:
        return NO_MATPLOTLIB
    metric = [k for k in results[sizes[0]][0] if k.endswith(" after")][0]
    fig, ax = plt.subplots(figsize=(2 + 1.4 * len(methods), 3.6))
    width = 0.8 / len(sizes)
    for i, size in enumerate(sizes):
        xs = [j + i * width for j in range(len(methods))]
        ax.bar(xs, [r[metric] for r in results[size]], width, label=size)
    ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(methods))], methods)
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return None

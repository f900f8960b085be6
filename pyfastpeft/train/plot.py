"""Loss and metric curves (PNG when matplotlib is installed, CSV always), bar charts and markdown tables."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .checkpoint import atomic_write, atomic_write_text


def pyplot_or_none():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


NO_MATPLOTLIB = "matplotlib is not installed (pip install 'pyfastpeft[plot]'), so no PNG was drawn"


def write_curves(out: Path, history: dict, metric_name: str) -> tuple[list[Path], str | None]:
    """``out/curves.csv`` (step, loss, metric at evaluated steps) and ``out/curves.png``.

    Returns the written paths and a note when the PNG could not be drawn."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss", metric_name])
    evals = dict(zip(history["eval_step"], history["metric"], strict=True))
    for step, loss in zip(history["step"], history["loss"], strict=True):
        w.writerow([step, f"{loss:.6f}", "" if step not in evals else f"{evals[step]:.6f}"])
    paths = [atomic_write_text(out / "curves.csv", buf.getvalue())]
    plt = pyplot_or_none()
    if plt is None:
        return paths, NO_MATPLOTLIB
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(history["step"], history["loss"], lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax2.plot(history["eval_step"], history["metric"], marker="o", ms=3)
    ax2.set_xlabel("step")
    ax2.set_ylabel(metric_name)
    ax2.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    paths.append(atomic_write(out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110)))
    plt.close(fig)
    return paths, None


def write_bar_chart(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> str | None:
    """A bar chart PNG; returns a note instead when matplotlib is missing."""
    plt = pyplot_or_none()
    if plt is None:
        return NO_MATPLOTLIB
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(labels) + 2), 3.8))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return None


def format_cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"

"""``pyfastpeft bench``: run ``bench/bench_<op>.py`` scripts and gather their results in one table.

Each script is run as its own process (``python bench/bench_<op>.py [--quick] --device D``) with
``PYFASTPEFT_BENCH_RESULTS`` pointing at a fresh folder, so the JSON it writes is collected from there
and the committed ``bench/results/`` stays untouched. Ops whose script does not exist yet are skipped
with a note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from .checkpoint import atomic_write_text
from .config import BenchConfig
from .plot import format_cell, markdown_table, write_bar_chart

KNOWN_OPS = ["lora", "multi_lora", "quant", "sparse", "optim", "bias", "distill"]


def bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "bench"


def run_benchmarks(config: BenchConfig) -> int:
    root = bench_dir()
    if not root.is_dir():
        raise UserError(f"no bench/ folder at {root}: the benchmarks run from a source checkout")
    wanted = KNOWN_OPS if config.op == "all" else [o.strip() for o in config.op.split(",") if o.strip()]
    unknown = [o for o in wanted if o not in KNOWN_OPS and not (root / f"bench_{o}.py").is_file()]
    if unknown:
        raise UserError(f"--op: unknown {unknown}; known: {', '.join(KNOWN_OPS)}, all")
    extra = sorted(p.stem[len("bench_") :] for p in root.glob("bench_*.py"))
    ops = wanted + ([o for o in extra if o not in wanted] if config.op == "all" else [])
    rows, failed = [], []
    for op in ops:
        script = root / f"bench_{op}.py"
        if not script.is_file():
            print(f"[bench] {op}: no {script.relative_to(root.parent)} yet, skipped")
            continue
        cmd = [sys.executable, str(script), "--device", config.device] + (["--quick"] if config.quick else [])
        print(f"[bench] {op}: {' '.join(cmd[1:])}", flush=True)
        with tempfile.TemporaryDirectory() as results:
            env = {**os.environ, "PYFASTPEFT_BENCH_RESULTS": results}
            proc = subprocess.run(cmd, cwd=root.parent, env=env, text=True, capture_output=True)
            print(proc.stdout, end="")
            if proc.returncode != 0:
                print(proc.stderr, end="", file=sys.stderr)
                failed.append(op)
                continue
            files = sorted(Path(results).glob("*.json"))
            if not files:
                print(f"[bench] {op}: wrote no JSON (its --quick mode prints only); its table is above")
            for f in files:
                for row in json.loads(f.read_text())["rows"]:
                    rows.append({"bench": f.stem, **row})
    if rows:
        _write_report(Path(config.out), rows)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _write_report(out: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    table = markdown_table(rows, columns)
    print("\n" + table)
    atomic_write_text(out / "bench.md", table)
    atomic_write_text(out / "bench.json", json.dumps(rows, indent=1) + "\n")
    timed = [r for r in rows if isinstance(r.get("ms"), (int, float))]
    written = [out / "bench.md", out / "bench.json"]
    if timed:
        # a row's settings are the fields before its "ms" measurement
        labels = [" / ".join(f"{format_cell(v)}" for v in list(r.values())[: list(r).index("ms")]) for r in timed]
        note = write_bar_chart(out / "bench.png", labels, [r["ms"] for r in timed], "ms (median)", "pyfastpeft bench")
        if note:
            print(note)
        else:
            written.append(out / "bench.png")
    print("[bench] wrote " + ", ".join(map(str, written)))

"""Keeps summary.json and summary.md of a staged GPU run (scripts/gpu.sh) up to date: one call after
each stage records its status, time and the figures parsed from its log, and rewrites both files
atomically, so whatever finished before a timeout is summarised.

    python scripts/gpu_summary.py record --results DIR --stage NAME --rc RC --seconds S --budget B \
        --log FILE
    python scripts/gpu_summary.py skip --results DIR --stage NAME --reason TEXT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

TIMEOUT_CODES = {124, 137}  # timeout(1)'s own, and SIGKILL after its grace period


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(results: Path) -> dict:
    path = results / "summary.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass  # a summary cut short is rebuilt from the stages recorded from now on
    return {"stages": {}}


def parse_pytest(text: str) -> dict:
    """Counts from pytest's closing line, else (a run cut short) from its -v lines."""
    counts: dict = {}
    closing = re.findall(r"^=+ (.*?) in [\d.]+s", text, re.MULTILINE)
    if closing:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", closing[-1]):
            counts["error" if what.startswith("error") else what] = int(n)
    else:
        for what in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            n = len(re.findall(rf"::\S+ {what}\b", text))
            if n:
                counts[what.lower()] = n
        counts["complete"] = False
    counts["failures"] = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE)))[:50]
    return counts


def parse_sanitizer(text: str) -> dict:
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    out: dict = {"errors": int(m[-1]) if m else None}
    if "Device not supported" in text:
        out["note"] = "compute-sanitizer does not support this device (a gVisor machine?)"
    return out


def parse_bench(results: Path) -> dict:
    path = results / "bench_gpu.json"
    if not path.exists():
        return {"note": "no bench_gpu.json"}
    data = json.loads(path.read_text())
    keep = ("figure", "candidate", "ms", "vs_baseline", "of_copy_bw", "of_bf16_matmul", "peak_vs_eager", "kernels")
    rows = [{k: r[k] for k in keep if r.get(k) is not None} for r in data.get("rows", [])]
    return {"ceilings": data.get("ceilings"), "rows": rows, "failed_sections": data.get("failed_sections", {})}


def details(stage: str, log_text: str, results: Path) -> dict:
    if stage == "tests":
        return parse_pytest(log_text)
    if stage.startswith("sanitize"):
        return parse_sanitizer(log_text)
    if stage == "bench":
        return parse_bench(results)
    return {}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return "" if v is None else str(v)


def render(summary: dict) -> str:
    lines = ["# GPU run", "", "| stage | status | seconds | budget | details |", "|---|---|---|---|---|"]
    bench = None
    for name, st in summary["stages"].items():
        d = dict(st.get("details", {}))
        if name == "bench":
            bench = d
            d = {"ceilings": d.get("ceilings"), "failed_sections": d.get("failed_sections")}
        d.pop("failures", None)
        brief = ", ".join(f"{k}={_fmt(v)}" for k, v in d.items() if v not in (None, {}, []))
        lines.append(f"| {name} | {st['status']} | {_fmt(st.get('seconds'))} | {_fmt(st.get('budget_s'))} | {brief} |")
    failures = summary["stages"].get("tests", {}).get("details", {}).get("failures")
    if failures:
        lines += ["", "## Failed tests", ""] + [f"- `{f}`" for f in failures]
    if bench and bench.get("rows"):
        cols = ["figure", "candidate", "ms", "vs_baseline", "of_copy_bw", "of_bf16_matmul", "peak_vs_eager", "kernels"]
        lines += [
            "",
            "## Figures (fractions of the ceilings measured in the same run)",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols),
        ]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in bench["rows"]]
    return "\n".join(lines) + "\n"


def save(results: Path, summary: dict) -> None:
    _write(results / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write(results / "summary.md", render(summary))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--rc", type=int, required=True)
    rec.add_argument("--seconds", type=float, required=True)
    rec.add_argument("--budget", type=float, required=True)
    rec.add_argument("--log", type=Path, required=True)
    skip = sub.add_parser("skip")
    skip.add_argument("--reason", required=True)
    for p in (rec, skip):
        p.add_argument("--results", type=Path, required=True)
        p.add_argument("--stage", required=True)
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        print(f"gpu_summary: error: --results: {args.results} is not a directory", file=sys.stderr)
        return 2
    summary = load(args.results)
    if args.cmd == "skip":
        summary["stages"][args.stage] = {"status": "skipped", "reason": args.reason}
    else:
        text = args.log.read_text(errors="replace") if args.log.exists() else ""
        status = "ok" if args.rc == 0 else "timeout" if args.rc in TIMEOUT_CODES else "failed"
        summary["stages"][args.stage] = {
            "status": status,
            "rc": args.rc,
            "seconds": round(args.seconds, 1),
            "budget_s": args.budget,
            "log": args.log.name,
            "details": details(args.stage, text, args.results),
        }
    save(args.results, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

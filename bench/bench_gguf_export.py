"""The main job's held-out exact match on its exported GGUF files, against the merged float32 model.

The default ``pyfastpeft finetune`` job (SmolLM2-135M-Instruct, LoRA, the dates task, seed 0) is run
once, or ``--adapter`` names a folder it wrote. Then, on the job's own 64 held-out dates (greedy
generation, ``DateTaskSource.evaluate``), this measures: the base model alone; the base with the adapter
(unmerged, as trained); the merged float32 model; and, per ``--quants``, the file ``export_gguf`` writes
(the embedding's format as ``pyfastpeft export`` chooses it), read two ways: by transformers' own GGUF
reader (de-quantized to float32; nothing goes through pyfastpeft's cache) and by ``pf.from_gguf(...,
quantized=True)`` (the blocks kept, computed by the project's kernels). Each row also has the logit
error against the merged float32 model on the first held-out prompts, measured as docs/gguf.md states the
formats' errors (max |Δlogit| / max |logit| and top-1 agreement over every position), and the file size.

    python -m bench.bench_gguf_export [--adapter DIR] [--quants q8_0,q4_1] [--out DIR [--keep]]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import pyfastpeft as pf
from bench._timing import print_table, write_results
from pyfastpeft.models.gguf_writer import QUANTS
from pyfastpeft.train.config import FinetuneConfig
from pyfastpeft.train.dates import DateTaskSource
from pyfastpeft.train.finetune import run_finetune
from pyfastpeft.train.gguf_export import default_embedding_quant, export_base, export_gguf
from pyfastpeft.train.merge import merged_state
from pyfastpeft.train.saved_adapter import load_base_model, read_saved_adapter, rebuild, recorded_base_folder

GOAL = 0.05  # the largest exact-match difference allowed between the q8_0 file and the merged model
LOGIT_PROMPTS = 3  # held-out prompts whose logits (every position) are compared with the merged model's
QUIET = lambda *a, **k: None  # noqa: E731


@torch.no_grad()
def prompt_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """The logits of every position of each prompt, run one prompt at a time (no padding), stacked."""
    return torch.cat([model(input_ids=torch.tensor([p])).logits[0].double() for p in prompts])


def measure(name: str, model, tokenizer, args, reference: dict) -> dict:
    """One row: exact match on the held-out dates (the task made with this model's own tokenizer), and
    the logits on the first prompts against the merged model's (``reference``, once it is set)."""
    model.eval()
    source = DateTaskSource(tokenizer, seed=args.seed, held_out=args.held_out)
    t0 = time.perf_counter()
    exact = source.evaluate(model)["exact match"]
    row = {"candidate": name, "exact_match": exact, "eval_s": time.perf_counter() - t0}
    row["same_prompts"] = source.held_prompts == reference["prompts"]
    logits = prompt_logits(model, reference["prompts"][:LOGIT_PROMPTS])
    want = reference.get("logits")
    if want is None:  # this is the merged model: the reference itself
        reference["logits"] = want = logits
    diff = (logits - want).abs().max().item()
    row["max_abs_logit_diff"] = diff
    row["rel_logit_err"] = diff / want.abs().max().item()
    row["top1_agreement"] = (logits.argmax(-1) == want.argmax(-1)).double().mean().item()
    print(f"  {name}: exact match {exact:.3f}, max |dlogit| {diff:.3g} ({row['eval_s']:.0f} s)", flush=True)
    return row


def default_job(out: Path, seed: int, held_out: int) -> tuple[Path, dict]:
    """Runs ``pyfastpeft finetune`` with no arguments but ``--out`` (and the seed and held-out count)."""
    t0 = time.perf_counter()
    summary = run_finetune(FinetuneConfig(out=str(out), seed=seed, held_out=held_out), log=QUIET)
    if summary["exit_code"] != 0:
        raise SystemExit(f"the default job did not complete: {summary}")
    keep = ("method", "step", "before", "after", "loss_first", "loss_last", "step_seconds", "model")
    return out, {**{k: summary[k] for k in keep}, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=None, help="a saved adapter of the default job (default: run the job)")
    ap.add_argument("--quants", default="q8_0,q4_1", help=f"comma-separated, of {', '.join(QUANTS)}")
    ap.add_argument("--out", default=None, help="folder for the job and the exported files (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep --out (a temporary folder is deleted otherwise)")
    ap.add_argument("--seed", type=int, default=0, help="the job's seed (its held-out dates too)")
    ap.add_argument("--held-out", type=int, default=64, help="held-out dates, as the job's --held-out")
    ap.add_argument("--name", default="gguf_export_exact_match", help="results file name under bench/results")
    args = ap.parse_args()
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANTS]
    if bad or not quants:
        ap.error(f"--quants: expected some of {', '.join(QUANTS)}, got {args.quants!r}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_gguf_export."))
    out.mkdir(parents=True, exist_ok=True)
    try:
        run(args, quants, out)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


def run(args, quants: list[str], out: Path) -> None:
    torch.manual_seed(0)
    job = None
    if args.adapter:
        adapter = Path(args.adapter)
    else:
        print(f"running the default finetune job into {out / 'job'} ...", flush=True)
        adapter, job = default_job(out / "job", args.seed, args.held_out)
        print(f"  done in {job['seconds']:.0f} s: exact match {job['before']:.3f} -> {job['after']:.3f}", flush=True)
    saved = read_saved_adapter(adapter)
    folder, source_gguf = export_base(None, recorded_base_folder(saved), log=QUIET)
    base_model, _ = load_base_model(str(folder), saved, log=QUIET)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    template = copy.deepcopy(base_model)  # the base alone, then the merged model
    adapted = rebuild(base_model, saved)
    method = saved.method or str(saved.peft_type).lower()
    merged = copy.deepcopy(template)
    merged.load_state_dict(merged_state(adapted, template, method))
    reference = {"prompts": DateTaskSource(tokenizer, seed=args.seed, held_out=args.held_out).held_prompts}

    print(f"adapter {adapter} ({method}) over {folder}; {args.held_out} held-out dates", flush=True)
    rows = [measure("merged float32", merged, tokenizer, args, reference)]  # first: the logit reference
    rows.append(measure("base float32 (no adapter)", template, tokenizer, args, reference))
    rows.append(measure("adapter, unmerged", adapted, tokenizer, args, reference))
    del template, adapted, base_model
    for quant in quants:
        path = out / f"tuned.{quant}.gguf"
        embedding = default_embedding_quant(quant)
        t0 = time.perf_counter()
        export_gguf(adapter, path, quant, embedding_quant=embedding, log=QUIET)
        export_s = time.perf_counter() - t0
        fields = {
            "quant": quant,
            "embedding_quant": embedding or quant,
            "size_mib": path.stat().st_size / 2**20,
            "export_s": export_s,
        }
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(out), gguf_file=path.name)
        load_s = time.perf_counter() - t0
        row = measure(f"{quant} file, transformers", model, tok, args, reference)
        rows.append({**row, **fields, "load_s": load_s})
        del model
        t0 = time.perf_counter()
        model, tok = pf.from_gguf(path, quantized=True)
        load_s = time.perf_counter() - t0
        row = measure(f"{quant} file, block kernels", model, tok, args, reference)
        rows.append({**row, **fields, "load_s": load_s})
        del model

    merged_em = rows[0]["exact_match"]
    for row in rows:
        row["minus_merged"] = row["exact_match"] - merged_em
    print(
        f"\nexact match on {args.held_out} held-out dates; logits vs the merged float32 model on the first "
        f"{LOGIT_PROMPTS} held-out prompts ({reference['logits'].shape[0]} positions); torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    columns = ["candidate", "exact_match", "minus_merged", "rel_logit_err", "max_abs_logit_diff", "top1_agreement"]
    print_table(rows, columns + ["size_mib", "export_s", "load_s", "eval_s"])
    goal = {}
    for row in rows:
        if row.get("quant") == "q8_0":
            kind = row["candidate"].split(", ")[1]
            goal[kind] = {"difference": row["minus_merged"], "within": abs(row["minus_merged"]) <= GOAL}
            print(
                f"q8_0 through {kind}: {row['exact_match']:.3f} vs merged {merged_em:.3f}, difference "
                f"{row['minus_merged']:+.3f}: {'within' if goal[kind]['within'] else 'NOT within'} {GOAL}"
            )
    extra = {
        "adapter": str(adapter) if args.adapter else "the default job, run by this script",
        "job": job,
        "base_folder": str(folder),
        "source_gguf": str(source_gguf),
        "seed": args.seed,
        "held_out": args.held_out,
        "logit_positions": int(reference["logits"].shape[0]),
        "goal_q8_0_within": GOAL,
        "q8_0_goal": goal,
        "load_average_1_5_15": os.getloadavg(),
    }
    path = write_results(args.name, rows, "python -m bench.bench_gguf_export " + " ".join(sys.argv[1:]), extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

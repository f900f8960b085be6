"""Prompt tuning, P-tuning and prefix tuning on the built-in TinyLlama (the command line's "medium"
size): one training step, and generation with the KV cache against full recomputation.

Rows, each timed in interleaved rounds (medians):
  training step   forward + backward + AdamW step on a copy-task batch, for each method and for LoRA
                  (r=8 on every projection) as the reference PEFT method; trainable parameters and the
                  bytes autograd saves for backward (the CPU's peak-memory proxy, see bench/_timing.py)
  generation      model.generate with the KV cache against use_cache=False (every step recomputes the
                  whole sequence), for the base model and each method; the tokens are checked equal

    python -m bench.bench_prompt_learning [--quick] [--rounds 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

import pyfastpeft as pf
from bench._timing import print_table, saved_activation_bytes, time_interleaved, write_results
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.models.data import make_batch

METHODS = {
    "prompt tuning": lambda p: pf.PromptTuningConfig(num_virtual_tokens=p),
    "P-tuning (MLP)": lambda p: pf.PromptEncoderConfig(num_virtual_tokens=p),
    "P-tuning (LSTM)": lambda p: pf.PromptEncoderConfig(num_virtual_tokens=p, encoder_reparameterization_type="LSTM"),
    "prefix tuning": lambda p: pf.PrefixTuningConfig(num_virtual_tokens=p),
    "prefix tuning (MLP)": lambda p: pf.PrefixTuningConfig(num_virtual_tokens=p, prefix_projection=True),
    "LoRA r=8 (reference)": lambda p: pf.LoraConfig(
        r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small smoke size")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    batch_size, length, virtual, new_tokens = (4, 4, 4, 8) if args.quick else (32, 8, 16, 32)
    rounds = 3 if args.quick else args.rounds
    torch.manual_seed(0)
    base = TinyLlamaForCausalLM(
        TinyLlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    )
    batch = make_batch("copy", batch_size, length, base.config.vocab_size, torch.Generator().manual_seed(0))
    models = {name: pf.get_peft_model(copy.deepcopy(base), make(virtual)) for name, make in METHODS.items()}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for name, m in models.items()
    }

    def step(name):
        def run():
            m, opt = models[name], optimizers[name]
            loss = m(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    times = time_interleaved({n: step(n) for n in models}, rounds=rounds)
    lora_ms = times["LoRA r=8 (reference)"]
    rows = []
    for name, m in models.items():
        saved = saved_activation_bytes(
            lambda m=m: m(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        )
        rows.append(
            {
                "case": f"train step: {name}",
                "ms": times[name],
                "vs LoRA": times[name] / lora_ms,
                "trainable": pf.report(m, with_disk_size=False).trainable,
                "saved bytes": saved,
            }
        )

    prompt_ids = batch.input_ids[:, : length + 2]  # BOS, the symbols, SEP: the answer is generated
    gen_models = {"base model": base.eval(), **{n: m.eval() for n, m in models.items() if "LoRA" not in n}}
    cases = {}
    for name, m in gen_models.items():
        cached = m.generate(prompt_ids, new_tokens)
        recomputed = m.generate(prompt_ids, new_tokens, use_cache=False)
        if not torch.equal(cached, recomputed):
            sys.exit(f"{name}: KV-cache generation differs from full recomputation")
        cases[f"{name}|cache"] = lambda m=m: m.generate(prompt_ids, new_tokens)
        cases[f"{name}|full"] = lambda m=m: m.generate(prompt_ids, new_tokens, use_cache=False)
    gen_times = time_interleaved(cases, rounds=max(3, rounds // 2))
    for name in gen_models:
        cached, full = gen_times[f"{name}|cache"], gen_times[f"{name}|full"]
        rows.append(
            {
                "case": f"generate {new_tokens} tokens: {name}",
                "ms": cached,
                "full recompute ms": full,
                "speedup": full / cached,
                "tokens/s": batch_size * new_tokens / (cached / 1e3),
            }
        )
    columns = ["case", "ms", "vs LoRA", "trainable", "saved bytes", "full recompute ms", "speedup", "tokens/s"]
    print(f"batch {batch_size}, sequence {batch.input_ids.shape[1]}, {virtual} virtual tokens, {rounds} rounds")
    print_table(rows, columns)
    if not args.quick:
        command = "python -m bench.bench_prompt_learning " + " ".join(sys.argv[1:])
        path = write_results("prompt_learning", rows, command, {"threads": torch.get_num_threads(), "pid": os.getpid()})
        print(f"written to {path}")


if __name__ == "__main__":
    main()

"""(IA)³ and bottleneck adapters: what they cost over the frozen base.

Part 1, the (IA)³ layer, forward + backward (dx and dl) of one linear with the vector active, against
  - the frozen nn.Linear alone (the floor: what the scaling should cost next to nothing over), and
  - Hugging Face PEFT's IA3 Linear on the same weights (when peft is installed),
for the output-scaling (keys/values) and the input-scaling (feed-forward) cases; plus saved-activation
bytes. Part 2, one training step (forward, backward, AdamW) of the built-in TinyLlama per method: time,
trainable parameters, saved-activation bytes.

    python -m bench.bench_ia3_adapters [--device cpu|cuda] [--quick] [--rounds 20] [--threads N] [--cpu-time]

On a shared CPU, ``--threads 1 --cpu-time`` (this process's CPU time, one thread) gives the steadier
figures.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

import pyfastpeft as pf
from bench._timing import print_table, saved_activation_bytes, time_interleaved, write_results
from pyfastpeft.models import TinyLlamaConfig, TinyLlamaForCausalLM
from pyfastpeft.models.data import make_batch
from pyfastpeft.tuners import IA3Linear


def layer_rows(n: int, d_in: int, d_out: int, dev: str, rounds: int, clock) -> list[dict]:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, device=dev).requires_grad_(False)
    x = torch.randn(n, d_in, device=dev, requires_grad=True)
    try:
        import peft
    except ImportError:  # the PEFT column is optional
        peft = None
    rows = []
    for feedforward in (False, True):
        ours = IA3Linear(copy.deepcopy(base), feedforward)
        ours.update_layer("default", init=False)
        ours.active_adapters = ["default"]
        gy = torch.randn(n, d_out, device=dev)
        fns = {"frozen nn.Linear": base, "pyfastpeft IA3Linear": ours}
        if peft is not None:
            config = peft.IA3Config(target_modules=["x"], feedforward_modules=["x"] if feedforward else [])
            theirs = peft.tuners.ia3.Linear(copy.deepcopy(base), "default", config, is_feedforward=feedforward)
            with torch.no_grad():
                theirs.ia3_l["default"].copy_(ours.ia3_l["default"])
            fns["PEFT ia3.Linear"] = theirs

        def step(module, gy=gy):
            def run():
                x.grad = None
                for p in module.parameters():
                    p.grad = None
                module(x).backward(gy)

            return run

        times = time_interleaved({k: step(m) for k, m in fns.items()}, device=dev, rounds=rounds, clock=clock)
        floor = times["frozen nn.Linear"]
        for name, module in fns.items():
            rows.append(
                {
                    "case": "input scaling (feed-forward)" if feedforward else "output scaling (k, v)",
                    "impl": name,
                    "shape": f"{n}x{d_in}->{d_out}",
                    "fwd+bwd ms": times[name],
                    "x frozen linear": times[name] / floor,
                    "saved MB": saved_activation_bytes(lambda m=module: m(x), exclude=(x, *module.parameters()))
                    / 2**20,
                }
            )
    return rows


def kernel_rows(n: int, d: int, dev: str, rounds: int, clock) -> list[dict]:
    """The scaling's backward alone: the fused op against what autograd's multiply does."""
    torch.manual_seed(0)
    x, gy, scale = (torch.randn(n, d, device=dev), torch.randn(n, d, device=dev), torch.randn(d, device=dev))
    fns = {
        "pyfastpeft ia3_scale_backward": lambda: torch.ops.pyfastpeft.ia3_scale_backward(gy, x, scale, [True, True]),
        "torch: dy*l, (dy*x).sum(0)": lambda: (gy * scale, (gy * x).sum(0)),
    }
    times = time_interleaved(fns, device=dev, rounds=rounds, clock=clock)
    base = times["torch: dy*l, (dy*x).sum(0)"]
    return [
        {
            "case": "backward of the scaling",
            "impl": k,
            "shape": f"{n}x{d}",
            "bwd ms": v,
            "vs torch": v / base,
        }
        for k, v in times.items()
    ]


def tiny_model(cfg: TinyLlamaConfig) -> TinyLlamaForCausalLM:
    torch.manual_seed(0)
    return TinyLlamaForCausalLM(cfg)


METHODS = {
    "lora r=8 (q,k,v,o,gate,up,down)": lambda: pf.LoraConfig(
        r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ),
    "lora r=8, A tied across layers": lambda: pf.LoraConfig(
        r=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        tie_lora_A=True,
    ),
    "ia3 (k, v, down)": lambda: pf.IA3Config(),
    "adapter houlsby rf=16": lambda: pf.AdapterConfig(config="houlsby"),
    "adapter pfeiffer rf=16": lambda: pf.AdapterConfig(config="pfeiffer"),
    "adapter parallel rf=16": lambda: pf.AdapterConfig(config="parallel"),
    "adapter houlsby, shared by all layers": lambda: pf.AdapterConfig(config="houlsby", share_across_layers=True),
}


def model_rows(batch_size: int, dev: str, rounds: int, clock) -> list[dict]:
    cfg = TinyLlamaConfig()
    batch = make_batch("copy", batch_size, 8, cfg.vocab_size, torch.Generator().manual_seed(0))
    ids, labels = batch.input_ids.to(dev), batch.labels.to(dev)
    models, steps = {}, {}
    for name, make in METHODS.items():
        model = pf.get_peft_model(tiny_model(cfg).to(dev), make())
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def run(model=model, opt=opt):
            loss = model(ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

        models[name], steps[name] = model, run
    times = time_interleaved(steps, device=dev, rounds=rounds, clock=clock)
    rows = []
    for name, model in models.items():
        trainable, total = model.get_nb_trainable_parameters()
        saved = saved_activation_bytes(lambda model=model: model(ids, labels=labels).loss)
        rows.append(
            {
                "method": name,
                "step ms": times[name],
                "trainable": trainable,
                "trainable %": 100.0 * trainable / total,
                "saved MB": saved / 2**20,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if pf.cuda_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a small smoke size")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    ap.add_argument("--cpu-time", action="store_true", help="time with process_time (CPU time) instead of wall")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    n, d_in, d_out = (256, 256, 256) if args.quick else (2048, 1024, 1024)
    layers = layer_rows(n, d_in, d_out, args.device, args.rounds, clock)
    layers += kernel_rows(n, d_out, args.device, args.rounds, clock)
    print_table(layers, ["case", "impl", "shape", "fwd+bwd ms", "bwd ms", "x frozen linear", "vs torch", "saved MB"])
    print()
    steps = model_rows(4 if args.quick else 16, args.device, args.rounds, clock)
    print_table(steps, ["method", "step ms", "trainable", "trainable %", "saved MB"])
    name = f"ia3_adapters_{args.device}" + ("_quick" if args.quick else "")
    extra = {"threads": torch.get_num_threads(), "clock": "process_time" if args.cpu_time else "perf_counter"}
    command = "python -m bench.bench_ia3_adapters " + " ".join(sys.argv[1:])
    path = write_results(name, layers + steps, command, extra)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Runs the key CPU ops at the level that PYFASTPEFT_CPU_CAPABILITY selects and saves the results.

Run as a script (``python cpu_levels_probe.py OUT.safetensors``) by tests/test_cpu_dispatch.py, once per
level the machine runs. Every case is computed twice; ``<case>.deterministic`` records whether the two
runs were bit-identical. The inputs are made from fixed seeds, so every level sees the same ones.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

import pyfastpeft
import pyfastpeft.ops as ops


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inputs(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The cases' inputs (also used by the test for its float64 references)."""
    g = _gen(0)
    n, d_in, d_out, r = 37, 67, 45, 5  # odd sizes: every level runs its vector body and its tails

    def t(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return {
        "x": t(n, d_in),
        "weight": t(d_out, d_in, scale=0.2),
        "bias": t(d_out),
        "lora_A": t(r, d_in, scale=0.3),
        "lora_B": t(d_out, r, scale=0.3),
        "grad_y": t(n, d_out),
        "ia3_scale": t(d_in),
        "stack_A": t(3, r, d_in, scale=0.3),
        "stack_B": t(3, d_out, r, scale=0.3),
        "adapters": torch.randint(-1, 3, (n,), generator=g),
        "teacher": t(n, 301),
        "student": t(n, 301),
        "labels": torch.randint(0, 301, (n,), generator=g),
        "sparse_idx": torch.randperm(d_out * d_in, generator=g)[:97].sort().values,
        "param": t(1000),
        "grad": t(1000),
        "exp_avg": t(1000, scale=0.1),
        "exp_avg_sq": t(1000, scale=0.1).abs(),
    }


def _lora(dtype: torch.dtype, dropout_p: float) -> dict[str, torch.Tensor]:
    a = inputs(dtype)
    x, A, B, W = (a[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B", "weight"))
    y = ops.lora_linear(x, W, a["bias"], A, B, scaling=1.5, dropout_p=dropout_p, seed=1234)
    y.backward(a["grad_y"])
    return {"y": y.detach(), "dx": x.grad, "dA": A.grad, "dB": B.grad, "dW": W.grad}


def _multi_lora(dtype: torch.dtype, dropout_p: float) -> dict[str, torch.Tensor]:
    a = inputs(dtype)
    x, A, B = (a[k].clone().requires_grad_(True) for k in ("x", "stack_A", "stack_B"))
    y = ops.multi_lora_linear(x, a["weight"], a["bias"], A, B, [1.5, 0.5, 2.0], a["adapters"], dropout_p, seed=99)
    y.backward(a["grad_y"])
    return {"y": y.detach(), "dx": x.grad, "dA": A.grad, "dB": B.grad}


def _mask() -> dict[str, torch.Tensor]:
    ones = torch.ones(3, 1000)
    return {"f32": ops.philox_dropout(ones, 0.3, seed=7), "f64": ops.philox_dropout(ones.double(), 0.3, seed=7)}


def _quant(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    a = inputs(dtype)
    out = {}
    for name, kw in {"tensor": {"group_size": 0}, "channel": {"group_size": -1}, "group": {"group_size": 67}}.items():
        x = a["x"].clone().requires_grad_(True)
        q, scale, zp = ops.fake_quantize(x, bits=4, symmetric=False, **kw)
        q.backward(a["x"].flip(0))
        out.update({f"{name}.q": q.detach(), f"{name}.scale": scale, f"{name}.zp": zp, f"{name}.dx": x.grad})
    x = a["x"].clone().requires_grad_(True)
    s = out["channel.scale"].clone().requires_grad_(True)
    y = ops.fake_quantize_lsq(x, s, None, bits=4, group_size=-1)
    y.backward(a["x"].flip(0))
    out.update({"lsq.y": y.detach(), "lsq.dx": x.grad, "lsq.dscale": s.grad})
    return out


def _optim() -> dict[str, torch.Tensor]:
    a = inputs(torch.float32)
    p, m, v = a["param"].clone(), a["exp_avg"].clone(), a["exp_avg_sq"].clone()
    step = torch.zeros(())
    for _ in range(3):
        ops.fused_adamw_([p], [a["grad"]], [m], [v], [step], torch.tensor(1e-2, dtype=torch.float64))
    return {"param": p, "exp_avg": m, "exp_avg_sq": v, "norm": ops.multi_tensor_l2_norm([a["grad"], a["x"]])}


def _sparse() -> dict[str, torch.Tensor]:
    a = inputs(torch.float32)
    return {"grad": ops.sampled_weight_grad(a["grad_y"], a["x"], a["sparse_idx"], a["x"].shape[1])}


def _distill(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    a = inputs(dtype)
    s = a["student"].clone().requires_grad_(True)
    loss = ops.kd_loss(s, a["teacher"], a["labels"], temperature=2.0, alpha=0.3)
    loss.backward()
    return {"loss": loss.detach(), "ds": s.grad}


def _ia3_bias(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    a = inputs(dtype)
    x, l_ = a["x"].clone().requires_grad_(True), a["ia3_scale"].clone().requires_grad_(True)
    ops.ia3_scale(x, l_).backward(a["x"].flip(0))
    xb, b = a["x"].clone().requires_grad_(True), a["bias"].clone().requires_grad_(True)
    ops.bias_only_linear(xb, a["weight"], b).backward(a["grad_y"])
    return {"ia3.dx": x.grad, "ia3.dl": l_.grad, "bias.dx": xb.grad, "bias.db": b.grad}


CASES = {
    "mask": _mask,
    "lora.f32": lambda: _lora(torch.float32, 0.0),
    "lora_drop.f32": lambda: _lora(torch.float32, 0.25),
    "lora_drop.bf16": lambda: _lora(torch.bfloat16, 0.25),
    "lora_drop.f64": lambda: _lora(torch.float64, 0.25),
    "multi_lora.f32": lambda: _multi_lora(torch.float32, 0.0),
    "multi_lora_drop.f64": lambda: _multi_lora(torch.float64, 0.2),
    "quant.f32": lambda: _quant(torch.float32),
    "quant.bf16": lambda: _quant(torch.bfloat16),
    "optim.f32": _optim,
    "sparse.f32": _sparse,
    "distill.f32": lambda: _distill(torch.float32),
    "distill.bf16": lambda: _distill(torch.bfloat16),
    "ia3_bias.f32": lambda: _ia3_bias(torch.float32),
    "ia3_bias.bf16": lambda: _ia3_bias(torch.bfloat16),
}


def main(path: str) -> None:
    out: dict[str, torch.Tensor] = {}
    for case, fn in CASES.items():
        first, second = fn(), fn()
        same = all(torch.equal(first[k], second[k]) for k in first)
        out[f"{case}.deterministic"] = torch.tensor(same)
        out.update({f"{case}/{k}": v.contiguous() for k, v in first.items()})
    out["level"] = torch.tensor([ord(c) for c in pyfastpeft.build_info()["cpu_capability"]], dtype=torch.uint8)
    save_file(out, path)


if __name__ == "__main__":
    main(sys.argv[1])

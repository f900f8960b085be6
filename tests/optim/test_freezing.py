"""FreezingScheduler with FusedAdamW: settled blocks freeze, their state is freed, no rebuild."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfastpeft  # noqa: F401
from pyfastpeft.optim import FreezingScheduler, FusedAdamW


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def test_settled_block_freezes_and_costs_no_rebuild():
    model = make_model()
    # block "slow" barely moves (tiny learning rate): it settles; the others keep moving
    opt = FusedAdamW(
        [
            {"params": model[0].parameters(), "lr": 1e-7},
            {"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 1e-2},
        ]
    )
    sched = FreezingScheduler({"slow": model[0], "mid": model[2], "head": model[4]}, threshold=1e-4, window=5)
    x, t = torch.randn(32, 8), torch.randn(32, 4)
    frozen_at = None
    for step in range(30):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        opt.step()
        if sched.step() == ["slow"]:
            frozen_at = step
            frozen_values = [p.detach().clone() for p in model[0].parameters()]
    assert frozen_at == 4  # the end of the first window
    assert sched.frozen == {"slow"}
    assert all(not p.requires_grad and p.grad is None for p in model[0].parameters())
    assert all(torch.equal(p, v) for p, v in zip(model[0].parameters(), frozen_values, strict=True))
    assert all(p not in opt.state for p in model[0].parameters())  # moments freed by the optimizer
    assert all(opt.state[p]["step"].item() == 30 for p in model[4].parameters())
    report = sched.report()
    n_slow = sum(p.numel() for p in model[0].parameters())
    n_all = sum(p.numel() for p in model.parameters())
    assert report["frozen_params"] == n_slow
    assert report["frozen_param_steps"] == n_slow * 25
    assert report["saved_weight_grad_fraction"] == pytest.approx(n_slow * 25 / (n_all * 30))
    assert report["last_relative_update"]["slow"] < 1e-4 < report["last_relative_update"]["head"]

    sched.unfreeze("slow")
    assert all(p.requires_grad for p in model[0].parameters())
    opt.zero_grad()
    nn.functional.mse_loss(model(x), t).backward()
    opt.step()
    assert all(opt.state[p]["step"].item() == 1 for p in model[0].parameters())  # a fresh start


def test_relative_update_and_patience():
    p = nn.Parameter(torch.ones(4))
    sched = FreezingScheduler({"b": [p]}, threshold=0.1, window=2, patience=2)
    with torch.no_grad():
        p.add_(0.5)  # relative update 0.5 in the first window
    assert sched.relative_update("b") == pytest.approx(0.5)
    assert sched.step() == [] and sched.step() == []
    assert sched.step() == [] and sched.step() == []  # calm once
    assert sched.step() == [] and sched.step() == ["b"]  # calm twice in a row: frozen
    with pytest.raises(ValueError, match="unknown block"):
        sched.unfreeze("nope")
    with pytest.raises(ValueError, match="threshold"):
        FreezingScheduler({"b": [p]}, threshold=0)

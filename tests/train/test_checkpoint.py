"""Atomic writes and the optimizer-state round trip a checkpoint relies on."""

from __future__ import annotations

import pytest
import torch

from pyfastpeft.train.checkpoint import (
    atomic_write,
    load_tensors,
    optimizer_from_flat,
    optimizer_to_flat,
    save_tensors,
)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_tensors_and_json_metadata_round_trip(tmp_path):
    t = {"a": torch.randn(3, 2), "b": torch.arange(5)}
    save_tensors(tmp_path / "s.safetensors", t, {"step": 3, "nested": {"k": [1, 2]}})
    back, meta = load_tensors(tmp_path / "s.safetensors")
    assert meta == {"step": 3, "nested": {"k": [1, 2]}}
    assert all(torch.equal(t[k], back[k]) for k in t)


def test_optimizer_state_round_trip_continues_identically():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(4, 3))
    opt1 = torch.optim.AdamW([w1], lr=0.1)
    for _ in range(3):
        opt1.zero_grad()
        (w1**2).sum().backward()
        opt1.step()
    tensors, meta = optimizer_to_flat(opt1)
    w2 = torch.nn.Parameter(w1.detach().clone())
    opt2 = torch.optim.AdamW([w2], lr=0.5)  # the saved lr must win
    optimizer_from_flat(opt2, {k: v.clone() for k, v in tensors.items()}, meta)
    for w, opt in ((w1, opt1), (w2, opt2)):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert torch.equal(w1, w2)

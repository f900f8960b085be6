"""DistillationLoss and the distill() loop on small teacher/student models."""

from __future__ import annotations

import contextlib

import pytest
import torch

import pyfastpeft as pf
from pyfastpeft.distill import DistillationLoss, distill
from pyfastpeft.ops import reference
from tests.conftest import assert_within_rounding
from tests.ops.test_distill import kd_terms

VOCAB, HIDDEN, SEQ = 50, 16, 6


class TinyLM(torch.nn.Module):
    """Embedding → tanh MLP → head, returning logits [B, S, V]."""

    def __init__(self, hidden: int = HIDDEN, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.mlp = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.mlp(self.embed(input_ids))))


class AdapterLM(TinyLM):
    """TinyLM with a zero-initialised low-rank adapter on the MLP and a PEFT-style disable_adapter()."""

    def __init__(self, rank: int = 4, seed: int = 0):
        super().__init__(seed=seed)
        self.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(rank, HIDDEN) * 0.1)
        self.lora_B = torch.nn.Parameter(torch.zeros(HIDDEN, rank))
        self.adapters_on = True

    @contextlib.contextmanager
    def disable_adapter(self):
        self.adapters_on = False
        try:
            yield
        finally:
            self.adapters_on = True

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = self.mlp(x)
        if self.adapters_on:
            h = h + x @ self.lora_A.t() @ self.lora_B.t()
        return self.head(torch.tanh(h))


def batches(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (4, SEQ), generator=g)
        labels[:, :2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_distillation_loss_module_matches_reference():
    s = torch.randn(3, 5, VOCAB, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, VOCAB, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (3, 5))
    labels[0] = -100
    module = DistillationLoss(temperature=2.0, alpha=0.25, divergence="reverse_kl")
    kw = dict(temperature=2.0, alpha=0.25, divergence="reverse_kl")
    loss_terms, _ = kd_terms(s, t, labels, **kw)
    # both float64, each within (vocab + rows) roundings of the terms plus a few single operations
    chain = 2 * (VOCAB + 15)
    ref = reference.kd_loss(s, t, labels, 2.0, 0.25, divergence="reverse_kl")
    assert_within_rounding("loss", module(s, t, labels), ref, loss_terms, terms=chain, roundings=16)
    assert "reverse_kl" in repr(module)


def test_distillation_loss_from_hidden():
    hs = torch.randn(10, HIDDEN, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(VOCAB, HIDDEN, dtype=torch.float64)
    ht = torch.randn(10, 8, dtype=torch.float64)
    wt = torch.randn(VOCAB, 8, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (10,))
    module = DistillationLoss(temperature=1.5, alpha=0.5, divergence="js", chunk_size=3)
    s, t = hs.detach() @ ws.T, ht @ wt.T
    s_abs, t_abs = hs.detach().abs() @ ws.abs().T, ht.abs() @ wt.abs().T
    loss_terms, _ = kd_terms(s, t, labels, 1.5, 0.5, "js", s_abs=s_abs, t_abs=t_abs)
    chain = 2 * (VOCAB + 10 + HIDDEN + 8)
    ref = reference.fused_linear_kd_loss(hs, ws, ht, wt, labels, 1.5, 0.5, divergence="js")
    assert_within_rounding(
        "loss", module.from_hidden(hs, ws, ht, wt, labels), ref, loss_terms, terms=chain, roundings=16
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(divergence="kl"), "divergence"),
        (dict(temperature=0.0), "temperature"),
        (dict(alpha=-0.1), "alpha"),
        (dict(chunk_size=-2), "chunk_size"),
    ],
)
def test_distillation_loss_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationLoss(**kwargs)


def test_distill_reduces_the_loss_with_a_separate_teacher():
    teacher = TinyLM(hidden=32, seed=3)
    student = TinyLM(seed=4)
    data = batches()
    loss = DistillationLoss(temperature=2.0, alpha=0.0)
    before = [loss(student(b["input_ids"]), teacher(b["input_ids"]), b["labels"]).item() for b in data]
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = distill(teacher, student, data, loss=loss, lr=1e-2, epochs=5)
    after = [loss(student(b["input_ids"]), teacher(b["input_ids"]), b["labels"]).item() for b in data]
    assert len(losses) == 5 * len(data)
    assert sum(after) < 0.5 * sum(before)
    for k, v in teacher.state_dict().items():  # the teacher is never updated
        assert torch.equal(v, teacher_state[k])
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_with_adapters_disabled_teacher_trains_only_the_adapter():
    student = AdapterLM()
    base = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("lora_")}
    data = batches(4)
    # The adapter starts at zero, so the student equals its base model: a pure KD loss starts at 0 and
    # the labels' cross-entropy is what moves the adapter away from the base.
    loss = DistillationLoss(temperature=1.0, alpha=0.5)
    seen_teacher_modes = []
    orig_forward = student.forward

    def spy(input_ids):
        seen_teacher_modes.append(student.adapters_on)
        return orig_forward(input_ids)

    student.forward = spy
    losses = distill(None, student, data, loss=loss, lr=5e-2, max_steps=3)
    assert len(losses) == 3
    assert seen_teacher_modes[:2] == [False, True]  # teacher pass with adapters off, then the student's
    assert student.lora_B.abs().sum() > 0
    for k, v in student.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k])


def test_distill_with_hugging_face_style_outputs_and_shifted_labels():
    class Output:
        def __init__(self, logits):
            self.logits = logits

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return Output(self.inner(input_ids))

    teacher, student = Wrapped(TinyLM(seed=5)), Wrapped(TinyLM(seed=6))
    pairs = [(b["input_ids"], b["labels"]) for b in batches(2)]
    steps = []
    losses = distill(
        teacher,
        student,
        pairs,
        loss=DistillationLoss(alpha=0.3, divergence="js"),
        shift_labels=True,
        on_step=lambda step, value: steps.append(step),
    )
    assert steps == [1, 2] and all(torch.isfinite(torch.tensor(losses)))


def test_distill_bad_arguments():
    student = TinyLM()
    with pytest.raises(ValueError, match="disable_adapter"):
        distill(None, student, batches(1))
    with pytest.raises(ValueError, match="teacher"):
        distill(student, student, batches(1))
    frozen = TinyLM().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        distill(TinyLM(), frozen, batches(1))
    with pytest.raises(ValueError, match="data"):
        distill(TinyLM(), TinyLM(), [object()])
    with pytest.raises(ValueError, match="labels: required"):
        distill(TinyLM(), TinyLM(), [torch.randint(0, VOCAB, (2, 3))])  # bare inputs need alpha=0
    assert pf.distill.distill is distill

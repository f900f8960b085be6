"""Plain-PyTorch references of every op. Tests compare the kernels against these in float64;
benchmarks time them as the eager baseline."""

from __future__ import annotations

import math

import torch


def lora_linear(x, weight, bias, lora_A, lora_B, scaling=1.0, dropout_mask=None, dropout_p=0.0):
    """Hugging Face PEFT's LoRA formula: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``.

    ``dropout_mask`` (same shape as x, 0/1) fixes the dropout so the result can be compared exactly.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    return y + (xd @ lora_A.t() @ lora_B.t()) * scaling


def kd_loss(student_logits, teacher_logits, labels=None, temperature=1.0, alpha=0.5, ignore_index=-100,
            divergence="forward_kl"):
    """The eager composition: ``α·cross_entropy(s, labels) + (1 − α)·T²·D(softmax(t/T), softmax(s/T))``
    per token, mean over tokens whose label is not ``ignore_index`` (0 when there are none)."""
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    ls = torch.log_softmax(s / temperature, dim=-1)
    lt = torch.log_softmax(t / temperature, dim=-1)
    if divergence == "forward_kl":
        d = torch.nn.functional.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse_kl":
        d = torch.nn.functional.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    elif divergence == "js":
        lm = torch.logsumexp(torch.stack([ls, lt]), dim=0) - math.log(2.0)
        d = 0.5 * (torch.nn.functional.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
                   + torch.nn.functional.kl_div(lm, lt, reduction="none", log_target=True).sum(-1))
    else:
        raise ValueError(f"divergence: unknown {divergence!r}")
    row = (1.0 - alpha) * temperature**2 * d
    if labels is None:
        valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        if alpha > 0:
            row = row + alpha * torch.nn.functional.cross_entropy(s, flat, ignore_index=ignore_index, reduction="none")
    row = torch.where(valid, row, torch.zeros((), dtype=row.dtype, device=row.device))
    return row.sum() / valid.sum().clamp(min=1)


def fused_linear_kd_loss(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, labels=None,
                         temperature=1.0, alpha=0.5, ignore_index=-100, divergence="forward_kl"):
    """:func:`kd_loss` on the full logits ``h·Wᵀ`` of student and teacher."""
    s = student_hidden @ student_head_weight.t()
    with torch.no_grad():
        t = teacher_hidden @ teacher_head_weight.t()
    return kd_loss(s, t, labels, temperature, alpha, ignore_index, divergence)

"""Plain-PyTorch references of every op. Tests compare the kernels against these in float64;
benchmarks time them as the eager baseline."""

from __future__ import annotations

import math

import torch


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as a matrix of ``width`` columns (``reshape(-1, 0)`` cannot infer the rows of a 0-wide input)."""
    return t.reshape(math.prod(t.shape[:-1]), width)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling=1.0, dropout_mask=None, dropout_p=0.0):
    """Hugging Face PEFT's LoRA formula: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``.

    ``dropout_mask`` (same shape as x, 0/1) fixes the dropout so the result can be compared exactly.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    xd = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    return y + (xd @ lora_A.t() @ lora_B.t()) * scaling


def philox4x32_10(counter_lo, counter_hi: int, key: int):
    """Philox4x32-10 on numpy arrays of 64-bit counters (the spec csrc/include/pyfastpeft/philox.h
    implements); returns the four 32-bit words as uint64 arrays."""
    import numpy as np

    m32 = np.uint64(0xFFFFFFFF)
    ctr = np.asarray(counter_lo, dtype=np.uint64)
    c0, c1 = ctr & m32, ctr >> np.uint64(32)
    c2 = np.full_like(c0, counter_hi & 0xFFFFFFFF)
    c3 = np.full_like(c0, (counter_hi >> 32) & 0xFFFFFFFF)
    k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0),
            p1 & m32,
            (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1),
            p0 & m32,
        )
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def philox_keep_mask(numel: int, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The keep mask (bool, flat) every pyfastpeft dropout draws for ``numel`` elements."""
    import numpy as np

    e = np.arange(numel, dtype=np.int64)
    block = (e // 128) * 16 + e % 16
    lane = (e % 128) // 16
    words = np.stack(philox4x32_10(block.astype(np.uint64), offset, seed))
    word = words[lane // 2, np.arange(numel)]
    u16 = (word >> (16 * (lane % 2)).astype(np.uint64)) & np.uint64(0xFFFF)
    threshold = min(int(p * 65536.0 + 0.5), 65535)
    return torch.from_numpy(u16 >= threshold)


def sampled_weight_grad(grad_y, x, indices, in_features):
    """The dense weight gradient ``grad_yᵀ·x`` gathered at the flat indices."""
    dense = _rows(grad_y, grad_y.shape[-1]).t() @ _rows(x, in_features)
    return dense.reshape(-1)[indices.long()]


def sparse_delta_linear(x, weight, bias, delta, indices):
    """``linear(x, W₀ + Δ, b)`` with Δ scattered densely (differentiable in x, bias and delta)."""
    dense = torch.zeros(weight.numel(), dtype=delta.dtype, device=delta.device).index_put((indices.long(),), delta)
    return torch.nn.functional.linear(x, weight + dense.view_as(weight), bias)


# ---- quant -------------------------------------------------------------------------------------------
# The fake-quantization formula of pyfastpeft/ops/quant.py in float64. Where the formula rounds to the
# accumulation type (float32 for float32/16-bit inputs), `_acc` rounds the exact float64 value the same way;
# a single float32 operation rounded once equals float64-then-float32 (53 >= 2·24 + 2 bits).
QUANT_EPS = torch.finfo(torch.float32).eps


def _quant_layout(x, group_size, axis):
    """(pre, C, post) view sizes and the scale shape of a scheme."""
    if group_size == 0:
        return (1, 1, x.numel()), ()
    if group_size == -1:
        a = axis % x.dim()
        pre = 1
        for d in x.shape[:a]:
            pre *= d
        post = x.numel() // max(1, pre * x.shape[a])
        return (pre, x.shape[a], post), (x.shape[a],)
    g = group_size
    return (1, x.numel() // g, g), (*x.shape[:-1], x.shape[-1] // g)


def _acc(x_dtype):
    if x_dtype == torch.float64:
        return lambda t: t
    return lambda t: t.float().double()


def fake_quantize_qparams(x, bits=8, group_size=-1, symmetric=True, axis=0, dtype=None):
    """(scale, zero_point) in float64 (values exactly those of the kernel), per the scheme's groups.
    ``dtype``: the input dtype whose accumulation rules apply (default x.dtype)."""
    (pre, C, post), shape = _quant_layout(x, group_size, axis)
    acc = _acc(dtype or x.dtype)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    xg = x.detach().double().reshape(pre, C, post).transpose(0, 1).reshape(C, pre * post)
    probe = (xg * 0).sum(dim=1)
    lo = xg.amin(dim=1).clamp(max=0) if xg.shape[1] else torch.zeros(C, dtype=torch.float64)
    hi = xg.amax(dim=1).clamp(min=0) if xg.shape[1] else torch.zeros(C, dtype=torch.float64)
    if symmetric:
        scale = acc(torch.maximum(-lo, hi) / ((qmax - qmin) / 2))
        zero_point = torch.zeros_like(scale)
    else:
        scale = acc((hi - lo) / (qmax - qmin))
    scale = scale.clamp(min=QUANT_EPS)
    if not symmetric:
        zero_point = (qmin - torch.round(acc(lo / scale))).clamp(qmin, qmax)
    bad = torch.isnan(probe)
    scale = torch.where(bad, torch.nan, scale)
    zero_point = torch.where(bad, 0.0, zero_point)
    return scale.reshape(shape), zero_point.reshape(shape)


def _broadcast_qparam(t, x, group_size, axis):
    """A per-group tensor expanded to x's shape."""
    (pre, C, post), _ = _quant_layout(x, group_size, axis)
    return t.reshape(1, C, 1).expand(pre, C, post).reshape(x.shape)


def fake_quantize_codes(x, scale, zero_point, bits=8, group_size=-1, axis=0, dtype=None):
    """Unclamped integer codes ``rint(x · acc(1/s)) + z`` in float64, given (scale, zero_point)."""
    acc = _acc(dtype or x.dtype)
    s = _broadcast_qparam(scale.double(), x, group_size, axis)
    z = _broadcast_qparam(zero_point.double(), x, group_size, axis)
    return torch.round(acc(x.detach().double() * acc(1.0 / s))) + z


def fake_quantize(x, bits=8, group_size=-1, symmetric=True, axis=0, dtype=None):
    """``(out, scale, zero_point)`` in float64 (``out.to(dtype)`` is the kernel's exact result for an input of
    that dtype, default x.dtype), with the straight-through gradient: d out / dx = 1 where the code is in
    range, 0 elsewhere."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    dtype = dtype or x.dtype
    scale, zero_point = fake_quantize_qparams(x, bits, group_size, symmetric, axis, dtype)
    q = fake_quantize_codes(x, scale, zero_point, bits, group_size, axis, dtype)
    s = _broadcast_qparam(scale, x, group_size, axis)
    z = _broadcast_qparam(zero_point, x, group_size, axis)
    value = _acc(dtype)((q.clamp(qmin, qmax) - z) * s)
    mask = ((q >= qmin) & (q <= qmax)).double()
    x64 = x.double()
    out = x64 * mask + (value - x64 * mask).detach()
    return out, scale, zero_point


def fake_quantize_lsq(x, scale, zero_point=None, bits=8, group_size=-1, axis=0, grad_factor=1.0):
    """LSQ (LSQ+ with a zero point) by autograd in float64: ``s·(clamp(round_ste(x/s) + z) - z)`` with the
    scale clamped to eps, z rounded and clamped, and the scale / zero-point gradients times grad_factor."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    acc = _acc(x.dtype)
    x64 = x.double()
    # gradients times grad_factor, values untouched: v + (a − a) is exactly v
    s = scale.double().clamp(min=QUANT_EPS)
    s = s.detach() + (s * grad_factor - (s * grad_factor).detach())
    if zero_point is None:
        z = torch.zeros_like(s)
    else:
        z = zero_point.double() * grad_factor
        z = zero_point.detach().double().round().clamp(qmin, qmax) + (z - z.detach())
    s = _broadcast_qparam(s, x, group_size, axis)
    z = _broadcast_qparam(z, x, group_size, axis)
    t = x64 / s
    t_value = acc(x64.detach() * acc(1.0 / s.detach()))
    t = t + (t_value - t).detach()
    rounded = t + (torch.round(t_value) - t).detach()
    return s * (torch.clamp(rounded + z, qmin, qmax) - z)


def multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_indices, dropout_mask=None, dropout_p=0.0):
    """Each adapter run separately on its own tokens with :func:`lora_linear`, the base layer alone on
    the tokens with index -1, and the rows put back in token order (what a mixed batch must equal)."""
    in_features = x.shape[-1]
    x2 = _rows(x, in_features)
    idx = adapter_indices.reshape(-1).long()
    mask2 = None if dropout_mask is None else _rows(dropout_mask, in_features)
    rows = []
    order = []
    for k in [-1, *range(lora_A.shape[0])]:
        sel = (idx == k).nonzero().flatten()
        if sel.numel() == 0:
            continue
        xs = x2[sel]
        if k < 0:
            rows.append(torch.nn.functional.linear(xs, weight, bias))
        else:
            mk = None if mask2 is None else mask2[sel]
            s_k = float(scalings[k])
            rows.append(lora_linear(xs, weight, bias, lora_A[k], lora_B[k], s_k, mk, dropout_p))
        order.append(sel)
    if not rows:  # no tokens
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.cat(rows)[torch.argsort(torch.cat(order))]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def kd_loss(
    student_logits, teacher_logits, labels=None, temperature=1.0, alpha=0.5, ignore_index=-100, divergence="forward_kl"
):
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
        d = 0.5 * (
            torch.nn.functional.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
            + torch.nn.functional.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
        )
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


def fused_linear_kd_loss(
    student_hidden,
    student_head_weight,
    teacher_hidden,
    teacher_head_weight,
    labels=None,
    temperature=1.0,
    alpha=0.5,
    ignore_index=-100,
    divergence="forward_kl",
):
    """:func:`kd_loss` on the full logits ``h·Wᵀ`` of student and teacher."""
    s = student_hidden @ student_head_weight.t()
    with torch.no_grad():
        t = teacher_hidden @ teacher_head_weight.t()
    return kd_loss(s, t, labels, temperature, alpha, ignore_index, divergence)


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, upcast=False):
    """The eager head and loss: ``cross_entropy(hidden·weightᵀ, labels)``, mean over the tokens whose label
    is not ``ignore_index`` (0 when there are none). ``upcast``: the loss over a float32 copy of 16-bit
    logits, as transformers computes it."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if upcast:
        logits = logits.float()
    flat = labels.reshape(-1)
    total = torch.nn.functional.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
    return total / max(int((flat != ignore_index).sum()), 1)


def bias_only_linear(x, weight, bias):
    """BitFit linear: ``x·Wᵀ + b`` (W frozen; its gradient is never taken)."""
    return torch.nn.functional.linear(x, weight.detach(), bias)


def ia3_scale(x, scale):
    """(IA)³ scaling: y[..., j] = x[..., j]·scale[j]."""
    return x * scale


def adamw_step(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    step,
    lr,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=1e-2,
    max_exp_avg_sq=None,
    anchor=None,
    l2sp=0.0,
    grad_scale=1.0,
    maximize=False,
):
    """One AdamW step (the formula of csrc/ops/optim/optim.h) in the tensors' own dtype, out of place:
    returns ``(param, exp_avg, exp_avg_sq, max_exp_avg_sq)`` after step number ``step`` (counted from 1).
    With master weights, pass the master as ``param`` and round the result to the parameter's dtype."""
    g = grad.to(param.dtype) * grad_scale
    if l2sp:
        g = g + l2sp * (param - anchor)
    if maximize:
        g = -g
    param = param * (1 - lr * weight_decay)
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        max_exp_avg_sq = torch.maximum(max_exp_avg_sq, exp_avg_sq)
        second = max_exp_avg_sq
    denom = second.sqrt() / math.sqrt(1 - beta2**step) + eps
    param = param - lr / (1 - beta1**step) * exp_avg / denom
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


def multi_tensor_l2_norm(tensors):
    """``sqrt(Σ x²)`` over all elements of all tensors, in float64."""
    return torch.sqrt(sum((t.double().square().sum() for t in tensors), torch.zeros((), dtype=torch.float64)))


_GGUF_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}


def gguf_dequantize(blocks, qtype, cols, dtype=torch.float64):
    """The weight ``[rows, cols]`` of GGUF blocks (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8), decoded from the bytes
    in ``dtype`` (float64: exact)."""
    bb = _GGUF_BLOCK_BYTES[int(qtype)]
    rows = blocks.shape[0]
    if rows * cols == 0:
        return torch.zeros(rows, cols, dtype=dtype, device=blocks.device)
    b = blocks.reshape(rows, cols // 32, bb)
    d = b[..., 0:2].contiguous().view(torch.float16).to(dtype)  # [rows, nb, 1]
    if qtype == 8:
        q = b[..., 2:].contiguous().view(torch.int8).to(dtype)
        w = d * q
    else:
        head = 4 if qtype == 3 else 2
        nib = b[..., head:].to(torch.int64)
        q = torch.cat([nib & 0x0F, nib >> 4], dim=-1).to(dtype)  # weight j: low nibble, j + 16: high
        w = d * (q - 8) if qtype == 2 else d * q + b[..., 2:4].contiguous().view(torch.float16).to(dtype)
    return w.reshape(rows, cols)


def gguf_linear(x, blocks, qtype, cols, bias=None):
    """``x · dequant(W)ᵀ + bias`` with W dequantized in x's dtype (float64: the exact weights)."""
    return torch.nn.functional.linear(x, gguf_dequantize(blocks, qtype, cols, x.dtype), bias)

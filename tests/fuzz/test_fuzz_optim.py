"""Fuzz: the multi-tensor AdamW step and L2 norm against their float64 references, over tensor lists of
any sizes (0 and 1 included), every dtype, master weights, AMSGrad, L2-SP, gradient scaling and
maximisation. The AdamW op updates contiguous tensors in place (its documented contract); the norm reads
any layout."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import pyfastpeft  # noqa: F401
from pyfastpeft.ops import fused_adamw_, multi_tensor_l2_norm, reference
from tests.fuzz.common import FUZZ, assert_close_to_float64, dtypes, layouts, seeds, tensor, values

sizes = st.lists(st.integers(0, 300), min_size=1, max_size=5)


@FUZZ
@given(
    sizes=sizes,
    dtype=dtypes,
    master=st.booleans(),
    amsgrad=st.booleans(),
    l2sp=st.sampled_from([0.0, 0.5]),
    clip=st.sampled_from([None, 0.3]),
    maximize=st.booleans(),
    lr=st.floats(1e-4, 1e-1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.floats(1e-8, 1e-3),
    weight_decay=st.floats(0.0, 1.0),
    step=st.integers(0, 1000),
    seed=seeds,
)
def test_fused_adamw(
    sizes, dtype, master, amsgrad, l2sp, clip, maximize, lr, beta1, beta2, eps, weight_decay, step, seed
):
    master = master and dtype in (torch.bfloat16, torch.float16)
    state_dtype = torch.float32 if master else dtype
    n = len(sizes)
    params = [tensor((s,), dtype, "contiguous", seed + i) for i, s in enumerate(sizes)]
    masters = (
        [p.float() + values(p.shape, seed + 100 + i, 1e-3).float() for i, p in enumerate(params)] if master else []
    )
    grads = [tensor((s,), dtype, "contiguous", seed + 200 + i) for i, s in enumerate(sizes)]
    # a state some steps into training: m of either sign, v ≥ 0
    exp_avgs = [tensor((s,), state_dtype, "contiguous", seed + 300 + i, 0.1) for i, s in enumerate(sizes)]
    exp_avg_sqs = [tensor((s,), state_dtype, "contiguous", seed + 400 + i, 0.1).square() for i, s in enumerate(sizes)]
    max_sqs = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    anchors = [tensor((s,), state_dtype, "contiguous", seed + 500 + i) for i, s in enumerate(sizes)] if l2sp else []
    steps = [torch.tensor(float(step), dtype=torch.float32) for _ in range(n)]
    clip32 = None if clip is None else torch.tensor(clip, dtype=torch.float32).item()  # the op's scale is float32
    hyper = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, l2sp=l2sp, maximize=maximize)

    def reference_step(convert):
        out = []
        for i in range(n):
            theta = convert(masters[i] if master else params[i])
            out.append(
                reference.adamw_step(
                    theta,
                    convert(grads[i]),
                    convert(exp_avgs[i]),
                    convert(exp_avg_sqs[i]),
                    step + 1,
                    lr,
                    max_exp_avg_sq=convert(max_sqs[i]) if amsgrad else None,
                    anchor=convert(anchors[i]) if l2sp else None,
                    grad_scale=1.0 if clip is None else clip32,
                    **hyper,
                )
            )
        return out

    lowp = reference_step(lambda t: t.clone())
    ref64 = reference_step(lambda t: t.double())
    fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
        torch.tensor(lr, dtype=torch.float64),
        max_exp_avg_sqs=max_sqs,
        masters=masters,
        anchors=anchors,
        grad_scale=None if clip is None else torch.tensor(clip, dtype=torch.float32),
        **hyper,
    )
    for i in range(n):
        assert steps[i].item() == step + 1
        ours = [masters[i] if master else params[i], exp_avgs[i], exp_avg_sqs[i]] + ([max_sqs[i]] if amsgrad else [])
        k = len(ours)  # the reference also returns max_exp_avg_sq (None) without amsgrad
        names = ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"][:k]
        for name, a, b, c in zip(names, ours, lowp[i][:k], ref64[i][:k], strict=True):
            assert_close_to_float64(f"{name}[{i}]", a, b, c, terms=4)  # a few operations per element
        if master:  # the parameter receives its master's rounded value
            assert torch.equal(params[i], masters[i].to(dtype))


@FUZZ
@given(
    shapes=st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=3), min_size=1, max_size=5),
    dtype=dtypes,
    layout=layouts,
    spread=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=seeds,
)
def test_multi_tensor_l2_norm(shapes, dtype, layout, spread, seed):
    tensors = [tensor(s, dtype, layout, seed + i, spread) for i, s in enumerate(shapes)]
    ours = multi_tensor_l2_norm(tensors)
    assert ours.dtype == torch.float32 and ours.shape == ()
    ref64 = reference.multi_tensor_l2_norm(tensors)
    # plain PyTorch in float32 on the dtype's values: the result type the op promises
    lowp = torch.linalg.vector_norm(torch.cat([t.float().reshape(-1) for t in tensors]))
    assert_close_to_float64("norm", ours, lowp, ref64, terms=sum(t.numel() for t in tensors))

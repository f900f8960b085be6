"""Hostile inputs to every op: arguments on different devices (the meta device included) are refused
with a ValueError naming the argument, and the edge cases that are valid (size-0 dimensions, int32
labels, integer scalings, zero adapters, unsorted indices) compute the float64 reference's answer."""

from __future__ import annotations

import re

import pytest
import torch

import pyfastpeft  # noqa: F401
from pyfastpeft import ops
from pyfastpeft.ops import reference
from tests.conftest import assert_within_rounding, requires_cuda
from tests.ops.test_distill import kd_terms

OPS = torch.ops.pyfastpeft
N, IN, OUT, R, K, V = 4, 5, 3, 2, 2, 7


def _randn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _rng():
    return torch.tensor([1, 0], dtype=torch.int64)


def _labels():
    return torch.tensor([0, 3, -100, 6])


# name -> (op, arguments by name); every tensor argument is tried on a device of its own
CASES = {
    "lora_linear": (
        OPS.lora_linear,
        dict(
            x=_randn(N, IN),
            weight=_randn(OUT, IN),
            bias=_randn(OUT),
            lora_A=_randn(R, IN),
            lora_B=_randn(OUT, R),
            scaling=0.5,
            dropout_p=0.1,
            rng_state=_rng(),
        ),
    ),
    "lora_linear_backward": (
        OPS.lora_linear_backward,
        dict(
            grad_y=_randn(N, OUT),
            x=_randn(N, IN),
            weight=_randn(OUT, IN),
            lora_A=_randn(R, IN),
            lora_B=_randn(OUT, R),
            xa=_randn(N, R),
            scaling=0.5,
            dropout_p=0.1,
            rng_state=_rng(),
            keep=None,
            output_mask=[True] * 5,
        ),
    ),
    "philox_dropout": (OPS.philox_dropout, dict(x=_randn(N, IN), p=0.5, rng_state=_rng())),
    "dropout_linear": (OPS.dropout_linear, dict(x=_randn(N, IN), weight=_randn(R, IN), p=0.5, rng_state=_rng())),
    "multi_lora_linear": (
        OPS.multi_lora_linear,
        dict(
            x=_randn(N, IN),
            weight=_randn(OUT, IN),
            bias=_randn(OUT),
            lora_A=_randn(K, R, IN),
            lora_B=_randn(K, OUT, R),
            scalings=torch.ones(K, dtype=torch.float64),
            adapter_indices=torch.tensor([0, 1, -1, 0]),
            dropout_p=0.1,
            rng_state=_rng(),
        ),
    ),
    "multi_lora_linear_backward": (
        OPS.multi_lora_linear_backward,
        dict(
            grad_y=_randn(N, OUT),
            x=_randn(N, IN),
            weight=_randn(OUT, IN),
            lora_A=_randn(K, R, IN),
            lora_B=_randn(K, OUT, R),
            scalings=torch.ones(K, dtype=torch.float64),
            adapter_indices=torch.tensor([0, 1, -1, 0]),
            xa=_randn(N, R),
            dropout_p=0.1,
            rng_state=_rng(),
            output_mask=[True] * 5,
        ),
    ),
    "ia3_scale": (OPS.ia3_scale, dict(x=_randn(N, IN), scale=_randn(IN))),
    "ia3_scale_backward": (
        OPS.ia3_scale_backward,
        dict(grad_y=_randn(N, IN), x=_randn(N, IN), scale=_randn(IN), output_mask=[True] * 2),
    ),
    "bias_only_linear": (OPS.bias_only_linear, dict(x=_randn(N, IN), weight=_randn(OUT, IN), bias=_randn(OUT))),
    "bias_only_linear_backward": (
        OPS.bias_only_linear_backward,
        dict(grad_y=_randn(N, OUT), weight=_randn(OUT, IN), output_mask=[True] * 2),
    ),
    "gguf_linear": (
        OPS.gguf_linear,
        dict(x=_randn(N, 32), blocks=torch.zeros(OUT, 34, dtype=torch.uint8), qtype=8, cols=32, bias=_randn(OUT)),
    ),
    "gguf_linear_backward": (
        OPS.gguf_linear_backward,
        dict(grad_y=_randn(N, OUT), blocks=torch.zeros(OUT, 34, dtype=torch.uint8), qtype=8, cols=32),
    ),
    "gguf_embedding": (
        OPS.gguf_embedding,
        dict(
            ids=torch.tensor([0, 2]),
            blocks=torch.zeros(OUT, 34, dtype=torch.uint8),
            qtype=8,
            cols=32,
            dtype=torch.float32,
        ),
    ),
    "sparse_delta_linear": (
        OPS.sparse_delta_linear,
        dict(
            x=_randn(N, IN), weight=_randn(OUT, IN), bias=_randn(OUT), delta=_randn(3), indices=torch.tensor([1, 4, 9])
        ),
    ),
    "sparse_delta_linear_backward": (
        OPS.sparse_delta_linear_backward,
        dict(
            grad_y=_randn(N, OUT),
            x=_randn(N, IN),
            weight=_randn(OUT, IN),
            delta=_randn(3),
            indices=torch.tensor([1, 4, 9]),
            output_mask=[True] * 3,
        ),
    ),
    "sampled_weight_grad": (
        OPS.sampled_weight_grad,
        dict(grad_y=_randn(N, OUT), x=_randn(N, IN), indices=torch.tensor([1, 4, 9]), in_features=IN),
    ),
    "fake_quantize_backward": (
        OPS.fake_quantize_backward,
        dict(
            grad_out=_randn(N, IN),
            x=_randn(N, IN),
            scale=torch.ones(N, dtype=torch.float64),
            zero_point=torch.zeros(N, dtype=torch.int32),
            bits=8,
            group_size=-1,
            axis=0,
        ),
    ),
    "fake_quantize_lsq": (
        OPS.fake_quantize_lsq,
        dict(
            x=_randn(N, IN),
            scale=torch.ones(N, dtype=torch.float64),
            zero_point=torch.zeros(N, dtype=torch.float64),
            bits=8,
            group_size=-1,
            axis=0,
            grad_factor=1.0,
        ),
    ),
    "fake_quantize_lsq_backward": (
        OPS.fake_quantize_lsq_backward,
        dict(
            grad_out=_randn(N, IN),
            x=_randn(N, IN),
            scale=torch.ones(N, dtype=torch.float64),
            zero_point=torch.zeros(N, dtype=torch.float64),
            bits=8,
            group_size=-1,
            axis=0,
            grad_factor=1.0,
            need_grad_x=True,
        ),
    ),
    "kd_loss": (
        OPS.kd_loss,
        dict(
            student_logits=_randn(N, V),
            teacher_logits=_randn(N, V, seed=1),
            labels=_labels(),
            temperature=2.0,
            alpha=0.5,
            ignore_index=-100,
            divergence="forward_kl",
            compute_grad=True,
        ),
    ),
    "fused_linear_kd_loss": (
        OPS.fused_linear_kd_loss,
        dict(
            student_hidden=_randn(N, IN),
            student_weight=_randn(V, IN),
            teacher_hidden=_randn(N, 6),
            teacher_weight=_randn(V, 6),
            labels=_labels(),
            temperature=2.0,
            alpha=0.5,
            ignore_index=-100,
            divergence="js",
            chunk_size=0,
            output_mask=[True, True],
        ),
    ),
    "fused_linear_cross_entropy": (
        OPS.fused_linear_cross_entropy,
        dict(
            hidden=_randn(N, IN),
            weight=_randn(V, IN),
            labels=_labels(),
            ignore_index=-100,
            chunk_size=0,
            output_mask=[True, True],
        ),
    ),
    "multi_tensor_l2_norm": (OPS.multi_tensor_l2_norm, dict(tensors=[_randn(3), _randn(2, 2)])),
    "fused_adamw_": (
        OPS.fused_adamw_,
        dict(
            params=[_randn(3)],
            grads=[_randn(3)],
            exp_avgs=[torch.zeros(3, dtype=torch.float64)],
            exp_avg_sqs=[torch.zeros(3, dtype=torch.float64)],
            max_exp_avg_sqs=[],
            masters=[],
            anchors=[],
            steps=[torch.zeros((), dtype=torch.float32)],
            lr=torch.tensor(1e-3, dtype=torch.float64),
            grad_scale=None,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            l2sp=0.0,
            maximize=False,
        ),
    ),
}


def _tensor_arguments(args: dict) -> list[str]:
    """Argument names holding a tensor (list arguments: their first tensor, named like the C++ checks)."""
    names = []
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            names.append(name)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            names.append(f"{name}[0]")
    return names


def _to(value, device: str):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [t.to(device) for t in value]
    return value


def _moved(args: dict, target: str, device: str) -> dict:
    out = {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            value = value.clone()
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            value = [t.clone() for t in value]
        out[name] = value
    if target.endswith("[0]"):
        base = target[:-3]
        out[base] = [out[base][0].to(device), *out[base][1:]]
    else:
        out[target] = out[target].to(device)
    return out


MISMATCHES = [(op, arg) for op, (_, args) in CASES.items() for arg in _tensor_arguments(args)]


def _reference(op_name: str, args: dict) -> str:
    """The argument the others are checked against: x where the op has one, else the first tensor."""
    return "x" if "x" in args else _tensor_arguments(args)[0]


@pytest.mark.parametrize(("op_name", "argument"), MISMATCHES, ids=[f"{o}-{a}" for o, a in MISMATCHES])
def test_one_argument_on_meta_is_refused(op_name, argument):
    # The dispatcher sends any call holding a meta tensor to the fake kernel; without its check the call
    # "succeeded" with uninitialised CPU tensors.
    op, args = CASES[op_name]
    moved = _moved(args, argument, "meta")
    if argument == _reference(op_name, args):
        # the reference argument itself moved: every other argument is named as being on the CPU
        with pytest.raises(ValueError, match=rf"expected device meta \(the device of {re.escape(argument)}\), got cpu"):
            op(**moved)
    else:
        with pytest.raises(ValueError, match=rf"^{re.escape(argument)}: expected device cpu \(the device of "):
            op(**moved)


def test_every_op_has_a_mismatch_case():
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("pyfastpeft::")}
    # these take one tensor
    assert schemas - {"fake_quantize", "gguf_dequantize", "gguf_quantize"} == set(CASES)


@requires_cuda
@pytest.mark.parametrize(("op_name", "argument"), MISMATCHES, ids=[f"{o}-{a}" for o, a in MISMATCHES])
def test_one_argument_on_another_real_device_is_refused(op_name, argument):
    op, args = CASES[op_name]
    if argument == _reference(op_name, args):
        pytest.skip("the reference argument: the others' cases cover it")
    on_cuda = {name: _to(value, "cuda") for name, value in args.items()}
    back = _moved(on_cuda, argument, "cpu")
    with pytest.raises(ValueError, match=rf"{re.escape(argument)}: expected device cuda"):
        op(**back)


def test_wrappers_refuse_meta_too():
    x, w = _randn(N, IN), _randn(OUT, IN)
    with pytest.raises(ValueError, match="^teacher_logits: expected device cpu"):
        ops.kd_loss(_randn(N, V), _randn(N, V).to("meta"), alpha=0.0)
    with pytest.raises(ValueError, match="^lora_B: expected device cpu"):
        ops.lora_linear(x, w, None, _randn(R, IN), _randn(OUT, R).to("meta"))
    with pytest.raises(ValueError, match="^scale: expected device cpu"):
        ops.ia3_scale(x, _randn(IN).to("meta"))


def test_all_meta_still_gives_shapes():
    # meta tensors throughout are how shapes are traced: still accepted
    y = ops.lora_linear(
        *(t.to("meta") for t in (_randn(N, IN), _randn(OUT, IN), _randn(OUT))),
        _randn(R, IN).to("meta"),
        _randn(OUT, R).to("meta"),
    )
    assert y.device.type == "meta" and y.shape == (N, OUT)


# ---- size-0 dimensions ------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_lora_linear_with_zero_in_features(device, dropout_p):
    x = torch.zeros(N, 0, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.zeros(OUT, 0, dtype=torch.float64, device=device)
    b = _randn(OUT).to(device).requires_grad_()
    A = torch.zeros(R, 0, dtype=torch.float64, device=device, requires_grad=True)
    B = _randn(OUT, R).to(device).requires_grad_()
    y = ops.lora_linear(x, w, b, A, B, 2.0, dropout_p, seed=3)
    # x·Wᵀ and the LoRA term are empty sums (exactly 0), so every result below is exact: the bias, a sum of
    # N ones, and zeros
    torch.testing.assert_close(y, b.detach().expand(N, OUT), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.shape == (N, 0) and A.grad.shape == (R, 0)
    torch.testing.assert_close(b.grad, torch.full((OUT,), float(N), dtype=torch.float64, device=device), rtol=0, atol=0)
    torch.testing.assert_close(B.grad, torch.zeros(OUT, R, dtype=torch.float64, device=device), rtol=0, atol=0)


def test_lora_linear_module_with_zero_in_features(device):
    base = torch.nn.Linear(0, OUT).to(device=device, dtype=torch.float64)
    layer = pyfastpeft.tuners.LoraLinear(base, r=R, lora_dropout=0.2)
    y = layer(torch.zeros(2, 3, 0, dtype=torch.float64, device=device))
    torch.testing.assert_close(y, base.bias.detach().expand(2, 3, OUT), rtol=0, atol=0)  # empty sums: exact


def test_other_linear_ops_with_zero_in_features(device):
    x = torch.zeros(N, 0, dtype=torch.float64, device=device)
    w = torch.zeros(OUT, 0, dtype=torch.float64, device=device)
    b = _randn(OUT).to(device)
    exact = dict(rtol=0, atol=0)  # every product below is an empty sum plus the bias: exact
    torch.testing.assert_close(ops.bias_only_linear(x, w, b), b.expand(N, OUT), **exact)
    empty_idx = torch.zeros(0, dtype=torch.int64, device=device)
    torch.testing.assert_close(
        ops.sparse_delta_linear(x, w, b, torch.zeros(0, dtype=torch.float64, device=device), empty_idx),
        b.expand(N, OUT),
        **exact,
    )
    assert ops.sampled_weight_grad(_randn(N, OUT).to(device), x, empty_idx, 0).shape == (0,)
    A = torch.zeros(K, R, 0, dtype=torch.float64, device=device)
    Bm = _randn(K, OUT, R).to(device)
    idx = torch.tensor([0, 1, -1, 0], device=device)
    torch.testing.assert_close(ops.multi_lora_linear(x, w, b, A, Bm, [1.0, 2.0], idx), b.expand(N, OUT), **exact)
    torch.testing.assert_close(ops.ia3_scale(x, torch.zeros(0, dtype=torch.float64, device=device)), x, **exact)


def test_zero_out_features_and_zero_rows(device):
    x = _randn(N, IN).to(device)
    w = torch.zeros(0, IN, dtype=torch.float64, device=device)
    y = ops.lora_linear(x, w, None, _randn(R, IN).to(device), torch.zeros(0, R, dtype=torch.float64, device=device))
    assert y.shape == (N, 0)
    x0 = torch.zeros(0, IN, dtype=torch.float64, device=device)
    assert ops.bias_only_linear(x0, _randn(OUT, IN).to(device), _randn(OUT).to(device)).shape == (0, OUT)
    y = ops.multi_lora_linear(
        x0,
        _randn(OUT, IN).to(device),
        None,
        _randn(K, R, IN).to(device),
        _randn(K, OUT, R).to(device),
        [1.0, 1.0],
        torch.zeros(0, dtype=torch.int64, device=device),
    )
    assert y.shape == (0, OUT)


def test_zero_vocabulary_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^student_logits: expected a vocabulary of at least 1, got shape \(4, 0\)"):
        ops.kd_loss(torch.zeros(N, 0), torch.zeros(N, 0), alpha=0.0)
    with pytest.raises(ValueError, match="^student_weight: expected a vocabulary of at least 1"):
        ops.fused_linear_kd_loss(
            _randn(N, IN),
            torch.zeros(0, IN, dtype=torch.float64),
            _randn(N, IN),
            torch.zeros(0, IN, dtype=torch.float64),
            alpha=0.0,
        )


def test_fused_kd_loss_with_zero_hidden_size():
    hs, ws = torch.zeros(N, 0, dtype=torch.float64), torch.zeros(V, 0, dtype=torch.float64)
    ht, wt = _randn(N, 3), _randn(V, 3, seed=1)
    ours = ops.fused_linear_kd_loss(hs, ws, ht, wt, alpha=0.0)
    ref = reference.kd_loss(hs @ ws.t(), ht @ wt.t(), None, alpha=0.0)
    loss_terms, _ = kd_terms(hs @ ws.t(), ht @ wt.t(), None, alpha=0.0, t_abs=ht.abs() @ wt.abs().t())
    assert_within_rounding("loss", ours, ref, loss_terms, terms=2 * (V + N + 3), roundings=16)


# ---- other bad arguments with a clear message ----------------------------------------------------------


def test_bias_only_linear_without_bias_names_the_argument():
    with pytest.raises(ValueError, match=r"^bias: expected a tensor \[out_features\].*got NoneType"):
        ops.bias_only_linear(_randn(N, IN), _randn(OUT, IN), None)


def test_sparse_backward_checks_the_indices_like_the_forward(device):
    args = dict(
        grad_y=_randn(N, OUT).to(device),
        x=_randn(N, IN).to(device),
        weight=_randn(OUT, IN).to(device),
        delta=_randn(2).to(device),
        output_mask=[True] * 3,
    )
    with pytest.raises(ValueError, match="^indices: entry 1 is 15, out of range for a weight with 15 elements"):
        OPS.sparse_delta_linear_backward(indices=torch.tensor([0, 15], device=device), **args)
    with pytest.raises(ValueError, match="^indices: expected strictly increasing"):
        OPS.sparse_delta_linear_backward(indices=torch.tensor([4, 2], device=device), **args)


# ---- valid inputs that used to be refused ---------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "js"])
def test_kd_loss_takes_int32_labels(divergence, device):
    s = _randn(2, 3, V).to(device).requires_grad_()
    t = _randn(2, 3, V, seed=1).to(device)
    labels = torch.tensor([[0, 3, -100], [6, 1, 2]], device=device)
    loss32 = ops.kd_loss(s, t, labels.to(torch.int32), divergence=divergence)
    (g32,) = torch.autograd.grad(loss32, s)
    loss64 = ops.kd_loss(s, t, labels, divergence=divergence)
    (g64,) = torch.autograd.grad(loss64, s)
    assert torch.equal(loss32, loss64) and torch.equal(g32, g64)
    ref = reference.kd_loss(s.detach(), t, labels, divergence=divergence)
    loss_terms, _ = kd_terms(s, t, labels, divergence=divergence)
    assert_within_rounding("loss", loss64, ref, loss_terms, terms=2 * (V + labels.numel()), roundings=16)
    hs, ws, ht, wt = (
        _randn(6, IN).to(device),
        _randn(V, IN).to(device),
        _randn(6, 4).to(device),
        _randn(V, 4).to(device),
    )
    flat = labels.reshape(-1)
    assert torch.equal(
        ops.fused_linear_kd_loss(hs, ws, ht, wt, flat.to(torch.int32), divergence=divergence),
        ops.fused_linear_kd_loss(hs, ws, ht, wt, flat, divergence=divergence),
    )


def _masked_kd_reference(s, t, labels, temperature, alpha, divergence):
    """float64 loss with 0·log 0 = 0 at the teacher's -inf entries (PyTorch's kl_div gives NaN there)."""
    ls = torch.log_softmax(s / temperature, -1)
    lt = torch.log_softmax(t / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "forward_kl":
        d = torch.where(pt > 0, pt * (lt - ls), 0.0).sum(-1)
    else:  # js
        lm = torch.log(0.5 * (ps + pt))
        d = 0.5 * (torch.where(ps > 0, ps * (ls - lm), 0.0) + torch.where(pt > 0, pt * (lt - lm), 0.0)).sum(-1)
    ce = torch.nn.functional.cross_entropy(s, labels.clamp_min(0), reduction="none")
    keep = labels != -100
    rows = alpha * ce + (1 - alpha) * temperature**2 * d
    return rows[keep].sum() / keep.sum()


@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("vocab", [7, 1100])  # 1100: whole 512-wide tiles of -inf, the first one included
def test_kd_loss_with_masked_teacher_vocabulary_is_finite(divergence, dtype, vocab, device):
    s = _randn(N, vocab, seed=2).to(device, dtype).requires_grad_()
    t = _randn(N, vocab, seed=3).to(device, dtype)
    masked = torch.zeros(vocab, dtype=torch.bool)
    masked[: vocab * 2 // 3] = True  # the first two thirds of the vocabulary are masked out
    t[:, masked.to(device)] = float("-inf")
    labels = torch.tensor([vocab - 1, -100, vocab - 2, 0], device=device)
    loss = ops.kd_loss(s, t, labels, temperature=2.0, alpha=0.3, divergence=divergence)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    s64 = s.detach().double().requires_grad_()
    ref = _masked_kd_reference(s64, t.double(), labels, 2.0, 0.3, divergence)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    # the reference is float64 and the inputs exact in it: only ours rounds, along a chain of the
    # vocabulary and the rows (kd_terms: masked entries have pt = 0 and add no terms)
    loss_terms, g_terms = kd_terms(s, t, labels, temperature=2.0, alpha=0.3, divergence=divergence)
    chain = 2 * (vocab + N)
    assert_within_rounding("loss", loss, ref.detach(), loss_terms, terms=chain, roundings=16)
    assert_within_rounding("grad", grad, ref_grad, g_terms, terms=chain, roundings=16)


def test_multi_lora_takes_integer_scalings(device):
    x, w, b = _randn(N, IN).to(device), _randn(OUT, IN).to(device), _randn(OUT).to(device)
    A, B = _randn(K, R, IN).to(device), _randn(K, OUT, R).to(device)
    idx = torch.tensor([0, 1, -1, 1], device=device)
    ours = ops.multi_lora_linear(x, w, b, A, B, torch.tensor([2, 3], device=device), idx)
    ref = reference.multi_lora_linear(x, w, b, A, B, torch.tensor([2.0, 3.0], dtype=torch.float64, device=device), idx)
    terms = reference.multi_lora_linear(
        x.abs(), w.abs(), b.abs(), A.abs(), B.abs(), torch.tensor([2.0, 3.0], dtype=torch.float64, device=device), idx
    )
    # x·Wᵀ, x·Aᵀ then ·Bᵀ, scaling and bias, rounded by ours and by the reference
    assert_within_rounding("y", ours, ref, terms, terms=2 * (IN + R + 3), roundings=2)


@pytest.mark.parametrize("rank", [0, R])
def test_multi_lora_with_zero_adapters_is_the_base_layer(device, rank):
    x = _randn(N, IN).to(device).requires_grad_()
    w = _randn(OUT, IN).to(device).requires_grad_()
    b = _randn(OUT).to(device).requires_grad_()
    A = torch.zeros(0, rank, IN, dtype=torch.float64, device=device, requires_grad=True)
    B = torch.zeros(0, OUT, rank, dtype=torch.float64, device=device, requires_grad=True)
    idx = torch.full((N,), -1, device=device)
    y = ops.multi_lora_linear(x, w, b, A, B, torch.zeros(0, dtype=torch.float64, device=device), idx)
    ref = torch.nn.functional.linear(x, w, b)
    # ours and PyTorch's linear, each rounding a chain of in_features (forward), out_features (dx) or N
    # (dw, db) products and sums
    chain = 2 * (IN + OUT + N + 1)
    magnitude = torch.nn.functional.linear(x.detach().abs(), w.detach().abs(), b.detach().abs())
    assert_within_rounding("y", y, ref, magnitude, terms=chain, roundings=2)
    gy = _randn(N, OUT, seed=5).to(device)
    ours = torch.autograd.grad(y, (x, w, b, A, B), gy)
    theirs = torch.autograd.grad(ref, (x, w, b), gy)
    xa, wa, ba = (t.detach().abs().requires_grad_() for t in (x, w, b))
    terms = torch.autograd.grad(torch.nn.functional.linear(xa, wa, ba), (xa, wa, ba), gy.abs())
    for name, o, t, m in zip(("dx", "dw", "db"), ours[:3], theirs, terms, strict=True):
        assert_within_rounding(name, o, t, m, terms=chain, roundings=2)
    assert ours[3].shape == A.shape and ours[4].shape == B.shape
    if device == "cpu":
        with pytest.raises(ValueError, match="^adapter_indices: index 0 at token 2 is out of range for 0 adapters"):
            ops.multi_lora_linear(x, w, b, A, B, [], torch.tensor([-1, -1, 0, -1]))


@pytest.mark.parametrize("int32", [False, True])
def test_sampled_weight_grad_takes_unsorted_and_repeated_indices(device, int32):
    gy, x = _randn(N, OUT).to(device), _randn(N, IN, seed=1).to(device)
    idx = torch.tensor([9, 0, 14, 3, 9, 7], device=device, dtype=torch.int32 if int32 else torch.int64)
    ours = ops.sampled_weight_grad(gy, x, idx, IN)
    ref = reference.sampled_weight_grad(gy, x, idx.long(), IN)
    # each entry a sum of N products, rounded by ours and by the reference
    terms = reference.sampled_weight_grad(gy.abs(), x.abs(), idx.long(), IN)
    assert_within_rounding("grad", ours, ref, terms, terms=2 * N, roundings=2)
    with pytest.raises(ValueError, match="out of range for a weight with 15 elements"):
        ops.sampled_weight_grad(gy, x, torch.tensor([9, 15, 2], device=device), IN)


# ---- outputs that require grad carry it -----------------------------------------------------------------


def test_philox_dropout_is_differentiable(device):
    x = _randn(3, 5, seed=4).to(device).requires_grad_()
    y = ops.philox_dropout(x, 0.4, seed=11)
    mask = reference.philox_keep_mask(x.numel(), 0.4, 11).view(3, 5).to(device)
    # x·mask/(1 − p): the scale 1/(1 − p) and the product, rounded by ours and by the reference: no sums
    assert_within_rounding("y", y, x.detach() * mask / 0.6, x.detach().abs() / 0.6, terms=0, roundings=4)
    gy = _randn(3, 5, seed=5).to(device)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert_within_rounding("dx", gx, gy * mask / 0.6, gy.abs() / 0.6, terms=0, roundings=4)
    assert torch.autograd.gradcheck(lambda t: ops.philox_dropout(t, 0.4, seed=11), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.philox_dropout(t, 0.4, seed=11), (x,))
    # a transposed (non-contiguous) input is masked by its row-major element index, its gradient too
    xt = _randn(5, 3, seed=6).to(device).t().requires_grad_()
    (gxt,) = torch.autograd.grad(ops.philox_dropout(xt, 0.4, seed=11), xt, gy)
    assert_within_rounding("dx (transposed)", gxt, gy * mask / 0.6, gy.abs() / 0.6, terms=0, roundings=4)


def test_sampled_weight_grad_is_differentiable(device):
    gy = _randn(N, OUT).to(device).requires_grad_()
    x = _randn(N, IN, seed=1).to(device).requires_grad_()
    idx = torch.tensor([9, 0, 14, 9], device=device)
    assert torch.autograd.gradcheck(lambda g, t: ops.sampled_weight_grad(g, t, idx, IN), (gy, x))
    out = ops.sampled_weight_grad(gy, x, idx, IN)
    ref = reference.sampled_weight_grad(gy, x, idx, IN)
    w = _randn(4, seed=7).to(device)
    ours = torch.autograd.grad((out * w).sum(), (gy, x))
    theirs = torch.autograd.grad((ref * w).sum(), (gy, x))
    ga, xa = gy.detach().abs().requires_grad_(), x.detach().abs().requires_grad_()
    terms = torch.autograd.grad((reference.sampled_weight_grad(ga, xa, idx, IN) * w.abs()).sum(), (ga, xa))
    # each gradient entry sums the products of the sampled entries that use it (at most all 4)
    for name, o, t, m in zip(("d grad_y", "dx"), ours, theirs, terms, strict=True):
        assert_within_rounding(name, o, t, m, terms=2 * (4 + 1), roundings=2)

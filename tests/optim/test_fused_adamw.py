"""FusedAdamW and its ops against torch.optim.AdamW (the reference) over many steps."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastpeft  # noqa: F401
from pyfastpeft.ops.optim import fused_adamw_, multi_tensor_l2_norm
from pyfastpeft.optim import FusedAdamW, lora_plus_param_groups
from tests.conftest import low_precision_error_bound, requires_cuda

SHAPES = [(7, 5), (3,), (33, 65), (1,), (4097,)]


def make_params(device, dtype=torch.float32, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]


def clone_params(ps, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_(p.requires_grad) for p in ps]


def set_grads(step, *param_lists, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for shapes in zip(*param_lists, strict=True):
        grad = torch.randn(shapes[0].shape, generator=g, dtype=torch.float64)
        for p in shapes:
            p.grad = grad.to(p.device, p.dtype)


def assert_rel_close(ours, ref, rel=1e-6):
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        if b.numel() == 0:
            continue
        err = (a.detach().double() - b.detach().double()).abs().max().item()
        scale = b.detach().double().abs().max().item()
        assert err <= rel * max(scale, 1e-12), (err, scale)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3),
        dict(lr=1e-2, amsgrad=True),
        dict(lr=1e-2, maximize=True, weight_decay=0.0),
    ],
)
def test_matches_torch_adamw_50_steps(device, options):
    ours = make_params(device)
    ref = clone_params(ours)
    opt, ref_opt = FusedAdamW(ours, **options), torch.optim.AdamW(ref, **options)
    for step in range(50):
        set_grads(step, ours, ref)
        opt.step()
        ref_opt.step()
    assert_rel_close(ours, ref)
    for p, q in zip(ours, ref, strict=True):
        s, r = opt.state[p], ref_opt.state[q]
        assert s["step"].item() == r["step"].item() == 50
        assert_rel_close([s["exp_avg"], s["exp_avg_sq"]], [r["exp_avg"], r["exp_avg_sq"]])


def test_param_groups_and_tensor_lr(device):
    ours = make_params(device)
    ref = clone_params(ours)

    def groups(ps, lr2):
        return [
            {"params": ps[:2], "lr": 1e-2, "weight_decay": 0.0},
            {"params": ps[2:], "lr": lr2, "betas": (0.5, 0.9)},
        ]

    opt = FusedAdamW(groups(ours, torch.tensor(3e-3)), weight_decay=0.2)
    ref_opt = torch.optim.AdamW(groups(ref, 3e-3), weight_decay=0.2)
    for step in range(50):
        if step == 25:  # a scheduler changing the learning rate mid-run
            opt.param_groups[0]["lr"] = ref_opt.param_groups[0]["lr"] = 5e-3
        set_grads(step, ours, ref)
        opt.step()
        ref_opt.step()
    assert_rel_close(ours, ref)


def test_float64_matches_tightly():
    ours = make_params("cpu", torch.float64)
    ref = clone_params(ours)
    opt, ref_opt = FusedAdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
    for step in range(50):
        set_grads(step, ours, ref)
        opt.step()
        ref_opt.step()
    assert_rel_close(ours, ref, rel=1e-12)


# float16 moments without master weights underflow (eps = 1e-8 is 0 in float16) and torch's AdamW
# itself returns inf there, so float16 is tested with master weights only.
@pytest.mark.parametrize(
    "dtype,master_weights", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)]
)
def test_low_precision_within_dtype_error(device, dtype, master_weights):
    ours = make_params(device, dtype)
    ref64 = clone_params(ours, torch.float64)
    lowp = clone_params(ours)
    opt = FusedAdamW(ours, lr=1e-2, master_weights=master_weights)
    ref_opt, lowp_opt = torch.optim.AdamW(ref64, lr=1e-2), torch.optim.AdamW(lowp, lr=1e-2)
    for step in range(50):
        set_grads(step, ours, lowp)
        for p, q in zip(ours, ref64, strict=True):
            q.grad = p.grad.double()  # the same (rounded) gradients
        opt.step()
        ref_opt.step()
        lowp_opt.step()
    assert all(p.dtype == dtype for p in ours)

    def flat(ps):
        return torch.cat([p.detach().double().flatten() for p in ps])

    # the rule over the whole parameter set: a single element's rounding path is a coin toss
    err, bound = low_precision_error_bound(flat(ours), flat(lowp), flat(ref64))
    assert err <= bound, (err, bound)
    if master_weights:
        state = opt.state[ours[0]]
        assert state["master"].dtype == state["exp_avg"].dtype == torch.float32
        assert torch.equal(state["master"].to(dtype), ours[0].detach())


def test_frozen_tensors_untouched_and_stateless(device):
    ours = make_params(device)
    ours[1].requires_grad_(False)
    before = ours[1].detach().clone()
    opt = FusedAdamW(ours, lr=1e-2)
    for step in range(5):
        set_grads(step, ours)
        ours[1].grad = None
        opt.step()
    assert torch.equal(ours[1], before)
    assert ours[1] not in opt.state
    assert all(p in opt.state for i, p in enumerate(ours) if i != 1)


def test_freeze_and_unfreeze_mid_run(device):
    ours = make_params(device)
    ref = clone_params(ours)
    opt = FusedAdamW(ours, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    for step in range(50):
        if step == 10:
            ours[2].requires_grad_(False)
        if step == 20:
            ours[2].requires_grad_(True)
            ref_opt.state.pop(ref[2])  # unfrozen: a fresh start, as a new AdamW would make
        set_grads(step, ours, ref)
        if 10 <= step < 20:
            frozen_value = ours[2].detach().clone()
            ref[2].grad = None  # torch's AdamW skips a tensor without a gradient
        opt.step()
        ref_opt.step()
        if 10 <= step < 20:
            assert torch.equal(ours[2], frozen_value)
            assert "exp_avg" not in opt.state.get(ours[2], {})
    assert opt.state[ours[2]]["step"].item() == 30
    assert_rel_close(ours, ref)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clipping_matches_clip_grad_norm(device, max_norm):
    ours = make_params(device)
    ref = clone_params(ours)
    opt = FusedAdamW(ours, lr=1e-2, max_grad_norm=max_norm)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    for step in range(50):
        set_grads(step, ours, ref)
        grads_before = [p.grad.clone() for p in ours]
        norm = opt.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        ref_opt.step()
        assert abs(norm.item() - ref_norm.item()) <= 1e-5 * ref_norm.item()
        # the gradients are not rewritten
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads_before, strict=True))
    assert_rel_close(ours, ref, rel=2e-6)


def test_l2sp_pulls_toward_first_values(device):
    lam = 0.3
    ours = make_params(device)
    ref = clone_params(ours)
    anchors = [p.detach().clone() for p in ref]
    opt = FusedAdamW(ours, lr=1e-2, l2sp=lam)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    for step in range(50):
        set_grads(step, ours, ref)
        for q, a in zip(ref, anchors, strict=True):
            q.grad = q.grad + lam * (q.detach() - a)
        opt.step()
        ref_opt.step()
    assert_rel_close(ours, ref)
    assert torch.equal(opt.state[ours[0]]["anchor"], anchors[0])


def test_state_dict_round_trip(device):
    ours = make_params(device)
    other = clone_params(ours)
    opt = FusedAdamW(ours, lr=1e-2, amsgrad=True)
    for step in range(10):
        set_grads(step, ours)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    with torch.no_grad():
        for p, q in zip(other, ours, strict=True):
            p.copy_(q)
    opt2 = FusedAdamW(other, lr=1.0)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["amsgrad"]
    for step in range(10, 20):
        set_grads(step, ours, other)
        opt.step()
        opt2.step()
    assert_rel_close(other, ours, rel=0.0)


def test_loads_torch_adamw_state_dict(device):
    ours = make_params(device)
    ref = clone_params(ours)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for step in range(10):
        set_grads(step, ref)
        ref_opt.step()
    with torch.no_grad():
        for p, q in zip(ours, ref, strict=True):
            p.copy_(q)
    opt = FusedAdamW(ours)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    assert opt.state[ours[0]]["step"].device == ours[0].device
    for step in range(10, 50):
        set_grads(step, ours, ref)
        opt.step()
        ref_opt.step()
    assert_rel_close(ours, ref)


def test_lora_plus_groups():
    model = torch.nn.Module()
    model.lora_A = torch.nn.Parameter(torch.zeros(2, 3))
    model.lora_B = torch.nn.Parameter(torch.zeros(3, 2))
    model.frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    groups = lora_plus_param_groups(model, lr=1e-3, lr_ratio=8.0)
    assert [g["lr"] for g in groups] == [1e-3, 8e-3]
    assert groups[0]["params"] == [model.lora_A] and groups[1]["params"] == [model.lora_B]
    opt = FusedAdamW(groups)
    model.lora_A.grad, model.lora_B.grad = torch.ones(2, 3), torch.ones(3, 2)
    opt.step()
    assert torch.allclose(model.lora_B.detach(), torch.full((3, 2), -8e-3))
    assert torch.allclose(model.lora_A.detach(), torch.full((2, 3), -1e-3))


# ---- the ops ----------------------------------------------------------------------------------------
def _op_args(device, n=3, master=False):
    dtype = torch.bfloat16 if master else torch.float32
    sdtype = torch.float32
    ps = [torch.randn(5 + i, 3, device=device).to(dtype) for i in range(n)]
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.zeros_like(p, dtype=sdtype) for p in ps]
    vs = [torch.zeros_like(p, dtype=sdtype) for p in ps]
    masters = [p.float() for p in ps] if master else []
    steps = [torch.zeros((), device=device) for _ in ps]
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    return ps, gs, ms, vs, masters, steps, lr


@pytest.mark.parametrize("master", [False, True])
def test_opcheck_fused_adamw(device, master):
    ps, gs, ms, vs, masters, steps, lr = _op_args(device, master=master)
    anchors = [p.clone().to(torch.float32 if master else p.dtype) for p in ps]
    args = (
        ps,
        gs,
        ms,
        vs,
        [],
        masters,
        anchors,
        steps,
        lr,
        torch.tensor(0.5, device=device),
        0.9,
        0.999,
        1e-8,
        0.01,
        0.1,
        False,
    )
    torch.library.opcheck(torch.ops.pyfastpeft.fused_adamw_.default, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_l2_norm(device, dtype):
    ts = [torch.randn(s, device=device, dtype=torch.float64) for s in [(3, 5), (70000,), (1,)]]
    ts.append(torch.randn(8, 6, device=device, dtype=torch.float64).t())  # non-contiguous
    low = [t.to(dtype) for t in ts]
    ours = multi_tensor_l2_norm(low)
    ref = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in low]))
    assert ours.dtype == torch.float32 and ours.device.type == torch.device(device).type
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    torch.library.opcheck(torch.ops.pyfastpeft.multi_tensor_l2_norm.default, (low,))


def test_bad_inputs_name_the_argument():
    ps, gs, ms, vs, _, steps, lr = _op_args("cpu")
    with pytest.raises(ValueError, match="grads: expected 3 tensors"):
        fused_adamw_(ps, gs[:2], ms, vs, steps, lr)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\]: expected shape"):
        fused_adamw_(ps, gs, [ms[0], ms[0], ms[2]], vs, steps, lr)
    with pytest.raises(ValueError, match=r"grads\[0\]: expected dtype"):
        fused_adamw_(ps, [gs[0].double(), *gs[1:]], ms, vs, steps, lr)
    with pytest.raises(ValueError, match="lr: expected a one-element"):
        fused_adamw_(ps, gs, ms, vs, steps, lr.float())
    with pytest.raises(ValueError, match="anchors: required"):
        fused_adamw_(ps, gs, ms, vs, steps, lr, l2sp=0.1)
    with pytest.raises(ValueError, match="masters: float32 master weights"):
        fused_adamw_(ps, gs, ms, vs, steps, lr, masters=[p.clone() for p in ps])
    with pytest.raises(ValueError, match="betas"):
        FusedAdamW(ps, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="tensors: expected at least one"):
        multi_tensor_l2_norm([])


def test_one_launch_per_group_device_and_dtype(monkeypatch):
    import pyfastpeft.optim.fused_adamw as module

    calls = []
    real = module.fused_adamw_
    monkeypatch.setattr(module, "fused_adamw_", lambda ps, *a, **kw: (calls.append(len(ps)), real(ps, *a, **kw)))
    ps32 = make_params("cpu", torch.float32, shapes=[(3, 4)] * 40)
    ps64 = make_params("cpu", torch.float64, shapes=[(5,)] * 7)
    opt = FusedAdamW([{"params": ps32 + ps64}, {"params": make_params("cpu", shapes=[(2,)] * 3)}])
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    assert sorted(calls) == [3, 7, 40]


@requires_cuda
def test_step_captured_in_cuda_graph():
    ours = make_params("cuda")
    ref = clone_params(ours)
    opt = FusedAdamW(ours, lr=torch.tensor(1e-2, device="cuda"), max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    set_grads(0, ours, ref)
    opt.step()  # state is allocated outside the graph
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    ref_opt.step()
    static_grads = [p.grad for p in ours]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(1, 20):
        set_grads(step, ref)
        for g, q in zip(static_grads, ref, strict=True):
            g.copy_(q.grad)
        graph.replay()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
    torch.cuda.synchronize()
    assert opt.state[ours[0]]["step"].item() == 20
    assert_rel_close(ours, ref, rel=2e-6)


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(1e-4, 1e-1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.floats(1e-10, 1e-3),
    weight_decay=st.floats(0.0, 1.0),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6),
)
def test_random_hyperparameters_match_torch(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, sizes):
    ours = make_params("cpu", shapes=[(s,) for s in sizes])
    ref = clone_params(ours)
    options = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    opt, ref_opt = FusedAdamW(ours, **options), torch.optim.AdamW(ref, **options)
    for step in range(10):
        set_grads(step, ours, ref)
        opt.step()
        ref_opt.step()
    assert_rel_close(ours, ref, rel=2e-6)


@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "l2sp": 0.1}])
def test_non_contiguous_parameters_match_torch_adamw(device, options):
    # torch.optim.AdamW takes strided parameters (a transposed or sliced view made a Parameter); so do we
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)]
    ours = [base[0].to(device).t().requires_grad_(), base[1].to(device)[::2].requires_grad_()]
    assert not any(p.is_contiguous() for p in ours)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    options = dict(options)
    l2sp = options.pop("l2sp", 0.0)
    opt = FusedAdamW(ours, lr=1e-2, l2sp=l2sp, **options)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, **options)
    for step in range(5):
        set_grads(step, ours, ref)
        opt.step()
        if l2sp:  # torch has no L2-SP term: compare with the contiguous run instead
            continue
        ref_opt.step()
    if l2sp:
        contiguous = [p.detach().contiguous().requires_grad_() for p in ref]
        opt_c = FusedAdamW(contiguous, lr=1e-2, l2sp=l2sp, **options)
        for step in range(5):
            set_grads(step, contiguous)
            opt_c.step()
        ref = contiguous
    assert all(not p.is_contiguous() for p in ours)  # updated in place, views kept
    assert_rel_close(ours, ref, rel=1e-12)

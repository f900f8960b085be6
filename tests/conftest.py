"""Shared test fixtures: the devices to test on and per-dtype tolerances."""

from __future__ import annotations

import importlib.abc
import os
import subprocess
import sys

# PYFASTPEFT_TEST_WITHOUT=transformers,peft runs the suite as if those optional packages were not
# installed: importing them (or any submodule) raises ModuleNotFoundError, as on a machine without them.
# The tests that need them must skip; every other test must still run and pass.
_ABSENT = {name.strip() for name in os.environ.get("PYFASTPEFT_TEST_WITHOUT", "").split(",") if name.strip()}


class _AbsentPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in _ABSENT:
            raise ModuleNotFoundError(f"No module named {fullname!r} (PYFASTPEFT_TEST_WITHOUT)", name=fullname)
        return None


if _ABSENT:
    if any(name.split(".")[0] in _ABSENT for name in sys.modules):
        raise RuntimeError(f"PYFASTPEFT_TEST_WITHOUT: {sorted(_ABSENT)} already imported before the tests started")
    sys.meta_path.insert(0, _AbsentPackages())

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

import pyfastpeft  # noqa: E402

# CI draws the same property-test examples on every run (a red build is then reproducible, and never
# a new random draw); elsewhere each run explores fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def python_m_pyfastpeft(*argv, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m pyfastpeft *argv`` in a child process (the real entry point, as a user runs it), its
    output captured as text; ``kwargs`` go to subprocess.run (cwd, env)."""
    cmd = [sys.executable, "-m", "pyfastpeft", *(str(a) for a in argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


DEVICES = ["cpu"] + (["cuda"] if pyfastpeft.cuda_available() else [])
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


_NO_CUDA = "CUDA kernels not built or no GPU"
requires_cuda = pytest.mark.skipif(not pyfastpeft.cuda_available(), reason=_NO_CUDA)


def pytest_collection_modifyitems(config, items):
    """Mark every test that touches CUDA with ``cuda`` (``pytest -m cuda`` runs only those): the
    ``device="cuda"`` variants, the ``requires_cuda`` tests and everything under tests/cuda/."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_cuda = str(params.get("device", "")).startswith("cuda")
        needs_cuda = any(m.kwargs.get("reason") == _NO_CUDA for m in item.iter_markers("skipif"))
        under_cuda_dir = item.path.parent.name == "cuda" and item.path.parent.parent.name == "tests"
        if on_cuda or needs_cuda or under_cuda_dir:
            item.add_marker(pytest.mark.cuda)


def low_precision_error_bound(
    ours: torch.Tensor,
    torch_lowp: torch.Tensor,
    ref64: torch.Tensor,
    factor: float = 2.0,
    magnitude: torch.Tensor | None = None,
):
    """Flash-attention's rule: our error against the float64 reference may be at most `factor` times the
    error of the same computation done by plain PyTorch in the low-precision dtype, plus two units of
    roundings of the dtype at the result's magnitude (PyTorch's own error can be zero by luck on tiny
    inputs, where a different but equally valid summation order is one rounding off). ``magnitude``:
    the same computation on the inputs' absolute values (Σ|a·b| for a sum of products), for results
    that cancel: a valid summation order is then off by roundings of the summands, not of the result."""
    if ref64.numel() == 0:  # nothing to be wrong about (the shapes are the caller's to check)
        return 0.0, 0.0
    ours_err = (ours.double() - ref64).abs().max().item()
    torch_err = (torch_lowp.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item() if magnitude is None else magnitude.abs().max().item()
    floor = 2 * torch.finfo(ours.dtype).eps * scale + 1e-12
    return ours_err, factor * torch_err + floor


def assert_as_accurate_as(name: str, ours: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, factor: float = 2.0):
    """``ours`` (a network's output, say) at most ``factor`` times as far from the float64 run as ``plain``
    (the same function computed another way in the same dtype: unmerged, uncompiled, plain PyTorch
    modules), plus two roundings at the outputs' size (low_precision_error_bound): for results of a
    whole network, whose sums' absolute terms cannot be followed through the nonlinearities."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref64.shape)}"
    err, bound = low_precision_error_bound(ours.detach(), plain.detach(), ref64.detach(), factor)
    assert err <= bound, f"{name}: error {err:.3g} against float64 > bound {bound:.3g}"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels (and PyTorch's CPU matmuls) sum in: float32 for every dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounding_bound(magnitude: torch.Tensor, dtype: torch.dtype, terms: int = 1, roundings: int = 1) -> torch.Tensor:
    """Elementwise bound on |computed − exact| for results that are sums of products, whatever the order
    of the sums: ``terms`` (the longest chain of additions and multiplications behind one element)
    operations in the accumulation type, and ``roundings`` roundings to ``dtype`` (the result's, and
    any intermediate or input rounding the reference does not share), each off by at most one unit
    roundoff times the element's sum of absolute terms, ``magnitude`` (the same computation run on the
    inputs' absolute values). With eps = 2·u this is γ_n = n·u/(1 − n·u) ≤ n·eps while n·u ≤ 1/2, so
    the second-order terms are covered. The tiny absolute floor is the spacing of subnormals, where a
    rounding is not relative."""
    acc_eps = torch.finfo(accumulation_dtype(dtype)).eps
    info = torch.finfo(dtype)
    return (
        terms * acc_eps + roundings * info.eps
    ) * magnitude.detach().double().abs() + roundings * info.tiny * info.eps


def assert_within_rounding(
    name: str,
    ours: torch.Tensor,
    ref64: torch.Tensor,
    magnitude: torch.Tensor,
    terms: int = 1,
    roundings: int = 1,
) -> None:
    """Every element of ``ours`` within ``rounding_bound`` of the float64 reference (see there)."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref64.shape)}"
    if ours.numel() == 0:
        return
    err = (ours.detach().double() - ref64.detach().double()).abs()
    bound = rounding_bound(magnitude, ours.dtype, terms, roundings).expand_as(err)
    over = err > bound
    if over.any():
        i = (err - bound).argmax()
        raise AssertionError(
            f"{name}: {int(over.sum())} of {err.numel()} elements past the rounding bound; worst "
            f"error {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g} "
            f"({ours.dtype}, {terms} terms, {roundings} roundings)"
        )


def lsq_qparam_grad_bounds(x, grad_out, scale, zero_point, bits: int, group_size: int, axis: int, grad_factor: float):
    """How far LSQ's scale (and zero-point) gradients may lie from the float64 reference: each is a sum
    over its quantization group of n terms, accumulated in float32 (float64 for float64 x), so at most
    γ_n = (n + 2)·eps times the sum of their absolute values. A scale term is grad·(rint(x/s) − x/s)
    (|·| ≤ 1/2) or grad·(qmin − z or qmax − z) (|·| < 2^bits), a zero-point term grad·s, all times the
    grad factor. Returns one bound tensor per gradient, in the scale's shape."""
    from pyfastpeft.ops import reference

    acc_eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    gamma = (x.numel() // max(1, scale.numel()) + 2) * acc_eps
    (pre, channels, post), _ = reference._quant_layout(x, group_size, axis)
    abs_grad = grad_out.double().abs().reshape(pre, channels, post).sum(dim=(0, 2)).reshape(scale.shape)
    bounds = [gamma * abs(grad_factor) * 2**bits * abs_grad]
    if zero_point is not None:
        s = scale.detach().double().clamp(min=reference.QUANT_EPS)
        bounds.append(gamma * abs(grad_factor) * s * abs_grad)
    return bounds

"""Shared test fixtures: the devices to test on and per-dtype tolerances."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

import pyfastpeft

# CI draws the same property-test examples on every run (a red build is then reproducible, and never
# a new random draw); elsewhere each run explores fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

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
    ours_err = (ours.double() - ref64).abs().max().item()
    torch_err = (torch_lowp.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item() if magnitude is None else magnitude.abs().max().item()
    floor = 2 * torch.finfo(ours.dtype).eps * scale + 1e-12
    return ours_err, factor * torch_err + floor

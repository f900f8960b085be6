"""What the build reports, and the clear failure when torch changed since the build."""

from __future__ import annotations

import subprocess
import sys

import torch

import pyfastpeft


def test_build_info():
    info = pyfastpeft.build_info()
    assert set(info) >= {"cuda_built", "cuda_archs", "torch_version"}
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_built"], bool)
    if info["cuda_built"]:
        assert info["cuda_archs"]
    else:
        assert info["cuda_archs"] == ""


def test_every_op_is_registered_with_cpu_kernel():
    for name in ("lora_linear", "lora_linear_backward", "philox_dropout"):
        op = getattr(torch.ops.pyfastpeft, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name


def test_import_under_other_torch_fails_with_rebuild_message():
    code = (
        "import torch; torch.__version__ = '0.0.1-not-the-build'\n"
        "try:\n"
        "    import pyfastpeft\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR:" in out.stdout, out.stdout + out.stderr
    assert "built against torch" in out.stdout
    assert "0.0.1-not-the-build" in out.stdout
    assert "pip install --no-build-isolation" in out.stdout

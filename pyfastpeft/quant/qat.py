"""prepare_qat / convert and the safetensors file of a converted model."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..nn.fake_quant_linear import FakeQuantLinear
from ..nn.quantized_linear import QuantizedLinear

_FORMAT = "pyfastpeft.quantized/1"


@dataclass
class QATConfig:
    """Which linears to fake-quantize, and how.

    Attributes:
        weight_bits: weight code width (2..8).
        weight_group_size: groups of this many input features per output row; -1 per output row; 0 per tensor.
        weight_symmetric: symmetric weight codes.
        activation_bits: per-token dynamic activation codes; None for weight-only quantization.
        activation_symmetric: symmetric activation codes (asymmetric by default).
        learnable_scale: learn the weight scales with LSQ.
        target_modules: module names to quantize: a list of names or name suffixes (PEFT's rule), a regular
            expression matched against the full name, or None for every nn.Linear.
        exclude_modules: names or suffixes to leave in float (e.g. ``["lm_head"]``).
    """

    weight_bits: int = 4
    weight_group_size: int = 32
    weight_symmetric: bool = True
    activation_bits: int | None = 8
    activation_symmetric: bool = False
    learnable_scale: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] = field(default_factory=list)

    @classmethod
    def int8_dynamic_activation_int4_weight(cls, group_size: int = 32, **kw) -> QATConfig:
        """ "8da4w": int4 symmetric grouped weights, int8 asymmetric per-token activations."""
        return cls(weight_bits=4, weight_group_size=group_size, activation_bits=8, **kw)

    @classmethod
    def weight_only(cls, bits: int = 4, group_size: int = 32, **kw) -> QATConfig:
        return cls(weight_bits=bits, weight_group_size=group_size, activation_bits=None, **kw)

    def scheme(self) -> dict:
        d = asdict(self)
        return {
            k: d[k]
            for k in (
                "weight_bits",
                "weight_group_size",
                "weight_symmetric",
                "activation_bits",
                "activation_symmetric",
            )
        }


def _matches(name: str, patterns: list[str] | str | None, default: bool) -> bool:
    if patterns is None:
        return default
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare_qat(model: nn.Module, config: QATConfig) -> nn.Module:
    """Swap the targeted ``nn.Linear`` modules of ``model`` (in place) for FakeQuantLinear sharing their
    weight and bias. A targeted linear whose in_features the group size does not divide raises ValueError."""
    if not isinstance(config, QATConfig):
        raise ValueError(f"config: expected a QATConfig, got {type(config).__name__}")
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and _matches(name, config.target_modules, True)
        and not _matches(name, config.exclude_modules or None, False)
    ]
    if not targets:
        raise ValueError(f"config.target_modules: no nn.Linear of the model matches {config.target_modules!r}")
    for name, linear in targets:
        _replace(
            model,
            name,
            FakeQuantLinear.from_linear(linear, learnable_scale=config.learnable_scale, **config.scheme()),
        )
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace each FakeQuantLinear of ``model`` (in place) with a QuantizedLinear of its integer codes."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not found:
        raise ValueError("model: holds no FakeQuantLinear (run prepare_qat first)")
    for name, module in found:
        _replace(model, name, QuantizedLinear.from_fake_quant(module))
    return model


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the converted model's state dict to a safetensors file, with each QuantizedLinear's scheme in the
    metadata. The file is written to a temporary name in the same directory and renamed over ``path``, so a
    reader never sees a partial file."""
    path = Path(path)
    schemes = {
        name: {
            **m.scheme(),
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "dtype": str(m.dtype).removeprefix("torch."),
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
    }
    if not schemes:
        raise ValueError("model: holds no QuantizedLinear (run convert first)")
    # Clone: safetensors refuses tensors that share storage (tied weights).
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": _FORMAT, "quantized_modules": json.dumps(schemes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_quantized(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a :func:`save_quantized` file into ``model`` (the float architecture, prepared, or converted): the
    recorded linears become QuantizedLinear modules first, then the state dict is loaded."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"path: {path} is not a pyfastpeft quantized checkpoint")
        schemes = json.loads(metadata["quantized_modules"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    for name, info in schemes.items():
        info = dict(info)
        dtype = getattr(torch, info.pop("dtype"))
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"model: has no module {name!r} recorded in {path}") from e
        device = next(iter(old.buffers() if isinstance(old, QuantizedLinear) else old.parameters())).device
        _replace(
            model,
            name,
            QuantizedLinear(
                info.pop("in_features"),
                info.pop("out_features"),
                info.pop("bias"),
                dtype=dtype,
                device=device,
                **info,
            ),
        )
    model.load_state_dict(state, strict=strict)
    return model

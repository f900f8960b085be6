"""QuantizedLinear: integer weights, dequantized on the fly. See fake_quant_linear.py for the shared
semantics; LoRA over either base is the LoRA layer's quantized-base mode (``pyfastpeft.tuners.LoraLinear``)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .fake_quant_linear import FakeQuantLinear, _ActivationQuant, _check_bits


def codes_per_byte(bits: int) -> int:
    """Codes stored per byte: 2 for int4, 4 for int2; other widths keep one int8 per code."""
    return 8 // bits if bits in (2, 4) else 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes in [-2^(bits-1), 2^(bits-1)) along the last dimension → storage.

    int8 (and widths other than 2 and 4): int8, as is. int4 / int2: uint8, code ``k`` of each byte in
    bits ``[k·bits, (k+1)·bits)`` as ``code + 2^(bits-1)`` (element ``2i`` in the low nibble for int4).
    """
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return codes.to(torch.int8)
    if codes.shape[-1] % per_byte:
        raise ValueError(
            f"codes: the last dimension ({codes.shape[-1]}) must be a multiple of {per_byte} for int{bits}"
        )
    u = (codes.to(torch.int32) + 2 ** (bits - 1)).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (u << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 codes."""
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return packed.to(torch.int32)
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return (u - 2 ** (bits - 1)).reshape(*packed.shape[:-1], -1)


def _expand_groups(t: torch.Tensor, out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    """A per-group [out, in/g] (per-row [out], per-tensor []) tensor broadcast to [out, in]."""
    if group_size == 0:
        return t.reshape(1, 1)
    if group_size == -1:
        return t.reshape(out_features, 1)
    return t.repeat_interleave(group_size, dim=1)


class QuantizedLinear(_ActivationQuant, nn.Module):
    """Inference linear over real integer weights: ``linear(aq(x), (codes - z)·s, b)``.

    Buffers: ``qweight`` (int8 ``[out, in]``, or uint8 ``[out, in/2]`` for int4 and ``[out, in/4]`` for int2),
    ``weight_scale`` (float32; float64 for a float64 model), ``weight_zero_point`` (int32), and ``bias``.
    The dequantized weight is computed in the scale's dtype and cast to ``dtype``, exactly as the fake
    quantizer does, so outputs equal the FakeQuantLinear this was converted from.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_bits: int = 4,
        weight_group_size: int = 32,
        weight_symmetric: bool = True,
        activation_bits: int | None = 8,
        activation_symmetric: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        _check_bits("weight_bits", weight_bits)
        _check_bits("activation_bits", activation_bits, allow_none=True)
        per_byte = codes_per_byte(weight_bits)
        if in_features % per_byte:
            raise ValueError(
                f"in_features: {in_features} is not a multiple of {per_byte}, as int{weight_bits} packing needs"
            )
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.weight_group_size, self.weight_symmetric = (
            weight_bits,
            weight_group_size,
            weight_symmetric,
        )
        self.activation_bits, self.activation_symmetric = activation_bits, activation_symmetric
        self.dtype = dtype
        storage = torch.int8 if per_byte == 1 else torch.uint8
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if weight_group_size == 0:
            qshape: tuple[int, ...] = ()
        elif weight_group_size == -1:
            qshape = (out_features,)
        else:
            qshape = (out_features, in_features // weight_group_size)
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // per_byte, dtype=storage, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(qshape, dtype=acc, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(qshape, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_fake_quant(cls, module: FakeQuantLinear) -> QuantizedLinear:
        """Integer codes of ``module``'s current fake-quantized weight, recovered from the kernel's own output
        so they are the codes it used: ``(clamp(q) - z)·s`` in float32 divided by s is exact."""
        w = module.weight.detach()
        scale, zero_point = module.weight_qparams()
        if not torch.isfinite(scale).all():
            raise ValueError("weight: holds NaN or inf values; its quantization groups have no finite scale")
        acc = scale.dtype
        out = ops.fake_quantize_lsq(
            w.to(acc),
            scale,
            zero_point.to(acc),
            module.weight_bits,
            module.weight_group_size,
            0,
            grad_factor=1.0,
        )
        s = _expand_groups(scale, module.out_features, module.in_features, module.weight_group_size)
        z = _expand_groups(zero_point, module.out_features, module.in_features, module.weight_group_size)
        codes = torch.round(out.double() / s.double()).to(torch.int32) + z
        q = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            dtype=w.dtype,
            device=w.device,
            **module.scheme(),
        )
        q.qweight.copy_(pack_codes(codes, module.weight_bits))
        q.weight_scale.copy_(scale)
        q.weight_zero_point.copy_(zero_point)
        if module.bias is not None:
            q.bias.copy_(module.bias.detach())
        return q

    def packed_weights(self) -> tuple[torch.Tensor, int]:
        """(the packed codes, how many parameters they stand for: the weights, and the bias, which is a
        buffer here): parameter counts include frozen packed weights, as GGUFLinear's
        (pyfastpeft.report.trainable_parameters), so a quantized model counts as its float model did."""
        return self.qweight, self.in_features * self.out_features + (0 if self.bias is None else self.out_features)

    def codes(self) -> torch.Tensor:
        """The int32 codes ``[out, in]``."""
        return unpack_codes(self.qweight, self.weight_bits)

    def dequantized_weight(self) -> torch.Tensor:
        """``((codes - z)·s)`` in the scale's dtype, cast to ``dtype``."""
        g = self.weight_group_size
        s = _expand_groups(self.weight_scale, self.out_features, self.in_features, g)
        z = _expand_groups(self.weight_zero_point, self.out_features, self.in_features, g)
        return ((self.codes() - z).to(s.dtype) * s).to(self.dtype)

    def quantized_weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def extra_repr(self) -> str:
        scheme = ", ".join(f"{k}={v}" for k, v in self.scheme().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {scheme}, dtype={self.dtype}"

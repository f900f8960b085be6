"""Functional ops: thin wrappers over ``torch.ops.pyfastpeft.*`` with autograd and fake kernels."""

from .. import _extension  # noqa: F401, I001  (loads the compiled operators first)
from .bias import bias_only_linear
from .ia3 import ia3_scale
from .distill import fused_linear_cross_entropy, fused_linear_kd_loss, kd_loss
from .dropout import dropout_linear, philox_dropout
from .gguf import gguf_dequantize, gguf_embedding, gguf_linear, gguf_quantize
from .lora import lora_linear
from .multi_lora import (
    BASE_ADAPTER,
    adapter_indices_from_names,
    check_adapter_indices,
    kernel_layout,
    multi_lora_linear,
)
from .optim import fused_adamw_, multi_tensor_l2_norm
from .quant import fake_quantize, fake_quantize_lsq
from .sparse import sampled_weight_grad, sparse_delta_linear

__all__ = [
    "BASE_ADAPTER",
    "adapter_indices_from_names",
    "bias_only_linear",
    "check_adapter_indices",
    "fake_quantize",
    "fake_quantize_lsq",
    "fused_adamw_",
    "fused_linear_cross_entropy",
    "fused_linear_kd_loss",
    "gguf_dequantize",
    "gguf_embedding",
    "gguf_linear",
    "gguf_quantize",
    "ia3_scale",
    "kd_loss",
    "kernel_layout",
    "lora_linear",
    "multi_lora_linear",
    "multi_tensor_l2_norm",
    "dropout_linear",
    "philox_dropout",
    "sampled_weight_grad",
    "sparse_delta_linear",
]

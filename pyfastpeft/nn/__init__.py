"""PEFT modules."""

from .fake_quant_linear import FakeQuantLinear
from .lora_linear import LoRALinear
from .quantized_linear import QuantizedLinear, QuantLoRALinear

__all__ = ["LoRALinear", "FakeQuantLinear", "QuantizedLinear", "QuantLoRALinear"]

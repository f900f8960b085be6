"""Quantization-aware fine-tuning workflow: prepare_qat → train → convert → save_quantized / load_quantized.

```python
cfg = pf.quant.QATConfig.int8_dynamic_activation_int4_weight(group_size=32, exclude_modules=["lm_head"])
pf.quant.prepare_qat(model, cfg)      # nn.Linear → FakeQuantLinear (same weight / bias parameters)
...train...
pf.quant.convert(model)               # FakeQuantLinear → QuantizedLinear (int8 / packed int4 codes + scales)
pf.quant.save_quantized(model, "model.safetensors")
```
"""

from .qat import QATConfig, convert, load_quantized, prepare_qat, save_quantized

__all__ = ["QATConfig", "prepare_qat", "convert", "save_quantized", "load_quantized"]

"""LoRA trained through the grid it will ship on (quantization-aware fine-tuning).

A LoRA update is often about the size of one 4-bit rounding step, so fusing it into the weights
and quantizing the result can round it away (export/retention.py measures how much). With
`model.lora.qat_bits=4` each adapted layer computes with its weights as the quantized export
will hold them: W + scale * (A B)^T fused, quantized to MLX's affine grid (`qat_bits`, groups of
`qat_group_size`: what `mlxlab export --quantize` writes at 64, GGUF Q4_1 at 32) and dequantized,
with the straight-through estimator for the gradient (the rounding's gradient taken as 1), so
the adapters learn an update that survives the rounding. The adapters stay plain LoRA: saved,
fused and exported as any other.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora_linear import LoRALinear, dequantized_weight, input_dims


class QATLoRALinear(LoRALinear):
    """LoRALinear whose forward uses the fused weight on the quantized grid (module docstring);
    with its adapter off, the base alone."""

    @staticmethod
    def from_base_qat(linear: nn.Module, rank: int, alpha: float, dropout: float, bits: int,
                      group_size: int) -> QATLoRALinear:
        columns = input_dims(linear)
        if columns % group_size:
            raise ConfigError(f"model.lora.qat_group_size={group_size}: a targeted layer has "
                              f"{columns} inputs, not whole groups; use a group size that "
                              "divides it (32, 64 or 128) or leave the layer out of the targets")
        layer = QATLoRALinear(columns, linear.weight.shape[0], rank, alpha, dropout,
                              bias="bias" in linear)
        layer.linear = linear
        layer.linear.freeze()
        layer.bits, layer.group_size = bits, group_size
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        if not self.adapter_on:
            return self.linear(x)
        weight = dequantized_weight(self.linear)
        fused = weight + (self.scale * (self.lora_a @ self.lora_b)).T.astype(weight.dtype)
        rounded = mx.dequantize(*mx.quantize(fused, group_size=self.group_size, bits=self.bits),
                                group_size=self.group_size, bits=self.bits)
        through = fused + mx.stop_gradient(rounded.astype(fused.dtype) - fused)
        y = x @ through.T
        return y + self.linear.bias if "bias" in self.linear else y

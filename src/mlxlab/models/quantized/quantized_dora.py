"""mlx-lm's DoRA wrapper on a quantized base, with the base product of
models/quantized/quantized_cpu.py.

mlx-lm's DoRALinear dequantizes its quantized base with mx.dequantize (~10x slower than
kernels.dequantize on the CPU) and multiplies x by that float weight, so autodiff keeps the float
copy of every wrapped layer from the forward to the backward: 4-bit DoRA holds the float model.
Here the base product is quantized_product's (dequantized again in the backward), and the weight
norm, which DoRA takes without a gradient (mlx-lm's stop_gradient), uses a temporary dequantized
copy that is freed once the norm is taken. The same parameters and the same outputs to rounding.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.tuner.dora import DoRALinear

from mlxlab import kernels
from mlxlab.models.quantized.quantized_product import quantized_product

__all__ = ["CpuQuantizedDoRALinear", "DoRALinear", "quantized_dora"]


def quantized_dora(layer: DoRALinear, x: mx.array) -> mx.array:
    """DoRALinear.__call__ (mlx-lm 0.32) of `layer` (a DoRALinear or a class built on it) on a
    quantized base, with the base product and the dequantize made cheap on the CPU and
    memory-flat."""
    base = layer.linear
    y = quantized_product(x, base)
    z = (layer.dropout(x) @ layer.lora_a) @ layer.lora_b
    out = y + (layer.scale * z).astype(x.dtype)
    # The norm of the adapted weight, without a gradient, as mlx-lm takes it.
    weight = kernels.dequantize(base["weight"], base["scales"], base["biases"], base.group_size,
                                base.bits, mx.float32)
    adapted = weight + (layer.scale * layer.lora_b.T) @ layer.lora_a.T
    denom = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))
    out = (layer.m / denom).astype(x.dtype) * out
    return out + base["bias"] if "bias" in base else out


class CpuQuantizedDoRALinear(DoRALinear):
    """mlx-lm's DoRALinear on a quantized base computing quantized_dora on the CPU; on another
    device, mlx-lm's own."""

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        return quantized_dora(self, x)

"""x @ W.T of a quantized layer on the fused CPU kernel (its own module: the quantized linear
and embedding classes (quantized_cpu.py) and the DoRA class (quantized_dora.py) both call it)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxlab import kernels

FLOATS = (mx.float32, mx.bfloat16, mx.float16)


def quantized_product(x: mx.array, layer: nn.Module) -> mx.array:
    """x @ W.T of a quantized layer (its weight, scales, biases, group_size, bits): fused on the
    CPU (kernels.quantized_product), else mx.quantized_matmul."""
    if x.dtype in FLOATS:
        out = kernels.quantized_product(x.astype(mx.float32), layer["weight"], layer["scales"],
                                        layer["biases"], layer.group_size, layer.bits)
        if out is not None:
            return out.astype(x.dtype)
    return mx.quantized_matmul(x, layer["weight"], layer["scales"], layer["biases"],
                               transpose=True, group_size=layer.group_size, bits=layer.bits)

"""Training on a 4- or 8-bit base (QLoRA) at the float GEMM's speed on the CPU backend.

Why: MLX 0.32's CPU quantized matmul runs ~3 GFLOP/s on x86 where the float GEMM on OpenBLAS
(runtime/compute/blas.py) runs ~240 (a 1536x4096 layer, 128 rows; its backward, a quantized matmul too,
~11), so a 4-bit model trained tens of times slower than the float one (docs/benchmarks.md,
"QLoRA on the CPU"). Here a quantized layer's product is kernels.quantized_product: one fused
task that dequantizes the weight a block of rows at a time into a scratch buffer and runs the
float GEMM on it, and whose VJP in x does the same in the backward; no float copy of a weight
lives between forward and backward, or beyond the task, so the model's memory stays 4-bit (a
separate dequantize + matmul would not: see kernels/csrc/quantized.cpp). The packed weights are
frozen (no gradient to them, as nn.QuantizedLinear's); adapters around the layer (mlx-lm's
LoRALinear holds it as `.linear`) train through x's cotangent. bf16/fp16 activations are
multiplied in float32 and cast back; bf16/fp16 scales and biases (what most 4-bit folders hold)
go to the kernel as stored and are widened there, so no float32 copy of them lives through the
step.

`use_fast_cpu_quantized(model)` switches a model's quantized layers to these classes in place
(subclasses of mlx's: the same parameters under the same names, the same isinstance checks, so
checkpoints, adapters, fusing and export see the model they saw). On another device (Metal, CUDA)
it switches nothing, and where the fused path cannot run (another device, bits other than 2/4/8,
no ELF BLAS to call, trainer.fused_kernels=off) a switched layer computes what MLX's own
quantized layer computes, with MLX's kernels.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxlab.models.quantized.quantized_product import quantized_product


class CpuQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose product on the CPU is the float GEMM on a weight dequantized just
    in time (module docstring); the same parameters, outputs equal to rounding."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_product(x, self)
        return y + self["bias"] if "bias" in self else y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose `as_linear` (a tied output head: the largest product of a
    small model) runs as CpuQuantizedLinear's does. Lookups stay MLX's (they dequantize only the
    rows looked up)."""

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_product(x, self)


def _switchable(module: nn.Module) -> bool:
    """An affine-quantized layer (mlx's other modes, mxfp4/nvfp4, have no biases to add)."""
    return module.mode == "affine" and module.get("biases") is not None


def _dora_class() -> tuple[type, type] | None:
    """(mlx-lm's DoRALinear, its CPU class for a quantized base), when mlx-lm is installed."""
    try:
        from mlxlab.models.quantized.quantized_dora import CpuQuantizedDoRALinear, DoRALinear
    except ImportError:
        return None
    return DoRALinear, CpuQuantizedDoRALinear


def _cpu_class(module: nn.Module, dora: tuple[type, type] | None) -> type | None:
    """The CPU class `module` switches to, or None. Exact types only: a subclass of mlx's layers
    may compute something else in its __call__."""
    if type(module) is nn.QuantizedLinear and _switchable(module):
        return CpuQuantizedLinear
    if type(module) is nn.QuantizedEmbedding and _switchable(module):
        return CpuQuantizedEmbedding
    if dora is not None and type(module) is dora[0]:
        base = module.linear
        if isinstance(base, nn.QuantizedLinear) and _switchable(base):
            return dora[1]
    return None


def use_fast_cpu_quantized(model: nn.Module) -> int:
    """Switch `model`'s affine-quantized Linear and Embedding layers, and mlx-lm DoRA wrappers
    on a quantized base, to the CPU classes above, in place; returns how many were switched.
    No-op (0) when MLX's default device is not the CPU: Metal and CUDA keep MLX's own quantized
    kernels. Call it before or after adding adapters, before the first (compiled) step."""
    if mx.default_device() != mx.cpu:
        return 0
    dora = _dora_class()
    switched = 0
    for _, module in model.named_modules():
        new_class = _cpu_class(module, dora)
        if new_class is not None:
            # The instance keeps its identity, parameters and frozen state (a parent, e.g. a
            # LoRA wrapper's `.linear`, still holds it); only its methods change.
            module.__class__ = new_class
            switched += 1
    return switched

"""The LoRA layer on a Linear (float or quantized: QLoRA), mlx-lm's names, shapes and math, and
what reading its base takes (its input size, its weight in float)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlxlab.models.adapters.adapter_layer import AdapterLayer


class LoRALinear(AdapterLayer):
    """y = linear(x) + (alpha / rank) * dropout(x) @ A @ B, with `linear` frozen, float or
    quantized (the base stays packed, the adapters train in float32). mlx-lm's LoRALinear: the
    same names, shapes, init and math, so its adapter files are ours; written here because
    importing mlx-lm costs seconds (it imports transformers), which every classifier and
    from-scratch run would pay for a 30-line layer.

    B starts at zero, so wrapping a model does not change its outputs.
    """

    @staticmethod
    def from_base(linear: nn.Module, rank: int, alpha: float, dropout: float) -> LoRALinear:
        lora = LoRALinear(input_dims(linear), linear.weight.shape[0], rank, alpha, dropout,
                          bias="bias" in linear)
        lora.linear = linear
        lora.linear.freeze()
        return lora

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))
        self.adapter_on = True  # a plain attribute, not a parameter: adapters_off flips it

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if not self.adapter_on:
            return y
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(y.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The base with W + scale * (A @ B)^T merged in; a quantized base is dequantized,
        merged and quantized again as it was (mlx-lm's fuse), or left float with `dequantize`."""
        weight = dequantized_weight(self.linear)
        out_dims, in_dims = weight.shape
        fused = nn.Linear(in_dims, out_dims, bias="bias" in self.linear)
        delta = (self.scale * (self.lora_a @ self.lora_b)).T
        fused.weight = weight + delta.astype(weight.dtype)
        if "bias" in self.linear:
            fused.bias = self.linear.bias
        return _requantized(fused, self.linear, dequantize)


def input_dims(linear: nn.Module) -> int:
    """A Linear's input size; a quantized one packs 32 // bits weights in each uint32."""
    in_dims = linear.weight.shape[1]
    return in_dims * 32 // linear.bits if isinstance(linear, nn.QuantizedLinear) else in_dims


def dequantized_weight(linear: nn.Module) -> mx.array:
    if not isinstance(linear, nn.QuantizedLinear):
        return linear.weight
    return mx.dequantize(linear.weight, linear.scales, linear.biases, group_size=linear.group_size,
                         bits=linear.bits, mode=linear.mode)


def _requantized(fused: nn.Linear, base: nn.Module, dequantize: bool) -> nn.Module:
    if dequantize or not isinstance(base, nn.QuantizedLinear):
        return fused
    return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)

"""LoRA / DoRA on a MoE layer's routed experts (routed_experts.py: what the experts are): one
low-rank pair per expert, gathered with the router's indices, so a token's update is its own
experts' and an expert that receives no token gets no gradient.

LoRA: y = W_e x + s * B_e A_e x, mlx-lm's LoRASwitchLinear itself (its names and shapes,
lora_a (E, r, in), lora_b (E, out, r), B at zero, its two gathered products and its fuse), so its
adapter files are mlx-lm's; mlxlab adds the adapter switch, the routed counts and the update
norms. DoRA: a learned magnitude per expert and output row, m (E, out), over the adapted rows'
norm (Liu et al. 2024 per expert, the norm held constant in the backward as mlx-lm's DoRALinear
does); mlx-lm has no DoRA on experts. Both start equal to the base.

This module imports mlx-lm (seconds): lora.py imports it only for a model with experts, which
imported mlx-lm's MoE layers already.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.tuner.lora import LoRASwitchLinear as MLXLoRASwitchLinear

from mlxlab.errors import ConfigError
from mlxlab.models.adapters.adapter_layer import AdapterLayer
from mlxlab.models.adapters.routed_experts import RoutedCounts, expert_weight, routed_rows


def _fused(linear: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A SwitchLinear of `weight` with `linear`'s bias, quantized again as `linear` was unless
    `dequantize`."""
    num_experts, out_dims, in_dims = weight.shape
    fused = SwitchLinear(in_dims, out_dims, num_experts, bias="bias" in linear)
    fused.weight = weight
    if "bias" in linear:
        fused.bias = linear.bias
    if dequantize or "scales" not in linear:
        return fused
    return fused.to_quantized(group_size=linear.group_size, bits=linear.bits, mode=linear.mode)


class LoRASwitchLinear(AdapterLayer, MLXLoRASwitchLinear):
    """mlx-lm's LoRA on stacked experts, y = linear(x, indices) + scale * B_e A_e dropout(x)
    for each token's experts e, with the adapter switch, the routed counts and the update's
    norms (module docstring)."""

    counts: RoutedCounts | None = None  # set by counting_routes (eager forwards only)

    @classmethod
    def from_base(cls, linear: nn.Module, rank: int, alpha: float, dropout: float
                  ) -> LoRASwitchLinear:
        """The adapter on `linear`, frozen; lora.kind's from_base, by rank and alpha (mlx-lm's
        takes the scale)."""
        if linear.get("global_scale") is not None:  # mlx-lm's nvfp4 experts, one scale each
            raise ConfigError("model.lora.targets reach nvfp4 experts with a global scale, which "
                              "mlxlab's expert adapters do not dequantize: leave the experts out "
                              "of model.lora.targets or use an affine-quantized (or float) model")
        layer = cls(linear.input_dims, linear.output_dims, linear.num_experts, r=rank,
                    dropout=dropout, scale=alpha / rank)
        layer.linear = linear
        layer.linear.freeze()
        layer.start()
        return layer

    def start(self) -> None:
        """What the adapter starts from on its base (LoRA: B at zero, nothing more)."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if not self.adapter_on:
            return self.linear(x, indices, sorted_indices=sorted_indices)
        if self.counts is not None:
            self.counts.add(indices)
        return super().__call__(x, indices, sorted_indices)

    def delta(self) -> mx.array:
        """The adapter's (E, out, in) change to the experts' weights."""
        return self.scale * (self.lora_b @ self.lora_a)

    def update_norms(self) -> mx.array:
        """||scale * B_e A_e||_F per expert (E,), from the (E, r, r) Gram matrices: never the
        (E, out, in) product."""
        gram = (self.lora_b.swapaxes(-1, -2) @ self.lora_b) * (self.lora_a @ self.lora_a.swapaxes(-1, -2))
        return abs(self.scale) * mx.sqrt(mx.maximum(gram.sum(axis=(-1, -2)), 0.0))


class _TakenFrom:
    """The base weight array the held row norms were taken from, and those norms: a plain
    object, not an array, so the module does not take it for a parameter or state."""

    def __init__(self, weight: mx.array | None = None, norms: mx.array | None = None):
        self.weight, self.norms = weight, norms


class DoRASwitchLinear(LoRASwitchLinear):
    """DoRA on stacked experts: m_e / ||W_e + s B_e A_e||_rows * (W_e x + s B_e A_e x) + bias
    (module docstring); m starts at the base rows' norms, so the layer starts as the base."""

    kind = "dora"

    def start(self) -> None:
        """m at the base rows' norms: the layer computes the base."""
        self.m = mx.sqrt(self._base_norm2())

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, r: int = 8,
                 dropout: float = 0.0, scale: float = 20.0, bias: bool = False):
        super().__init__(input_dims, output_dims, num_experts, r, dropout, scale, bias)
        self.m = mx.ones((num_experts, output_dims))
        self._taken = _TakenFrom()

    def _base_norm2(self) -> mx.array:
        """||W_e||^2 of each expert's rows (E, out), float32: the frozen base's, taken once (the
        only time a quantized base is dequantized whole) and again when the base's weight is
        another array (a checkpoint loaded into it). Held as `_frozen_norm2`, which the module's
        state has (a compiled step reads it as an input) and its parameters have not (not
        trained, saved or counted)."""
        held = self.get("_frozen_norm2")
        if held is not None and held is not self._taken.norms:
            return held  # a compiled step's trace: its input, the state's array
        if held is None or self._taken.weight is not self.linear.weight:
            weight = expert_weight(self.linear).astype(mx.float32)
            held = mx.stop_gradient((weight * weight).sum(axis=-1))
            mx.eval(held)  # the dequantized copy goes now
            self._frozen_norm2, self._taken = held, _TakenFrom(self.linear.weight, held)
        return held

    def _base_times_a(self) -> mx.array:
        """W_e A_e^T (E, out, r), float32: a quantized base multiplies packed (one gather_qmm
        over the experts, each dequantized a tile at a time), never dequantized whole."""
        linear, a = self.linear, self.lora_a
        if "scales" not in linear:
            return linear.weight.astype(mx.float32) @ a.swapaxes(-1, -2)
        product = mx.gather_qmm(a, linear.weight, linear.scales, linear.get("biases"),
                                rhs_indices=mx.arange(a.shape[0]), transpose=True,
                                group_size=linear.group_size, bits=linear.bits,
                                mode=linear.mode)
        return product.astype(mx.float32).swapaxes(-1, -2)

    def _row_scale(self) -> mx.array:
        """m / ||W + s B A|| per expert and output row (E, out); the norm is a constant to the
        backward (DoRA's own simplification, as mlx-lm's DoRALinear). Expanded as ||W||^2 +
        2s <W, BA> + s^2 ||BA||^2 row by row: the base's ||W||^2 held (_base_norm2), the rest
        from W A^T (E, out, r) and A A^T (E, r, r), so no (E, out, in) array is made (at
        Qwen3-30B-A3B's shape W + sBA would be 800 MB a projection and layer) and a quantized
        base is not dequantized."""
        a, b = self.lora_a, self.lora_b
        cross = (self._base_times_a() * b).sum(axis=-1)
        square = ((b @ (a @ a.swapaxes(-1, -2))) * b).sum(axis=-1)
        norm2 = self._base_norm2() + 2 * self.scale * cross + self.scale**2 * square
        return self.m / mx.stop_gradient(mx.sqrt(mx.maximum(norm2, 0.0)))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if not self.adapter_on:
            return self.linear(x, indices, sorted_indices=sorted_indices)
        adapted = super().__call__(x, indices, sorted_indices)  # W_e x + bias + s B_e A_e x
        bias = routed_rows(self.linear.bias, indices) if "bias" in self.linear else None
        if bias is not None:  # the magnitude scales the adapted product, not the bias
            adapted = adapted - bias
        out = routed_rows(self._row_scale(), indices).astype(adapted.dtype) * adapted
        return out + bias if bias is not None else out

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = expert_weight(self.linear)
        adapted = weight.astype(mx.float32) + self.delta()
        merged = (self.m / mx.linalg.norm(adapted, axis=-1))[..., None] * adapted
        return _fused(self.linear, merged.astype(weight.dtype), dequantize)


# lora.kind -> how an adapter of that kind wraps a MoE layer's stacked experts
EXPERT_KINDS = {"lora": LoRASwitchLinear.from_base, "dora": DoRASwitchLinear.from_base}

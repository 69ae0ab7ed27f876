"""LoRA / DoRA on a MoE layer's routed experts: mlx-lm stacks a layer's experts into one
SwitchLinear (or QuantizedSwitchLinear, 4- or 8-bit: QLoRA) of weight (E, out, in) that
multiplies each token by the experts its router picked (`mx.gather_mm` with the router's
indices). The adapter here is one low-rank pair per expert, gathered with the same indices, so
a token's update is its own experts' and an expert that receives no token gets no gradient.

LoRA: y = W_e x + s * B_e A_e x, with mlx-lm's LoRASwitchLinear's names and shapes
(lora_a (E, r, in), lora_b (E, out, r), B at zero), so its adapter files are mlx-lm's.
DoRA: a learned magnitude per expert and output row, m (E, out), over the adapted rows' norm
(Liu et al. 2024 per expert, the norm held constant in the backward as mlx-lm's DoRALinear
does); mlx-lm has no DoRA on experts. Both start equal to the base.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.errors import ConfigError
from mlxlab.models.adapter_layer import AdapterLayer

# A target with one of these path components names the routed experts ("experts",
# "switch_mlp.gate_proj", HF's "experts.down_proj")
EXPERT_WORDS = ("experts", "switch_mlp")


def switch_types() -> tuple[type, ...]:
    """mlx-lm's SwitchLinear and QuantizedSwitchLinear when its MoE layers are imported (a
    model that holds one imported them; importing mlx-lm costs seconds, which a model without
    experts does not pay)."""
    module = sys.modules.get("mlx_lm.models.switch_layers")
    return (module.SwitchLinear, module.QuantizedSwitchLinear) if module else ()


def is_experts(module: nn.Module) -> bool:
    """Whether `module` is a MoE layer's stacked experts (exact types: a subclass may compute
    something else)."""
    return type(module) in switch_types()


def names_experts(target: str) -> bool:
    """Whether a model.lora.targets entry names the routed experts."""
    return any(part in EXPERT_WORDS for part in target.split("."))


def expert_weight(linear: nn.Module) -> mx.array:
    """The experts' (E, out, in) float weight; a quantized one dequantized."""
    if "scales" not in linear:
        return linear.weight
    return mx.dequantize(linear.weight, linear.scales, linear.get("biases"),
                         group_size=linear.group_size, bits=linear.bits, mode=linear.mode)


def routed_rows(values: mx.array, indices: mx.array) -> mx.array:
    """Per-expert rows (E, out) at each token's experts, shaped as SwitchLinear's output (its
    bias is added this way)."""
    return mx.expand_dims(values[indices], -2)


def _fused(linear: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A SwitchLinear of `weight` with `linear`'s bias, quantized again as `linear` was unless
    `dequantize`."""
    module = sys.modules["mlx_lm.models.switch_layers"]
    num_experts, out_dims, in_dims = weight.shape
    fused = module.SwitchLinear(in_dims, out_dims, num_experts, bias="bias" in linear)
    fused.weight = weight
    if "bias" in linear:
        fused.bias = linear.bias
    if dequantize or "scales" not in linear:
        return fused
    return fused.to_quantized(group_size=linear.group_size, bits=linear.bits, mode=linear.mode)


class RoutedCounts:
    """How many positions a MoE layer's router sent to each of its experts while counted
    (counting_routes): a plain object, not an array, so the module does not take it for a
    parameter."""

    def __init__(self, num_experts: int):
        self.tokens = np.zeros(num_experts, dtype=np.int64)

    def add(self, indices: mx.array) -> None:
        self.tokens += np.bincount(np.array(indices).reshape(-1), minlength=len(self.tokens))


class LoRASwitchLinear(AdapterLayer):
    """LoRA on stacked experts: y = linear(x, indices) + scale * B_e A_e dropout(x) for each
    token's experts e (module docstring)."""

    counts: RoutedCounts | None = None  # set by counting_routes (eager forwards only)

    @classmethod
    def from_base(cls, linear: nn.Module, rank: int, alpha: float, dropout: float
                  ) -> LoRASwitchLinear:
        if linear.get("global_scale") is not None:  # mlx-lm's nvfp4 experts, one scale each
            raise ConfigError("model.lora.targets reach nvfp4 experts with a global scale, which "
                              "mlxlab's expert adapters do not dequantize: leave the experts out "
                              "of model.lora.targets or use an affine-quantized (or float) model")
        layer = cls(linear.input_dims, linear.output_dims, linear.num_experts, rank,
                    alpha / rank, dropout)
        layer.linear = linear
        layer.linear.freeze()
        layer.start()
        return layer

    def start(self) -> None:
        """What the adapter starts from on its base (LoRA: B at zero, nothing more)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, rank: int = 8,
                 scale: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)  # each expert's A drawn as LoRALinear's
        self.lora_a = mx.random.uniform(-bound, bound, (num_experts, rank, input_dims))
        self.lora_b = mx.zeros((num_experts, output_dims, rank))
        self.adapter_on = True

    def update(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """scale * B_e A_e x for each token's experts, gathered as the experts' own product."""
        if self.counts is not None:
            self.counts.add(indices)
        z = mx.gather_mm(self.dropout(x), self.lora_a.swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        return self.scale * z

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        if not self.adapter_on:
            return y
        return y + self.update(x, indices, sorted_indices).astype(y.dtype)

    def delta(self) -> mx.array:
        """The adapter's (E, out, in) change to the experts' weights."""
        return self.scale * (self.lora_b @ self.lora_a)

    def update_norms(self) -> mx.array:
        """||scale * B_e A_e||_F per expert (E,), from the (E, r, r) Gram matrices: never the
        (E, out, in) product."""
        gram = (self.lora_b.swapaxes(-1, -2) @ self.lora_b) * (self.lora_a @ self.lora_a.swapaxes(-1, -2))
        return abs(self.scale) * mx.sqrt(mx.maximum(gram.sum(axis=(-1, -2)), 0.0))

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The experts with W_e + scale * B_e A_e merged in; a quantized base is dequantized,
        merged and quantized again as it was, or left float with `dequantize`."""
        weight = expert_weight(self.linear)
        return _fused(self.linear, weight + self.delta().astype(weight.dtype), dequantize)


class _TakenFrom:
    """The base weight array the held row norms were taken from, and those norms: a plain
    object, not an array, so the module does not take it for a parameter or state."""

    def __init__(self, weight: mx.array | None = None, norms: mx.array | None = None):
        self.weight, self.norms = weight, norms


class DoRASwitchLinear(LoRASwitchLinear):
    """DoRA on stacked experts: m_e / ||W_e + s B_e A_e||_rows * (W_e x + s B_e A_e x) + bias
    (module docstring); m starts at the base rows' norms, so the layer starts as the base."""

    def start(self) -> None:
        """m at the base rows' norms: the layer computes the base."""
        self.m = mx.sqrt(self._base_norm2())

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, rank: int = 8,
                 scale: float = 2.0, dropout: float = 0.0):
        super().__init__(input_dims, output_dims, num_experts, rank, scale, dropout)
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
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        if not self.adapter_on:
            return y
        bias = routed_rows(self.linear.bias, indices) if "bias" in self.linear else None
        if bias is not None:
            y = y - bias
        out = y + self.update(x, indices, sorted_indices).astype(y.dtype)
        out = routed_rows(self._row_scale(), indices).astype(y.dtype) * out
        return out + bias if bias is not None else out

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = expert_weight(self.linear)
        adapted = weight.astype(mx.float32) + self.delta()
        merged = (self.m / mx.linalg.norm(adapted, axis=-1))[..., None] * adapted
        return _fused(self.linear, merged.astype(weight.dtype), dequantize)


# lora.kind -> how an adapter of that kind wraps a MoE layer's stacked experts
EXPERT_KINDS = {"lora": LoRASwitchLinear.from_base, "dora": DoRASwitchLinear.from_base}


def expert_blocks(model: nn.Module) -> dict[str, list[LoRASwitchLinear]]:
    """The MoE blocks whose experts hold adapters ("lm.model.layers.0.mlp"), each with its
    expert adapters (gate, up, down, ...)."""
    blocks: dict[str, list[LoRASwitchLinear]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRASwitchLinear):
            blocks.setdefault(name.rsplit(".", 2)[0], []).append(module)
    return dict(sorted(blocks.items(), key=lambda kv: _natural(kv[0])))


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


@contextmanager
def counting_routes(model: nn.Module) -> Iterator[dict[str, RoutedCounts]]:
    """Inside the block, each eager forward adds the positions its routers send to each expert
    (one count per MoE block with expert adapters); not for a compiled function, whose arrays
    are not values while it is traced."""
    blocks = expert_blocks(model)
    counts = {block: RoutedCounts(layers[0].lora_a.shape[0]) for block, layers in blocks.items()}
    for block, layers in blocks.items():
        layers[0].counts = counts[block]
    try:
        yield counts
    finally:
        for layers in blocks.values():
            layers[0].counts = None


def expert_update_norms(model: nn.Module) -> dict[str, np.ndarray]:
    """Per MoE block, each expert's adapter update norm over its projections:
    sqrt(sum ||scale * B_e A_e||_F^2), (E,); zero for an expert that never trained."""
    norms = {}
    for block, layers in expert_blocks(model).items():
        squares = sum(layer.update_norms() ** 2 for layer in layers)
        norms[block] = np.sqrt(np.array(squares.astype(mx.float32)))
    return norms

"""A MoE layer's routed experts as mlxlab sees them, without importing mlx-lm: mlx-lm stacks a
layer's experts into one SwitchLinear (or QuantizedSwitchLinear) of weight (E, out, in) that
multiplies each token by the experts its router picked (`mx.gather_mm` with the router's
indices). Here: which modules are such experts (and which adapters wrap them), their float
weight, and what the adapters on them did (routed-token counts, update norms). The adapters
themselves are lora_experts.py, which imports mlx-lm (seconds), so only a model with experts,
which imported it already, loads them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.models.adapters.adapter_layer import AdapterLayer

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


def adapts_experts(module: nn.Module) -> bool:
    """Whether `module` is an adapter on a MoE layer's stacked experts (lora_experts.py)."""
    return isinstance(module, AdapterLayer) and is_experts(module.linear)


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


class RoutedCounts:
    """How many positions a MoE layer's router sent to each of its experts while counted
    (counting_routes): a plain object, not an array, so the module does not take it for a
    parameter."""

    def __init__(self, num_experts: int):
        self.tokens = np.zeros(num_experts, dtype=np.int64)

    def add(self, indices: mx.array) -> None:
        self.tokens += np.bincount(np.array(indices).reshape(-1), minlength=len(self.tokens))


def dora_on_experts(model: nn.Module) -> bool:
    """Whether DoRA adapters wrap any routed experts (mlx-lm's adapter files and PEFT have no
    form for them)."""
    return any(adapts_experts(m) and m.kind == "dora" for m in model.modules())


def expert_blocks(model: nn.Module) -> dict[str, list[AdapterLayer]]:
    """The MoE blocks whose experts hold adapters ("lm.model.layers.0.mlp"), each with its
    expert adapters (gate, up, down, ...)."""
    blocks: dict[str, list[AdapterLayer]] = {}
    for name, module in model.named_modules():
        if adapts_experts(module):
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

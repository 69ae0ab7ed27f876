"""How many parameters a model has, counted from shapes (a quantized layer by the weights it
packs)."""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count from shapes alone (no mx.eval, so no allocation). A quantized layer counts
    the weights it packs (32 // bits per uint32), not its packed words, scales and biases: the
    same count as its float original (mlx-lm's get_total_parameters)."""
    if trainable_only:
        return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if "scales" in m:  # QuantizedLinear / Embedding / SwitchLinear
            packed = m.weight.size + m.scales.size + (m.biases.size if "biases" in m else 0)
            total += m.weight.size * 32 // m.bits - packed
    return total

"""Post-training quantization of a classifier's Linear layers (trainer.quantize_bits).

One rule for both sides: the trainer quantizes the best weights with it, and a run's quantized
checkpoint is rebuilt with it (float model, then this, then a strict load of the packed weights).
Embeddings stay float: a small model's table is a large share of its size but quantizing it
costs the most accuracy; the export to mlx-lm (export/mlx_lm.py) follows mlx-lm's own rule.
"""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten

GROUP_SIZE = 32  # every Linear of the presets has an input size divisible by it


def quantize_linears(model: nn.Module, bits: int, group_size: int = GROUP_SIZE) -> dict:
    """Quantize in place every nn.Linear whose input size is a multiple of group_size; returns
    the settings a checkpoint records to rebuild it ({"bits", "group_size"})."""
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda _, m: isinstance(m, nn.Linear)
                and m.weight.shape[-1] % group_size == 0)
    return {"bits": int(bits), "group_size": int(group_size)}


def parameter_mb(model: nn.Module) -> float:
    """The model's parameters in memory (packed weights, scales and biases when quantized)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 2**20

"""sentence-transformers' BinaryCrossEntropyLoss: each (query, passage) pair's logit against its
label (1 relevant, 0 not, or a score in [0, 1]), torch.nn.BCEWithLogitsLoss's form and mean, with
its `pos_weight` on the positive term (None: 1). Its activation_fn default, Identity, is the only
one: the loss reads the raw logit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def binary_cross_entropy(logits: mx.array, labels: mx.array,
                         pos_weight: float | None = None) -> mx.array:
    """Per-pair BCEWithLogitsLoss (no reduction): (1 - y) x + (1 + (w - 1) y) softplus(-x)."""
    x, y = logits.astype(mx.float32), labels.astype(mx.float32)
    weight = 1.0 if pos_weight is None else 1.0 + (pos_weight - 1.0) * y
    return (1.0 - y) * x + weight * nn.softplus(-x)

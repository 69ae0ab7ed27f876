"""Gradient checkpointing (trainer.grad_checkpoint): each decoder block keeps only its input
for the backward and recomputes its activations there, trading one more forward per block for
the memory of every block's activations (long rows). mlx-lm's recipe (`mx.checkpoint` over the
block's call), applied to these block instances only: each gets a subclass whose call is
checkpointed, so its parameter names, other models and other blocks of the same class (a
teacher's, an evaluation copy's) stay as they were."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.models.base import Model

_CHECKPOINTED: dict[type, type] = {}  # a block class -> its checkpointed subclass


def _checkpointed(cls: type) -> type:
    if cls in _CHECKPOINTED.values():
        return cls
    if cls not in _CHECKPOINTED:
        def __call__(self, *args, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return cls.__call__(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    return _CHECKPOINTED[cls]


def checkpoint_blocks(model: Model) -> int:
    """Recompute each of the model's decoder blocks in the backward; returns how many. A model
    without blocks is one line: the setting would do nothing."""
    blocks: list[nn.Module] = model.blocks()
    if not blocks:
        raise ConfigError(f"trainer.grad_checkpoint=true: a {type(model).__name__} has no decoder "
                          "blocks to recompute; leave it false")
    for block in blocks:
        block.__class__ = _checkpointed(type(block))
    return len(blocks)

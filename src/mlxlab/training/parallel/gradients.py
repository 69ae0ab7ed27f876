"""How a step turns each rank's gradients into the update, per trainer.distributed.mode.

- data parallel (`auto`/`on`): every rank holds whole gradients of its rows, weighted by its
  token count; one all-sum (in 32 MiB buckets) makes them the global batch's;
- fsdp: the backward already summed them over ranks into this rank's shard (gather.py), so the
  loss is weighted by the token count before differentiation and only the counts are summed;
  the clip's norm sums the shards' squared norms over ranks;
- tensor: every rank computes the same rows, so losses and counts agree without a collective;
  a split linear's gradient is this rank's slice (the clip's norm sums those over ranks), the
  rest are whole and equal on every rank.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlxlab import kernels
from mlxlab.runtime.cluster import distributed
from mlxlab.training.parallel.layout import Layout


class DataParallel:
    """Whole gradients on every rank, summed over ranks (one process: nothing to sum)."""

    weighted_in_loss = False  # the step multiplies each gradient by the token count itself
    in_model = False  # the model's forward and backward hold no collective

    def __init__(self, world: distributed.World) -> None:
        self.world = world

    @property
    def collective(self) -> bool:
        """The step must take its summing path (even for one micro-batch)."""
        return self.world.enabled

    def sum_over_ranks(self, grads: Any, numbers: dict) -> tuple[Any, dict]:
        summed = self.world.all_sum_tree({"g": grads, **numbers})
        return summed.pop("g"), summed

    def clip(self, grads: Any, max_norm: float) -> tuple[Any, mx.array]:
        return kernels.clip_grad_norm(grads, max_norm)


class FullySharded(DataParallel):
    """Gradient shards already summed over ranks by the backward (trainer.distributed.mode=fsdp)."""

    weighted_in_loss = True
    in_model = True

    def sum_over_ranks(self, grads: Any, numbers: dict) -> tuple[Any, dict]:
        return grads, self.world.all_sum_tree(numbers)

    def clip(self, grads: Any, max_norm: float) -> tuple[Any, mx.array]:
        return _clip(grads, max_norm, _squares(grads, lambda _: True, self.world))


class TensorParallel(DataParallel):
    """Every rank computes the same rows; split linears hold slices (trainer.distributed.mode=
    tensor)."""

    in_model = True

    def __init__(self, world: distributed.World, layout: Layout) -> None:
        super().__init__(world)
        self.layout = layout

    @property
    def collective(self) -> bool:
        return False  # the collectives are inside the model's forward and backward

    def sum_over_ranks(self, grads: Any, numbers: dict) -> tuple[Any, dict]:
        return grads, numbers

    def clip(self, grads: Any, max_norm: float) -> tuple[Any, mx.array]:
        def split(name: str) -> bool:
            return self.layout.axis_of(name) is not None

        whole = _squares(grads, lambda name: not split(name), None)
        return _clip(grads, max_norm, whole + _squares(grads, split, self.world))


def _squares(grads: Any, chosen, world: distributed.World | None) -> mx.array:
    """The sum of squares of the chosen gradients, summed over `world`'s ranks when given."""
    total = mx.array(0.0, mx.float32)
    for name, g in tree_flatten(grads):
        if chosen(name):
            total = total + (g.astype(mx.float32) ** 2).sum()
    return total if world is None else world.all_sum(total)


def _clip(grads: Any, max_norm: float, squares: mx.array) -> tuple[Any, mx.array]:
    """optim.clip_grad_norm for a norm computed over ranks (max_norm <= 0: no clip)."""
    norm = mx.sqrt(squares)
    if not max_norm or max_norm <= 0:
        return grads, norm
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: (g * scale).astype(g.dtype), grads), norm

"""The collective under a fully sharded module: all-gather in the forward, reduce-scatter in the
backward, over one flat buffer per group of parameters.

MLX's `nn.FullyShardedModule` builds the same function (`mlx.nn.layers.distributed.
_make_gather_fn`: each rank's shards flattened into one row, `all_gather`, split and reshaped);
this one differs where a trainer needs it to:

- the backward sums the gradients over ranks instead of averaging them, because the step weighs
  each rank's loss by its token count (step.py), so N ranks x B rows give the update of one
  process with N x B rows exactly;
- MLX's ring backend (TCP between Macs, localhost) has no `sum_scatter`: there the backward
  all-sums the flat gradient and keeps this rank's row (twice the traffic of a reduce-scatter,
  the same numbers); MPI and NCCL take `sum_scatter`;
- a parameter whose first axis N does not divide is stored padded with zero rows up to the next
  multiple of N (`padded_rows`): the gather cuts them off, so the model computes with its own
  shape, and the backward gives them a zero gradient, so they stay zero under the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import reduce

import mlx.core as mx

from mlxlab.runtime.cluster import distributed


def padded_rows(rows: int, n: int) -> int:
    """The first axis a parameter of `rows` rows is stored with over `n` ranks: a multiple of n."""
    return -(-rows // n) * n


def make_gather(world: distributed.World, full_shapes: Sequence[tuple[int, ...]]
                ) -> Callable[[list[mx.array]], list[mx.array]]:
    """fn(shards) -> full arrays: shard i is rows rank*k..(rank+1)*k of a parameter of shape
    full_shapes[i] padded to padded_rows (all of one dtype); its vjp returns each shard's
    gradient summed over ranks."""
    n, rank, group = world.size, world.rank, world.group
    stored = [(padded_rows(shape[0], n), *shape[1:]) for shape in full_shapes]
    sizes = [math.prod(shape) // n for shape in stored]
    offsets = reduce(lambda acc, s: acc + [acc[-1] + s], sizes, [0])[1:-1]
    shard_shapes = [(shape[0] // n, *shape[1:]) for shape in stored]
    scatter = distributed.supports_sum_scatter(world)

    @mx.custom_function
    def gather(shards: list[mx.array]) -> list[mx.array]:
        row = mx.concatenate([s.reshape(1, -1) for s in shards], axis=1)
        full = mx.distributed.all_gather(row, group=group)  # (n, sum of shard sizes)
        return [part.reshape(padded)[:shape[0]] for part, padded, shape in
                zip(mx.split(full, offsets, axis=1), stored, full_shapes)]

    @gather.vjp
    def gather_vjp(shards, cotangents, _):
        local = mx.concatenate([pad_rows(c, padded[0]).reshape(n, -1)
                                for c, padded in zip(cotangents, stored)], axis=1)
        if scatter:
            mine = mx.distributed.sum_scatter(local, group=group)
        else:
            mine = mx.distributed.all_sum(local, group=group)[rank:rank + 1]
        return [part.reshape(shape).astype(s.dtype) for part, shape, s in
                zip(mx.split(mine, offsets, axis=1), shard_shapes, shards)]

    return gather


def pad_rows(x: mx.array, rows: int) -> mx.array:
    """`x` with zero rows added along axis 0 up to `rows` (itself when it has them)."""
    if x.shape[0] == rows:
        return x
    return mx.concatenate([x, mx.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)], axis=0)

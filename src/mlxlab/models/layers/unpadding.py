"""Unpadded rows: an encoder's dense layers on the real tokens of a padded batch only.

A batch of texts padded to its longest holds pad positions whose hidden states nothing reads
(attention masks them as keys, pooling skips them), yet every linear layer of a padded forward
pass computes them: on sentence pairs a quarter of the step's matrix products. `Unpadded` holds
which rows of the flattened (rows x positions) batch to keep (`index`, sorted, from the data:
data/sentence_pairs.py's `real_token_index`) and moves hidden states between the two layouts:
`pack` (B, T, C) -> (N, C), `pad` (N, C) -> (B, T, C) with zeros at the rows left out. The
projections, norms and MLPs run on (N, C); attention, which mixes positions, runs on the padded
layout with its mask (models/layers/blocks.py's `Attention.unpadded`). A kept row may be a pad (the
index is rounded up to a multiple of a few tokens so the compiled step sees few shapes); its
state is computed and ignored like any pad's.
"""

from __future__ import annotations

import mlx.core as mx


class Unpadded:
    """The kept rows `index` (N,) of a (rows, positions) batch, and the way back (see the module)."""

    def __init__(self, index: mx.array, rows: int, positions: int):
        self.index, self.shape = index, (rows, positions)
        n, slots = index.shape[0], rows * positions
        # each padded slot's row in the packed states, or n: the zero row `_pad` appends
        self.slots = mx.full((slots,), n, mx.int32).at[index].add(mx.arange(n, dtype=mx.int32) - n)

    def pack(self, x: mx.array) -> mx.array:
        """(B, T, C) -> (N, C): the kept rows."""
        return _pack(x.reshape(-1, x.shape[-1]), self.index, self.slots)

    def pad(self, x: mx.array) -> mx.array:
        """(N, C) -> (B, T, C): the kept rows in their places, zeros elsewhere."""
        return _pad(x, self.index, self.slots).reshape(*self.shape, x.shape[-1])


# Each move's gradient is the other move (the kept rows are distinct), a gather: MLX's own
# gradient of a gather is a scatter-add, several times slower on the CPU.
def _padded(x: mx.array, slots: mx.array) -> mx.array:
    return mx.concatenate([x, mx.zeros((1, x.shape[-1]), x.dtype)])[slots]


@mx.custom_function
def _pack(x: mx.array, index: mx.array, slots: mx.array) -> mx.array:
    return x[index]


@_pack.vjp
def _pack_vjp(primals: tuple, cotangent: mx.array, _output: mx.array) -> tuple:
    _, index, slots = primals
    return _padded(cotangent, slots), mx.zeros_like(index), mx.zeros_like(slots)


@mx.custom_function
def _pad(x: mx.array, index: mx.array, slots: mx.array) -> mx.array:
    return _padded(x, slots)


@_pad.vjp
def _pad_vjp(primals: tuple, cotangent: mx.array, _output: mx.array) -> tuple:
    _, index, slots = primals
    return cotangent[index], mx.zeros_like(index), mx.zeros_like(slots)

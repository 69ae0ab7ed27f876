"""Ranking quality of a query's scored passages, per list, in MLX (inside the loss's aux):
the reciprocal rank of the best-placed relevant passage (MRR's term) and nDCG with linear gains
(a passage's label; sklearn's ndcg_score). Ties in the scores go to the earlier passage, so a
list whose scores are all equal ranks as given, never better than that."""

from __future__ import annotations

import mlx.core as mx


def ranks(values: mx.array, valid: mx.array) -> mx.array:
    """(B, K) 1-based ranks of each list's valid entries by `values`, descending, ties to the
    earlier index; padding (valid False) ranks after every valid entry."""
    k = values.shape[-1]
    above = values[..., None, :] > values[..., :, None]          # [b, i, j]: j beats i
    tie = (values[..., None, :] == values[..., :, None]) & (mx.arange(k)[None, :] < mx.arange(k)[:, None])
    beats = (above | tie) & valid[..., None, :]
    return 1 + beats.sum(axis=-1) + mx.where(valid, 0, k)


def reciprocal_rank(scores: mx.array, labels: mx.array, valid: mx.array) -> mx.array:
    """(B,) 1 / the rank of the first relevant (label > 0) passage; 0 for a list with none."""
    relevant = valid & (labels > 0)
    return mx.where(relevant, 1.0 / ranks(scores, valid), 0.0).max(axis=-1)


def ndcg(scores: mx.array, labels: mx.array, valid: mx.array) -> mx.array:
    """(B,) DCG of the lists as ranked by `scores` over the DCG of their ideal order (0 where no
    passage has a positive label)."""
    gains = mx.where(valid, labels.astype(mx.float32), 0.0)
    dcg = (gains / mx.log2(1.0 + ranks(scores, valid))).sum(axis=-1)
    ideal = (gains / mx.log2(1.0 + ranks(gains, valid))).sum(axis=-1)
    return mx.where(ideal > 0, dcg / mx.maximum(ideal, 1e-12), 0.0)

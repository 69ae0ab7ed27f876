"""Ranking quality of a query's scored passages, per list, in MLX (inside the loss's aux):
the reciprocal rank of the best-placed relevant passage (MRR's term) and nDCG with linear gains
(a passage's label). Passages with equal scores are a tie: each metric is its mean over every
order of the tied passages (McSherry & Najork 2008; sklearn's ndcg_score averages ties so), so a
scorer that gives every passage the same score earns what a random order does, whatever order
the list was written in."""

from __future__ import annotations

import mlx.core as mx


def _tied(values: mx.array, valid: mx.array) -> tuple[mx.array, mx.array]:
    """(B, K) each entry's count of valid entries scoring above it and of valid entries tied
    with it (itself included): its tie group takes the 0-based places [above, above + tied)."""
    pairs = valid[..., None, :]  # [b, i, j]: entry j is valid
    above = ((values[..., None, :] > values[..., :, None]) & pairs).sum(axis=-1)
    tied = ((values[..., None, :] == values[..., :, None]) & pairs).sum(axis=-1)
    return above, tied


def _mean_discount(above: mx.array, tied: mx.array, k: int) -> mx.array:
    """The mean of 1 / log2(2 + place) over each entry's tie group's places."""
    places = mx.arange(k, dtype=mx.float32)
    before = mx.concatenate([mx.zeros((1,)), mx.cumsum(1.0 / mx.log2(2.0 + places))])
    ends = mx.minimum(above + tied, k)
    return (before[ends] - before[mx.minimum(above, k)]) / mx.maximum(tied, 1)


def reciprocal_rank(scores: mx.array, labels: mx.array, valid: mx.array) -> mx.array:
    """(B,) the mean over the orders of tied passages of 1 / the rank of the first relevant
    (label > 0) passage; 0 for a list with none. The first relevant passage lies in the best
    tie group holding one: `above` passages before it, `n` tied, `r` of them relevant; it is the
    group's (j+1)-th with probability C(n-1-j, r-1) / C(n, r)."""
    k = scores.shape[-1]
    relevant = valid & (labels > 0)
    top = mx.where(relevant, scores, -mx.inf).max(axis=-1, keepdims=True)
    group = valid & (scores == top)
    n = group.sum(axis=-1, keepdims=True).astype(mx.float32)
    r = (group & relevant).sum(axis=-1, keepdims=True).astype(mx.float32)
    above = (valid & (scores > top)).sum(axis=-1, keepdims=True).astype(mx.float32)
    j = mx.arange(k, dtype=mx.float32)[None, :]
    # P(the first j of the group hold no relevant passage) = prod_{t<j} (n-r-t)/(n-t)
    misses = mx.where(j < n, mx.maximum(n - r - j, 0.0) / mx.maximum(n - j, 1.0), 0.0)
    none_before = mx.concatenate([mx.ones_like(misses[:, :1]), mx.cumprod(misses, axis=-1)[:, :-1]],
                                 axis=-1)
    first_here = mx.where(j < n, none_before * r / mx.maximum(n - j, 1.0), 0.0)
    return mx.where(r[:, 0] > 0, (first_here / (above + j + 1.0)).sum(axis=-1), 0.0)


def ndcg(scores: mx.array, labels: mx.array, valid: mx.array) -> mx.array:
    """(B,) DCG of the lists as ranked by `scores` (each gain at its tie group's mean discount)
    over the DCG of their ideal order (0 where no passage has a positive label)."""
    k = scores.shape[-1]
    gains = mx.where(valid, labels.astype(mx.float32), 0.0)
    dcg = (gains * _mean_discount(*_tied(scores, valid), k)).sum(axis=-1)
    # equal gains tied: the same DCG in every order of them
    ideal = (gains * _mean_discount(*_tied(gains, valid), k)).sum(axis=-1)
    return mx.where(ideal > 0, dcg / mx.maximum(ideal, 1e-12), 0.0)

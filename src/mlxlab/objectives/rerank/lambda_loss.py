"""sentence-transformers' LambdaLoss (Wang et al. 2018) with its defaults: the NDCGLoss2++
weighting (mu = 10: NDCGLoss2's weights x mu + LambdaRank's), every pair of a list counted (k
None), sigma 1, log base 2. A list is sorted by the model's logits; each pair whose labels differ
(the higher-labelled passage first in the true order, both passages real) adds its weight x
log sigmoid(sigma (s_i - s_j)) with gains (2^label - 1) / the list's ideal DCG; the loss is minus
the sum over the batch's counted pairs, over their number. Padding (doc_mask 0) is a logit of
-1e16 and a label of -inf, as there."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlxlab.objectives.rerank.list_net import PAD_LOGIT

MU = 10.0  # NDCGLoss2PPScheme's mu
SIGMA = 1.0
EPS = 1e-10  # the ideal DCG's floor


def _weights(gain: mx.array, discount: mx.array) -> mx.array:
    """NDCGLoss2PPScheme: (B, K, K) pair weights of gains sorted by the predictions."""
    k = discount.shape[0]
    positions = mx.arange(k)
    delta = mx.abs(positions[:, None] - positions[None, :])
    inverse = 1.0 / discount
    # NDCGLoss2: |1 / D(|i - j|) - 1 / D(|i - j| + 1)|, 0 on the diagonal (D(0) wraps to the last)
    ndcg2 = mx.abs(inverse[(delta - 1) % k] - inverse[delta]) * (delta != 0)
    gaps = mx.abs(gain[:, :, None] - gain[:, None, :])
    lambda_rank = mx.abs(inverse[:, None] - inverse[None, :])
    return MU * ndcg2[None] * gaps + lambda_rank[None] * gaps


def lambda_loss(logits: mx.array, labels: mx.array, doc_mask: mx.array
                ) -> tuple[mx.array, mx.array]:
    """(the summed pair losses, the number of pairs counted) of (B, K) logits and labels; the
    loss is the first over the second (at least 1)."""
    valid = doc_mask > 0
    logits = mx.where(valid, logits.astype(mx.float32), PAD_LOGIT)
    labels = mx.where(valid, labels.astype(mx.float32), -mx.inf)
    order = mx.stop_gradient(mx.argsort(-logits, axis=-1))  # the sort itself has no gradient
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    true_by_preds = mx.take_along_axis(labels, order, axis=-1)
    ideal = -mx.sort(-labels, axis=-1)
    diffs = true_by_preds[:, :, None] - true_by_preds[:, None, :]
    counted = mx.isfinite(diffs) & (diffs > 0)
    discount = mx.log2(2.0 + mx.arange(logits.shape[-1], dtype=mx.float32))
    best = mx.maximum(((2.0 ** mx.maximum(ideal, 0.0) - 1.0) / discount).sum(axis=-1), EPS)
    gain = (2.0 ** mx.maximum(true_by_preds, 0.0) - 1.0) / best[:, None]
    gaps = mx.clip(sorted_logits[:, :, None] - sorted_logits[:, None, :], -1e8, 1e8)
    pair = _weights(gain, discount) * nn.log_sigmoid(SIGMA * gaps) / math.log(2)
    return -mx.where(counted, pair, 0.0).sum(), counted.sum().astype(mx.float32)

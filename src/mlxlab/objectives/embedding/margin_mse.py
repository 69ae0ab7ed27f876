"""MarginMSELoss (`objective=margin_mse`), sentence-transformers' definition: the mean squared
error between the student's margins, dot(query, positive) - dot(query, negative_k), and the
teacher's (Hofstätter et al. 2020). Rows: query, positive, one or more negatives, and `label`:
the teacher's margins (one a negative), or its scores (positive first, then each negative).
"""

from __future__ import annotations

import mlx.core as mx

from mlxlab.objectives.embedding.embedding import EmbeddingObjective, pairwise_dot


class MarginMSELoss(EmbeddingObjective):
    """Student margins regressed on the teacher's (see the module)."""

    least_columns = 3
    needs_labels = True

    def from_embeddings(self, embeddings: list[mx.array], labels: mx.array | None) -> mx.array:
        query, positive, negatives = embeddings[0], embeddings[1], embeddings[2:]
        rows = query.shape[0]
        labels = mx.stop_gradient(labels).reshape(rows, -1)
        if labels.shape[1] == len(negatives) + 1:  # scores: the positive's minus each negative's
            labels = labels[:, :1] - labels[:, 1:]
        score = pairwise_dot(query, positive)
        margins = mx.stack([score - pairwise_dot(query, n) for n in negatives], axis=1)
        return mx.mean(mx.square(margins - labels))

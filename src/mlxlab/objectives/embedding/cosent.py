"""CoSENTLoss (`objective=cosent`), sentence-transformers' definition: pairs scored by scale x
cosine similarity, and every two pairs whose labels say which is more similar ranked by
log(1 + sum exp(s_lower - s_higher)) over the batch (Su 2022). Rows: anchor, positive (the
other text) and a `score` (or `label`) similarity.
"""

from __future__ import annotations

import mlx.core as mx

from mlxlab.config.records import check_number
from mlxlab.errors import ConfigError
from mlxlab.objectives.embedding.embedding import EmbeddingObjective, pairwise_cos_sim


class CoSENTLoss(EmbeddingObjective):
    """The ranking of pairs by their labelled similarity (see the module)."""

    needs_labels = True
    couples_rows = True  # every two pairs of the batch

    def __init__(self, scale: float = 20.0) -> None:
        check_number("objective.scale", scale, float, 0.0)
        if scale <= 0:
            raise ConfigError(f"objective.scale={scale} must be above 0")
        self.scale = float(scale)

    def from_embeddings(self, embeddings: list[mx.array], labels: mx.array | None) -> mx.array:
        scores = pairwise_cos_sim(embeddings[0], embeddings[1]) * self.scale
        labels = labels.reshape(-1)
        # s_i - s_j where pair i is labelled less similar than pair j; the rest left out
        lower = labels[:, None] < labels[None, :]
        diff = mx.where(lower, scores[:, None] - scores[None, :], -mx.inf).reshape(-1)
        return mx.logsumexp(mx.concatenate([mx.zeros((1,)), diff]))

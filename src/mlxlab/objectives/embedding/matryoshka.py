"""MatryoshkaLoss (`objective=matryoshka`), sentence-transformers' definition: an inner loss
(`objective.loss`, any embedding loss node) computed on the embeddings cut to each of
`matryoshka_dims` leading dimensions and normalized to unit length, weighted by
`matryoshka_weights` (default 1 each) and summed (Kusupati et al. 2022), so the first 64, 128,
... dimensions of a vector are an embedding of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlxlab.errors import ConfigError
from mlxlab.objectives.base import ObjectiveSetup
from mlxlab.objectives.embedding.embedding import EmbeddingObjective, normalize


class MatryoshkaLoss(EmbeddingObjective):
    """The inner loss summed over leading-dimension cuts (see the module)."""

    def __init__(self, loss: EmbeddingObjective, matryoshka_dims: Sequence[int],
                 matryoshka_weights: Sequence[float] | None = None) -> None:
        if not isinstance(loss, EmbeddingObjective) or isinstance(loss, MatryoshkaLoss):
            raise ConfigError("objective.loss must be an embedding loss node, e.g. "
                              "{_target_: mlxlab.objectives.embedding.mnrl."
                              "MultipleNegativesRankingLoss}")
        dims = [int(d) for d in matryoshka_dims or ()]
        if not dims or any(d <= 0 for d in dims):
            raise ConfigError(f"objective.matryoshka_dims={list(matryoshka_dims or [])}: give "
                              "one or more dimensions above 0, e.g. [384,256,128,64]")
        weights = [1.0] * len(dims) if matryoshka_weights is None else list(matryoshka_weights)
        if len(weights) != len(dims):
            raise ConfigError(f"objective.matryoshka_weights has {len(weights)} values for "
                              f"{len(dims)} matryoshka_dims: give one weight a dimension")
        self.inner = loss
        self.least_columns, self.needs_labels = loss.least_columns, loss.needs_labels
        self.couples_rows = loss.couples_rows
        pairs = sorted(zip(dims, weights), reverse=True)  # largest first, as sentence-transformers
        self.dims, self.weights = [d for d, _ in pairs], [float(w) for _, w in pairs]

    def setup(self, setup: ObjectiveSetup) -> None:
        super().setup(setup)
        dimension = setup.model.dimension
        if max(self.dims) > dimension:
            raise ConfigError(f"objective.matryoshka_dims={self.dims} exceeds the model's "
                              f"{dimension} dimensions: give dimensions up to {dimension}")

    def from_embeddings(self, embeddings: list[mx.array], labels: mx.array | None) -> mx.array:
        total = mx.array(0.0)
        for dim, weight in zip(self.dims, self.weights):
            cut = [normalize(e[..., :dim]) for e in embeddings]
            total = total + weight * self.inner.from_embeddings(cut, labels)
        return total

"""MultipleNegativesRankingLoss (`objective=mnrl`), sentence-transformers' definition: each anchor
against every positive and hard negative of the batch, cross-entropy toward its own positive
over scale x cosine similarities (van den Oord et al. 2018's InfoNCE with in-batch negatives).

`directions` adds sentence-transformers' other candidate pools to query_to_doc (always there):
query_to_query (the other anchors), doc_to_query (the positive against every anchor),
doc_to_doc (the positive against every other document); `partition_mode` joint puts them in one
softmax, per_direction averages a softmax per direction. The symmetric variant
(MultipleNegativesSymmetricRankingLoss) is directions=[query_to_doc, doc_to_query] with
partition_mode=per_direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlxlab.config.records import check_choice, check_number
from mlxlab.errors import ConfigError
from mlxlab.objectives.embedding.embedding import EmbeddingObjective, cos_sim

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITIONS = ("joint", "per_direction")


def check_ranking(scale: float, directions: Sequence[str], partition_mode: str) -> tuple[str, ...]:
    """The settings of a multiple-negatives loss, checked; its directions as a tuple."""
    check_number("objective.scale", scale, float, 0.0)
    if scale <= 0:
        raise ConfigError(f"objective.scale={scale} must be above 0")
    directions = tuple(directions)
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or "query_to_doc" not in directions:
        raise ConfigError(f"objective.directions={list(directions)}: give query_to_doc and any "
                          f"of {', '.join(DIRECTIONS[1:])}")
    check_choice("objective.partition_mode", partition_mode, PARTITIONS)
    if partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
        raise ConfigError("objective.partition_mode=per_direction needs every direction to hold "
                          "the positive: drop query_to_query and doc_to_doc, or use joint")
    return directions


def ranking_loss(embeddings: list[mx.array], scale: float, directions: Sequence[str],
                 partition_mode: str) -> mx.array:
    """sentence-transformers' MultipleNegativesRankingLoss.compute_loss_from_embeddings."""
    queries, docs = embeddings[0], embeddings[1:]
    rows = queries.shape[0]
    docs_all, docs_pos = mx.concatenate(docs, axis=0), docs[0]
    own = mx.eye(rows, dtype=mx.bool_)
    sims = {"query_to_doc": cos_sim(queries, docs_all)}
    if "query_to_query" in directions:
        sims["query_to_query"] = mx.where(own, -mx.inf, cos_sim(queries, queries))
    if "doc_to_query" in directions:
        sims["doc_to_query"] = cos_sim(queries, docs_pos).T
    if "doc_to_doc" in directions:
        same = mx.concatenate([own] * len(docs), axis=1)
        sims["doc_to_doc"] = mx.where(same, -mx.inf, cos_sim(docs_all, docs_pos).T)
    sims = {key: value * scale for key, value in sims.items()}
    positive = mx.diagonal(sims["query_to_doc"][:, :rows])
    if partition_mode == "joint":
        log_z = mx.logsumexp(mx.concatenate(list(sims.values()), axis=1), axis=1)
    else:
        log_z = sum(mx.logsumexp(s, axis=1) for s in sims.values()) / len(sims)
    return -(positive - log_z).mean()


class MultipleNegativesRankingLoss(EmbeddingObjective):
    """In-batch negatives plus any hard-negative columns (see the module)."""

    couples_rows = True

    def __init__(self, scale: float = 20.0, directions: Sequence[str] = ("query_to_doc",),
                 partition_mode: str = "joint") -> None:
        self.directions = check_ranking(scale, directions, partition_mode)
        self.scale, self.partition_mode = float(scale), partition_mode

    def from_embeddings(self, embeddings: list[mx.array], labels: mx.array | None) -> mx.array:
        return ranking_loss(embeddings, self.scale, self.directions, self.partition_mode)

"""Retrieval scored per query, as sentence-transformers' InformationRetrievalEvaluator scores it.

Queries and documents are vectors; a document's score for a query is their cosine similarity.
Each query's ranking is its documents sorted by (-score, document id) and cut at the largest k
any metric reads; a document is relevant when the qrels give it a score above 0 (the evaluator
reads relevance as a set). Per query: accuracy@k (a relevant document in the first k), precision@k
and recall@k, MRR@k (1 / the first relevant rank), nDCG@k (binary gains over the ideal ranking of
the query's relevant documents) and MAP@k (the precisions at each relevant hit over
min(k, relevant)). A task's metric is the mean over its queries, which is what the evaluator
reports; the rows keep each query's values under the query id, so two runs pair query by query
(evaluation/paired.py, `mlxlab runs compare`). Here, below evaluation/, because the embedding
objectives' evaluation computes them; evaluation/in_training.py writes the rows. The evaluator's `ndcg@10` is `ndcg_at_10` here:
MLflow refuses "@" in a metric's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mlxlab.objectives.base import ExampleScores
from mlxlab.stats import UNIT

RETRIEVAL = "retrieval"  # an ExampleScores kind
# The evaluator's defaults: the ks of each metric
ACCURACY_AT = (1, 3, 5, 10)
PRECISION_RECALL_AT = (1, 3, 5, 10)
MRR_AT, NDCG_AT, MAP_AT = (10,), (10,), (100,)
# every per-query score, in the order the rows hold them; each one's direction and range
SCORES = ([f"accuracy_at_{k}" for k in ACCURACY_AT]
          + [f"{name}_at_{k}" for k in PRECISION_RECALL_AT for name in ("precision", "recall")]
          + [f"mrr_at_{k}" for k in MRR_AT] + [f"ndcg_at_{k}" for k in NDCG_AT]
          + [f"map_at_{k}" for k in MAP_AT])
DEFINITIONS = {name: UNIT for name in SCORES}
# the scores `mlxlab runs compare` pairs query by query (the rows keep all of SCORES)
PAIRED = ("ndcg_at_10", "mrr_at_10", "map_at_100", "recall_at_10", "accuracy_at_1")
DEEPEST = max(*ACCURACY_AT, *PRECISION_RECALL_AT, *MRR_AT, *NDCG_AT, *MAP_AT)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row over its length (torch's normalize: at least 1e-12), float32."""
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def rankings(queries: np.ndarray, documents: np.ndarray, document_ids: Sequence[str],
             depth: int = DEEPEST) -> list[list[str]]:
    """Each query's first `depth` document ids by cosine similarity, ties by id."""
    scores = unit_rows(queries) @ unit_rows(documents).T
    ids = np.asarray(document_ids, dtype=object)
    depth = min(depth, len(ids))
    out = []
    for row in scores:
        # the documents scoring at least the depth-th best, then the evaluator's order on them
        cut = np.partition(row, len(row) - depth)[len(row) - depth]
        candidates = np.flatnonzero(row >= cut)
        order = sorted(candidates, key=lambda i: (-float(row[i]), ids[i]))
        out.append([ids[i] for i in order[:depth]])
    return out


def _dcg(gains: Sequence[int], k: int) -> float:
    return float(sum(g / np.log2(i + 2) for i, g in enumerate(list(gains)[:k])))


def query_scores(ranked: Sequence[str], relevant: set[str]) -> dict[str, float]:
    """One query's scores (SCORES) from its ranking and its relevant documents."""
    hits = [doc in relevant for doc in ranked]
    out: dict[str, float] = {}
    for k in ACCURACY_AT:
        out[f"accuracy_at_{k}"] = float(any(hits[:k]))
    for k in PRECISION_RECALL_AT:
        out[f"precision_at_{k}"] = sum(hits[:k]) / k
        out[f"recall_at_{k}"] = sum(hits[:k]) / len(relevant)
    for k in MRR_AT:
        first = next((rank for rank, hit in enumerate(hits[:k]) if hit), None)
        out[f"mrr_at_{k}"] = 0.0 if first is None else 1.0 / (first + 1)
    for k in NDCG_AT:
        out[f"ndcg_at_{k}"] = _dcg([int(h) for h in hits], k) / _dcg([1] * len(relevant), k)
    for k in MAP_AT:
        found, total = 0, 0.0
        for rank, hit in enumerate(hits[:k]):
            if hit:
                found += 1
                total += found / (rank + 1)
        out[f"map_at_{k}"] = total / min(k, len(relevant))
    return out


def score_retrieval(task: str, queries: np.ndarray, query_ids: Sequence[str],
                    documents: np.ndarray, document_ids: Sequence[str],
                    relevant: Mapping[str, set[str]]) -> ExampleScores:
    """The task's per-query rows ({"id": query id, score: value, ...}) and their means, for
    queries with at least one relevant document (the evaluator leaves the others out)."""
    kept = [i for i, q in enumerate(query_ids) if relevant.get(q)]
    ranked = rankings(queries[kept], documents, document_ids)
    rows = [{"id": str(query_ids[i]), **query_scores(r, relevant[query_ids[i]])}
            for i, r in zip(kept, ranked)]
    metrics = {name: float(np.mean([row[name] for row in rows])) if rows else float("nan")
               for name in SCORES}
    return ExampleScores(task, RETRIEVAL, metrics, rows, {name: True for name in PAIRED})

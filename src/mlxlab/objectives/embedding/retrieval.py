"""Retrieval scored per query, as sentence-transformers' InformationRetrievalEvaluator scores it.

Queries and documents are vectors; a document's score for a query is their cosine similarity.
Each query's ranking is its documents sorted by score, cut at the largest k any metric reads; a
document is relevant when the qrels give it a score above 0 (the evaluator reads relevance as a
set). Per query: accuracy@k (a relevant document in the first k), precision@k and recall@k,
MRR@k (1 / the first relevant rank), nDCG@k (binary gains over the ideal ranking of the query's
relevant documents) and MAP@k (the precisions at each relevant hit over min(k, relevant)).
Documents with equal scores are a tie, and each score is its mean over every order of the tied
documents (McSherry & Najork 2008, as sklearn's ndcg_score averages ties): a model that scores
everything alike earns a random order's scores, not the corpus order's. Without ties these are
the evaluator's values; with them the evaluator takes torch.topk's order and trec_eval
(pytrec_eval, mteb) orders ties by document id. A task's metric is the mean over its queries, which is what the evaluator
reports; the rows keep each query's values under the query id, so two runs pair query by query
(evaluation/paired.py, `mlxlab runs compare`). Here, below evaluation/, because the embedding
objectives' evaluation computes them; evaluation/in_training.py writes the rows. The evaluator's `ndcg@10` is `ndcg_at_10` here:
MLflow refuses "@" in a metric's name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

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


def tie_groups(row: np.ndarray, relevant: np.ndarray, depth: int = DEEPEST
               ) -> list[tuple[int, int]]:
    """(documents, relevant documents) of each group of equal scores in one query's `row` of
    scores, best first, down to the group holding the `depth`-th place; `relevant`: the
    relevant documents' places in the row."""
    depth = min(depth, len(row))
    # the documents scoring at least the depth-th best: every one tied with it included
    cut = np.partition(row, len(row) - depth)[len(row) - depth]
    values, sizes = np.unique(-row[row >= cut], return_counts=True)
    kept = -row[relevant]
    kept = kept[kept <= values[-1]]
    hits = np.bincount(np.searchsorted(values, kept), minlength=len(values))
    return list(zip(sizes.tolist(), hits.tolist()))


class _Places:
    """A ranking's tie groups as (first place, size, relevant documents) each: the expectations
    over the orders of each group's documents that the scores are."""

    def __init__(self, groups: Sequence[tuple[int, int]]) -> None:
        self.groups, start = [], 0
        for size, hits in groups:
            self.groups.append((start, size, hits))
            start += size

    def hits(self, k: int) -> float:
        """The expected relevant documents in the first k places."""
        return sum(r * min(max(k - s, 0), n) / n for s, n, r in self.groups)

    def first_relevant(self) -> Iterator[tuple[int, float]]:
        """(place, probability) of the first relevant document, over its group's places."""
        for s, n, r in self.groups:
            if r:
                none_yet = 1.0
                for j in range(min(n - r + 1, DEEPEST - s)):  # no metric reads deeper
                    yield s + j, none_yet * r / (n - j)
                    none_yet *= (n - r - j) / (n - j)
                return

    def dcg(self, k: int) -> float:
        """Binary gains, each group's relevant share at each of its places."""
        return sum(r / n * _discounts(s, min(s + n, k)) for s, n, r in self.groups if s < k)

    def precision_sum(self, k: int) -> float:
        """The expected sum over the first k places of (relevant there) x (precision there)."""
        total, before = 0.0, 0
        for s, n, r in self.groups:
            both = r * (r - 1) / (n * (n - 1)) if n > 1 else 0.0  # two places both relevant
            for place in range(s, min(s + n, k)):
                total += (r / n * (before + 1) + (place - s) * both) / (place + 1)
            before += r
        return total


def _discounts(start: int, end: int) -> float:
    return float(sum(1.0 / np.log2(i + 2) for i in range(start, end)))


def query_scores(groups: Sequence[tuple[int, int]], relevant: int) -> dict[str, float]:
    """One query's scores (SCORES) from its ranking's tie groups ((documents, relevant ones),
    best first) and its number of relevant documents."""
    places = _Places(groups)
    first = list(places.first_relevant())
    out: dict[str, float] = {}
    for k in ACCURACY_AT:
        out[f"accuracy_at_{k}"] = sum(p for place, p in first if place < k)
    for k in PRECISION_RECALL_AT:
        out[f"precision_at_{k}"] = places.hits(k) / k
        out[f"recall_at_{k}"] = places.hits(k) / relevant
    for k in MRR_AT:
        out[f"mrr_at_{k}"] = sum(p / (place + 1) for place, p in first if place < k)
    for k in NDCG_AT:
        out[f"ndcg_at_{k}"] = places.dcg(k) / _discounts(0, min(k, relevant))
    for k in MAP_AT:
        out[f"map_at_{k}"] = places.precision_sum(k) / min(k, relevant)
    return out


def score_retrieval(task: str, queries: np.ndarray, query_ids: Sequence[str],
                    documents: np.ndarray, document_ids: Sequence[str],
                    relevant: Mapping[str, set[str]]) -> ExampleScores:
    """The task's per-query rows ({"id": query id, score: value, ...}) and their means, for
    queries with at least one relevant document (the evaluator leaves the others out)."""
    kept = [i for i, q in enumerate(query_ids) if relevant.get(q)]
    scores = unit_rows(queries[kept]) @ unit_rows(documents).T
    place = {doc: i for i, doc in enumerate(document_ids)}
    rows = []
    for i, row in zip(kept, scores):
        judged = relevant[query_ids[i]]
        found = np.array([place[d] for d in judged if d in place], dtype=np.int64)
        rows.append({"id": str(query_ids[i]),
                     **query_scores(tie_groups(row, found), len(judged))})
    metrics = {name: float(np.mean([row[name] for row in rows])) if rows else float("nan")
               for name in SCORES}
    return ExampleScores(task, RETRIEVAL, metrics, rows, {name: True for name in PAIRED})

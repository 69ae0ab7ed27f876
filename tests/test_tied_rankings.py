"""Tied scores are averaged over their orders, in the retrieval scores (objectives/embedding/
retrieval.py) and the rerankers' MRR and nDCG (objectives/rerank/ranking_metrics.py): a scorer
that gives every passage the same score earns a random order's scores, not the order the
passages were written in (positive first: MRR 1.0 and nDCG 1.0 when ties went to the earlier
one). nDCG against sklearn's ndcg_score, which averages ties so; MRR, recall, precision and
accuracy by hand."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlxlab.objectives.embedding.retrieval import score_retrieval
from mlxlab.objectives.rerank.ranking_metrics import ndcg, reciprocal_rank

sklearn_metrics = pytest.importorskip("sklearn.metrics")

HARMONIC_5 = sum(1 / r for r in range(1, 6))  # 1 + 1/2 + ... + 1/5


def test_a_constant_retriever_scores_as_a_random_order():
    """Five documents, the relevant one written first, every document the same vector."""
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(2, 8)).astype(np.float32)
    documents = np.tile(rng.normal(size=(1, 8)).astype(np.float32), (5, 1))
    ids = [f"d{i}" for i in range(5)]
    found = score_retrieval("t", queries, ["q0", "q1"], documents, ids,
                            {"q0": {"d0"}, "q1": {"d0", "d1"}})
    one, two = found.rows
    expected = sklearn_metrics.ndcg_score([[1, 0, 0, 0, 0]], [[0] * 5], k=10)
    assert one["ndcg_at_10"] == pytest.approx(expected) and expected < 0.6
    assert two["ndcg_at_10"] == pytest.approx(
        sklearn_metrics.ndcg_score([[1, 1, 0, 0, 0]], [[0] * 5], k=10))
    assert one["mrr_at_10"] == pytest.approx(HARMONIC_5 / 5)
    assert one["recall_at_1"] == pytest.approx(1 / 5) and one["recall_at_3"] == pytest.approx(3 / 5)
    assert two["precision_at_3"] == pytest.approx(2 * 3 / 5 / 3)
    # two relevant of five: none in the first place with probability 3/5, in the first two 3/10
    assert two["accuracy_at_1"] == pytest.approx(2 / 5)
    assert two["accuracy_at_3"] == pytest.approx(1 - 1 / 10)  # all three misses: 1/10
    # the first relevant at place 1 (2/5), 2 (3/5 x 2/4), 3 (3/5 x 2/4 x 2/3), 4 (1/10)
    assert two["mrr_at_10"] == pytest.approx(2 / 5 + 3 / 10 / 2 + 1 / 5 / 3 + 1 / 10 / 4)


def test_a_constant_reranker_scores_as_a_random_order():
    scores = mx.zeros((2, 5))
    labels = mx.array([[1.0, 0, 0, 0, 0], [3.0, 2.0, 0, 0, 0]])
    valid = mx.array([[True] * 5, [True, True, True, True, False]])
    mrr = np.array(reciprocal_rank(scores, labels, valid))
    assert mrr[0] == pytest.approx(HARMONIC_5 / 5)
    assert mrr[1] == pytest.approx(2 / 4 + 2 / 4 * 2 / 3 / 2 + 2 / 4 * 1 / 3 / 3)
    got = np.array(ndcg(scores, labels, valid))
    assert got[0] == pytest.approx(sklearn_metrics.ndcg_score([[1, 0, 0, 0, 0]], [[0] * 5]))
    assert got[1] == pytest.approx(sklearn_metrics.ndcg_score([[3, 2, 0, 0]], [[0] * 4]))


def test_partial_ties_equal_sklearn_and_the_mean_over_orders():
    """Random lists with some scores tied: nDCG as sklearn's, MRR as its mean over every
    order of the tied passages, written out."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        k = int(rng.integers(2, 7))
        s = rng.integers(0, 3, size=k).astype(np.float32)
        labels = rng.integers(0, 3, size=k).astype(np.float32)
        if not labels.any():
            continue
        args = mx.array(s[None]), mx.array(labels[None]), mx.ones((1, k), mx.bool_)
        assert float(ndcg(*args)[0]) == pytest.approx(
            sklearn_metrics.ndcg_score([labels], [s]), abs=1e-5)
        rr = []
        for tiebreak in itertools.permutations(range(k)):
            order = sorted(range(k), key=lambda i: (-s[i], tiebreak[i]))
            rr.append(next(1 / (p + 1) for p, i in enumerate(order) if labels[i] > 0))
        assert float(reciprocal_rank(*args)[0]) == pytest.approx(np.mean(rr), abs=1e-5)
        # the same lists as retrieval (binary relevance), nDCG@10 against sklearn's
        ids = [f"d{i}" for i in range(k)]
        query = np.ones((1, 2), np.float32)
        docs = np.stack([[np.cos(v), np.sin(v)] for v in s / 4]).astype(np.float32)
        row = score_retrieval("t", query, ["q"], docs, ids,
                              {"q": {ids[i] for i in np.flatnonzero(labels)}}).rows[0]
        assert row["ndcg_at_10"] == pytest.approx(
            sklearn_metrics.ndcg_score([labels > 0], [s], k=10), abs=1e-5)

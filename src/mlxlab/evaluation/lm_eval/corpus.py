"""lm-eval's corpus-level scores: word and byte perplexity, bits per byte, BLEU, chrF (and chrF++)
and TER are not means of per-document scores. lm-eval keeps a piece per document (a text's
log-likelihood with its words or bytes; a reference with the answer) and aggregates the pieces of
the whole task at once (`lm_eval.api.metrics`: weighted_perplexity, bits_per_byte, bleu, chrf,
chrfpp, ter).

Each is written here as additive per-document statistics and the function of their sum that is
lm-eval's aggregate: the log-likelihood and weight summed (lm-eval's own function on the summed
pair), sacreBLEU's sentence statistics summed (its `_compute_score_from_stats`, as its own
bootstrap and lm-eval's `corpus_*` calls compute a corpus score). A bootstrap over documents
then resamples sums, not texts (TER's alignment of 200 sentences takes over a second).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# lm-eval's aggregations (their registered names) that score a task from per-document pieces
CORPUS_AGGREGATIONS = ("weighted_perplexity", "bits_per_byte", "bleu", "chrf", "chrf++", "ter")
WEIGHTED = ("weighted_perplexity", "bits_per_byte")


def aggregation(metric: str, config: Mapping) -> tuple[str | None, Callable[[list], float]]:
    """(registered name, function) of the aggregation lm-eval applies to `metric` in a task of
    `config` (its metric_list's, else the metric's registered default)."""
    from lm_eval.api.registry import AGGREGATION_REGISTRY, get_aggregation, get_metric_aggregation

    named = next((m.get("aggregation") for m in config.get("metric_list") or []
                  if m.get("metric") == metric and isinstance(m.get("aggregation"), str)), None)
    function = get_aggregation(named) if named else get_metric_aggregation(metric)
    name = named or next((k for k, v in AGGREGATION_REGISTRY.items() if v is function), None)
    return name, function


def _sacrebleu_metric(name: str) -> Any:
    """The sacreBLEU metric lm-eval's aggregation of that name scores with (sacrebleu.corpus_*
    with its defaults; chrF++ with word_order=2)."""
    from sacrebleu.metrics import BLEU, CHRF, TER

    return {"bleu": BLEU, "chrf": CHRF, "chrf++": lambda: CHRF(word_order=2), "ter": TER}[name]()


def corpus_statistics(name: str, pieces: Sequence[Any]
                      ) -> tuple[np.ndarray, Callable[[np.ndarray], float]]:
    """(documents, k) additive statistics of lm-eval's per-document `pieces` for the
    aggregation `name` (CORPUS_AGGREGATIONS), and the function of their column sums that gives
    lm-eval's aggregate of those documents."""
    if name in WEIGHTED:
        from lm_eval.api.registry import get_aggregation

        function = get_aggregation(name)
        stats = np.array([[float(ll), float(weight)] for ll, weight in pieces], np.float64)
        return stats, lambda total: float(function([(total[0], total[1])]))
    from lm_eval.api.metrics import _sacreformat

    refs, preds = _sacreformat([p[0] for p in pieces], [p[1] for p in pieces])
    metric = _sacrebleu_metric(name)
    stats = np.array(metric._extract_corpus_statistics(preds, refs), np.float64)
    return stats, lambda total: float(metric._compute_score_from_stats(list(total)).score)

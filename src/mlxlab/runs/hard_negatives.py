"""Hard negatives for (anchor, positive) pairs, with sentence-transformers'
`util.mine_hard_negatives` semantics: the house's embedder (models/embedders/sentence_folder.py)
ranks a corpus for each anchor, optionally a cross-encoder (runs/reranker.py) rescores the
candidates, and passages too close to the positive, outside the score bounds or among the first
`range_min` are skipped before `num_negatives` are taken (the top ones, or a random sample of the
rest).

The steps, as there: the corpus is the given one plus every positive, de-duplicated in order;
anchors are de-duplicated, each keeping its positives (the rows with that anchor). Texts are
embedded unit length; a candidate's score is its cosine with the anchor; the
`range_max + max_positives` best candidates are kept (range_max, when not given:
range_min + num_negatives + max_positives, or range_min + 10 x num_negatives + max_positives
when a margin, max_score or a cross-encoder's min_score may skip some). With a cross-encoder and
a margin or score bound, its scores replace the embedder's for the candidates and the positives.
A positive never becomes a negative; `absolute_margin` skips a candidate whose score + margin
exceeds the anchor's lowest positive score, `relative_margin` one above that score less
|score| x margin; then max_score and min_score. Output rows (`output_format`): triplet (anchor,
positive, negative: one row a negative), n-tuple (anchor, positive, negative_1..n: only anchors
with all n), labeled-pair (anchor, passage, label 1 / 0) or labeled-list (anchor, [positive,
negatives...], labels [1, 0, ...]), keyed by the input's own anchor and positive keys.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlxlab.errors import ConfigError
from mlxlab.models.embedders.sentence_folder import TextEmbedder
from mlxlab.runs.reranker import Reranker

OUTPUT_FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
STRATEGIES = ("top", "random")


@dataclass(frozen=True)
class MiningSettings:
    """mine_hard_negatives' settings under its names (see the module)."""

    range_min: int = 0
    range_max: int | None = None
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    num_negatives: int = 3
    sampling_strategy: str = "top"
    output_format: str = "triplet"
    batch_size: int = 32
    seed: int = 0  # sampling_strategy=random: the sample's seed

    def checked_range_max(self, max_positives: int, rescored: bool) -> int:
        """range_max as given or derived (the module), after every check of the numbers."""
        if self.num_negatives < 1:
            raise ConfigError(f"num_negatives must be at least 1, got {self.num_negatives}")
        if self.sampling_strategy not in STRATEGIES:
            raise ConfigError(f"sampling_strategy={self.sampling_strategy!r}: use top or random")
        if (self.min_score is not None and self.max_score is not None
                and self.min_score > self.max_score):
            raise ConfigError(f"min_score={self.min_score} is above max_score={self.max_score}: "
                              "no candidate could be kept; give min_score <= max_score")
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"output_format={self.output_format!r}: use one of "
                              f"{', '.join(OUTPUT_FORMATS)}")
        range_max = self.range_max
        if range_max is None:
            skips = (self.absolute_margin is not None or self.relative_margin is not None
                     or self.max_score is not None or (rescored and self.min_score is not None))
            range_max = self.range_min + self.num_negatives * (10 if skips else 1) + max_positives
        if self.range_min < 0 or self.range_min >= range_max:
            raise ConfigError(f"range_min={self.range_min} must be >= 0 and below "
                              f"range_max={range_max}")
        if self.num_negatives > range_max - self.range_min:
            raise ConfigError(f"cannot mine {self.num_negatives} negatives an anchor: only "
                              f"{range_max - self.range_min} candidates remain after skipping "
                              f"range_min={self.range_min} of range_max={range_max}")
        return range_max


@dataclass
class Candidates:
    """The de-duplicated anchors and corpus, each anchor's positives (corpus indices), and its
    best candidates: corpus indices (-1: none) and scores, best first."""

    queries: list[str]
    corpus: list[str]
    positives: list[list[int]]
    indices: np.ndarray
    scores: np.ndarray
    positive_scores: np.ndarray  # one per (anchor, positive), in anchor order


def _texts(anchors: Sequence[str], positives: Sequence[str], corpus: Sequence[str]
           ) -> tuple[list[str], list[str], list[list[int]], int]:
    """(queries, corpus, each query's positives, the most rows one anchor has)."""
    corpus = list(dict.fromkeys([*corpus, *positives]))
    at = {text: i for i, text in enumerate(corpus)}
    queries = list(dict.fromkeys(anchors))
    where = {q: i for i, q in enumerate(queries)}
    owned: list[list[int]] = [[] for _ in queries]
    rows = [0] * len(queries)
    for anchor, positive in zip(anchors, positives):
        rows[where[anchor]] += 1
        if at[positive] not in owned[where[anchor]]:
            owned[where[anchor]].append(at[positive])
    return queries, corpus, owned, max(rows)


def candidates(embedder: TextEmbedder, anchors: Sequence[str], positives: Sequence[str],
               corpus: Sequence[str], settings: MiningSettings,
               reranker: Reranker | None = None) -> tuple[Candidates, int]:
    """Each anchor's best `range_max + max_positives` candidates by the embedder (rescored by
    `reranker` when settings skip by score), and range_max."""
    queries, corpus, owned, max_positives = _texts(anchors, positives, corpus)
    bounded = (settings.absolute_margin is not None or settings.relative_margin is not None
               or settings.max_score is not None or settings.min_score is not None)
    range_max = settings.checked_range_max(max_positives, reranker is not None)
    docs = embedder.encode(corpus, settings.batch_size, normalize=True)
    asked = embedder.encode(queries, settings.batch_size, normalize=True)
    similarity = asked @ docs.T
    width = range_max + max_positives
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :min(width, len(corpus))]
    indices = np.full((len(queries), width), -1, np.int64)
    scores = np.full((len(queries), width), -np.inf, np.float32)
    indices[:, :order.shape[1]] = order
    scores[:, :order.shape[1]] = np.take_along_axis(similarity, order, axis=1)
    pairs = [(q, p) for q, mine in enumerate(owned) for p in mine]
    positive_scores = np.array([asked[q] @ docs[p] for q, p in pairs], np.float32)
    if reranker is not None and bounded:
        for q, row in enumerate(indices):
            scores[q] = reranker.predict([(queries[q], corpus[i]) for i in row],
                                         settings.batch_size)
        positive_scores = reranker.predict([(queries[q], corpus[p]) for q, p in pairs],
                                           settings.batch_size).astype(np.float32)
    scores[indices == -1] = -np.inf
    return Candidates(queries, corpus, owned, indices, scores, positive_scores), range_max


def skip_candidates(found: Candidates, settings: MiningSettings) -> None:
    """Set to -inf the scores of the candidates that cannot be negatives (the module)."""
    scores = found.scores
    for q, mine in enumerate(found.positives):
        scores[q, np.isin(found.indices[q], mine)] = -np.inf
    if settings.absolute_margin is not None or settings.relative_margin is not None:
        counts = [len(p) for p in found.positives]
        starts = np.cumsum([0, *counts[:-1]])
        lowest = np.array([found.positive_scores[s:s + n].min() for s, n in zip(starts, counts)],
                          np.float32)[:, None]
        if settings.absolute_margin is not None:
            scores[scores + np.float32(settings.absolute_margin) > lowest] = -np.inf
        if settings.relative_margin is not None:
            threshold = lowest - np.abs(lowest) * np.float32(settings.relative_margin)
            scores[scores > threshold] = -np.inf
    if settings.max_score is not None:
        scores[scores > settings.max_score] = -np.inf
    if settings.min_score is not None:
        scores[scores < settings.min_score] = -np.inf


def choose_negatives(found: Candidates, settings: MiningSettings, range_max: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(corpus indices, scores) of each anchor's negatives, best first; -inf: none there."""
    order = np.argsort(-found.scores, axis=1, kind="stable")[:, :range_max]
    indices = np.take_along_axis(found.indices, order, axis=1)[:, settings.range_min:]
    scores = np.take_along_axis(found.scores, order, axis=1)[:, settings.range_min:]
    n = settings.num_negatives
    if settings.sampling_strategy == "top":
        return indices[:, :n], scores[:, :n]
    rng = random.Random(settings.seed)
    options = np.maximum(indices.shape[1] - np.isinf(scores).sum(axis=1), n)
    picked = np.array([rng.sample(range(int(k)), k=n) for k in options])
    indices, scores = (np.take_along_axis(a, picked, axis=1) for a in (indices, scores))
    resort = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(indices, resort, axis=1), np.take_along_axis(scores, resort, axis=1)


def mined_rows(found: Candidates, negatives: np.ndarray, scores: np.ndarray,
               output_format: str, keys: tuple[str, str]) -> list[dict]:
    """The output rows of one format (the module), keyed by the input's anchor and positive
    keys."""
    anchor, positive = keys
    rows: list[dict] = []
    for q, mine in enumerate(found.positives):
        query, kept = found.queries[q], [int(i) for i, s in zip(negatives[q], scores[q])
                                         if np.isfinite(s)]
        texts = [found.corpus[i] for i in kept]
        if output_format == "labeled-pair":
            rows += [{anchor: query, positive: found.corpus[p], "label": 1} for p in mine]
            rows += [{anchor: query, positive: t, "label": 0} for t in texts]
            continue
        for p in mine:
            pos = found.corpus[p]
            if output_format == "triplet":
                rows += [{anchor: query, positive: pos, "negative": t} for t in texts]
            elif output_format == "n-tuple" and len(kept) == negatives.shape[1]:
                rows.append({anchor: query, positive: pos,
                             **{f"negative_{i}": t for i, t in enumerate(texts, 1)}})
            elif output_format == "labeled-list" and texts:
                rows.append({anchor: query, positive: [pos, *texts],
                             "labels": [1] + [0] * len(texts)})
    return rows


def mine_hard_negatives(embedder: TextEmbedder, anchors: Sequence[str],
                        positives: Sequence[str], settings: MiningSettings,
                        corpus: Sequence[str] = (), reranker: Reranker | None = None,
                        keys: tuple[str, str] = ("anchor", "positive")) -> list[dict]:
    """The mined rows (the module) of (anchor, positive) pairs."""
    if not anchors or len(anchors) != len(positives):
        raise ConfigError("mining needs (anchor, positive) pairs: give at least one, each with "
                          "its positive")
    found, range_max = candidates(embedder, anchors, positives, corpus, settings, reranker)
    skip_candidates(found, settings)
    negatives, scores = choose_negatives(found, settings, range_max)
    return mined_rows(found, negatives, scores, settings.output_format, keys)

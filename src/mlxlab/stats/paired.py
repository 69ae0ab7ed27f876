"""Is B better than A, by how much, and how sure are we? The tests behind `mlxlab runs compare`.

Across seeds: two configs trained on the same seeds (and scored on the same validation rows,
data.split_seed) are paired, seed by seed, so the seed's own luck cancels: the paired t test
and its interval for the mean difference, and the Wilcoxon signed-rank test, which does not
assume the differences are normal. Configs with too few common seeds fall back to Welch's
unpaired t test.

Across validation rows (classifiers): each run stores its best checkpoint's per-row
predictions, so two configs can also be compared row by row: McNemar's exact test on one pair
of runs, and a paired bootstrap over the rows of the seed-averaged correctness.

Several comparisons at once get Holm's step-down correction, and a non-result says how many
seeds would resolve a given difference (the power of the paired t test at the observed spread).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mlxlab.stats.intervals import CONFIDENCE, t_quantile

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 10_000
EXACT_WILCOXON_MAX_N = 50  # exact null distribution below this (and without ties or zeros)


def _t_sf(t: float, df: float) -> float:
    from scipy.special import stdtr

    return float(stdtr(df, -abs(t)))  # one tail


@dataclass(frozen=True)
class Difference:
    """mean(B) - mean(A) with its interval and p-values; paired when n_pairs >= 2."""

    n_a: int
    n_b: int
    n_pairs: int
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    t_p: float                       # paired t (Welch's t when unpaired)
    wilcoxon_p: float | None         # paired only
    sd_diff: float                   # of the per-seed differences (paired), else pooled sd
    paired: bool
    confidence: float = CONFIDENCE
    extra: dict = field(default_factory=dict)


def paired_t(diffs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, low, high, two-sided p) of the paired t test on per-pair differences."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2, n - 1) * se
    if se == 0:  # every pair differs by the same amount
        return mean, mean, mean, (1.0 if mean == 0 else 0.0)
    return mean, mean - half, mean + half, min(1.0, 2 * _t_sf(mean / se, n - 1))


def welch_t(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
            ) -> tuple[float, float, float, float]:
    """(mean(b) - mean(a), low, high, two-sided p) of Welch's unpaired t test."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    diff = float(y.mean() - x.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff, (1.0 if diff == 0 else 0.0)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    half = t_quantile(0.5 + confidence / 2, df) * se
    return diff, diff - half, diff + half, min(1.0, 2 * _t_sf(diff / se, df))


def wilcoxon_signed_rank(diffs: Sequence[float]) -> float:
    """Two-sided p of the Wilcoxon signed-rank test (zero differences dropped, as Wilcoxon
    did): exact for small samples without ties, else the normal approximation with the tie
    correction. 1.0 when every difference is zero."""
    d = np.asarray([x for x in diffs if x != 0], dtype=np.float64)
    n = len(d)
    if n == 0:
        return 1.0
    from scipy.stats import rankdata

    ranks = rankdata(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    ties = len(np.unique(np.abs(d))) < n
    if n <= EXACT_WILCOXON_MAX_N and not ties:
        counts = _signed_rank_counts(n)  # counts[w]: sign patterns whose positive ranks sum to w
        total = float(2**n)
        w = int(round(w_plus))
        low_tail = counts[: w + 1].sum() / total
        high_tail = counts[w:].sum() / total
        return float(min(1.0, 2 * min(low_tail, high_tail)))
    mean = n * (n + 1) / 4
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (tie_counts**3 - tie_counts).sum() / 48
    if var <= 0:
        return 1.0
    from scipy.special import ndtr

    z = (w_plus - mean) / math.sqrt(var)
    return float(min(1.0, 2 * ndtr(-abs(z))))


def _signed_rank_counts(n: int) -> np.ndarray:
    """The exact null distribution of W+ for ranks 1..n (counts, not probabilities)."""
    top = n * (n + 1) // 2
    counts = np.zeros(top + 1, dtype=np.float64)
    counts[0] = 1
    for rank in range(1, n + 1):
        counts[rank:] = counts[rank:] + counts[:-rank].copy()
    return counts


def compare(a: Mapping[object, float], b: Mapping[object, float],
            confidence: float = CONFIDENCE) -> Difference:
    """B against A, each a {seed: value} of finite values (failed runs left out beforehand).
    Seeds present in both pair up; with fewer than two pairs the groups compare unpaired."""
    a = {k: float(v) for k, v in a.items() if v is not None and math.isfinite(v)}
    b = {k: float(v) for k, v in b.items() if v is not None and math.isfinite(v)}
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a comparison needs at least 2 finite values per group "
                         f"(got {len(a)} and {len(b)}): run more seeds (replicates=N)")
    common = sorted(set(a) & set(b), key=str)
    mean_a, mean_b = float(np.mean(list(a.values()))), float(np.mean(list(b.values())))
    if len(common) >= 2:
        diffs = [b[s] - a[s] for s in common]
        diff, low, high, p = paired_t(diffs, confidence)
        return Difference(len(a), len(b), len(common), mean_a, mean_b, diff, low, high, p,
                          wilcoxon_signed_rank(diffs), float(np.std(diffs, ddof=1)), True,
                          confidence)
    diff, low, high, p = welch_t(list(a.values()), list(b.values()), confidence)
    pooled = math.sqrt((np.var(list(a.values()), ddof=1) + np.var(list(b.values()), ddof=1)) / 2)
    return Difference(len(a), len(b), 0, mean_a, mean_b, diff, low, high, p, None, pooled, False,
                      confidence)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the family-wise error rate
    stays at alpha over all the comparisons, uniformly more powerful than Bonferroni."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> tuple[int, int, float]:
    """(rows only A got right, rows only B got right, two-sided exact p) on the same rows."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"McNemar needs predictions on the same rows ({a.shape} vs {b.shape})")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return only_a, only_b, 1.0
    from scipy.stats import binom

    return only_a, only_b, float(min(1.0, 2 * binom.cdf(min(only_a, only_b), n, 0.5)))


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, rounds: int = 10_000,
                     confidence: float = CONFIDENCE, seed: int = 0
                     ) -> tuple[float, float, float, float]:
    """Row-level comparison of two groups of classifier runs on the same validation rows.

    `correct_a` and `correct_b` are (runs, rows) arrays of 0/1; each row's correctness is
    averaged over its group's runs (seeds), then the rows are resampled with replacement:
    (accuracy difference B - A, low, high, two-sided p = twice the smaller tail beyond 0)."""
    a = np.atleast_2d(np.asarray(correct_a, np.float64)).mean(axis=0)
    b = np.atleast_2d(np.asarray(correct_b, np.float64)).mean(axis=0)
    if a.shape != b.shape:
        raise ValueError(f"the bootstrap needs the same validation rows ({a.shape} vs {b.shape})")
    d = b - a
    rng = np.random.default_rng(seed)
    n = len(d)
    stats = np.empty(rounds)
    for start in range(0, rounds, 1000):  # in chunks: memory stays rows x 1000
        k = min(1000, rounds - start)
        stats[start:start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    p = 2 * min((stats <= 0).mean(), (stats >= 0).mean())
    return float(d.mean()), float(low), float(high), float(min(1.0, p))


def power_paired_t(n: int, delta: float, sd: float, alpha: float = ALPHA) -> float:
    """The power of the two-sided paired t test with n pairs to detect a true mean difference
    `delta` when the per-pair differences spread with standard deviation `sd`."""
    from scipy.stats import nct

    if n < 2 or sd <= 0:
        return math.nan
    df = n - 1
    crit = t_quantile(1 - alpha / 2, df)
    ncp = abs(delta) / (sd / math.sqrt(n))
    return float(nct.sf(crit, df, ncp) + nct.cdf(-crit, df, ncp))


def seeds_needed(delta: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest seed pairs at which the paired t test detects `delta` with `power`, given
    differences spreading by `sd` (observed); None if more than MAX_SEEDS would be needed
    or the spread is unknown."""
    if not (math.isfinite(sd) and sd > 0 and math.isfinite(delta) and delta != 0):
        return None
    lo, hi = 2, 2
    while power_paired_t(hi, delta, sd, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > MAX_SEEDS:
            return None
    while lo < hi:  # power grows with n: the first n reaching it
        mid = (lo + hi) // 2
        if power_paired_t(mid, delta, sd, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return hi

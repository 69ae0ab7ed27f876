"""Is B better than A, by how much, and how sure are we? The tests behind `mlxlab runs compare`.

Every p-value and interval here is one call into `scipy.stats`; this module only decides which
test applies and states the project's conventions, once:

- **Pairing.** Two configs trained on the same seed (and scored on the same validation rows,
  data.split_seed) form a pair: the seed's own luck (initialisation, batch order, dropout
  masks) cancels in the difference B - A. Seeds that only one config finished are left out of
  the paired tests; with fewer than two common seeds the groups compare unpaired (Welch).
- **Across seeds.** The paired t test (`scipy.stats.ttest_rel`) and its Student-t interval for
  the mean difference; it assumes the per-seed differences are roughly normal. Beside it the
  Wilcoxon signed-rank test (`scipy.stats.wilcoxon`), which assumes only that they are
  symmetric about their median under the null.
- **Ties and zeros.** Accuracy on R rows moves in steps of 1/R, so per-seed differences tie and
  are often exactly zero. The differences are first snapped to a grid far below any metric's
  resolution (`TIE_TOLERANCE` times the metrics' scale), so float noise (0.8146 - 0.8090 vs
  0.5000 - 0.4944) neither splits a tie nor turns a zero into a sign. Zero differences are
  dropped (`zero_method="wilcox"`, Wilcoxon's rule and the default of scipy and R's
  wilcox.test: a seed on which both configs score the same is evidence for neither side; the
  test's n is the number of non-zero pairs, reported beside the p). Then, without ties or
  zeros, scipy's exact null distribution (`method="exact"`); with ties or zeros, the exact
  permutation distribution of the signed ranks (`PermutationMethod`, all 2^n sign patterns)
  up to `EXACT_PERMUTATION_MAX_N` non-zero pairs, the tie-corrected normal approximation above
  that (where it holds). A p-value is therefore never below 2 / 2^n, the smallest any n pairs
  can give.
- **Across validation rows** (classifiers): each run stores its best checkpoint's per-row
  predictions. McNemar's exact test on one pair of runs is the binomial test on the rows only
  one of them got right (`scipy.stats.binomtest`, p = 1/2). Over a group of seeds, each row's
  correctness is averaged over the group's runs and the per-row differences B - A are
  (a) resampled for a percentile interval of the accuracy difference (`scipy.stats.bootstrap`,
  paired, seeded) and (b) sign-flipped for the p-value of the paired randomization test
  (`scipy.stats.permutation_test`, permutation_type="samples", seeded).
- **Degenerate spread.** When every pair differs by exactly the same amount the t statistic is
  undefined (scipy returns NaN); the difference is then known exactly: interval of width zero,
  p = 1 if it is zero, else 0.

Several comparisons at once get Holm's step-down correction, and a non-result says how many
seeds would resolve a given difference (the power of the paired t test at the observed spread,
from the noncentral t, `scipy.stats.nct`).
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
# Exact enumeration of the 2^n sign patterns with ties or zeros goes through scipy's generic
# permutation_test: about a second at n = 10 on a 2-core Zen 3, doubling with each pair. 12
# covers the replicate counts sweeps use; past it the tie-corrected normal approximation holds.
EXACT_PERMUTATION_MAX_N = 12
# Per-seed differences equal to within this fraction of the metric's scale are one tie (and
# within it of zero, a zero): float noise is ~1e-16, a metric's resolution (1/rows) ~1e-5.
TIE_TOLERANCE = 1e-9
BOOTSTRAP_ROUNDS = 10_000
PERMUTATION_ROUNDS = 9_999
# The conventions above in one paragraph, for readers of the store (the sweep parent's
# description and comparison.json, sweeps/verdict.py)
CONVENTIONS = (
    "Seeds pair up across configs (same seed, same validation rows). Paired t test "
    "(scipy.stats.ttest_rel; assumes roughly normal per-seed differences) with its Student-t "
    "interval; Wilcoxon signed-rank (scipy.stats.wilcoxon; assumes symmetry) with zero "
    "differences dropped (zero_method='wilcox'), exact, or with ties or zeros the exact "
    "permutation distribution (up to 12 non-zero pairs). Per validation row: McNemar's exact "
    "binomial test per seed pair, a paired percentile bootstrap interval and a randomization "
    "test over rows. Holm's correction over several comparisons; a config is called better "
    "only when every Holm-adjusted paired t p < alpha and there are enough seed pairs for the "
    "signed-rank test to reach alpha at all (6 at 0.05). Seeds needed: the power of the paired "
    "t test at the observed spread (80 %, alpha 0.05), and at least those 6.")


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
    wilcoxon_n: int | None = None     # non-zero pairs: the signed-rank test's n
    wilcoxon_method: str | None = None  # "exact", "exact permutation" or "normal approximation"

    @property
    def t_test(self) -> str:
        return "paired t" if self.paired else "Welch's t"


@dataclass(frozen=True)
class Wilcoxon:
    """The signed-rank test on per-pair differences: two-sided p, its n (non-zero pairs), and
    how the null distribution was computed."""

    p: float
    n: int
    method: str

    @property
    def smallest_p(self) -> float:
        return smallest_signed_rank_p(self.n)


def smallest_signed_rank_p(n: int) -> float:
    """The smallest two-sided p the signed-rank test can give on n non-zero pairs: 2 / 2^n
    (every sign alike), however large the differences."""
    return min(1.0, 2.0 / 2.0**n)


def signed_rank_reach(alpha: float = ALPHA) -> int:
    """The fewest non-zero pairs at which the signed-rank test can give p < alpha at all (6 at
    0.05: 2/2^6 = 0.031, where 5 pairs give at best 0.0625). Below it a verdict cannot be
    confirmed by both tests, whatever the data."""
    n = 1
    while smallest_signed_rank_p(n) >= alpha:
        n += 1
    return n


def paired_t(diffs: Sequence[float], confidence: float = CONFIDENCE
             ) -> tuple[float, float, float, float]:
    """(mean, low, high, two-sided p) of the paired t test on per-pair differences B - A."""
    from scipy.stats import ttest_1samp

    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    if float(d.std(ddof=1)) == 0:  # every pair differs by the same amount (module docstring)
        return mean, mean, mean, (1.0 if mean == 0 else 0.0)
    # ttest_rel(b, a) is ttest_1samp(b - a, 0); the differences are what a pairing yields
    res = ttest_1samp(d, 0.0)
    ci = res.confidence_interval(confidence)
    return mean, float(ci.low), float(ci.high), float(res.pvalue)


def welch_t(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
            ) -> tuple[float, float, float, float]:
    """(mean(b) - mean(a), low, high, two-sided p) of Welch's unpaired t test."""
    from scipy.stats import ttest_ind

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(y.mean() - x.mean())
    if x.var(ddof=1) + y.var(ddof=1) == 0:
        return diff, diff, diff, (1.0 if diff == 0 else 0.0)
    res = ttest_ind(y, x, equal_var=False)
    ci = res.confidence_interval(confidence)
    return diff, float(ci.low), float(ci.high), float(res.pvalue)


def snap_ties(diffs: Sequence[float], scale: float = 1.0) -> np.ndarray:
    """Differences on a grid of TIE_TOLERANCE * scale: float noise neither splits a tie nor
    makes a zero non-zero (module docstring)."""
    step = TIE_TOLERANCE * max(1.0, abs(scale))
    return np.round(np.asarray(diffs, dtype=np.float64) / step) * step


def wilcoxon_signed_rank(diffs: Sequence[float], scale: float = 1.0) -> Wilcoxon:
    """The two-sided Wilcoxon signed-rank test on per-pair differences B - A, by the module's
    conventions (zeros dropped; exact, exact permutation or normal approximation). `scale`:
    the metric's magnitude, for the tie grid. p = 1 when every difference is zero."""
    from scipy.stats import PermutationMethod, wilcoxon

    d = snap_ties(diffs, scale)
    nonzero = d[d != 0]
    n = len(nonzero)
    if n == 0:
        return Wilcoxon(1.0, 0, "no non-zero difference")
    ties = len(np.unique(np.abs(nonzero))) < n
    zeros = n < len(d)
    if not ties and not zeros:
        method, name = ("exact", "exact") if n <= 50 else ("asymptotic", "normal approximation")
    elif n <= EXACT_PERMUTATION_MAX_N:
        method, name = PermutationMethod(n_resamples=np.inf), "exact permutation"
    else:
        method, name = "asymptotic", "normal approximation"
    p = wilcoxon(d, zero_method="wilcox", correction=False, method=method).pvalue
    return Wilcoxon(float(min(1.0, p)), n, name)


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
        scale = max(abs(v) for v in (*a.values(), *b.values()))
        w = wilcoxon_signed_rank(diffs, scale)
        return Difference(len(a), len(b), len(common), mean_a, mean_b, diff, low, high, p,
                          w.p, float(np.std(diffs, ddof=1)), True, confidence,
                          wilcoxon_n=w.n, wilcoxon_method=w.method)
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
    """(rows only A got right, rows only B got right, two-sided exact p) on the same rows:
    the binomial test of only_b out of the discordant rows against 1/2."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"McNemar needs predictions on the same rows ({a.shape} vs {b.shape})")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    return only_a, only_b, float(binomtest(only_b, only_a + only_b, 0.5).pvalue)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(b - a, axis=axis)


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray,
                     rounds: int = BOOTSTRAP_ROUNDS, confidence: float = CONFIDENCE,
                     seed: int = 0) -> tuple[float, float, float, float]:
    """Row-level comparison of two groups of classifier runs on the same validation rows.

    `correct_a` and `correct_b` are (runs, rows) arrays of 0/1; each row's correctness is
    averaged over its group's runs (seeds). Returns (accuracy difference B - A, the paired
    percentile bootstrap interval over rows, the two-sided p of the paired randomization test
    over rows), both seeded by `seed` (module docstring)."""
    from scipy.stats import bootstrap, permutation_test

    a = np.atleast_2d(np.asarray(correct_a, np.float64)).mean(axis=0)
    b = np.atleast_2d(np.asarray(correct_b, np.float64)).mean(axis=0)
    if a.shape != b.shape:
        raise ValueError(f"the bootstrap needs the same validation rows ({a.shape} vs {b.shape})")
    diff = float(np.mean(b - a))
    if np.all(a == b):  # no row differs: nothing to resample (scipy warns of a degenerate run)
        return diff, diff, diff, 1.0
    ci = bootstrap((a, b), _mean_difference, paired=True, vectorized=True, n_resamples=rounds,
                   confidence_level=confidence, method="percentile",
                   rng=np.random.default_rng(seed)).confidence_interval
    p = permutation_test((a, b), _mean_difference, permutation_type="samples", vectorized=True,
                         n_resamples=PERMUTATION_ROUNDS, rng=np.random.default_rng(seed)).pvalue
    return diff, float(ci.low), float(ci.high), float(min(1.0, p))


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
    differences spreading by `sd` (observed), and the signed-rank test can reach alpha at all
    (signed_rank_reach: never 2, where its smallest p is 0.5); None if more than MAX_SEEDS
    would be needed or the spread is unknown. Differences that do not spread at all (sd 0:
    every seed gave the same difference) leave the t test certain at any n, so the signed-rank
    test's reach is what it takes."""
    if not (math.isfinite(sd) and sd >= 0 and math.isfinite(delta) and delta != 0):
        return None
    if sd == 0:
        return signed_rank_reach(alpha)
    lo = hi = signed_rank_reach(alpha)
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

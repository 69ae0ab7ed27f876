"""stats/: every interval and p-value checked against scipy.stats (or a simulation) on the
same numbers."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats as st
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_h

from mlxlab import stats

RNG = np.random.default_rng(7)
A = RNG.normal(0.836, 0.009, 10)            # ten seeds of one config
B = A + RNG.normal(-0.006, 0.006, 10)       # the other config on the same seeds


def test_summary_is_the_student_t_interval():
    s = stats.summarize(A)
    low, high = st.t.interval(0.95, len(A) - 1, loc=A.mean(), scale=st.sem(A))
    assert (s.n, s.mean, s.std) == (10, pytest.approx(A.mean()), pytest.approx(A.std(ddof=1)))
    assert (s.low, s.high) == (pytest.approx(low), pytest.approx(high))
    assert s.text(scale=100, digits=1).endswith("(95% CI, n=10)")
    s90 = stats.summarize(A, confidence=0.9)
    assert s90.high - s90.low < s.high - s.low


def test_summary_leaves_out_failed_runs_and_gives_one_value_no_interval():
    s = stats.summarize([0.8, math.nan, None, math.inf])
    assert s.n == 1 and s.mean == 0.8 and math.isnan(s.low) and math.isnan(s.high)
    assert stats.summarize([]).n == 0


def test_bands_per_step_count_only_the_curves_that_reached_the_step():
    curves = [{10: 1.0, 20: 0.8}, {10: 1.2, 20: 0.6}, {10: 1.1}]  # the third stopped early
    bands = stats.bands(curves)
    assert bands[10].n == 3 and bands[20].n == 2
    assert bands[20].mean == pytest.approx(0.7)
    low, high = st.t.interval(0.95, 1, loc=0.7, scale=st.sem([0.8, 0.6]))
    assert (bands[20].low, bands[20].high) == (pytest.approx(low), pytest.approx(high))


def test_paired_t_and_wilcoxon_match_scipy():
    d = stats.compare(dict(enumerate(A)), dict(enumerate(B)))
    assert d.paired and d.n_pairs == 10
    assert d.diff == pytest.approx((B - A).mean())
    assert d.t_p == pytest.approx(st.ttest_rel(B, A).pvalue)
    low, high = st.t.interval(0.95, 9, loc=(B - A).mean(), scale=st.sem(B - A))
    assert (d.low, d.high) == (pytest.approx(low), pytest.approx(high))
    assert d.wilcoxon_p == pytest.approx(st.wilcoxon(B, A, method="exact").pvalue)


def _exact_signed_rank_p(k: list[int]) -> float:
    """Independent of scipy: enumerate every sign pattern of the non-zero integer differences'
    midranks; two-sided p = share of patterns whose W+ lies at least as far from its mean."""
    nz = [x for x in k if x != 0]
    ranks = st.rankdata(np.abs(nz))
    observed = ranks[np.array(nz) > 0].sum()
    centre = ranks.sum() / 2
    w = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1),
                                                                                   repeat=len(nz))]
    return float(np.mean([abs(x - centre) >= abs(observed - centre) - 1e-9 for x in w]))


@pytest.mark.parametrize(("steps", "expected"), [
    ((1, 1, 2, 2), 0.125),          # the normal approximation says 0.063
    ((0, 0, 1, 2, 3, -1), 0.375),   # it says 0.197; scipy's exact permutation 0.375
])
def test_wilcoxon_on_tied_and_zero_accuracy_steps_is_exact(steps, expected):
    base = np.array([0.8146, 0.5, 0.8090, 0.6011, 0.7, 0.9])[: len(steps)]
    a = {seed: x for seed, x in enumerate(base)}
    b = {seed: x + k / 178 for seed, (x, k) in enumerate(zip(base, steps))}  # float noise
    d = stats.compare(a, b)
    n = sum(k != 0 for k in steps)
    assert d.wilcoxon_p == pytest.approx(expected) == _exact_signed_rank_p(list(steps))
    assert d.wilcoxon_p == pytest.approx(st.wilcoxon(np.array(steps) / 178,
                                                     method=st.PermutationMethod()).pvalue)
    assert (d.wilcoxon_n, d.wilcoxon_method) == (n, "exact permutation")
    assert d.wilcoxon_p >= 2 / 2**n
    assert stats.wilcoxon_signed_rank([0.0, 0.0]).p == 1.0


def _two_sided_tests_on(k_a: list[int], k_b: list[int]):
    """What scipy says on the integer counts (no float noise: ties and zeros are exact)."""
    kd = np.array(k_b) - np.array(k_a)
    nz = kd[kd != 0]
    ties = len(np.unique(np.abs(nz))) < len(nz) or len(nz) < len(kd)
    method = (st.PermutationMethod(n_resamples=np.inf)
              if ties and len(nz) <= stats.paired.EXACT_PERMUTATION_MAX_N else "auto")
    return nz, st.wilcoxon(kd, method=method).pvalue if len(nz) else 1.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st_h.integers(2, 8).flatmap(lambda n: st_h.tuples(
    st_h.lists(st_h.integers(120, 160), min_size=n, max_size=n),
    st_h.lists(st_h.integers(-3, 3), min_size=n, max_size=n))))
def test_every_p_value_and_interval_equals_scipys_on_tied_paired_samples(sample):
    """Accuracy on 178 rows for n seeds of A, and B a few rows off (ties and zeros are the
    rule, not the exception): every number compare() gives is scipy's on the same pairs."""
    k_a, steps = sample
    k_b = [x + s for x, s in zip(k_a, steps)]
    a = {seed: x / 178 for seed, x in enumerate(k_a)}
    b = {seed: x / 178 for seed, x in enumerate(k_b)}
    d = stats.compare(a, b)
    xa, xb = np.array(k_a) / 178, np.array(k_b) / 178
    assert d.paired and d.n_pairs == len(k_a)
    assert d.diff == pytest.approx((xb - xa).mean(), abs=1e-12)
    if np.ptp(np.array(steps)) > 0:  # scipy's t is undefined when every pair differs equally
        ref = st.ttest_rel(xb, xa)
        ci = ref.confidence_interval(0.95)
        assert d.t_p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12)
        assert (d.low, d.high) == (pytest.approx(ci.low, abs=1e-12),
                                   pytest.approx(ci.high, abs=1e-12))
    nz, p = _two_sided_tests_on(k_a, k_b)
    assert d.wilcoxon_n == len(nz)
    assert d.wilcoxon_p == pytest.approx(p, rel=1e-9)
    if len(nz):
        assert d.wilcoxon_p >= 2 / 2 ** len(nz) - 1e-12  # never below what n pairs allow
        assert d.wilcoxon_p == pytest.approx(_exact_signed_rank_p(list(np.array(steps))))
    s = stats.summarize(a.values())
    if np.ptp(xa) > 0:
        low, high = st.t.interval(0.95, len(xa) - 1, loc=xa.mean(), scale=st.sem(xa))
        assert (s.low, s.high) == (pytest.approx(low), pytest.approx(high))


@settings(max_examples=15, deadline=None)
@given(st_h.lists(st_h.tuples(st_h.booleans(), st_h.booleans()), min_size=2, max_size=60))
def test_mcnemar_and_row_bootstrap_equal_scipys_on_any_rows(rows):
    a, b = np.array(rows, bool).T
    only_a, only_b, p = stats.mcnemar_exact(a, b)
    assert (only_a, only_b) == (int((a & ~b).sum()), int((~a & b).sum()))
    assert p == (st.binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0)
    diff, low, high, p = stats.paired_bootstrap(a[None], b[None], rounds=500)
    assert diff == pytest.approx(b.mean() - a.mean())
    if only_a + only_b == 0:
        assert (low, high, p) == (diff, diff, 1.0)
        return
    x, y = a.astype(float), b.astype(float)
    ci = st.bootstrap((x, y), lambda u, v, axis=-1: (v - u).mean(axis), paired=True,
                      n_resamples=500, method="percentile",
                      rng=np.random.default_rng(0)).confidence_interval
    ref_p = st.permutation_test((x, y), lambda u, v, axis=-1: (v - u).mean(axis),
                                permutation_type="samples", n_resamples=9999,
                                rng=np.random.default_rng(0)).pvalue
    assert (low, high, p) == (pytest.approx(ci.low), pytest.approx(ci.high), pytest.approx(ref_p))


def test_unpaired_groups_get_welchs_test():
    a, b = {1: 0.80, 2: 0.82, 3: 0.81}, {4: 0.84, 5: 0.86, 6: 0.83, 7: 0.85}
    d = stats.compare(a, b)
    assert not d.paired and d.wilcoxon_p is None
    ref = st.ttest_ind(list(b.values()), list(a.values()), equal_var=False)
    assert d.t_p == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_too_few_values_say_what_to_do():
    with pytest.raises(ValueError, match="replicates=N"):
        stats.compare({1: 0.8}, {1: 0.9})


def test_holm_step_down():
    # m=4: sorted p 0.01, 0.03, 0.04, 0.2 -> 0.04, 0.09, max(0.09, 0.08)=0.09, 0.2
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_mcnemar_is_the_exact_binomial_test_on_discordant_rows():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], bool)
    b = np.array([0, 1, 1, 0, 0, 0, 1, 0, 0, 1], bool)
    only_a, only_b, p = stats.mcnemar_exact(a, b)
    assert (only_a, only_b) == (4, 1)
    assert p == pytest.approx(st.binomtest(1, 5, 0.5).pvalue)


def test_paired_bootstrap_over_rows():
    rng = np.random.default_rng(0)
    base = rng.random((5, 400)) < 0.8              # 5 seeds x 400 rows of correctness
    better = base | (rng.random((5, 400)) < 0.25)  # B fixes a quarter of A's mistakes
    diff, low, high, p = stats.paired_bootstrap(base, better)
    assert diff == pytest.approx(better.mean() - base.mean())
    assert 0 < low < diff < high and p < 0.01
    same = stats.paired_bootstrap(base, base)
    assert same[0] == 0 and same[3] == 1.0
    assert stats.paired_bootstrap(base, better) == (diff, low, high, p)  # seeded: reproducible


def test_seeds_needed_reaches_the_power_a_simulation_measures():
    delta, sd = 0.005, 0.008
    n = stats.seeds_needed(delta, sd)
    assert stats.power_paired_t(n, delta, sd) >= 0.8 > stats.power_paired_t(n - 1, delta, sd)
    rng = np.random.default_rng(1)  # 4000 simulated experiments of n paired seeds each
    diffs = rng.normal(delta, sd, (4000, n))
    p = st.ttest_1samp(diffs, 0.0, axis=1).pvalue
    assert (p < 0.05).mean() == pytest.approx(0.8, abs=0.03)
    assert stats.seeds_needed(0.0, sd) is None and stats.seeds_needed(1e-9, 1.0) is None


def test_seeds_needed_for_differences_that_do_not_spread_is_the_signed_rank_reach():
    # Three seeds that all differ by exactly +0.99 (a tool the other arm lacks): the t test is
    # certain at any n, so what it takes is the signed-rank test's reach, not "more than 10,000".
    assert stats.seeds_needed(0.99, 0.0) == stats.signed_rank_reach() == 6
    assert stats.seeds_needed(0.99, float("nan")) is None


# --- intervals inside what is possible -------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 40), (40, 40), (1, 1)])
def test_a_proportions_interval_is_scipys_wilson_interval_inside_0_1(k, n):
    """A proportion (k right of n examples) gets Wilson's score interval, scipy's
    binomtest(k, n).proportion_ci(method="wilson"): never below 0 or above 1, and not of zero
    width at 0/n or n/n (where a normal approximation gives [0, 0] and [1, 1])."""
    low, high = stats.proportion_interval(k, n)
    ci = st.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert (low, high) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert 0.0 <= low <= k / n <= high <= 1.0 and high - low > 0


def test_a_mean_of_bounded_values_over_few_seeds_is_cut_to_the_range_and_says_so():
    """Two seeds' accuracy 0.9 and 1.0: Student-t's interval reaches 1.58; the summary with the
    metric's range keeps the t bounds that are possible and says the interval was cut."""
    raw = stats.summarize([0.9, 1.0])
    assert raw.high > 1.0
    s = stats.summarize([0.9, 1.0], bounds=(0.0, 1.0))
    assert (s.low, s.high) == (pytest.approx(max(0.0, raw.low)), 1.0)
    assert s.cut and s.as_dict()["ci_cut"] is True
    text = s.text()
    assert "Student-t" in text and "cut to [0, 1]" in text and "n=2" in text
    assert "1.5" not in text
    inside = stats.summarize(A, bounds=(0.0, 1.0))  # a t interval inside the range is left alone
    assert not inside.cut and inside.text().endswith("(95% CI, n=10)")

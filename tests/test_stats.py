"""stats/: every interval and p-value checked against scipy.stats (or a simulation) on the
same numbers."""

import math

import numpy as np
import pytest
import scipy.stats as st

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


def test_wilcoxon_with_ties_and_zeros_matches_scipys_normal_approximation():
    diffs = [0.01, 0.02, 0.02, -0.01, 0.03, 0.0, 0.02, -0.02, 0.04, 0.01, 0.0, 0.03]
    ours = stats.wilcoxon_signed_rank(diffs)
    theirs = st.wilcoxon(diffs, zero_method="wilcox", correction=False, method="approx").pvalue
    assert ours == pytest.approx(theirs)
    assert stats.wilcoxon_signed_rank([0.0, 0.0]) == 1.0


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

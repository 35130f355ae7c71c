"""Tests for allocator.stats: each statistic against scipy, a textbook value or a simulation."""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import ArrayLike
from scipy import stats as sst

from allocator import stats
from allocator.stats import (
    beta_interval,
    chi_square,
    credible_interval,
    expected_loss,
    ipw_means,
    lift,
    mann_whitney,
    moments,
    power_proportions,
    prob_best,
    proportion_difference,
    sample_size_means,
    sample_size_proportions,
    samples_still_needed,
    srm_check,
    stratified_difference,
    stratified_means,
    welch_t,
)

# Two-sided 5% and one-sided 80% normal quantiles, as printed in z tables; used to check the
# sample-size formulas independently of scipy.
Z975 = 1.959964
Z80 = 0.841621


def test_docstring_examples_hold() -> None:
    result = doctest.testmod(stats)
    assert result.attempted > 0
    assert result.failed == 0


# ----------------------------------------------------------------------------------------
# moments
# ----------------------------------------------------------------------------------------


def test_moments_match_numpy_on_raw_data() -> None:
    x = np.random.default_rng(1).normal(5.0, 2.0, size=500)
    m = moments(x.size, float(x.sum()), float((x * x).sum()))
    assert m.mean == pytest.approx(x.mean(), rel=1e-12)
    assert m.var == pytest.approx(x.var(ddof=1), rel=1e-9)


def test_moments_single_observation_has_no_variance() -> None:
    assert math.isnan(moments(1, 3.0, 9.0).var)


def test_moments_clamps_cancellation_to_zero() -> None:
    # Three values of 1e8 with sum_sq rounded 4 ulp low: unclamped, the variance would be
    # (sum_sq - sum * mean) / 2 = -2.
    sum_sq = 3e16 * (1 - 1e-16)
    assert sum_sq - 3e8 * 1e8 < 0
    assert moments(3, 3e8, sum_sq).var == 0.0


@pytest.mark.parametrize("args", [(0, 1.0, 1.0), (2, math.nan, 1.0), (2, 1.0, math.inf)])
def test_moments_rejects_bad_input(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        moments(*args)


# ----------------------------------------------------------------------------------------
# chi_square
# ----------------------------------------------------------------------------------------


def test_chi_square_textbook_example() -> None:
    # Agresti, An Introduction to Categorical Data Analysis: party identification by gender,
    # read as 3 "arms" (Dem, Ind, Rep) x (female, male): X^2 = 30.07 on 2 df.
    r = chi_square([762, 327, 468], [762 + 484, 327 + 239, 468 + 477])
    assert r.statistic == pytest.approx(30.07, abs=0.005)
    assert r.dof == 2
    assert r.p_value == pytest.approx(math.exp(-30.070149 / 2), rel=1e-5)  # chi2_2 sf = e^-x/2
    assert r.name == "pearson_chi2"


def test_chi_square_matches_hand_computed_pearson_sum() -> None:
    s = np.array([120.0, 95.0, 140.0, 101.0])
    t = np.array([1000.0, 980.0, 1020.0, 990.0])
    table = np.column_stack((s, t - s))
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    x2 = float(((table - expected) ** 2 / expected).sum())
    r = chi_square(s, t)
    assert r.statistic == pytest.approx(x2, rel=1e-12)
    assert r.p_value == pytest.approx(float(sst.chi2.sf(x2, 3)), rel=1e-9)


def test_chi_square_2x2_is_squared_pooled_z_without_yates() -> None:
    s, t = np.array([100.0, 130.0]), np.array([1000.0, 1050.0])
    p = s / t
    pool = s.sum() / t.sum()
    z = (p[1] - p[0]) / math.sqrt(pool * (1 - pool) * (1 / t[0] + 1 / t[1]))
    r = chi_square(s, t)
    assert r.statistic == pytest.approx(z * z, rel=1e-10)
    assert r.p_value == pytest.approx(2 * sst.norm.sf(abs(z)), rel=1e-9)


def test_chi_square_drops_arms_without_trials() -> None:
    with_empty = chi_square([10, 0, 20], [100, 0, 110])
    without = chi_square([10, 20], [100, 110])
    assert with_empty == without
    assert with_empty.dof == 1


@pytest.mark.parametrize(
    ("s", "t"), [([0, 0], [100, 120]), ([100, 120], [100, 120]), ([5, 0], [50, 0])]
)
def test_chi_square_degenerate_table_is_nan(s: list[int], t: list[int]) -> None:
    r = chi_square(s, t)
    assert math.isnan(r.statistic)
    assert math.isnan(r.p_value)


@pytest.mark.parametrize(
    ("s", "t"),
    [
        ([1, 2], [10, 10, 10]),
        ([11, 2], [10, 10]),
        ([-1, 2], [10, 10]),
        ([1], [10]),
        ([1, math.nan], [10, 10]),
        ([[1, 2]], [[10, 10]]),
    ],
)
def test_chi_square_rejects_bad_input(s: list[float], t: list[float]) -> None:
    with pytest.raises(ValueError):
        chi_square(s, t)


@given(st.permutations([(12, 100), (30, 200), (7, 90), (0, 5)]))
def test_chi_square_does_not_depend_on_arm_order(rows: list[tuple[int, int]]) -> None:
    s, t = zip(*rows, strict=True)
    r = chi_square(list(s), list(t))
    ref = chi_square([12, 30, 7, 0], [100, 200, 90, 5])
    assert r.statistic == pytest.approx(ref.statistic, rel=1e-12)


# ----------------------------------------------------------------------------------------
# welch_t and mann_whitney
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [(1.0, 4.0, 30, 0.2, 1.0, 12), (10.0, 2.5, 1000, 10.1, 9.0, 50), (0.0, 1.0, 2, 0.0, 1.0, 2)],
)
def test_welch_t_matches_scipy_from_stats(case: tuple[float, ...]) -> None:
    ma, va, na, mb, vb, nb = case
    ref = sst.ttest_ind_from_stats(ma, math.sqrt(va), na, mb, math.sqrt(vb), nb, equal_var=False)
    r = welch_t(ma, va, na, mb, vb, nb)
    assert r.statistic == pytest.approx(float(ref.statistic), rel=1e-12, abs=1e-15)
    assert r.p_value == pytest.approx(float(ref.pvalue), rel=1e-10)


def test_welch_t_from_sufficient_statistics_matches_raw_ttest() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(1.0, 1.0, 300), rng.normal(1.2, 2.0, 80)
    mx = moments(x.size, float(x.sum()), float((x * x).sum()))
    my = moments(y.size, float(y.sum()), float((y * y).sum()))
    ref = sst.ttest_ind(x, y, equal_var=False)
    r = welch_t(mx.mean, mx.var, mx.n, my.mean, my.var, my.n)
    assert r.statistic == pytest.approx(float(ref.statistic), rel=1e-9)
    assert r.p_value == pytest.approx(float(ref.pvalue), rel=1e-8)
    assert r.dof == pytest.approx(float(ref.df), rel=1e-9)


@given(
    st.floats(-10, 10),
    st.floats(0.1, 10),
    st.integers(2, 10_000),
    st.floats(-10, 10),
    st.floats(0.1, 10),
    st.integers(2, 10_000),
)
def test_welch_t_is_antisymmetric(
    ma: float, va: float, na: int, mb: float, vb: float, nb: int
) -> None:
    ab, ba = welch_t(ma, va, na, mb, vb, nb), welch_t(mb, vb, nb, ma, va, na)
    assert ab.statistic == pytest.approx(-ba.statistic, rel=1e-12, abs=1e-300)
    assert ab.p_value == pytest.approx(ba.p_value, rel=1e-12)


def test_welch_t_two_constant_arms_match_scipy() -> None:
    # Constant arms with different values: scipy says t = -inf, p = 0 (the limit as the
    # variances shrink); with the same value there is nothing to test (NaN).
    with warnings.catch_warnings():  # scipy warns that constant data cancel exactly
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = sst.ttest_ind([1.0] * 10, [2.0] * 10, equal_var=False)
    r = welch_t(1.0, 0.0, 10, 2.0, 0.0, 10)
    assert r.statistic == float(ref.statistic) == -math.inf
    assert r.p_value == float(ref.pvalue) == 0.0
    assert welch_t(2.0, 0.0, 10, 1.0, 0.0, 3).statistic == math.inf
    same = welch_t(1.0, 0.0, 10, 1.0, 0.0, 10)
    assert math.isnan(same.statistic) and math.isnan(same.p_value)


@pytest.mark.parametrize(
    "case",
    [
        (1.0, 1.0, 1, 0.0, 1.0, 10),
        (1.0, -1.0, 10, 0.0, 1.0, 10),
        (math.nan, 1.0, 10, 0, 1, 10),
        (1.0, 1.0, 10, 0.0, math.inf, 10),
    ],
)
def test_welch_t_rejects_bad_input(case: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        welch_t(*case)


def test_mann_whitney_exact_textbook_value() -> None:
    # Complete separation of 3 vs 3: U = 0, and 1 of the C(6,3) = 20 equally likely
    # rankings is that extreme in each direction, so the two-sided exact p = 2/20.
    r = mann_whitney([1, 2, 3], [4, 5, 6])
    assert r.statistic == 0.0
    assert r.p_value == pytest.approx(0.1, rel=1e-12)
    assert r.dof is None


def test_mann_whitney_matches_scipy_two_sided() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.exponential(1.0, 200), rng.exponential(1.3, 150)
    ref = sst.mannwhitneyu(x, y, alternative="two-sided")
    r = mann_whitney(x, y)
    assert (r.statistic, r.p_value) == (float(ref.statistic), float(ref.pvalue))


@pytest.mark.parametrize(("x", "y"), [([], [1.0]), ([1.0], [math.nan]), ([[1.0]], [1.0])])
def test_mann_whitney_rejects_bad_input(x: list[float], y: list[float]) -> None:
    with pytest.raises(ValueError):
        mann_whitney(x, y)


# ----------------------------------------------------------------------------------------
# srm_check
# ----------------------------------------------------------------------------------------

# A bandit's allocation history: 6 epochs of 20,000 assignments, shares drifting from an
# even split toward arm 0.
SHARES = np.array(
    [
        [1 / 3, 1 / 3, 1 / 3],
        [0.40, 0.35, 0.25],
        [0.50, 0.30, 0.20],
        [0.60, 0.25, 0.15],
        [0.70, 0.20, 0.10],
        [0.80, 0.15, 0.05],
    ]
)
EPOCH_N = np.full(6, 20_000)


def test_srm_flags_a_real_mismatch_on_a_fixed_split() -> None:
    r = srm_check([50_000, 51_500], [[0.5, 0.5]], [101_500])
    # By hand: expected 50,750 each, X^2 = 2 * 750^2 / 50,750 = 22.17 on 1 df.
    assert r.statistic == pytest.approx(2 * 750**2 / 50_750, rel=1e-12)
    ref = sst.chisquare([50_000, 51_500])
    assert r.p_value == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert r.p_value < 1e-5 and r.flagged
    assert r.expected == (50_750.0, 50_750.0)


def test_srm_quiet_under_legitimate_adaptive_allocation_where_naive_check_fires() -> None:
    rng = np.random.default_rng(20190804)
    counts = np.array([rng.multinomial(n, p) for n, p in zip(EPOCH_N, SHARES, strict=True)])
    observed = counts.sum(axis=0)
    r = srm_check(observed, SHARES, counts)
    assert not r.flagged
    assert r.expected == pytest.approx(tuple(EPOCH_N @ SHARES), rel=1e-12)
    # A check against the initial 1/3 split, blind to the allocation history, cries wolf.
    naive = srm_check(observed, [SHARES[0]], [observed.sum()])
    assert naive.flagged and naive.p_value < 1e-100


def test_srm_false_alarm_rate_under_adaptive_allocation_is_at_most_alpha() -> None:
    # 300 replicate experiments at alpha = 0.05: if the test had exactly level 0.05 the
    # number of flags would be Binomial(300, 0.05), mean 15, sd 3.77; the pooled test is
    # conservative, so allow at most mean + 4 sd = 30.
    rng = np.random.default_rng(7)
    draws = np.stack(
        [rng.multinomial(n, p, size=300) for n, p in zip(EPOCH_N, SHARES, strict=True)]
    )
    flags = sum(
        srm_check(draws[:, i].sum(axis=0), SHARES, EPOCH_N, alpha=0.05).flagged for i in range(300)
    )
    assert flags <= 30


def test_srm_flags_lost_assignments_under_adaptive_allocation() -> None:
    # 5% of arm 0's units go missing (e.g. a logging bug). Arm 0 has share q = 0.556 of
    # N = 120,000; losing a fraction f of it gives noncentrality
    # lambda = N (1 - f q) q (1 - q) f^2 / (1 - f q)^2 ~ 76 on 2 df: mean X^2 ~ 78, sd ~ 17.5,
    # so X^2 exceeds the 0.001 threshold 13.8 with probability above 0.9999.
    rng = np.random.default_rng(11)
    counts = np.array([rng.multinomial(n, p) for n, p in zip(EPOCH_N, SHARES, strict=True)])
    observed = counts.sum(axis=0).astype(float)
    observed[0] = round(observed[0] * 0.95)
    r = srm_check(observed, SHARES, EPOCH_N)
    assert r.flagged and r.p_value < 0.001


def test_srm_matrix_and_totals_forms_agree() -> None:
    counts = np.array([[100, 90], [300, 120]])
    shares = [[0.5, 0.5], [0.7, 0.3]]
    assert srm_check(counts.sum(axis=0), shares, counts) == srm_check(
        counts.sum(axis=0), shares, counts.sum(axis=1)
    )


def test_srm_excludes_arms_never_allocated_and_never_seen() -> None:
    shares = [[0.5, 0.5, 0.0], [0.6, 0.4, 0.0]]
    r = srm_check([1100, 900, 0], shares, [1000, 1000])
    ref = srm_check([1100, 900], [[0.5, 0.5], [0.6, 0.4]], [1000, 1000])
    assert (r.statistic, r.p_value, r.dof) == (ref.statistic, ref.p_value, ref.dof)
    assert r.expected[2] == 0.0


def test_srm_traffic_to_an_unallocated_arm_is_a_mismatch() -> None:
    r = srm_check([500, 500, 1], [[0.5, 0.5, 0.0]], [1001])
    assert r.flagged and r.p_value == 0.0 and r.statistic == math.inf


def test_srm_single_live_arm_is_quiet() -> None:
    r = srm_check([0, 1000], [[0.0, 1.0]], [1000])
    assert (r.statistic, r.p_value, r.dof, r.flagged) == (0.0, 1.0, 0, False)


@pytest.mark.parametrize(
    ("obs", "shares", "assign", "alpha"),
    [
        ([1, 2], [[0.5, 0.6]], [3], 0.001),  # row does not sum to 1
        ([1, 2, 3], [[0.5, 0.5]], [3], 0.001),  # arms differ
        ([1, 2], [[0.5, 0.5]], [3, 4], 0.001),  # epochs differ
        ([1, 2], [[0.5, 0.5]], [0], 0.001),  # no traffic
        ([-1, 2], [[0.5, 0.5]], [3], 0.001),
        ([1, 2], [[1.5, -0.5]], [3], 0.001),
        ([1, 2], [[0.5, 0.5]], [3], 0.0),
        ([1, 2], [[0.5, 0.5]], [3], 1.0),
    ],
)
def test_srm_rejects_bad_input(
    obs: list[float], shares: list[list[float]], assign: list[float], alpha: float
) -> None:
    with pytest.raises(ValueError):
        srm_check(obs, shares, assign, alpha=alpha)


# ----------------------------------------------------------------------------------------
# Power and sample size
# ----------------------------------------------------------------------------------------


def test_sample_size_proportions_textbook_value() -> None:
    # Fleiss: n = [z_a sqrt(2 pbar qbar) + z_b sqrt(p1 q1 + p2 q2)]^2 / d^2 with table z's:
    # [1.959964 * sqrt(0.1958) + 0.841621 * sqrt(0.1956)]^2 / 0.02^2 = 3840.85 -> 3841.
    by_hand = (Z975 * math.sqrt(2 * 0.11 * 0.89) + Z80 * math.sqrt(0.09 + 0.1056)) ** 2 / 0.0004
    assert math.ceil(by_hand) == 3841
    assert sample_size_proportions(0.10, 0.02) == 3841
    assert sample_size_proportions(0.10, 0.2, relative=True) == 3841
    assert sample_size_proportions(0.12, -0.02) == 3841  # symmetric in direction


def test_sample_size_proportions_achieves_power_by_simulation() -> None:
    # Simulate the pooled two-proportion z test at n = 3841 per arm. 20,000 replicates give
    # a Monte Carlo SE of sqrt(0.8 * 0.2 / 20,000) = 0.0028; 5 SE = 0.014.
    n, reps = 3841, 20_000
    rng = np.random.default_rng(5)
    xa, xb = rng.binomial(n, 0.10, reps), rng.binomial(n, 0.12, reps)
    pool = (xa + xb) / (2 * n)
    z = (xb - xa) / n / np.sqrt(pool * (1 - pool) * 2 / n)
    assert abs(float(np.mean(np.abs(z) > Z975)) - 0.8) < 0.014


def test_sample_size_is_the_smallest_n_reaching_power() -> None:
    n = sample_size_proportions(0.10, 0.02)
    assert power_proportions(0.10, 0.12, n) >= 0.8 > power_proportions(0.10, 0.12, n - 1)


def test_bonferroni_over_k_minus_1_comparisons() -> None:
    assert sample_size_proportions(0.10, 0.02, k_arms=3) == sample_size_proportions(
        0.10, 0.02, alpha=0.025
    )
    assert sample_size_means(1.0, 0.5, k_arms=5) == sample_size_means(1.0, 0.5, alpha=0.0125)


def test_sample_size_means_textbook_value() -> None:
    # Cohen's d = 0.5 at alpha .05, power .8: 2 (1.959964 + 0.841621)^2 / 0.25 = 62.79 -> 63.
    assert math.ceil(2 * (Z975 + Z80) ** 2 / 0.25) == 63
    assert sample_size_means(1.0, 0.5) == 63
    assert sample_size_means(2.0, -1.0) == 63


def test_power_under_the_null_is_alpha() -> None:
    assert power_proportions(0.3, 0.3, 500) == pytest.approx(0.05, rel=1e-9)
    assert power_proportions(0.3, 0.3, 500, k_arms=3) == pytest.approx(0.025, rel=1e-9)


@given(st.floats(0.01, 0.5), st.floats(0.001, 0.2), st.integers(10, 100_000))
def test_power_increases_with_n(p: float, d: float, n: int) -> None:
    assert power_proportions(p, p + d, 2 * n) >= power_proportions(p, p + d, n)


def test_samples_still_needed() -> None:
    assert samples_still_needed([100, 250, 199.5], 200) == stats.Remaining((100, 0, 1), 101)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"p_control": 0.0, "mde": 0.01},
        {"p_control": 0.1, "mde": 0.0},
        {"p_control": 0.95, "mde": 0.1},
        {"p_control": 0.1, "mde": 0.01, "alpha": 1.0},
        {"p_control": 0.1, "mde": 0.01, "power": 0.0},
        {"p_control": 0.1, "mde": 0.01, "k_arms": 1},
        {"p_control": 0.1, "mde": math.nan},
    ],
)
def test_sample_size_proportions_rejects_bad_input(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        sample_size_proportions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sd", "mde"), [(0.0, 1.0), (-1.0, 1.0), (math.inf, 1.0), (1.0, 0.0), (1.0, math.nan)]
)
def test_sample_size_means_rejects_bad_input(sd: float, mde: float) -> None:
    with pytest.raises(ValueError):
        sample_size_means(sd, mde)


@pytest.mark.parametrize(("pa", "pb", "n"), [(0.0, 0.1, 10), (0.1, 1.0, 10), (0.1, 0.2, 0)])
def test_power_proportions_rejects_bad_input(pa: float, pb: float, n: float) -> None:
    with pytest.raises(ValueError):
        power_proportions(pa, pb, n)


@pytest.mark.parametrize(("n", "req"), [([], 10), ([-1], 10), ([5], -1)])
def test_samples_still_needed_rejects_bad_input(n: list[float], req: int) -> None:
    with pytest.raises(ValueError):
        samples_still_needed(n, req)


# ----------------------------------------------------------------------------------------
# lift
# ----------------------------------------------------------------------------------------


def test_lift_absolute_interval_matches_scipy_welch_interval() -> None:
    rng = np.random.default_rng(8)
    t, c = rng.normal(10.5, 3.0, 400), rng.normal(10.0, 2.0, 250)
    ref = sst.ttest_ind(t, c, equal_var=False).confidence_interval(0.95)
    r = lift(t.mean(), t.var(ddof=1), t.size, c.mean(), c.var(ddof=1), c.size)
    assert r.absolute.estimate == pytest.approx(t.mean() - c.mean(), rel=1e-12)
    assert (r.absolute.lower, r.absolute.upper) == pytest.approx(
        (float(ref.low), float(ref.high)), rel=1e-9
    )
    assert r.absolute.level == 0.95


def test_lift_relative_delta_interval_covers_at_nominal_rate() -> None:
    # Normal data summarized exactly: mean ~ N(mu, sd^2/n), var ~ sd^2 chi2_{n-1}/(n-1).
    # 4,000 replicates: coverage SE = sqrt(0.95 * 0.05 / 4000) = 0.0034; 5 SE = 0.017.
    rng = np.random.default_rng(9)
    reps, n, sd = 4000, 2000, 3.0
    mt = rng.normal(11.0, sd / math.sqrt(n), reps)
    mc = rng.normal(10.0, sd / math.sqrt(n), reps)
    vt = sd**2 * rng.chisquare(n - 1, reps) / (n - 1)
    vc = sd**2 * rng.chisquare(n - 1, reps) / (n - 1)
    hits = 0
    for i in range(reps):
        rel = lift(mt[i], vt[i], n, mc[i], vc[i], n).relative
        hits += rel.lower <= 0.1 <= rel.upper
    assert abs(hits / reps - 0.95) < 0.017


def test_proportion_difference_is_agresti_caffo() -> None:
    """By hand: 7/40 vs 2/40 -> adjusted 8/42 and 3/42, Wald on those."""
    iv = proportion_difference(7, 40, 2, 40, alpha=0.1)
    pt, pc = 8 / 42, 3 / 42
    half = sst.norm.isf(0.05) * math.sqrt(pt * (1 - pt) / 42 + pc * (1 - pc) / 42)
    assert iv.estimate == pytest.approx(7 / 40 - 2 / 40)
    assert (iv.lower, iv.upper, iv.level) == pytest.approx((pt - pc - half, pt - pc + half, 0.9))
    none = proportion_difference(0, 200, 0, 200)
    assert none.lower < 0.0 < none.upper  # Wald's would be [0, 0]
    # Rates differ by at most 1: 0/10 vs 10/10 (adjusted 1/12 vs 11/12) is clipped.
    assert proportion_difference(0, 10, 10, 10).lower == -1.0
    with pytest.raises(ValueError):
        proportion_difference(5, 4, 0, 10)


def test_proportion_difference_keeps_its_level_where_wald_does_not() -> None:
    """Rates 0.05 vs 0.01 at 100 each, 4,000 seeded replicates: coverage SE =
    sqrt(0.95 * 0.05 / 4000) = 0.0034. Agresti-Caffo must not fall below 95% by more than
    5 SE (0.017); Wald's interval, which the report used before, covers ~92% here."""
    rng = np.random.default_rng(30)
    reps, n, pt, pc = 4000, 100, 0.05, 0.01
    xt, xc = rng.binomial(n, pt, reps), rng.binomial(n, pc, reps)
    hits = sum(
        iv.lower <= pt - pc <= iv.upper
        for iv in (proportion_difference(a, n, b, n) for a, b in zip(xt, xc, strict=True))
    )
    assert hits / reps >= 0.95 - 0.017


def test_lift_relative_delta_method_by_hand() -> None:
    r = lift(0.12, 0.1056, 10_000, 0.10, 0.09, 10_000, alpha=0.10).relative
    se = math.sqrt(0.1056 / 10_000 / 0.01 + 0.09 / 10_000 * 0.0144 / 1e-4)
    assert r.estimate == pytest.approx(0.2, rel=1e-12)
    assert r.upper - r.estimate == pytest.approx(1.644854 * se, rel=1e-6)
    assert r.level == pytest.approx(0.90)


def test_lift_degenerate_cases() -> None:
    r = lift(1.0, 0.0, 10, 0.0, 0.0, 10)
    assert (r.absolute.lower, r.absolute.upper) == (1.0, 1.0)
    assert math.isnan(r.relative.estimate) and math.isnan(r.relative.upper)


@pytest.mark.parametrize(
    "case",
    [
        (1.0, 1.0, 1, 1.0, 1.0, 10, 0.05),
        (1.0, -1.0, 10, 1.0, 1.0, 10, 0.05),
        (1.0, 1.0, 10, 1.0, 1.0, 10, 0.0),
    ],
)
def test_lift_rejects_bad_input(case: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        lift(*case)


# ----------------------------------------------------------------------------------------
# Bayesian summaries
# ----------------------------------------------------------------------------------------


def test_beta_interval_against_scipy_and_uniform() -> None:
    iv = beta_interval(1.0, 1.0)
    assert (iv.lower, iv.upper) == pytest.approx((0.025, 0.975), rel=1e-12)
    iv = beta_interval(21.0, 181.0, level=0.9)
    assert iv.estimate == pytest.approx(21 / 202)
    assert (iv.lower, iv.upper) == pytest.approx(sst.beta.interval(0.9, 21, 181), rel=1e-12)


@pytest.mark.parametrize(("a", "b", "level"), [(0, 1, 0.9), (1, -1, 0.9), (1, 1, 1.0), (1, 1, 0)])
def test_beta_interval_rejects_bad_input(a: float, b: float, level: float) -> None:
    with pytest.raises(ValueError):
        beta_interval(a, b, level)


def test_credible_interval_from_draws_matches_beta_quantiles() -> None:
    # Sample quantile SE = sqrt(q(1-q)/D) / f(x_q); tolerance 5 SE.
    d, a, b = 100_000, 30.0, 70.0
    draws = np.random.default_rng(10).beta(a, b, size=(d, 2))
    ivs = credible_interval(draws, level=0.95)
    assert len(ivs) == 2
    for q, got in ((0.025, ivs[0].lower), (0.975, ivs[1].upper)):
        x = float(sst.beta.ppf(q, a, b))
        se = math.sqrt(q * (1 - q) / d) / float(sst.beta.pdf(x, a, b))
        assert abs(got - x) < 5 * se
    # Posterior mean SE = sd / sqrt(D), sd of Beta(30, 70) = sqrt(ab/((a+b)^2(a+b+1))).
    sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    assert abs(ivs[0].estimate - 0.3) < 5 * sd / math.sqrt(d)


def test_prob_best_and_expected_loss_match_normal_closed_forms() -> None:
    # Independent N(0, 1) and N(0.3, 1) arms; D = theta_1 - theta_0 ~ N(0.3, 2).
    # P(arm 1 best) = Phi(0.3 / sqrt 2); E[(D)+] = m Phi(m/s) + s phi(m/s).
    n = 200_000
    rng = np.random.default_rng(12)
    draws = np.column_stack((rng.normal(0.0, 1.0, n), rng.normal(0.3, 1.0, n)))
    m, s = 0.3, math.sqrt(2.0)
    p1 = float(sst.norm.cdf(m / s))
    pb = prob_best(draws)
    assert pb.sum() == pytest.approx(1.0)
    assert abs(pb[1] - p1) < 5 * math.sqrt(p1 * (1 - p1) / n)
    loss = expected_loss(draws)
    want = [
        m * sst.norm.cdf(m / s) + s * sst.norm.pdf(m / s),
        -m * sst.norm.cdf(-m / s) + s * sst.norm.pdf(m / s),
    ]
    # sd((D)+) <= sqrt(E[D^2]) = sqrt(m^2 + s^2).
    tol = 5 * math.sqrt(m * m + s * s) / math.sqrt(n)
    assert loss == pytest.approx(want, abs=tol)


def test_prob_best_splits_ties() -> None:
    draws = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert prob_best(draws).tolist() == [0.25, 0.5, 0.25]
    assert expected_loss(draws).tolist() == [1.0, 0.0, 0.5]


@given(st.integers(1, 50), st.integers(1, 6), st.integers(0, 2**32 - 1))
@settings(max_examples=50)
def test_prob_best_is_a_distribution_and_loss_nonnegative(d: int, k: int, seed: int) -> None:
    draws = np.random.default_rng(seed).integers(0, 3, size=(d, k)).astype(float)
    pb = prob_best(draws)
    assert pb.sum() == pytest.approx(1.0) and np.all(pb >= 0)
    assert np.all(expected_loss(draws) >= 0)


@pytest.mark.parametrize("draws", [[1.0, 2.0], [[1.0, math.nan]], np.empty((0, 2))])
def test_bayesian_summaries_reject_bad_draws(draws: ArrayLike) -> None:
    with pytest.raises(ValueError):
        prob_best(draws)
    with pytest.raises(ValueError):
        expected_loss(draws)
    with pytest.raises(ValueError):
        credible_interval(draws)


def test_credible_interval_rejects_bad_level() -> None:
    with pytest.raises(ValueError):
        credible_interval([[0.1, 0.2]], level=1.0)


# ----------------------------------------------------------------------------------------
# Stratified (epoch) estimates
# ----------------------------------------------------------------------------------------

# Simpson's paradox: a bandit starts 50/50 and moves 90% of traffic to A while a novelty
# effect fades and every arm's conversion rate drops. A beats B by 0.01 in both epochs.
#   epoch 1: A 5,000 at 0.10 -> 500, B 5,000 at 0.09 -> 450
#   epoch 2: A 9,000 at 0.05 -> 450, B 1,000 at 0.04 ->  40
SIMPSON_N = np.array([[5000.0, 5000.0], [9000.0, 1000.0]])
SIMPSON_RATES = np.array([[0.10, 0.09], [0.05, 0.04]])
SIMPSON_S = SIMPSON_N * SIMPSON_RATES


def test_stratified_means_resolve_simpsons_paradox() -> None:
    pooled = SIMPSON_S.sum(axis=0) / SIMPSON_N.sum(axis=0)
    assert pooled[1] > pooled[0]  # 490/6000 = 0.082 vs 950/14000 = 0.068: B looks better
    r = stratified_means(SIMPSON_S, SIMPSON_N)
    # Equal epoch traffic (10,000 each) -> weights 1/2: A = 0.075, B = 0.065.
    assert r.mean == pytest.approx((0.075, 0.065), rel=1e-12)
    assert r.mean[0] > r.mean[1]
    assert r.method == "epoch_stratified"


def test_stratified_se_matches_simulation() -> None:
    # True SE = sqrt(sum_e w_e^2 p(1-p)/n_e). The sample sd of 4,000 replicate estimates has
    # relative SE 1/sqrt(2 * 3999) = 0.011; tolerance 5 of those = 5.6%.
    rng = np.random.default_rng(13)
    w = np.array([[0.5], [0.5]])
    true_se = np.sqrt((w**2 * SIMPSON_RATES * (1 - SIMPSON_RATES) / SIMPSON_N).sum(axis=0))
    wins = rng.binomial(SIMPSON_N.astype(int), SIMPSON_RATES, size=(4000, 2, 2))
    est = np.array([stratified_means(x, SIMPSON_N).mean for x in wins])
    assert est.std(axis=0, ddof=1) == pytest.approx(true_se, rel=0.056)
    reported = np.array(stratified_means(wins[0], SIMPSON_N).se)
    # One replicate's plug-in SE: p-hat per cell has relative error ~ 1/sqrt(n p) <= 0.16
    # for the smallest cell (1000 x 0.04), diluted by the larger cells; 10% is > 3 sigma.
    assert reported == pytest.approx(true_se, rel=0.10)


def test_stratified_continuous_single_epoch_matches_raw_data() -> None:
    x = np.random.default_rng(14).normal(2.0, 1.5, 300)
    r = stratified_means([[x.sum()]], [[x.size]], [[(x * x).sum()]])
    assert r.mean[0] == pytest.approx(x.mean(), rel=1e-12)
    assert r.se[0] == pytest.approx(x.std(ddof=1) / math.sqrt(x.size), rel=1e-9)


def test_stratified_renormalizes_over_epochs_with_data_and_nan_for_empty_arm() -> None:
    # Arm 1 was switched off in epoch 2 and arm 2 never ran.
    r = stratified_means([[5.0, 4.0, 0.0], [30.0, 0.0, 0.0]], [[50, 50, 0], [100, 0, 0]])
    # Arm 0: both epochs carried 100 units -> weights 1/2 each: (0.1 + 0.3) / 2.
    assert r.mean[0] == pytest.approx(0.2)
    assert r.mean[1] == pytest.approx(0.08)
    assert math.isnan(r.mean[2]) and math.isnan(r.se[2])


def test_stratified_0_1_interval_covers_over_many_small_epochs() -> None:
    """50 epochs of 4 rewards per arm, rates 0.1 vs 0.3: the 95% interval covers the true
    difference in about 92% of runs (a shrunk centre, plus-two in every cell, covered in
    54%). With 400 seeded runs the observed share has sd sqrt(.92 * .08 / 400) = 0.014,
    so 0.88 is 2.9 sd below 0.92, and far above what a biased centre gives."""
    rng = np.random.default_rng(21)
    covered = 0
    runs = 400
    for _ in range(runs):
        counts = np.full((50, 2), 4.0)
        sums = np.stack([rng.binomial(4, 0.1, 50), rng.binomial(4, 0.3, 50)], axis=1)
        d = stratified_difference(sums.astype(float), counts, None, 1, 0).difference
        covered += d.lower <= 0.2 <= d.upper
    assert covered / runs >= 0.88


def test_stratified_difference_uses_only_epochs_where_both_arms_have_data() -> None:
    """Identical arms, base rate 0.10 then 0.05; A alone in epoch 2 (promoted). Per-arm
    stratified means cover different epochs (A 0.051, B 0.10); the difference is taken
    on epoch 1 alone, where both ran: exactly 0."""
    counts = [[1000.0, 1000.0], [100_000.0, 0.0]]
    sums = [[100.0, 100.0], [5000.0, 0.0]]
    means = stratified_means(sums, counts).mean
    # Epoch weights are all arms' traffic: 2,000 then 100,000.
    assert means[1] - means[0] == pytest.approx(0.1 - (2000 * 0.1 + 100_000 * 0.05) / 102_000)
    d = stratified_difference(sums, counts, None, 1, 0)
    assert d.epochs == 1 and d.difference.estimate == 0.0
    assert d.test.statistic == 0.0 and d.test.p_value == 1.0
    # A variant added in epoch 2, when the base rate had dropped: compared there only.
    added = stratified_difference(
        [[200.0, 0.0], [50.0, 50.0]], [[1000, 0], [1000, 1000]], None, 1, 0
    )
    assert added.epochs == 1 and added.difference.estimate == 0.0
    empty = stratified_difference([[1.0, 0.0]], [[10, 0]], None, 1, 0)
    assert empty.epochs == 0 and math.isnan(empty.difference.estimate)


def test_stratified_difference_matches_its_formula() -> None:
    """Three epochs, three arms (arm 2's traffic counts in the weights): the estimate
    sum_e w_e (m_1e - m_0e) with w_e = n_e / sum n_e, the variance sum_e w_e^2 (v_1e/n_1e
    + v_0e/n_0e) from each cell's sample variance, and the normal interval and p."""
    rng = np.random.default_rng(21)
    n = np.array([[30, 50, 20], [200, 100, 0], [40, 400, 60]], dtype=float)
    cells = [[rng.normal(1.0 + 0.1 * j, 2.0, int(n[e, j])) for j in range(3)] for e in range(3)]
    sums = [[c.sum() for c in row] for row in cells]
    sq = [[(c * c).sum() for c in row] for row in cells]
    d = stratified_difference(sums, n, sq, 1, 0, alpha=0.1)
    w = n.sum(axis=1) / n.sum()
    diff = sum(w[e] * (cells[e][1].mean() - cells[e][0].mean()) for e in range(3))
    var = sum(
        w[e] ** 2 * (cells[e][1].var(ddof=1) / n[e, 1] + cells[e][0].var(ddof=1) / n[e, 0])
        for e in range(3)
    )
    assert d.epochs == 3
    assert d.difference.estimate == pytest.approx(diff, rel=1e-12)
    half = sst.norm.isf(0.05) * math.sqrt(var)
    assert (d.difference.lower, d.difference.upper) == pytest.approx(
        (diff - half, diff + half), rel=1e-9
    )
    assert d.test.statistic == pytest.approx(diff / math.sqrt(var), rel=1e-9)
    assert d.test.p_value == pytest.approx(2 * sst.norm.sf(abs(diff / math.sqrt(var))), rel=1e-9)


def test_stratified_z_keeps_its_level_where_the_pooled_test_is_fooled() -> None:
    """A/A under Simpson's setting (SIMPSON_N traffic, both arms at 0.10 then 0.05): the
    pooled chi-square sees B ahead (its traffic sits in the better epoch) and rejects in
    most runs; the stratified z compares within epochs and rejects at its nominal 5%.
    400 seeded runs: the rejection count is Binomial(400, 0.05), sd 4.4, so 20 +- 13
    (3 sd) bounds it; pooled bias 0.082 - 0.068 = 0.014 at its se ~0.004 rejects > 90%."""
    rng = np.random.default_rng(22)
    rates = np.array([[0.10, 0.10], [0.05, 0.05]])
    strat = pooled = 0
    for _ in range(400):
        wins = rng.binomial(SIMPSON_N.astype(int), rates).astype(float)
        strat += stratified_difference(wins, SIMPSON_N, None, 1, 0).test.p_value < 0.05
        pooled += chi_square(wins.sum(axis=0), SIMPSON_N.sum(axis=0)).p_value < 0.05
    assert 7 <= strat <= 33
    assert pooled > 360


def test_stratified_z_keeps_its_level_with_a_starved_arm_at_a_low_rate() -> None:
    """A/A at rate 0.02: 2,000 each in epoch 1, then the challenger starved (100 of
    20,100) while the weights favour that epoch. The small cell has no success in 13% of
    runs (0.98**100); its plug-in variance is then 0, and a test built on those rejected
    61 of these 400 seeded runs. Under the null each epoch's variance is that of the
    pooled rate (Cochran-Mantel-Haenszel): its rate here is 4.9% (20,000 runs, not part
    of the test), so 400 runs reject Binomial(400, 0.049) times: 20 +- 13 (3 sd)."""
    rng = np.random.default_rng(23)
    n = np.array([[2000.0, 2000.0], [20000.0, 100.0]])
    rejected = sum(
        stratified_difference(
            rng.binomial(n.astype(int), 0.02).astype(float), n, None, 1, 0
        ).test.p_value
        < 0.05
        for _ in range(400)
    )
    assert 7 <= rejected <= 33


def test_stratified_interval_of_binary_rewards_keeps_spread_and_bounds() -> None:
    """No success at all: the plus-two proportions still give an interval around 0; a
    certain difference (all vs none) stays within [-1, 1]."""
    none = stratified_difference([[0.0, 0.0]], [[50, 50]], None, 1, 0)
    assert none.difference.lower < 0.0 < none.difference.upper
    assert math.isnan(none.test.statistic)  # no evidence either way: the pooled rate is 0
    full = stratified_difference([[0.0, 5.0]], [[5, 5]], None, 1, 0)
    assert full.difference.estimate == 1.0 and full.difference.upper <= 1.0
    assert full.test.p_value < 0.01


def test_stratified_interval_is_nan_when_rewards_have_no_spread() -> None:
    """Constant rewards in every cell (1.0 vs 2.0): the variance is exactly 0, so there is
    no interval to give (NaN, as the docstring says), not (-inf, inf); the difference
    itself is certain and the z statistic infinite."""
    d = stratified_difference([[10.0, 20.0]], [[10, 10]], [[10.0, 40.0]], 1, 0)
    assert d.difference.estimate == 1.0
    assert math.isnan(d.difference.lower) and math.isnan(d.difference.upper)
    assert d.test.statistic == math.inf and d.test.p_value == 0.0


def test_stratified_single_observation_cell_borrows_arm_variance() -> None:
    r = stratified_means([[1.0, 5.0], [0.0, 5.0]], [[1, 10], [9, 10]])
    # Arm 0 overall: 1 success in 10 -> sample variance (1 - 1/10) / 9 = 0.1.
    # Epoch 2 cell: 0 successes in 9 -> variance 0. Weights 11/30, 19/30 (epoch totals).
    want = math.sqrt((11 / 30) ** 2 * 0.1 / 1)
    assert r.se[0] == pytest.approx(want, rel=1e-12)


@st.composite
def _binary_cells(
    draw: st.DrawFn, epochs: int, constant_shares: bool
) -> tuple[np.ndarray, np.ndarray]:
    k = draw(st.integers(1, 5))
    if constant_shares:
        per_epoch = draw(st.lists(st.integers(1, 50), min_size=epochs, max_size=epochs))
        share = draw(st.lists(st.integers(1, 20), min_size=k, max_size=k))
        n = np.outer(per_epoch, share).astype(float)
    else:
        n = np.array(
            draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k)), dtype=float
        ).reshape(1, k)
    frac = np.array(draw(st.lists(st.floats(0, 1), min_size=n.size, max_size=n.size)))
    s = np.floor(frac.reshape(n.shape) * n)
    return s, n


@given(_binary_cells(epochs=1, constant_shares=False))
def test_stratified_equals_pooled_with_one_epoch(cells: tuple[np.ndarray, np.ndarray]) -> None:
    s, n = cells
    assert stratified_means(s, n).mean == pytest.approx(tuple(s[0] / n[0]), rel=1e-12)


@given(_binary_cells(epochs=4, constant_shares=True))
def test_stratified_equals_pooled_when_shares_never_change(
    cells: tuple[np.ndarray, np.ndarray],
) -> None:
    # n_ek = m_e c_k: sum_e (n_e/N) s_ek/(m_e c_k) = sum_e s_ek / (N c_k / sum c) = S_k / N_k.
    s, n = cells
    pooled = s.sum(axis=0) / n.sum(axis=0)
    assert stratified_means(s, n).mean == pytest.approx(tuple(pooled), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(
    ("s", "n", "ss"),
    [
        ([[1.0, 2.0]], [[10.0, 10.0, 10.0]], None),  # shapes differ
        ([[11.0]], [[10.0]], None),  # not 0/1 without sums_sq
        ([[-1.0]], [[10.0]], None),
        ([[1.0]], [[0.0]], [[1.0]]),  # sums in an empty cell
        ([[1.0]], [[-1.0]], [[1.0]]),
        ([[1.0]], [[2.0]], [[1.0, 1.0]]),
        ([1.0], [2.0], None),  # not 2-D
        ([[math.nan]], [[2.0]], None),
    ],
)
def test_stratified_rejects_bad_input(
    s: list[list[float]], n: list[list[float]], ss: list[list[float]] | None
) -> None:
    with pytest.raises(ValueError):
        stratified_means(s, n, ss)


# ----------------------------------------------------------------------------------------
# Inverse-propensity weighting
# ----------------------------------------------------------------------------------------


def _simpson_log(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, ...]:
    """The Simpson scenario as a decision log: first half 50/50, second half 90/10."""
    half = rows // 2
    epoch = np.repeat([0, 1], [half, rows - half])
    share = np.array([[0.5, 0.5], [0.9, 0.1]])[epoch]
    arms = (rng.random(rows) >= share[:, 0]).astype(np.int64)
    rewards = (rng.random(rows) < SIMPSON_RATES[epoch, arms]).astype(float)
    return arms, rewards, share[np.arange(rows), arms]


def test_ipw_is_unbiased_under_shifting_allocation() -> None:
    # Truth: each arm's mean rate over the logged traffic, (0.10 + 0.05)/2 and (0.09 + 0.04)/2.
    # Average of 400 replicate logs: tolerance 5 * (sd of replicates) / sqrt(400).
    truth = np.array([0.075, 0.065])
    rng = np.random.default_rng(15)
    reps = 400
    ht, hj, ht_se, naive = (np.empty((reps, 2)) for _ in range(4))
    for i in range(reps):
        a, r, p = _simpson_log(rng, 2000)
        res = ipw_means(a, r, p, 2)
        ht[i], hj[i], ht_se[i] = res.horvitz_thompson.mean, res.hajek.mean, res.horvitz_thompson.se
        naive[i] = [r[a == 0].mean(), r[a == 1].mean()]
    tol = 5 * ht.std(axis=0, ddof=1) / math.sqrt(reps)
    assert np.all(np.abs(ht.mean(axis=0) - truth) < tol)
    assert np.all(np.abs(hj.mean(axis=0) - truth) < 5 * hj.std(axis=0, ddof=1) / math.sqrt(reps))
    # Per-arm means are biased toward the epoch where the arm got its traffic: B's expected
    # naive mean is (2500 * 0.09 + 500 * 0.04) / 3000 per 2000 rows = 0.0817, not 0.065.
    naive_se = naive.std(axis=0, ddof=1) / math.sqrt(reps)
    assert abs(naive.mean(axis=0)[1] - 0.245 / 3) < 5 * naive_se[1]
    assert abs(naive.mean(axis=0)[1] - truth[1]) > 5 * naive_se[1]  # fails the check HT passes
    # Reported SE vs replicate sd: the sd of 400 replicates has relative SE 0.035; 5 SE.
    assert ht_se.mean(axis=0) == pytest.approx(ht.std(axis=0, ddof=1), rel=0.18)


def test_ipw_ranks_the_simpson_arms_correctly() -> None:
    a, r, p = _simpson_log(np.random.default_rng(16), 200_000)
    res = ipw_means(a, r, p, 2)
    pooled = [r[a == 0].mean(), r[a == 1].mean()]
    assert pooled[1] > pooled[0]
    # Gap 0.01 vs SEs ~ 0.0012 (arm 1's HT term has variance ~0.38 / 200,000 rows).
    assert res.horvitz_thompson.mean[0] > res.horvitz_thompson.mean[1]
    assert res.hajek.mean[0] > res.hajek.mean[1]


def test_ipw_hand_example_and_unplayed_arm() -> None:
    res = ipw_means([0, 0, 1], [1.0, 0.0, 2.0], [0.5, 0.25, 0.5], 3)
    # HT: (1/0.5 + 0 + ...)/3 for arm 0 = 2/3; Hajek: 2 / (2 + 4) = 1/3. Arm 1: 4/3 and 2.
    assert res.horvitz_thompson.mean[:2] == pytest.approx((2 / 3, 4 / 3))
    assert res.hajek.mean[:2] == pytest.approx((1 / 3, 2.0))
    # Arm 2 was never played: no data, so NaN from both (not HT's empty-sum 0 +- 0).
    for est in (res.horvitz_thompson, res.hajek):
        assert math.isnan(est.mean[2]) and math.isnan(est.se[2])
        assert all(math.isfinite(v) for v in est.mean[:2] + est.se[:2])


def test_ipw_single_row_has_no_standard_error() -> None:
    res = ipw_means([0], [1.0], [0.5], 1)
    assert res.horvitz_thompson.mean == (2.0,)
    assert math.isnan(res.horvitz_thompson.se[0]) and math.isnan(res.hajek.se[0])


@pytest.mark.parametrize(
    ("arms", "rewards", "props", "k"),
    [
        ([0.0, 1.0], [1.0, 1.0], [0.5, 0.5], 2),  # float arms
        ([0, 2], [1.0, 1.0], [0.5, 0.5], 2),
        ([0, -1], [1.0, 1.0], [0.5, 0.5], 2),
        ([0, 1], [1.0], [0.5, 0.5], 2),
        ([0, 1], [1.0, 1.0], [0.0, 0.5], 2),
        ([0, 1], [1.0, 1.0], [0.5, 1.5], 2),
        ([0, 1], [1.0, math.nan], [0.5, 0.5], 2),
        ([], [], [], 2),
        ([0], [1.0], [1.0], 0),
    ],
)
def test_ipw_rejects_bad_input(
    arms: list[int], rewards: list[float], props: list[float], k: int
) -> None:
    with pytest.raises(ValueError):
        ipw_means(arms, rewards, props, k)


def test_normal_gamma_interval_matches_draws_of_the_posterior() -> None:
    """The Student t marginal against the hierarchical sampler it summarizes: tau ~
    Gamma(shape, rate), mu | tau ~ N(mu_n, 1 / (kappa tau)). With 400,000 draws the
    empirical 2.5% quantile has sd sqrt(q (1 - q) / n) / f(x_q) ~ 1.3% of the t scale here;
    5 of those is the tolerance (a false failure < 1e-6)."""
    mu, kappa, shape, rate = 3.0, 12.0, 4.5, 2.0
    iv = stats.normal_gamma_interval(mu, kappa, shape, rate, level=0.95)
    rng = np.random.default_rng(11)
    tau = rng.gamma(shape, 1.0 / rate, 400_000)
    draws = rng.normal(mu, 1.0 / np.sqrt(kappa * tau))
    lo, hi = np.quantile(draws, [0.025, 0.975])
    scale = math.sqrt(rate / (shape * kappa))
    density = sst.t.pdf(sst.t.ppf(0.975, 2 * shape), 2 * shape) / scale
    tol = 5 * math.sqrt(0.025 * 0.975 / draws.size) / density
    assert iv.estimate == mu
    assert iv.lower == pytest.approx(lo, abs=tol) and iv.upper == pytest.approx(hi, abs=tol)
    assert iv.upper - mu == pytest.approx(mu - iv.lower, rel=1e-12)  # symmetric


@pytest.mark.parametrize("bad", [dict(kappa=0.0), dict(shape=-1.0), dict(rate=math.nan)])
def test_normal_gamma_interval_rejects_bad_parameters(bad: dict[str, float]) -> None:
    params = dict(mu=0.0, kappa=1.0, shape=1.0, rate=1.0) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        stats.normal_gamma_interval(**params)


def test_policy_credible_intervals_are_the_exact_posterior_quantiles() -> None:
    from allocator.policies import PolicyConfig, RewardKind, make_policy

    counts = np.array([[100.0, 12.0, 12.0], [0.0, 0.0, 0.0], [40.0, 30.0, 30.0]])
    beta = make_policy(PolicyConfig(prior_alpha=1.0, prior_beta=2.0), 3)
    for (n, s, _), iv in zip(counts, beta.credible_intervals(counts, 0.9), strict=True):
        lo, hi = sst.beta.ppf([0.05, 0.95], 1.0 + s, 2.0 + n - s)
        assert (iv.lower, iv.upper) == pytest.approx((lo, hi), rel=1e-12)
    x = np.random.default_rng(5).normal(2.0, 0.5, 50)
    normal = make_policy(PolicyConfig(reward=RewardKind.NORMAL), 1)
    (iv,) = normal.credible_intervals(np.array([[x.size, x.sum(), (x * x).sum()]]), 0.95)
    # The default prior (mean 0, kappa 1e-3, shape 1, rate 1) updated by the 50 rewards.
    k0 = 1e-3
    kappa_n = k0 + x.size
    mu_n = x.sum() / kappa_n
    shape_n = 1.0 + x.size / 2
    rate_n = 1.0 + 0.5 * ((x - x.mean()) ** 2).sum() + 0.5 * k0 * x.size * x.mean() ** 2 / kappa_n
    half = sst.t.ppf(0.975, 2 * shape_n) * math.sqrt(rate_n / (shape_n * kappa_n))
    assert (iv.lower, iv.upper) == pytest.approx((mu_n - half, mu_n + half), rel=1e-9)


# ----------------------------------------------------------------------------------------
# Sequential SRM
# ----------------------------------------------------------------------------------------


def _srm_run(rng: np.random.Generator, bias: np.ndarray, segments: int, per: int) -> list[float]:
    """Running max of log e after each segment; the split moves every segment (TABLE mode
    with refreshes), decisions are drawn from split * bias."""
    k = bias.size
    obs, exp, log_e, peak, path = np.zeros(k), np.zeros(k), 0.0, 0.0, []
    for _ in range(segments):
        shares = rng.dirichlet(np.full(k, 5.0))
        seg = rng.multinomial(per, shares * bias / (shares * bias).sum()).astype(float)
        log_e = stats.srm_e_step(log_e, obs, exp, seg, shares)
        peak = max(peak, log_e)
        path.append(peak)
        obs += seg
        exp += per * shares
    return path


def test_sequential_srm_false_alarms_stay_below_alpha_at_every_look() -> None:
    """A/A with the split moving every segment, read after each of 100 segments. Ville's
    inequality bounds P(ever crossing 1/alpha) by alpha = 0.05: over 400 seeded runs the
    count of runs ever flagged is at most Binomial(400, 0.05), mean 20, sd 4.4, and 37 is
    mean + 3.9 sd (false-fail chance < 1e-4). The one-look chi-square, read at the same
    100 looks, crosses 0.05 in far more runs: the peeking the sequential test is for."""
    alarms = peeking = 0
    for seed in range(400):
        rng = np.random.default_rng(seed)
        path = _srm_run(rng, np.ones(3), segments=100, per=500)
        alarms += path[-1] >= math.log(1 / 0.05)
    for seed in range(100):
        rng = np.random.default_rng(10_000 + seed)
        obs, exp = np.zeros(3), np.zeros(3)
        for _ in range(100):
            shares = np.full(3, 1 / 3)
            obs += rng.multinomial(500, shares)
            exp += 500 * shares
            if stats.srm_against(obs, exp).p_value < 0.05:
                peeking += 1
                break
    assert alarms <= 37
    # Repeated chi-square looks: about 30-40% of runs cross 0.05 within 100 looks (the
    # law of the iterated logarithm); 20 of 100 is far above what 5% could give (P < 1e-6).
    assert peeking >= 20


def test_sequential_srm_detects_real_mismatches() -> None:
    """A 5% excess on one of 3 arms (shares moving) is found within 100,000 decisions in
    every one of 20 runs, and a decision to an arm with share 0 is found at once."""
    for seed in range(20):
        path = _srm_run(np.random.default_rng(seed), np.array([1.05, 1.0, 1.0]), 100, 1000)
        assert path[-1] >= math.log(1 / 0.001), seed
    assert stats.srm_e_step(0.0, [5, 5], [5, 5], [1, 1], [1.0, 0.0]) == math.inf


def test_sequential_srm_step_is_zero_for_a_perfect_or_empty_segment() -> None:
    # No history: the prediction is the split itself, every factor is exactly 1.
    assert stats.srm_e_step(0.7, [0, 0], [0, 0], [60, 40], [0.6, 0.4]) == pytest.approx(0.7)
    assert stats.srm_e_step(0.7, [9, 1], [5, 5], [0, 0], [0.5, 0.5]) == 0.7
    assert stats.sequential_p_value(math.inf) == 0.0
    with pytest.raises(ValueError, match="one entry per arm"):
        stats.srm_e_step(0.0, [1], [1, 1], [1, 1], [0.5, 0.5])


# ----------------------------------------------------------------------------------------
# Multiple comparisons
# ----------------------------------------------------------------------------------------


def _holm_by_definition(p: list[float]) -> list[float]:
    """Holm (1979) as usually stated: adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_holm_matches_its_definition_and_never_lowers_a_p_value(p: list[float]) -> None:
    adj = stats.holm(p)
    assert adj.tolist() == pytest.approx(_holm_by_definition(p), rel=1e-12, abs=1e-300)
    assert np.all(adj >= np.asarray(p)) and np.all(adj <= 1.0)


def test_holm_skips_nan_and_rejects_bad_input() -> None:
    adj = stats.holm([0.02, math.nan, 0.01])
    assert math.isnan(adj[1]) and adj[[0, 2]].tolist() == [0.02, 0.02]
    assert stats.holm([0.3]).tolist() == [0.3]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([0.5, 1.5])


def test_holm_keeps_the_family_wise_error_rate() -> None:
    """Five true nulls with independent uniform p-values: P(any adjusted <= 0.05) <= 0.05
    (Holm's theorem). Over 4,000 draws the count is at most Binomial(4000, 0.05), mean 200,
    sd 13.8; 245 is mean + 3.3 sd. Unadjusted, some p is below 0.05 in 1 - 0.95**5 = 22.6%
    of draws (mean 905, sd 26): 800 is 4 sd below that."""
    p = np.random.default_rng(8).uniform(size=(4000, 5))
    any_adjusted = sum(bool((stats.holm(row) <= 0.05).any()) for row in p)
    assert any_adjusted <= 245
    assert (p <= 0.05).any(axis=1).sum() > 800

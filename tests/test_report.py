"""build_report on an engine directly: estimates whose definition depends on the policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from allocator_client.v1 import allocator_pb2 as pb
from scipy import stats as sps

from allocator.engine import Engine, ExperimentConfig
from allocator.policies import PolicyConfig, PolicyKind
from allocator.report import (
    RANK_MIN_PER_VARIANT,
    build_report,
    common_window,
    power_analysis,
    rank_tests,
)
from allocator.stats import sample_size_proportions


def _run(kind: PolicyKind, decisions: int = 3000) -> Engine:
    """``decisions`` unary (exact-mode) decisions, each rewarded at once: 0.10 vs 0.12."""
    engine = Engine()
    engine.create(
        ExperimentConfig(name="x", variants=("a", "b"), policy=PolicyConfig(kind=kind), seed=1)
    )
    rng = np.random.default_rng(0)
    for _ in range(decisions):
        d = engine.assign("x")
        value = float(rng.random() < (0.10 if d.arm == 0 else 0.12))
        engine.reward_batch("x", [d.arm], [value], epochs=[d.epoch])
    return engine


def test_ipw_is_nan_where_an_index_policy_served_arms_outside_the_recorded_split() -> None:
    """UCB's decisions follow the index between refreshes, so arms get rewards in epochs
    whose recorded share for them is 0: no inverse propensity exists for those, and
    dropping them (the old estimate) silently biased ipw_mean."""
    engine = _run(PolicyKind.UCB1)
    view = engine.view("x")
    outside = (view.epoch_shares == 0) & (view.epoch_stats[:, :, 0] > 0)
    assert outside.any(axis=0).all()  # the situation arises for both arms
    report = build_report(engine, "x")
    assert all(math.isnan(v.ipw_mean) for v in report.variants)
    assert all(math.isfinite(v.mean) for v in report.variants)


def test_ipw_is_an_estimate_where_every_reward_had_a_share() -> None:
    engine = _run(PolicyKind.THOMPSON)
    view = engine.view("x")
    assert not ((view.epoch_shares == 0) & (view.epoch_stats[:, :, 0] > 0)).any()
    report = build_report(engine, "x")
    # Hajek over strata, by hand from the epoch cells.
    w = 1.0 / view.epoch_shares
    es = view.epoch_stats
    expected = (es[:, :, 1] * w).sum(axis=0) / (es[:, :, 0] * w).sum(axis=0)
    assert [v.ipw_mean for v in report.variants] == pytest.approx(expected.tolist())


def _rewarded(values_a: np.ndarray, values_b: np.ndarray) -> Engine:
    """A Thompson Bernoulli experiment with these rewards for a and b (epoch 0)."""
    engine = Engine()
    engine.create(ExperimentConfig(name="x", variants=("a", "b"), seed=1))
    arms = np.concatenate([np.zeros(values_a.size), np.ones(values_b.size)]).astype(np.int64)
    engine.reward_batch("x", arms, np.concatenate([values_a, values_b]))
    return engine


def _pooled(report: pb.GetReportResponse) -> list[pb.TestResult]:
    """The report's tests on pooled data (not the stratified family)."""
    return [t for t in report.tests if t.name != "stratified_z"]


def test_fractional_rewards_of_a_bernoulli_experiment_get_welch_not_chi_square() -> None:
    """Uniform rewards on [0, 1] and [0.1, 1] (means 0.50 and 0.55, sd 0.29 and 0.26),
    2,000 each. Summed as success counts, the chi-square treats them as 0/1 rewards with
    sd ~0.5, about twice the real one, and loses most of its power. The Welch t on the
    real variances expects the difference at 0.05 / sqrt(0.083/2000 + 0.068/2000) = 5.8
    standard errors (p ~ 1e-8); p < 1e-5 (|t| > 4.4) leaves 1.4 sd of room for the draw."""
    rng = np.random.default_rng(3)
    report = build_report(_rewarded(rng.uniform(0.0, 1.0, 2000), rng.uniform(0.1, 1.0, 2000)), "x")
    (test,) = _pooled(report)
    assert test.name == "welch_t"
    assert test.p_value < 1e-5


def test_two_constant_arms_that_differ_get_an_infinite_statistic_not_nan() -> None:
    """Zero variance on both sides and different means: t = +inf with p = 0, not a
    "statistic nan, p 0" that reads as a failed test."""
    # Binary fractions, so the sums of squares cancel exactly (see stats.moments).
    (test,) = _pooled(build_report(_rewarded(np.full(50, 0.25), np.full(50, 0.5)), "x"))
    assert test.name == "welch_t"
    assert test.statistic == math.inf and test.p_value == 0.0


def test_lift_of_binary_rewards_has_an_interval_without_successes() -> None:
    """0/200 vs 0/200: Wald's interval was [0, 0]; Agresti-Caffo's is +-0.0137."""
    row = build_report(_rewarded(np.zeros(200), np.zeros(200)), "x").variants[1]
    assert row.lift == 0.0
    assert row.lift_ci_low == pytest.approx(-0.013688, abs=1e-6)
    assert row.lift_ci_high == pytest.approx(0.013688, abs=1e-6)


def test_binary_rewards_of_a_bernoulli_experiment_get_the_chi_square() -> None:
    rng = np.random.default_rng(4)
    a = (rng.random(500) < 0.1).astype(float)
    b = (rng.random(500) < 0.2).astype(float)
    (test,) = _pooled(build_report(_rewarded(a, b), "x"))
    assert test.name == "pearson_chi2"


def test_rank_tests_match_scipy_and_are_holm_adjusted_among_themselves() -> None:
    rng = np.random.default_rng(5)
    control = rng.normal(0.0, 1.0, 300)
    shifted = rng.normal(0.4, 1.0, 300)  # 0.4 sd: clearly detected at n = 300
    same = rng.normal(0.0, 1.0, 300)
    few = rng.normal(5.0, 1.0, RANK_MIN_PER_VARIANT - 1)  # too few to test
    sample = (
        [(0, float(v)) for v in control]
        + [(1, float(v)) for v in shifted]
        + [(2, float(v)) for v in same]
        + [(3, float(v)) for v in few]
    )
    tests = rank_tests(["a", "b", "c", "d"], sample)
    assert [(t.name, t.variant) for t in tests] == [
        ("mann_whitney_u", "b"),
        ("mann_whitney_u", "c"),
    ]
    for t, values in zip(tests, (shifted, same), strict=True):
        ref = sps.mannwhitneyu(values, control, alternative="two-sided")
        assert t.statistic == pytest.approx(ref.statistic)
        assert t.p_value == pytest.approx(ref.pvalue)
    b, c = tests
    assert b.p_value < 1e-4
    assert b.p_value_adjusted == pytest.approx(2 * b.p_value)
    assert c.p_value_adjusted == pytest.approx(min(1.0, max(c.p_value, 2 * b.p_value)))
    assert rank_tests(["a", "b"], [(1, 1.0)] * 50) == []  # no control values


def test_the_rank_sample_is_the_span_every_replica_covers() -> None:
    """A busy replica's last 4 rewards span t = 7..10, a quiet one's t = 1..9, and one that
    stopped long ago has 4 rewards around t = -100; a replica with 2 rewards in all has
    its whole history. The sample is what was received from t = 7 on (the latest start of
    a full window), where every replica's rewards are complete."""
    windows = {
        "busy": [(0, 10.0, 10.0), (1, 9.0, 9.0), (0, 8.0, 8.0), (1, 7.0, 7.0)],
        "quiet": [(0, 9.5, 9.0), (1, 6.0, 6.0), (0, 3.0, 3.0), (1, 1.0, 1.0)],
        "gone": [(0, -1.0, -100.0), (0, -2.0, -101.0), (1, -3.0, -102.0), (1, -4.0, -103.0)],
        "new": [(0, 20.0, 8.5), (1, 21.0, 2.0)],
    }
    sample = common_window(windows, per_replica=4)
    assert sorted(sample) == sorted([(0, 10.0), (1, 9.0), (0, 8.0), (1, 7.0), (0, 9.5), (0, 20.0)])
    assert common_window({"only": [(0, 1.0, 5.0)]}, per_replica=4) == [(0, 1.0)]
    assert common_window({}, per_replica=4) == []


@pytest.mark.parametrize(
    ("rate", "effect", "p1", "p2"),
    [
        (0.97, 0.05, 0.97, 0.92),  # near 1 only a fall fits
        (0.60, 0.10, 0.60, 0.50),  # the fall, nearer 0.5, is the harder one
        (0.30, 0.10, 0.30, 0.40),  # the rise, nearer 0.5
    ],
)
def test_power_analysis_sizes_the_harder_change_that_can_happen(
    rate: float, effect: float, p1: float, p2: float
) -> None:
    """The two-sided test must see a change of min_effect either way; the sample size is
    that of the pair with the larger variance (the formula is symmetric in the pair)."""
    n = 1000
    a = np.zeros(n)
    a[: round(rate * n)] = 1.0
    engine = _rewarded(a, a.copy())
    spec = pb.ExperimentSpec(name="x", promotion=pb.PromotionSettings(min_effect=effect))
    got = power_analysis(engine, "x", spec)
    assert got is not None
    assert got.sample_size_per_variant == sample_size_proportions(p1, p2 - p1)

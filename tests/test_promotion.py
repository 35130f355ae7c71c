"""Tests for allocator.promotion: settings, each condition, futility, guardrails,
reproducibility, the always-valid pair test and its calibration under continuous monitoring."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as sps

from allocator import kernels
from allocator.policies import PolicyConfig, RewardKind
from allocator.promotion import (
    ALWAYS_VALID,
    EXPECTED_LOSS,
    FUTILITY,
    MIN_DURATION,
    MIN_SAMPLES,
    P_BEST,
    GuardrailCheck,
    PromotionDecision,
    PromotionSettings,
    decide_kernel,
    evaluate,
    pair_evidence,
    pair_lower_bound,
)
from benchmarks import promotion as bench

BERNOULLI = PolicyConfig()
NORMAL = PolicyConfig(reward=RewardKind.NORMAL)


def bern(*arms: tuple[float, float]) -> np.ndarray:
    """Sufficient statistics of 0/1 rewards from (n, successes) per arm."""
    return np.array([[n, s, s] for n, s in arms], dtype=np.float64)


# A clear winner: 0.100 vs 0.115 on 20,000 rewards each (z ~ 4.9).
CLEAR = bern((20_000, 2_000), (20_000, 2_300))
# Plausible but not proven: 0.100 vs 0.108 (z ~ 2.6): the plain Bayesian rule promotes it.
PLAUSIBLE = bern((20_000, 2_000), (20_000, 2_160))


# ---- settings --------------------------------------------------------------------------


def test_default_settings() -> None:
    s = PromotionSettings()
    assert s.p_best_threshold == 0.95
    assert s.error_rate == pytest.approx(0.05)
    assert s.min_samples_per_variant == 100
    assert s.expected_loss_tolerance is None and s.indifference_margin is None
    assert not s.futility_enabled
    assert PromotionSettings(min_effect=0.01, futility_probability=0.05).futility_enabled


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"p_best_threshold": 0.5}, ValueError),
        ({"p_best_threshold": 1.0}, ValueError),
        ({"p_best_threshold": math.nan}, ValueError),
        ({"expected_loss_tolerance": 0.0}, ValueError),
        ({"expected_loss_tolerance": math.inf}, ValueError),
        ({"indifference_margin": -0.1}, ValueError),
        ({"indifference_margin": math.nan}, ValueError),
        ({"min_samples_per_variant": -1}, ValueError),
        ({"min_samples_per_variant": 1.5}, TypeError),
        ({"min_samples_per_variant": True}, TypeError),
        ({"min_duration_seconds": -1.0}, ValueError),
        ({"min_effect": 0.0}, ValueError),
        ({"min_effect": 0.01, "futility_probability": 0.0}, ValueError),
        ({"min_effect": 0.01, "futility_probability": 1.0}, ValueError),
        ({"futility_probability": 0.05}, ValueError),  # needs min_effect
        ({"mc_draws": 99}, ValueError),
        ({"mc_draws": 1000.0}, TypeError),
        ({"always_valid": 1}, TypeError),
        ({"cs_prior_samples": 0.0}, ValueError),
    ],
)
def test_settings_reject_bad_values(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        PromotionSettings(**kwargs)  # type: ignore[arg-type]


def test_guardrail_degradation() -> None:
    up = GuardrailCheck(means=(0.50, 0.45), max_degradation=0.02)
    assert up.degradation(candidate=1, control=0) == pytest.approx(0.05)
    assert up.degradation(candidate=0, control=0) == 0.0
    latency = GuardrailCheck(
        means=(100.0, 104.0), max_degradation=0.05, lower_is_better=True, relative=True
    )
    assert latency.degradation(candidate=1, control=0) == pytest.approx(0.04)
    zero = GuardrailCheck(means=(0.0, 1.0, -1.0), max_degradation=0.1, relative=True)
    assert zero.degradation(candidate=1, control=0) == -math.inf  # better than a zero baseline
    assert zero.degradation(candidate=2, control=0) == math.inf


@pytest.mark.parametrize(
    "kwargs",
    [
        {"means": (1.0,), "max_degradation": 0.1},
        {"means": (1.0, math.nan), "max_degradation": 0.1},
        {"means": (1.0, 2.0), "max_degradation": -0.1},
        {"means": (1.0, 2.0), "max_degradation": math.inf},
    ],
)
def test_guardrail_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        GuardrailCheck(**kwargs)  # type: ignore[arg-type]


# ---- input validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "stats",
    [
        np.zeros((2, 2)),
        np.zeros((1, 3)),
        np.zeros(3),
        np.array([[10.0, 1.0, 1.0], [math.nan, 1.0, 1.0]]),
        np.array([[10.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]),
        np.array([[10.0, 1.0, 1.0], [10.0, 1.0, -1.0]]),
    ],
)
def test_evaluate_rejects_bad_stats(stats: np.ndarray) -> None:
    with pytest.raises(ValueError):
        evaluate(PromotionSettings(), stats, BERNOULLI, 0.0, 1)


def test_evaluate_rejects_bad_arguments() -> None:
    s = PromotionSettings()
    with pytest.raises(ValueError, match="age_seconds"):
        evaluate(s, CLEAR, BERNOULLI, -1.0, 1)
    with pytest.raises(ValueError, match="control"):
        evaluate(s, CLEAR, BERNOULLI, 0.0, 1, control=2)
    with pytest.raises(ValueError, match="variants"):
        evaluate(s, CLEAR, BERNOULLI, 0.0, 1, variants=["a"])
    with pytest.raises(TypeError, match="rng"):
        evaluate(s, CLEAR, BERNOULLI, 0.0, np.zeros(4))  # not a uint64 state
    with pytest.raises(TypeError, match="rng"):
        evaluate(s, CLEAR, BERNOULLI, 0.0, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        evaluate(s, CLEAR, BERNOULLI, 0.0, -1)
    with pytest.raises(ValueError, match="guardrail"):
        evaluate(
            s,
            CLEAR,
            BERNOULLI,
            0.0,
            1,
            guardrails={"x": GuardrailCheck(means=(1.0, 2.0, 3.0), max_degradation=0.1)},
        )
    with pytest.raises(TypeError, match="guardrail"):
        evaluate(s, CLEAR, BERNOULLI, 0.0, 1, guardrails={"x": (1.0, 2.0)})  # type: ignore[dict-item]


# ---- the conditions, one by one ------------------------------------------------------------


def test_clear_winner_is_promoted() -> None:
    d = evaluate(PromotionSettings(), CLEAR, BERNOULLI, 0.0, 3, variants=["control", "b"])
    assert d.action == "promote" and d.candidate == 1
    assert d.unmet == ()
    assert d.p_best[1] > 0.999 and d.p_best.sum() == pytest.approx(1.0)
    assert d.expected_loss[1] < d.expected_loss[0]
    # Default tolerance and margin: 1% of the leader's posterior mean.
    assert d.tolerance == pytest.approx(0.01 * 2_301 / 20_002)
    assert d.margin == d.tolerance
    assert d.lower_bounds[0] > -d.margin and math.isnan(d.lower_bounds[1])
    names = [r.split(":")[0] for r in d.reasons]
    assert names == [MIN_SAMPLES, MIN_DURATION, P_BEST, EXPECTED_LOSS, ALWAYS_VALID]
    assert any("b" in r for r in d.reasons)


def test_no_data_continues_without_candidate() -> None:
    d = evaluate(PromotionSettings(), np.zeros((3, 3)), BERNOULLI, 0.0, 1)
    assert d.action == "continue" and d.candidate is None
    assert set(d.unmet) == {MIN_SAMPLES, P_BEST, EXPECTED_LOSS, ALWAYS_VALID}


def _blocked_only_by(d: PromotionDecision, name: str) -> None:
    assert d.action == "continue"
    assert d.unmet == (name,)
    blocking = [r for r in d.reasons if r.endswith("(blocks promotion)")]
    assert len(blocking) == 1 and blocking[0].startswith(name)


def test_min_samples_blocks() -> None:
    d = evaluate(PromotionSettings(min_samples_per_variant=20_001), CLEAR, BERNOULLI, 0.0, 1)
    _blocked_only_by(d, MIN_SAMPLES)


def test_min_duration_blocks() -> None:
    s = PromotionSettings(min_duration_seconds=3600.0)
    _blocked_only_by(evaluate(s, CLEAR, BERNOULLI, 3599.0, 1), MIN_DURATION)
    assert evaluate(s, CLEAR, BERNOULLI, 3600.0, 1).action == "promote"


def test_p_best_blocks() -> None:
    # 0.100 vs 0.1056: z ~ 1.8, P(best) ~ 0.96 < 0.99; the loss tolerance is loose.
    stats = bern((20_000, 2_000), (20_000, 2_112))
    s = PromotionSettings(
        p_best_threshold=0.99,
        indifference_margin=0.0,
        expected_loss_tolerance=1.0,
        always_valid=False,
    )
    d = evaluate(s, stats, BERNOULLI, 0.0, 1)
    _blocked_only_by(d, P_BEST)
    assert 0.9 < d.p_within_margin[1] < 0.99
    assert (
        evaluate(dataclasses.replace(s, p_best_threshold=0.9), stats, BERNOULLI, 0.0, 1).action
        == "promote"
    )


def test_expected_loss_blocks() -> None:
    s = PromotionSettings(expected_loss_tolerance=1e-7, always_valid=False)
    d = evaluate(s, PLAUSIBLE, BERNOULLI, 0.0, 1)
    _blocked_only_by(d, EXPECTED_LOSS)
    assert d.expected_loss[1] > 1e-7


def test_always_valid_blocks_what_the_plain_rule_promotes() -> None:
    d = evaluate(PromotionSettings(), PLAUSIBLE, BERNOULLI, 0.0, 1)
    _blocked_only_by(d, ALWAYS_VALID)
    assert d.p_within_margin[1] > 0.99  # the Bayesian side is convinced
    assert d.lower_bounds[0] < -d.margin
    plain = evaluate(PromotionSettings(always_valid=False), PLAUSIBLE, BERNOULLI, 0.0, 1)
    assert plain.action == "promote" and plain.candidate == 1


def test_guardrail_blocks_and_passes() -> None:
    bad = GuardrailCheck(
        means=(100.0, 130.0), max_degradation=0.05, lower_is_better=True, relative=True
    )
    d = evaluate(PromotionSettings(), CLEAR, BERNOULLI, 0.0, 1, guardrails={"latency": bad})
    _blocked_only_by(d, "guardrail:latency")
    ok = GuardrailCheck(
        means=(100.0, 102.0), max_degradation=0.05, lower_is_better=True, relative=True
    )
    d = evaluate(PromotionSettings(), CLEAR, BERNOULLI, 0.0, 1, guardrails={"latency": ok})
    assert d.action == "promote" and any(r.startswith("guardrail:latency") for r in d.reasons)


def test_guardrail_compares_with_the_given_control() -> None:
    # Arm 1 is control; the candidate (arm 2) is worse than it on the guardrail.
    stats = bern((20_000, 2_500), (20_000, 2_000), (20_000, 2_300))
    stats[0] = [20_000, 1_500, 1_500]
    g = GuardrailCheck(means=(0.9, 0.9, 0.7), max_degradation=0.1)
    d = evaluate(PromotionSettings(), stats, BERNOULLI, 0.0, 1, control=1, guardrails={"ok": g})
    assert d.candidate == 2 and d.unmet == ("guardrail:ok",)


def test_normal_rewards() -> None:
    rng = np.random.default_rng(3)
    x0, x1 = rng.normal(10.0, 3.0, 20_000), rng.normal(10.4, 3.0, 20_000)
    stats = np.array([[x.size, x.sum(), (x * x).sum()] for x in (x0, x1)])
    d = evaluate(PromotionSettings(expected_loss_tolerance=0.05), stats, NORMAL, 0.0, 1)
    assert d.action == "promote" and d.candidate == 1


# ---- futility ---------------------------------------------------------------------------------

FUTILE = PromotionSettings(indifference_margin=0.0, min_effect=0.01, futility_probability=0.05)


def test_futility_stops_and_keeps_control() -> None:
    stats = bern((50_000, 5_000), (50_000, 5_000))
    d = evaluate(FUTILE, stats, BERNOULLI, 0.0, 1)
    assert d.action == "futility_stop" and d.candidate == 0
    assert d.reasons[-1].startswith(FUTILITY) and "stop" in d.reasons[-1]


def test_futility_waits_while_a_variant_may_still_win() -> None:
    # Variant ahead by 0.004: P(lift >= 0.01) is tiny, but the expected gain of continuing
    # (control's expected loss, ~0.004) exceeds the tolerance (~0.001).
    stats = bern((50_000, 5_000), (50_000, 5_200))
    d = evaluate(FUTILE, stats, BERNOULLI, 0.0, 1)
    assert d.action == "continue" and d.candidate == 1
    assert "keep learning" in d.reasons[-1]


def test_futility_needs_evidence_and_settings() -> None:
    small = bern((300, 30), (300, 30))
    assert evaluate(FUTILE, small, BERNOULLI, 0.0, 1).action == "continue"
    equal = bern((50_000, 5_000), (50_000, 5_000))
    off = PromotionSettings(indifference_margin=0.0)
    d = evaluate(off, equal, BERNOULLI, 0.0, 1)
    assert d.action == "continue" and not any(r.startswith(FUTILITY) for r in d.reasons)
    s = dataclasses.replace(FUTILE, min_samples_per_variant=60_000)
    assert evaluate(s, equal, BERNOULLI, 0.0, 1).action == "continue"


# ---- reproducibility and the simulation kernel ------------------------------------------------


def test_same_inputs_and_seed_give_the_same_decision() -> None:
    s = PromotionSettings(min_effect=0.01, futility_probability=0.05)
    a = evaluate(s, PLAUSIBLE, BERNOULLI, 5.0, 42)
    b = evaluate(s, PLAUSIBLE, BERNOULLI, 5.0, 42)
    assert (a.action, a.candidate, a.reasons, a.unmet) == (
        b.action,
        b.candidate,
        b.reasons,
        b.unmet,
    )
    for f in ("p_best", "expected_loss", "p_within_margin", "lower_bounds"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    c = evaluate(s, PLAUSIBLE, BERNOULLI, 5.0, 43)
    assert not np.array_equal(a.p_best, c.p_best)  # the seed drives the Monte Carlo


def test_rng_state_is_advanced_in_place() -> None:
    state = kernels.seed_state(9)
    copy = state.copy()
    first = evaluate(PromotionSettings(), CLEAR, BERNOULLI, 0.0, state)
    assert not np.array_equal(state, copy)
    again = evaluate(PromotionSettings(), CLEAR, BERNOULLI, 0.0, copy)
    np.testing.assert_array_equal(first.p_best, again.p_best)


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, PolicyConfig]:
    k = int(rng.integers(2, 6))
    normal = rng.random() < 0.3
    stats = np.zeros((k, 3))
    for a in range(k):
        n = int(rng.choice([0, 50, 150, 2_000, 20_000, 80_000]))
        if normal:
            x = rng.normal(1.0 + rng.normal(0, 0.02), 1.0, n)
            stats[a] = [n, x.sum(), (x * x).sum()]
        else:
            s = rng.binomial(n, 0.1 + rng.normal(0, 0.006)) if n else 0
            stats[a] = [n, s, s]
    return stats, (NORMAL if normal else BERNOULLI)


def test_kernel_decides_exactly_as_evaluate() -> None:
    rng = np.random.default_rng(2024)
    variants = [
        PromotionSettings(mc_draws=500),
        PromotionSettings(mc_draws=500, always_valid=False),
        PromotionSettings(mc_draws=500, indifference_margin=0.005, expected_loss_tolerance=0.002),
        PromotionSettings(
            mc_draws=500, indifference_margin=0.0, min_effect=0.01, futility_probability=0.1
        ),
    ]
    seen = set()
    for case in range(240):
        stats, policy = _random_case(rng)
        s = variants[case % len(variants)]
        d = evaluate(s, stats, policy, 0.0, case)
        kind = 0 if policy.reward == RewardKind.BERNOULLI else 1
        q = (
            (policy.prior_alpha, policy.prior_beta, 0.0, 0.0)
            if kind == 0
            else (policy.prior_mean, policy.prior_kappa, policy.prior_shape, policy.prior_rate)
        )
        code, cand = decide_kernel(
            kernels.seed_state(case),
            stats,
            kind,
            *q,
            s.p_best_threshold,
            -1.0 if s.expected_loss_tolerance is None else s.expected_loss_tolerance,
            -1.0 if s.indifference_margin is None else s.indifference_margin,
            float(s.min_samples_per_variant),
            s.always_valid,
            s.cs_prior_samples,
            s.mc_draws,
            0,
            s.min_effect or 0.0,
            s.futility_probability or 0.0,
        )
        action = {0: "continue", 1: "promote", 2: "futility_stop"}[code]
        assert action == d.action, (case, stats, d.reasons)
        if action != "continue":
            assert cand == d.candidate
        seen.add(action)
    assert seen == {"continue", "promote", "futility_stop"}  # every branch was exercised


# ---- the always-valid pair test ----------------------------------------------------------------


def _log_m(
    theta0: tuple[float, float],
    n: tuple[float, float],
    mean: tuple[float, float],
    var: tuple[float, float],
    c: float,
) -> float:
    """The one-sided mixture e-value at one null point, straight from its formula."""
    u = np.subtract(mean, theta0)
    nn, vv = np.array(n), np.array(var)
    quad = float(np.sum(nn**2 * u**2 / (2 * vv * (c + nn))) + 0.5 * np.sum(np.log(c / (c + nn))))
    m = nn[0] * u[0] / (c + nn[0]) - nn[1] * u[1] / (c + nn[1])
    s = math.sqrt(float(np.sum(vv / (c + nn))))
    return math.log(2.0) + quad + float(sps.norm.logcdf(m / s))


def _pair(x: np.ndarray) -> tuple[float, float]:
    return float(x[0]), float(x[1])


def test_pair_evidence_is_the_minimum_over_the_null() -> None:
    rng = np.random.default_rng(11)
    for _ in range(25):
        n = _pair(rng.integers(2, 5_000, size=2))
        var = _pair(rng.uniform(0.01, 2.0, size=2))
        mean = _pair(rng.normal(0.0, 0.3, size=2))
        c = float(rng.choice([1.0, 100.0, 1_000.0]))
        d0 = mean[0] - mean[1] - abs(float(rng.normal(0.0, 0.2)))
        ev = pair_evidence(n[0], mean[0], var[0], n[1], mean[1], var[1], d0, c)

        def on_null(
            z: np.ndarray,
            d0: float = d0,
            n: tuple[float, float] = n,
            mean: tuple[float, float] = mean,
            var: tuple[float, float] = var,
            c: float = c,
        ) -> float:
            gap = d0 - z[1] ** 2  # theta_0 - theta_1 <= d0
            return _log_m((z[0] + gap / 2, z[0] - gap / 2), n, mean, var, c)

        brute = min(
            optimize.minimize(
                on_null,
                x0=[(mean[0] + mean[1]) / 2 + dz, 0.01],
                method="Nelder-Mead",
                options={"xatol": 1e-12, "fatol": 1e-12, "maxiter": 20_000},
            ).fun
            for dz in (-0.1, 0.0, 0.1)
        )
        # The optimizer only ever finds points of the null, so it cannot go below the true min.
        assert ev == pytest.approx(brute, abs=1e-7)


def test_pair_evidence_edge_cases() -> None:
    assert pair_evidence(100.0, 0.1, 0.09, 100.0, 0.2, 0.09, -0.05, 100.0) == -math.inf
    assert pair_evidence(1.0, 0.9, 0.09, 100.0, 0.1, 0.09, 0.0, 100.0) == -math.inf
    more = [pair_evidence(1e4, 0.12, 0.1, 1e4, 0.10, 0.09, d0, 1e3) for d0 in (0.0, -0.01, -0.02)]
    assert more[0] < more[1] < more[2]  # the further the null, the stronger the evidence
    thr = math.log(20.0)
    lb = pair_lower_bound(1_000.0, 0.12, 0.1, 800.0, 0.10, 0.09, thr, 1_000.0)
    assert pair_evidence(1_000.0, 0.12, 0.1, 800.0, 0.10, 0.09, lb - 1e-9, 1_000.0) >= thr
    assert pair_evidence(1_000.0, 0.12, 0.1, 800.0, 0.10, 0.09, lb + 1e-6, 1_000.0) < thr
    assert pair_lower_bound(1.0, 0.1, 0.09, 100.0, 0.1, 0.09, thr, 100.0) == -math.inf


def test_pair_test_is_always_valid_under_adaptive_sampling() -> None:
    # True means sit exactly on the null boundary theta_0 - theta_1 = -0.1 (normal, sd 1,
    # known). Each look adds 25 rewards, 80% of them to whichever arm currently looks
    # better for arm 0: adaptive and adversarial. Ville: P(ever reject) <= alpha = 0.05.
    # 1000 runs: binomial sd sqrt(0.05 * 0.95 / 1000) = 0.0069; 3 sd above alpha is 0.071.
    rng = np.random.default_rng(5)
    runs, looks, per, alpha = 1_000, 200, 25, 0.05
    thr = math.log(1 / alpha)
    n = np.zeros((runs, 2))
    s = np.zeros((runs, 2))
    alive = np.ones(runs, dtype=bool)
    for _ in range(looks):
        mean = np.where(n > 0, s / np.maximum(n, 1), 0.0)
        favour0 = mean[:, 0] - mean[:, 1] >= -0.1
        k0 = rng.binomial(per, np.where(favour0, 0.8, 0.2))
        for arm, k, mu in ((0, k0, 0.0), (1, per - k0, 0.1)):
            # A sum of k N(mu, 1) draws is N(k mu, k).
            s[:, arm] += rng.normal(k * mu, np.sqrt(np.maximum(k, 1e-300)))
            n[:, arm] += k
        for r in np.flatnonzero(alive):
            m0, m1 = s[r, 0] / max(n[r, 0], 1), s[r, 1] / max(n[r, 1], 1)
            if pair_evidence(n[r, 0], m0, 1.0, n[r, 1], m1, 1.0, -0.1, 100.0) >= thr:
                alive[r] = False
    rate = 1.0 - alive.mean()
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)
    # Not vacuous: 0.2 away from the null (one arm far better), it rejects almost always.
    ev = pair_evidence(5_000.0, 0.2, 1.0, 5_000.0, 0.1, 1.0, -0.1, 100.0)
    assert ev > thr


# ---- calibration through the benchmark's simulation ---------------------------------------------

# 200 seeded runs per scenario; wrong promotions must stay at most alpha = 0.05 plus three
# binomial sd: sqrt(0.05 * 0.95 / 200) = 0.0154, so the bound is 0.05 + 0.046 = 0.096.
CAL_RUNS = 200
CAL_BOUND = 0.05 + 3 * math.sqrt(0.05 * 0.95 / CAL_RUNS)


def _wrong_rate(sc: bench.Scenario, *, always_valid: bool = True) -> tuple[float, float]:
    settings = bench.rule_settings(sc, always_valid=always_valid, mc_draws=500)
    runs = [
        bench.simulate_run(sc, settings, 17 + 7919 * i, first_only=True) for i in range(CAL_RUNS)
    ]
    return (
        sum(r.wrong for r in runs) / CAL_RUNS,
        sum(r.first_action == 1 for r in runs) / CAL_RUNS,
    )


def test_calibrated_when_the_gap_is_just_above_the_margin() -> None:
    # Least favourable: arm 0 is worse by 0.0155, just over the margin 0.014, and the budget
    # keeps the standard error near the margin, so the rule is tempted at every look.
    sc = bench.Scenario(
        "lf", "normal", (0.0, 0.0155), (1.0, 1.0), budget=20_000, margin=0.014, floor=0.125
    )
    wrong, _ = _wrong_rate(sc)
    assert wrong <= CAL_BOUND
    # The check has teeth: on the same streams the plain Bayesian rule (P(within margin) and
    # expected loss, no always-valid bound) fails it, by peeking.
    plain, _ = _wrong_rate(sc, always_valid=False)
    assert plain > CAL_BOUND


def test_calibrated_on_a_small_lift_and_decides() -> None:
    sc = bench.Scenario("lift", "bernoulli", (0.10, 0.12), budget=30_000, floor=0.1)
    wrong, promoted = _wrong_rate(sc)
    assert wrong <= CAL_BOUND
    # A fixed test needs 2 x 3,841 here; most runs decide well within 30,000.
    assert promoted >= 0.8


# ---- benchmark scenarios ----------------------------------------------------------------------


def test_lognormal_parameters_are_those_of_the_reward() -> None:
    sc = bench.Scenario("ln", "lognormal", (20.0, 5.0), (30.0, 2.0), budget=1_000)
    for a, (mean, sd) in enumerate(zip(sc.means, sc.sds, strict=True)):
        mu, sigma = sc.reward_params(False)[a]
        dist = sps.lognorm(s=sigma, scale=math.exp(mu))
        assert dist.mean() == pytest.approx(mean, rel=1e-12)
        assert dist.std() == pytest.approx(sd, rel=1e-12)


def test_default_scenario_file_loads(tmp_path: Path) -> None:
    scenarios = bench.load_scenarios(bench.DEFAULT_SCENARIOS)
    assert len(scenarios) >= 9 and any(s.change_at for s in scenarios)
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"scenarios": [{"name": "x", "reward": "bernoulli", "means": [0.1, 1.5]}]})
    )
    with pytest.raises(ValueError, match="bernoulli means"):
        bench.load_scenarios(bad)
    bad.write_text(
        json.dumps(
            {
                "scenarios": [
                    {"name": "x", "reward": "normal", "means": [1, 2], "sds": [1], "oops": 1}
                ]
            }
        )
    )
    with pytest.raises(ValueError, match="unknown keys"):
        bench.load_scenarios(bad)

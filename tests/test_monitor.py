"""Tests for allocator.monitor: detectors, ARL calibration, promotion monitor, webhook, drift."""

from __future__ import annotations

import http.server
import itertools
import json
import logging
import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from allocator.lifecycle import Action, Event, EventType
from allocator.monitor import (
    Cusum,
    CusumSettings,
    Direction,
    Moments,
    MonitorSettings,
    PageHinkley,
    PageHinkleySettings,
    PromotionMonitor,
    PsiLevel,
    Reaction,
    RunningStats,
    WebhookNotifier,
    cusum_arl,
    cusum_threshold_for_arl,
    holdout_z_test,
    ks_drift,
    make_detector,
    psi,
    webhook_payload,
)

# ---- Siegmund ARL approximation ------------------------------------------------------


def test_threshold_matches_published_values() -> None:
    # Montgomery (SQC, §9.1): k=0.5, h=5 gives a two-sided in-control ARL of ~465
    # (exact Markov-chain value); Siegmund's approximation is within a few percent of it.
    assert cusum_arl(5.0, 0.5, two_sided=True) == pytest.approx(465, rel=0.03)
    # h=4, k=0.5, one-sided shift of 1 sd: tabulated ARL1 ~ 8.4 (Siegmund 8.38).
    assert cusum_arl(4.0, 0.5, 1.0) == pytest.approx(8.38, abs=0.05)
    assert cusum_threshold_for_arl(1000.0, 0.5) == pytest.approx(5.063, abs=1e-3)


@pytest.mark.parametrize("k", [0.0, 1e-7, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("two_sided", [False, True])
def test_threshold_inverts_arl(k: float, two_sided: bool) -> None:
    for arl0 in (50.0, 370.0, 1e4, 1e6):
        h = cusum_threshold_for_arl(arl0, k, two_sided=two_sided)
        assert cusum_arl(h, k, two_sided=two_sided) == pytest.approx(arl0, rel=1e-8)


def test_arl_limits() -> None:
    # Delta = 0 gives b^2; the series branch must agree with the closed form nearby.
    b = 3.0 + 1.166
    assert cusum_arl(3.0, 0.0) == pytest.approx(b * b)
    assert cusum_arl(3.0, 1e-6) == pytest.approx(cusum_arl(3.0, 1e-3), rel=1e-2)
    assert cusum_arl(1e4, 1.0) == math.inf
    # Two-sided in control is half the one-sided ARL by symmetry.
    assert cusum_arl(4.0, 0.5, two_sided=True) == pytest.approx(cusum_arl(4.0, 0.5) / 2)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1.0, 0.5), {}), ((math.inf, 0.5), {}), ((100.0, -0.1), {}), ((100.0, math.nan), {})],
)
def test_threshold_rejects_bad_arguments(args: tuple[float, float], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        cusum_threshold_for_arl(*args, **kwargs)


@pytest.mark.parametrize(
    ("h", "k", "shift"), [(-1.0, 0.5, 0.0), (1.0, -1.0, 0.0), (1.0, 0.5, math.inf)]
)
def test_arl_rejects_bad_arguments(h: float, k: float, shift: float) -> None:
    with pytest.raises(ValueError):
        cusum_arl(h, k, shift)


def _run_lengths(
    det: Cusum | PageHinkley, rng: np.random.Generator, runs: int, chunk: int, offset: int = 0
) -> np.ndarray:
    out = np.empty(runs)
    for r in range(runs):
        det.reset()
        while det.update_many(rng.standard_normal(chunk)) is None:
            pass
        assert det.alarm_at is not None
        out[r] = det.alarm_at - offset
    return out


@pytest.mark.parametrize("k", [0.25, 0.5])
def test_cusum_arl0_matches_simulation(k: float) -> None:
    arl0 = 200.0
    h = cusum_threshold_for_arl(arl0, k)
    det = Cusum(CusumSettings(k=k, h=h, mean=0.0, sd=1.0))
    rl = _run_lengths(det, np.random.default_rng(11), runs=1000, chunk=800)
    # Run lengths are ~geometric (sd ~ mean), so the MC standard error of the mean is
    # rl.std()/sqrt(1000) ~ 6.3 (3%). Siegmund's approximation is within ~5% of exact
    # values for k in [0.25, 0.5] (Montgomery §9.1 comparisons): allow 4 SE + 5%.
    se = rl.std(ddof=1) / math.sqrt(rl.size)
    assert abs(rl.mean() - arl0) <= 4 * se + 0.05 * arl0


def test_cusum_false_alarm_rate_on_stationary_stream() -> None:
    arl0, k, n = 500.0, 0.5, 200_000
    h = cusum_threshold_for_arl(arl0, k, two_sided=True)
    det = Cusum(CusumSettings(k=k, h=h, direction=Direction.BOTH, mean=0.0, sd=1.0))
    x = np.random.default_rng(3).standard_normal(n)
    pos = alarms = 0
    while (i := det.update_many(x[pos:])) is not None:
        alarms += 1
        pos += i + 1
        det.reset()
    # Alarms form a renewal process: E[count] ~ n/ARL0 = 400 and, with ~geometric run
    # lengths (var ~ ARL0^2), Var[count] ~ n var/ARL0^3 = n/ARL0 = 400, sd 20.
    # 5 sd = 100, plus 5% (20) for the approximation error of ARL0 itself.
    assert abs(alarms - n / arl0) <= 5 * math.sqrt(n / arl0) + 0.05 * n / arl0


def test_page_hinkley_arl0_matches_cusum_approximation() -> None:
    # With the running mean settled PH is the CUSUM recursion with k = delta/sd, h = lam/sd.
    k, arl0, burn = 0.5, 500.0, 2000
    h = cusum_threshold_for_arl(arl0, k)
    det = PageHinkley(PageHinkleySettings(delta=k, lam=h, burn_in=burn))
    rl = _run_lengths(det, np.random.default_rng(5), runs=400, chunk=5000, offset=burn)
    # MC SE ~ 500/sqrt(400) = 25. Besides Siegmund's ~5%, the running mean after the burn-in
    # is off by ~1/sqrt(2000) = 0.022 sd, moving ln ARL by ~2b * 0.022 = 0.25 per run; by
    # Jensen that inflates the mean ARL by ~exp(0.25^2/2) - 1 = 3%. Allow 4 SE + 10%.
    se = rl.std(ddof=1) / math.sqrt(rl.size)
    assert abs(rl.mean() - arl0) <= 4 * se + 0.10 * arl0


# ---- detection of a Bernoulli mean drop ----------------------------------------------

P0, P1 = 0.10, 0.05


def _bernoulli_drop(seed: int, n0: int, n1: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate((rng.random(n0) < P0, rng.random(n1) < P1)).astype(np.float64)


def test_cusum_detects_bernoulli_drop_within_bound() -> None:
    sd = math.sqrt(P0 * (1 - P0))  # 0.3
    shift = (P0 - P1) / sd  # 0.167 sd
    k = shift / 2
    h = cusum_threshold_for_arl(10_000.0, k)  # ~28.7
    n0 = 500
    det = Cusum(CusumSettings(k=k, h=h, direction=Direction.DOWN, mean=P0, sd=sd))
    idx = det.update_many(_bernoulli_drop(2024, n0, 5000))
    assert idx is not None and idx >= n0, "no alarm, or a false alarm before the change"
    delay = idx - n0 + 1
    # After the change the increments -z - k have mean mu = shift - k = 0.083 and variance
    # p1(1-p1)/sd^2 = 0.53; the largest step is 1/3 - k, so by Wald E[delay] <= (h + step)/mu
    # (~347; starting above 0 only helps). The passage time is ~inverse Gaussian with
    # sd ~ sqrt(h var / mu^3) ~ 162: bound at mean + 5 sd (~1160).
    mu, var, step = shift - k, P1 * (1 - P1) / sd**2, (P0 / sd) - k
    bound = (h + step) / mu + 5 * math.sqrt(h * var / mu**3)
    assert delay <= bound
    # Pre-change: P(false alarm within 500 samples) ~ 500/ARL0 = 5% (fixed seed).


def test_page_hinkley_detects_bernoulli_drop_within_bound() -> None:
    sd = math.sqrt(P0 * (1 - P0))
    delta = 0.005 / sd  # in sd units, as the detector reads it
    lam = cusum_threshold_for_arl(1e5, delta)  # ~122 sd, ARL0 ~ 1e5 samples
    n0 = 5000
    det = PageHinkley(PageHinkleySettings(delta=delta, lam=lam, burn_in=1000))
    idx = det.update_many(_bernoulli_drop(2024, n0, 8000))
    assert idx is not None and idx >= n0
    delay = idx - n0 + 1
    # In the units of the burn-in's sd s (~0.3): the running mean lags, so during the
    # first n0 post-change samples it stays above (P0 + P1)/2 = 0.075 in expectation, and
    # the drift of zbar - z - delta is at least mu = (0.075 - 0.05)/s - delta ~ 0.067 with
    # variance p1(1-p1)/s^2 ~ 0.53. Mean delay <= lam/mu ~ 1830, sd ~ sqrt(lam var / mu^3)
    # ~ 466; mean + 5 sd ~ 4160 < n0 keeps the lower bound on the running mean valid.
    assert det.reference is not None
    s = det.reference[1]
    mu, var = ((P0 + P1) / 2 - P1) / s - delta, P1 * (1 - P1) / s**2
    bound = lam / mu + 5 * math.sqrt(lam * var / mu**3)
    assert bound < n0
    assert delay <= bound


# A Page-Hinkley with delta 0.5 and lambda 50 batch-sd (a high threshold: the supervisor's
# default is CUSUM's h, ~12), burn-in 200 batches of 100 rewards, on a champion converting
# at 11% (batch-mean sd 0.0313).
PH_RATE, PH_BATCH, PH_BURN = 0.11, 100, 200
PH_SETTINGS = MonitorSettings(
    detector=PageHinkleySettings(delta=0.5, lam=50.0, burn_in=PH_BURN), batch_size=PH_BATCH
)


def _ph_monitor(rng: np.random.Generator, batches: int) -> PromotionMonitor:
    """A monitor with PH_SETTINGS' Page-Hinkley, fed ``batches`` batches at PH_RATE."""
    mon = PromotionMonitor("exp", 1, settings=PH_SETTINGS)
    assert mon.observe_many(rng.random(batches * PH_BATCH) < PH_RATE, now=1.0) is None
    return mon


def test_page_hinkley_detects_drop_of_bernoulli_rewards_in_batch_sd() -> None:
    """Rewards falling from 11% to 0: flagged within the delay the walk's algebra gives.

    Once the rewards are all 0 every batch mean is 0 and z = -D exactly, D = m0/s from the
    burn-in reference (m0, s). With T the sum of z and tau their count at the change (the
    burn-in's z sum to 0), after j batches the running mean is (T - jD)/(tau + j), so the
    walk's increment zbar - z - delta is exactly (D tau + T)/(tau + j) - delta: no noise.
    While those are positive the walk (started at S >= 0) is at least their sum, so the
    alarm comes by the first m whose sum over j <= m exceeds lambda. A priori D ~ 0.11/0.0313
    = 3.5 (s is within 20% of the batch sd but with probability ~1e-4), |T|/tau is a few
    hundredths, so m ~ lambda / (D - delta) ~ 17 batches and surely under 30.
    In raw reward units (what the detector used to read) the increments were at most
    0.11 - 0.5 < 0: it never fired, however long the drop.
    """
    mon = _ph_monitor(np.random.default_rng(31), 2 * PH_BURN)
    det = mon.detector
    assert isinstance(det, PageHinkley) and det.reference is not None
    m0, s = det.reference
    state = det.state()
    big_d, total, tau = m0 / s, state["total"], state["count"]
    assert tau == 2 * PH_BURN
    walk, m = 0.0, 0
    while walk <= 50.0:
        m += 1
        step = (big_d * tau + total) / (tau + m) - 0.5
        assert step > 0
        walk += step
    assert m <= 30
    reg = None
    sent = 0
    while reg is None and sent < 500_000:
        reg = mon.observe_many(np.zeros(PH_BATCH), now=2.0)
        sent += PH_BATCH
    assert reg is not None and reg.kind == "drift"
    assert det.alarm_at is not None and det.alarm_at - 2 * PH_BURN <= m


def test_page_hinkley_stays_quiet_on_stationary_bernoulli_rewards() -> None:
    """500,000 rewards at a steady 11% after the burn-in: no alarm.

    Given the burn-in reference (m0, s), write r = s/sigma, eps = (m0 - mu)/sigma for the
    batch means' true mean mu and sd sigma, u_t their standardised values and U_t the sum
    of u over the watched batches. The walk's increment zbar_t - z_t - delta is then
    exactly (-u_t - k_t)/r with k_t = r delta - eps B/t - U_t/t, threshold lambda: in
    sigma units, a CUSUM on -u with allowance k_t and h = r lambda. Where |U_t| <= c t for
    every t it is below the CUSUM with the constant k = r delta - |eps| - c, whose run
    length is close to geometric with Siegmund's ARL0, so its alarm chance over n batches
    is about n / ARL0 at most (the batch means of a Bernoulli(0.11) have a lighter lower
    tail than the normal, so a downward walk alarms even less often). A Brownian motion
    crosses c (B + n) with probability exp(-2 c^2 B), hence
    P(false alarm) <~ 2 exp(-2 c^2 B) + n / ARL0(r lambda, k), computed below.
    """
    rng = np.random.default_rng(32)
    mon = _ph_monitor(rng, PH_BURN)
    det = mon.detector
    assert isinstance(det, PageHinkley) and det.reference is not None
    mu, sigma = PH_RATE, math.sqrt(PH_RATE * (1 - PH_RATE) / PH_BATCH)
    r, eps = det.reference[1] / sigma, (det.reference[0] - mu) / sigma
    c, n = 0.2, 5000
    k = r * 0.5 - abs(eps) - c
    bound = 2 * math.exp(-2 * c * c * PH_BURN) + n / cusum_arl(r * 50.0, k)
    assert bound < 1e-5
    for _ in range(n // 100):
        assert mon.observe_many(rng.random(100 * PH_BATCH) < PH_RATE, now=2.0) is None
    assert det.n == PH_BURN + n and not det.alarm


def test_page_hinkley_refuses_a_state_saved_in_raw_units() -> None:
    """An earlier version's state (a walk on raw values, no reference) cannot be continued
    in sd units: loading it raises, and the supervisor then starts a new burn-in."""
    det = PageHinkley(PageHinkleySettings())
    old = {"n": 500, "lo": 0.2, "hi": 0.0, "alarm_at": None, "total": 55.0, "count": 500.0}
    with pytest.raises(ValueError, match="raw units"):
        det.load_state(old)
    mon = PromotionMonitor("exp", 1, settings=PH_SETTINGS)
    state = mon.state()
    state["promoted"]["detector"] = old
    with pytest.raises(ValueError, match="raw units"):
        PromotionMonitor("exp", 1, settings=PH_SETTINGS).load_state(state)


# ---- detector mechanics --------------------------------------------------------------


def test_cusum_burn_in_estimates_reference() -> None:
    rng = np.random.default_rng(1)
    burn = rng.normal(3.0, 2.0, 500)
    det = Cusum(CusumSettings(k=0.5, h=5.0, burn_in=500))
    assert det.reference is None
    assert det.update_many(burn) is None
    assert det.reference == pytest.approx((burn.mean(), burn.std(ddof=1)))
    assert det.statistic == 0.0
    # A given mean is kept; only the sd is estimated.
    det2 = Cusum(CusumSettings(mean=0.0, burn_in=500))
    det2.update_many(burn)
    assert det2.reference is not None and det2.reference[0] == 0.0


def test_constant_burn_in_does_not_divide_by_zero() -> None:
    det = Cusum(CusumSettings(k=0.5, h=5.0, direction=Direction.BOTH, burn_in=10))
    det.update_many(np.zeros(10))
    assert det.update(0.0) is False
    assert det.update(1.0) is True  # any change from a constant stream alarms


@pytest.mark.parametrize(
    ("direction", "step", "alarms"),
    [
        (Direction.DOWN, -2.0, True),
        (Direction.DOWN, 2.0, False),
        (Direction.UP, 2.0, True),
        (Direction.UP, -2.0, False),
        (Direction.BOTH, 2.0, True),
        (Direction.BOTH, -2.0, True),
    ],
)
def test_directions(direction: Direction, step: float, alarms: bool) -> None:
    cu = Cusum(CusumSettings(k=0.5, h=4.0, direction=direction, mean=0.0, sd=1.0))
    ph = PageHinkley(
        PageHinkleySettings(delta=0.5, lam=4.0, direction=direction, burn_in=0, sd=1.0)
    )
    ph.update_many(np.zeros(1000))
    for det in (cu, ph):
        assert (det.update_many(np.full(20, step)) is not None) is alarms


def test_alarm_latches_until_reset() -> None:
    det = Cusum(CusumSettings(k=0.0, h=1.0, mean=0.0, sd=1.0))
    assert det.update_many([0.0, -0.5, -0.7, 5.0]) == 2
    assert (det.alarm, det.alarm_at, det.n) == (True, 3, 4)
    stat = det.statistic
    assert det.update(10.0) is True and det.statistic == stat
    assert det.update_many([1.0, 2.0]) == 0
    assert det.update_many([]) is None
    det.reset()
    assert (det.alarm, det.alarm_at, det.n, det.statistic) == (False, None, 0, 0.0)


def test_page_hinkley_running_mean_and_reset() -> None:
    det = PageHinkley(PageHinkleySettings(delta=0.0, lam=100.0, burn_in=2))
    det.update_many([1.0, 2.0, 3.0])
    assert det.running_mean == pytest.approx(2.0)
    # Third sample (after burn-in) is 1.0 above the running mean 2.0: the downward side stays 0.
    assert det.statistic == 0.0
    det.reset()
    assert (det.n, det.running_mean) == (0, 0.0)


_values = st.lists(st.floats(min_value=-5, max_value=5, allow_nan=False), max_size=60)


@settings(max_examples=200, deadline=None)
@given(
    xs=_values,
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=4),
    direction=st.sampled_from(list(Direction)),
    burn=st.integers(min_value=2, max_value=10),
    ph=st.booleans(),
)
def test_update_many_is_bitwise_update(
    xs: list[float], cuts: list[int], direction: Direction, burn: int, ph: bool
) -> None:
    def make() -> Cusum | PageHinkley:
        if ph:
            return PageHinkley(
                PageHinkleySettings(delta=0.1, lam=2.0, direction=direction, burn_in=burn)
            )
        return Cusum(CusumSettings(k=0.25, h=2.0, direction=direction, burn_in=burn))

    one, many = make(), make()
    flags = [one.update(x) for x in xs]
    bounds = [0, *sorted(min(c, len(xs)) for c in cuts), len(xs)]
    first: int | None = None
    for lo, hi in itertools.pairwise(bounds):
        idx = many.update_many(xs[lo:hi])
        if idx is not None and first is None:
            first = lo + idx
    assert first == (flags.index(True) if True in flags else None)
    assert (one.n, one.alarm_at, one.statistic) == (many.n, many.alarm_at, many.statistic)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": -0.1},
        {"h": 0.0},
        {"h": math.inf},
        {"sd": 0.0, "mean": 0.0},
        {"mean": math.nan, "sd": 1.0},
        {"burn_in": 1},
        {"burn_in": -1, "mean": 0.0, "sd": 1.0},
    ],
)
def test_cusum_settings_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CusumSettings(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"direction": "down", "mean": 0.0, "sd": 1.0}, TypeError),
        ({"burn_in": 2.5}, TypeError),
    ],
)
def test_cusum_settings_types(kwargs: dict[str, Any], exc: type) -> None:
    with pytest.raises(exc):
        CusumSettings(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"delta": -1.0}, ValueError),
        ({"lam": 0.0}, ValueError),
        ({"burn_in": -1}, ValueError),
        ({"burn_in": 1}, ValueError),
        ({"sd": 0.0}, ValueError),
        ({"sd": math.inf, "burn_in": 0}, ValueError),
        ({"burn_in": True}, TypeError),
        ({"direction": "up"}, TypeError),
    ],
)
def test_page_hinkley_settings_validation(kwargs: dict[str, Any], exc: type) -> None:
    with pytest.raises(exc):
        PageHinkleySettings(**kwargs)


def test_detectors_reject_bad_input() -> None:
    det = Cusum(CusumSettings(mean=0.0, sd=1.0))
    with pytest.raises(ValueError):
        det.update(math.nan)
    with pytest.raises(TypeError):
        det.update("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        det.update_many([0.0, math.inf])
    with pytest.raises(ValueError):
        det.update_many(np.zeros((2, 2)))
    assert det.n == 0
    with pytest.raises(TypeError):
        Cusum(PageHinkleySettings())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        PageHinkley(CusumSettings(mean=0.0, sd=1.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        make_detector(object())  # type: ignore[arg-type]
    assert isinstance(make_detector(PageHinkleySettings()), PageHinkley)


# ---- sufficient statistics and the holdout z test ------------------------------------


def test_running_stats_match_numpy() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(1e6, 3.0, 10_000)  # large offset: naive sum-of-squares would lose digits
    rs = RunningStats()
    rs.add_many(x[:3000])
    for v in x[3000:3010]:
        rs.add(float(v))
    rs.add_many(x[3010:])
    rs.add_many([])
    m = rs.moments()
    assert m.n == x.size
    assert m.mean == pytest.approx(x.mean(), rel=1e-14)
    assert m.variance == pytest.approx(x.var(ddof=1), rel=1e-9)
    assert RunningStats().variance == 0.0


def test_holdout_z_test_by_hand() -> None:
    p = Moments(4000, 0.085, 0.0778)
    q = Moments(2000, 0.100, 0.0900)
    t = holdout_z_test(p, q, margin=0.005, alpha=0.05)
    se = math.sqrt(0.0778 / 4000 + 0.09 / 2000)
    z = (0.085 - 0.100 + 0.005) / se
    assert (t.diff, t.se, t.z) == pytest.approx((-0.015, se, z))
    assert t.p_value == pytest.approx(sps.norm.cdf(z))  # z = -1.25, p = 0.106
    assert not t.regressed
    # Without the margin: z = -0.015 / 0.00803 = -1.87, p = 0.031 < 0.05.
    assert holdout_z_test(p, q, alpha=0.05).regressed
    same = holdout_z_test(Moments(10, 1.0, 0.0), Moments(10, 1.0, 0.0))
    assert (same.z, same.p_value, same.regressed) == (0.0, 0.5, False)
    worse = holdout_z_test(Moments(10, 0.0, 0.0), Moments(10, 1.0, 0.0))
    assert (worse.z, worse.regressed) == (-math.inf, True)


@pytest.mark.parametrize(
    ("kwargs", "p"),
    [({"margin": -0.1}, 10), ({"alpha": 0.0}, 10), ({"alpha": 1.0}, 10), ({}, 1)],
)
def test_holdout_z_test_validation(kwargs: dict[str, Any], p: int) -> None:
    with pytest.raises(ValueError):
        holdout_z_test(Moments(p, 0.1, 0.09), Moments(10, 0.1, 0.09), **kwargs)


@pytest.mark.parametrize(("n", "mean", "var"), [(-1, 0.0, 0.0), (1, math.nan, 0.0), (1, 0.0, -1.0)])
def test_moments_validation(n: int, mean: float, var: float) -> None:
    with pytest.raises(ValueError):
        Moments(n, mean, var)


# ---- promotion monitor ---------------------------------------------------------------


def test_monitor_detects_drop_on_batched_bernoulli_rewards() -> None:
    events: list[Event] = []
    mon = PromotionMonitor(
        "exp",
        1,
        holdout_variant=0,
        emit=events.append,
        settings=MonitorSettings(reaction=Reaction.ROLLBACK),
    )
    rewards = _bernoulli_drop(7, 10_000, 10_000)
    reg = None
    fed = 0
    for chunk in np.array_split(rewards, 200):  # 100 rewards per call, as a reward batch
        reg = mon.observe_many(chunk, now=1000.0 + fed)
        fed += chunk.size
        if reg is not None:
            break
    assert reg is not None and reg.kind == "drift"
    # Default: batches of 100 (sd 0.03), burn-in 50 batches, k = 0.5, ARL0 = 1e4 batches.
    # The drop is 0.05/0.03 = 1.67 batch sd: E[delay] = cusum_arl(h, 0.5, 1.67) ~ 7.3
    # batches, passage sd ~ sqrt(h/mu^3) ~ 2.1 -> mean + 5 sd ~ 18 batches. The sd is
    # estimated from 50 batch means (relative error ~ 1/sqrt(100) = 10%); a 3 SE low
    # estimate stretches h in raw units by 1.3x: bound 18 * 1.3 ~ 24 batches = 2400 rewards.
    assert 10_000 < fed <= 10_000 + 2400
    assert reg.samples == fed and reg.promoted_mean < P0
    assert (reg.reaction, reg.action) == (Reaction.ROLLBACK, Action.ROLLBACK)
    assert reg.statistic > reg.threshold
    assert [e.type for e in events] == [EventType.DRIFT_DETECTED, EventType.RETRAIN_REQUESTED]
    assert all(e.experiment == "exp" and e.variant == 1 for e in events)
    assert events[1].details["reaction"] == "rollback"
    assert json.loads(json.dumps(reg.details())) == reg.details()
    # Once triggered the monitor ignores data and reports nothing new.
    assert mon.triggered and mon.regression is reg
    assert mon.observe_many(np.zeros(10_000), now=9e9) is None
    assert len(events) == 2


@pytest.mark.parametrize(
    "detector",
    [
        CusumSettings(k=0.5, h=6.0, direction=Direction.DOWN, burn_in=30),
        PageHinkleySettings(delta=0.25, lam=5.0, burn_in=30),
    ],
    ids=["cusum", "page_hinkley"],
)
def test_monitor_restored_from_state_continues_exactly(
    detector: CusumSettings | PageHinkleySettings,
) -> None:
    """A monitor rebuilt from ``state()`` (through JSON, as the supervisor stores it) and fed
    what follows alarms at the same reward with the same statistics as the original: the
    burn-in reference, the walk, the unfinished batch and the holdout looks carry over, and
    so does the regression once there is one."""
    settings = MonitorSettings(detector=detector, batch_size=7, holdout_min_samples=50)
    rng = np.random.default_rng(12)
    original = PromotionMonitor("exp", 1, holdout_variant=0, settings=settings)
    # 300 rewards at 0.5 in chunks of 5: 42 batches of 7 (the 30-batch burn-in and some
    # watched) and a batch 6/7 full.
    for _ in range(60):
        original.observe_many((rng.random(7) < 0.5).astype(float)[:5], now=1.0)
        original.observe_many((rng.random(5) < 0.5).astype(float), now=1.0, holdout=True)
    restored = PromotionMonitor("exp", 1, holdout_variant=0, settings=settings)
    restored.load_state(json.loads(json.dumps(original.state())))
    assert restored.state() == original.state()
    assert restored.detector.n > 30 and restored.last_holdout_test is not None
    after = [(rng.random(5) < 0.1).astype(float) for _ in range(200)]  # a drop to 0.1
    outcomes = []
    for mon in (original, restored):
        seen = None
        for i, chunk in enumerate(after):
            reg = mon.observe_many(chunk, now=2.0)
            if reg is not None:
                seen = (i, reg.kind, reg.statistic, reg.samples, reg.promoted_mean)
                break
        outcomes.append(seen)
    assert outcomes[0] is not None and outcomes[0] == outcomes[1]
    # Triggered: the regression is part of the state, and a restored monitor stays quiet.
    again = PromotionMonitor("exp", 1, holdout_variant=0, settings=settings)
    again.load_state(json.loads(json.dumps(original.state())))
    assert again.triggered and again.regression == original.regression
    assert again.observe_many(np.zeros(50), now=3.0) is None


def test_monitor_holdout_comparison_flags_regression() -> None:
    rng = np.random.default_rng(8)
    # A reference equal to the true post-promotion mean keeps the drift detector quiet, so
    # only the holdout comparison can fire.
    det = CusumSettings(k=0.5, h=7.0, mean=0.08, sd=math.sqrt(0.08 * 0.92))
    mon = PromotionMonitor(
        "exp",
        2,
        holdout_variant=0,
        settings=MonitorSettings(detector=det, holdout_min_samples=1000, holdout_alpha=0.01),
    )
    reg = None
    n = 0
    while reg is None and n < 20_000:
        reg = mon.observe_many(rng.random(500) < 0.08, now=1.0)
        reg = reg or mon.observe_many(rng.random(500) < 0.10, now=1.0, holdout=True)
        n += 500
    # Looks at min(n) = 1000 * 2^j with alpha_j = 0.01 / 2^(j+1). At 16,000 per arm the
    # expected z is -0.02 / sqrt((0.0736 + 0.09)/16000) = -6.25 against a critical value of
    # -3.42 (alpha 3.1e-4): power ~ Phi(2.8) = 0.998, so detection by 16,000 (<= 20,000).
    assert reg is not None and reg.kind == "holdout"
    assert reg.holdout_mean is not None and reg.holdout_mean > reg.promoted_mean
    assert reg.p_value is not None and reg.p_value < 0.01
    test = mon.last_holdout_test
    assert test is not None and test.regressed and test.alpha <= 0.005
    assert reg.action is Action.REOPEN  # default reaction


def test_monitor_holdout_no_false_regression_on_equal_streams() -> None:
    rng = np.random.default_rng(9)
    mon = PromotionMonitor(
        "exp",
        1,
        holdout_variant=0,
        settings=MonitorSettings(
            detector=CusumSettings(k=0.5, h=50.0, mean=0.1, sd=0.3), holdout_min_samples=1000
        ),
    )
    for _ in range(64):
        assert mon.observe_many(rng.random(1000) < 0.1, now=1.0) is None
        assert mon.observe_many(rng.random(1000) < 0.1, now=1.0, holdout=True) is None
    # 7 looks (1000 ... 64,000) spending 0.01 * (1/2 + ... + 1/128) < 0.01 in total: by the
    # union bound P(any false regression) <= 1% (fixed seed).
    assert not mon.triggered


def test_monitor_holdout_margin_defaults_to_the_promotion_rules() -> None:
    """Unset, the margin is the promotion rule's default, 1% of the champion's mean: with
    none, a right promotion (within the margin, below the old champion) is rolled back
    sooner or later. A given margin is used as it is."""
    rng = np.random.default_rng(10)
    quiet = CusumSettings(k=0.5, h=50.0, mean=0.1, sd=0.3)
    for margin, expected in ((None, None), (0.002, 0.002)):
        mon = PromotionMonitor(
            "exp",
            1,
            holdout_variant=0,
            settings=MonitorSettings(detector=quiet, holdout_margin=margin),
        )
        mon.observe_many(rng.random(1000) < 0.1, now=1.0)
        mon.observe_many(rng.random(1000) < 0.1, now=1.0, holdout=True)
        test = mon.last_holdout_test
        assert test is not None
        want = 0.01 * mon.promoted_stats.mean if expected is None else expected
        assert test.margin == pytest.approx(want) and test.margin > 0


def test_monitor_look_schedule_spends_alpha() -> None:
    mon = PromotionMonitor(
        "exp",
        1,
        holdout_variant=0,
        settings=MonitorSettings(
            detector=CusumSettings(k=0.5, h=50.0, mean=0.5, sd=0.5),
            holdout_min_samples=100,
            holdout_alpha=0.02,
        ),
    )
    ones = np.ones(100)
    mon.observe_many(ones, now=1.0)
    assert mon.last_holdout_test is None  # holdout has no data yet
    mon.observe_many(np.r_[np.zeros(50), np.ones(50)], now=1.0, holdout=True)
    first = mon.last_holdout_test
    assert first is not None and first.alpha == pytest.approx(0.01)
    # One call crossing the looks at 200 and 400 spends only the first one's alpha (0.005)
    # and skips both.
    mon.observe_many(np.ones(400), now=1.0)
    mon.observe_many(np.r_[np.zeros(200), np.ones(200)], now=1.0, holdout=True)
    second = mon.last_holdout_test
    assert second is not None and second.alpha == pytest.approx(0.005)
    mon.observe_many(np.ones(300), now=1.0)
    mon.observe_many(np.r_[np.zeros(150), np.ones(150)], now=1.0, holdout=True)
    third = mon.last_holdout_test
    assert third is not None and third.alpha == pytest.approx(0.02 / 16)
    assert mon.promoted_stats.n == 800 and mon.holdout_stats.n == 800


def test_monitor_records_holdout_drift_and_single_observations() -> None:
    mon = PromotionMonitor(
        "exp",
        1,
        holdout_variant=0,
        settings=MonitorSettings(
            batch_size=1, detector=CusumSettings(k=0.5, h=3.0, mean=1.0, sd=1.0)
        ),
    )
    mon.observe_many(np.full(10, -5.0), now=1.0, holdout=True)
    assert mon.holdout_detector.alarm and not mon.triggered
    reg = None
    for _ in range(10):
        reg = reg or mon.observe(-5.0, now=2.0)
    assert reg is not None and reg.holdout_drifted and reg.samples == mon.detector.alarm_at


def test_monitor_notify_only_and_failing_emit(caplog: pytest.LogCaptureFixture) -> None:
    def boom(event: Event) -> None:
        raise RuntimeError("sink down")

    mon = PromotionMonitor(
        "exp",
        0,
        emit=boom,
        settings=MonitorSettings(
            batch_size=1,
            reaction=Reaction.NOTIFY_ONLY,
            detector=CusumSettings(k=0.5, h=3.0, mean=1.0, sd=1.0),
        ),
    )
    with caplog.at_level(logging.ERROR, logger="allocator.monitor"):
        reg = mon.observe_many(np.full(5, -5.0), now=3.0)
    assert reg is not None and reg.action is None and reg.holdout_mean is None
    assert caplog.text.count("emitting") == 2


def test_monitor_validation() -> None:
    with pytest.raises(ValueError):
        PromotionMonitor("", 0)
    with pytest.raises(ValueError):
        PromotionMonitor("e", -1)
    with pytest.raises(ValueError):
        PromotionMonitor("e", 1, holdout_variant=1)
    mon = PromotionMonitor("e", 1)
    with pytest.raises(ValueError, match="holdout"):
        mon.observe(1.0, now=1.0, holdout=True)
    with pytest.raises(ValueError):
        mon.observe(math.nan, now=1.0)
    with pytest.raises(ValueError):
        mon.observe(1.0, now=math.inf)
    assert mon.observe_many([], now=1.0) is None


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"detector": object()}, TypeError),
        ({"batch_size": 0}, ValueError),
        ({"batch_size": 1.0}, TypeError),
        ({"reaction": "rollback"}, TypeError),
        ({"holdout_margin": -1.0}, ValueError),
        ({"holdout_margin": math.nan}, ValueError),
        ({"holdout_alpha": 1.5}, ValueError),
        ({"holdout_min_samples": 1}, ValueError),
        ({"holdout_min_samples": 10.0}, TypeError),
    ],
)
def test_monitor_settings_validation(kwargs: dict[str, Any], exc: type) -> None:
    with pytest.raises(exc):
        MonitorSettings(**kwargs)


# ---- webhook -------------------------------------------------------------------------


class _Receiver:
    """A real HTTP server on 127.0.0.1:0 that records requests and answers scripted codes."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.codes = list(codes or [])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers.items()), body))
                code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/retrain"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    yield r
    r.close()


EVENT = Event(
    EventType.RETRAIN_REQUESTED,
    "checkout",
    2,
    1_700_000_000.25,
    "CUSUM alarm",
    {"kind": "drift", "statistic": 7.5, "window": (1, 2)},
)


def test_webhook_posts_documented_json(receiver: _Receiver) -> None:
    hook = WebhookNotifier(receiver.url, timeout=2.0, retries=0)
    hook(Event(EventType.PROMOTED, "checkout", 2, 1.0))  # not selected: ignored
    hook(EVENT)
    assert hook.flush(timeout=10.0)
    hook.close()
    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    assert headers["Content-Type"] == "application/json"
    assert "X-Allocator-Signature" not in headers
    assert json.loads(body) == {
        "event": "RETRAIN_REQUESTED",
        "experiment": "checkout",
        "variant": 2,
        "at": "2023-11-14T22:13:20.250Z",
        "reason": "CUSUM alarm",
        "details": {"kind": "drift", "statistic": 7.5, "window": [1, 2]},
    }
    assert json.loads(body) == webhook_payload(EVENT)
    assert (hook.delivered, hook.failed, hook.dropped) == (1, 0, 0)


def test_webhook_signs_body(receiver: _Receiver) -> None:
    import hashlib
    import hmac

    hook = WebhookNotifier(receiver.url, timeout=2.0, retries=0, secret=b"s3cret", event_types=None)
    hook.notify(Event(EventType.PROMOTED, "checkout", 2, 1.0))
    assert hook.flush(timeout=10.0)
    hook.close()
    headers, body = receiver.requests[0]
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["X-Allocator-Signature"] == f"sha256={expected}"
    assert json.loads(body)["event"] == "PROMOTED"


def test_webhook_retries_server_errors(receiver: _Receiver) -> None:
    receiver.codes = [500, 503]
    hook = WebhookNotifier(receiver.url, timeout=2.0, retries=3, backoff=0.01)
    hook(EVENT)
    assert hook.flush(timeout=10.0)
    hook.close()
    assert len(receiver.requests) == 3
    assert receiver.requests[0][1] == receiver.requests[2][1]
    assert (hook.delivered, hook.failed) == (1, 0)


def test_webhook_gives_up_and_logs(receiver: _Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.codes = [500] * 10
    hook = WebhookNotifier(receiver.url, timeout=2.0, retries=2, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="allocator.monitor"):
        hook(EVENT)
        assert hook.flush(timeout=10.0)
    hook.close()
    assert len(receiver.requests) == 3  # 1 + retries
    assert (hook.delivered, hook.failed) == (0, 1)
    assert "giving up" in caplog.text


def test_webhook_does_not_retry_client_errors(receiver: _Receiver) -> None:
    receiver.codes = [404, 200]
    hook = WebhookNotifier(receiver.url, timeout=2.0, retries=3, backoff=0.01)
    hook(EVENT)
    assert hook.flush(timeout=10.0)
    hook.close()
    assert len(receiver.requests) == 1 and hook.failed == 1


def test_webhook_unreachable_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    r = _Receiver()
    url = r.url
    r.close()  # nothing listens on that port any more
    hook = WebhookNotifier(url, timeout=1.0, retries=1, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="allocator.monitor"):
        hook(EVENT)
        assert hook.flush(timeout=10.0)
    hook.close()
    assert hook.failed == 1 and "giving up" in caplog.text


def test_webhook_queue_full_and_closed_drop(caplog: pytest.LogCaptureFixture) -> None:
    hook = WebhookNotifier("http://127.0.0.1:9/x", timeout=1.0, retries=0, queue_size=1)
    hook.close()
    with caplog.at_level(logging.ERROR, logger="allocator.monitor"):
        hook(EVENT)
    assert hook.dropped == 1 and "dropped" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"url": "file:///etc/passwd"}, ValueError),
        ({"url": "http://"}, ValueError),
        ({"url": 3}, ValueError),
        ({"timeout": 0.0}, ValueError),
        ({"retries": -1}, ValueError),
        ({"backoff": -1.0}, ValueError),
        ({"max_backoff": 0.1, "backoff": 1.0}, ValueError),
        ({"queue_size": 0}, ValueError),
        ({"secret": "text"}, TypeError),
    ],
)
def test_webhook_validation(kwargs: dict[str, Any], exc: type) -> None:
    args: dict[str, Any] = {"url": "http://127.0.0.1:9/x", **kwargs}
    with pytest.raises(exc):
        WebhookNotifier(**args)


# ---- score drift ---------------------------------------------------------------------


def test_ks_drift_matches_scipy() -> None:
    rng = np.random.default_rng(12)
    ref, cur = rng.beta(2, 5, 3000), rng.beta(2.4, 5, 2000)
    res = ks_drift(ref, cur, alpha=0.05)
    expected = sps.ks_2samp(ref, cur)
    assert (res.statistic, res.p_value) == (expected.statistic, expected.pvalue)
    assert (res.n_reference, res.n_current, res.drifted) == (3000, 2000, expected.pvalue < 0.05)
    disjoint = ks_drift([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0])
    assert disjoint.statistic == 1.0  # the empirical CDFs are 1 apart between 4 and 5


@pytest.mark.parametrize(
    ("ref", "cur", "kwargs"),
    [([], [1.0], {}), ([1.0], [math.nan], {}), ([1.0], [1.0], {"alpha": 0.0})],
)
def test_ks_drift_validation(ref: list[float], cur: list[float], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ks_drift(ref, cur, **kwargs)


def test_psi_by_hand() -> None:
    ref = np.arange(100.0)  # quartile edges 24.75, 49.5, 74.25 -> 25% per bin
    cur = np.repeat([10.0, 30.0, 60.0, 90.0], [40, 30, 20, 10])  # 40/30/20/10%
    res = psi(ref, cur, bins=4)
    expected = (
        (0.40 - 0.25) * math.log(0.40 / 0.25)
        + (0.30 - 0.25) * math.log(0.30 / 0.25)
        + (0.20 - 0.25) * math.log(0.20 / 0.25)
        + (0.10 - 0.25) * math.log(0.10 / 0.25)
    )  # = 0.2282
    assert res.value == pytest.approx(expected, rel=1e-12)
    assert res.level is PsiLevel.MODERATE
    assert res.edges == pytest.approx((24.75, 49.5, 74.25))
    assert res.reference_fractions == pytest.approx((0.25,) * 4)
    assert sum(res.contributions) == pytest.approx(res.value)


def test_psi_empty_bins_use_epsilon_and_levels() -> None:
    ref = np.arange(100.0)
    res = psi(ref, np.full(50, 5.0), bins=4, eps=1e-4)
    # Bin 0 holds everything; the three empty bins count as 1e-4.
    expected = (1 - 0.25) * math.log(1 / 0.25) + 3 * (1e-4 - 0.25) * math.log(1e-4 / 0.25)
    assert res.value == pytest.approx(expected)
    assert res.level is PsiLevel.SIGNIFICANT
    assert psi(ref, ref).value == 0.0 and psi(ref, ref).level is PsiLevel.STABLE
    # Values outside the reference range land in the open outer bins.
    assert psi(ref, [-1e9, 1e9], bins=2).current_fractions == (0.5, 0.5)


def test_psi_tied_reference_merges_bins() -> None:
    res = psi(np.r_[np.zeros(90), np.ones(10)], [0.0, 1.0], bins=10)
    # Deciles 1-8 are all 0 and the 9th interpolates to 0.1: nine edges collapse to two,
    # and the bin below the minimum is empty in the reference (eps).
    assert res.edges == pytest.approx((0.0, 0.1))
    assert res.reference_fractions == pytest.approx((1e-4, 0.9, 0.1))
    assert res.current_fractions == pytest.approx((1e-4, 0.5, 0.5))


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"bins": 1}, ValueError),
        ({"bins": 2.0}, TypeError),
        ({"eps": 0.0}, ValueError),
        ({"current": []}, ValueError),
        ({"current": [math.inf]}, ValueError),
    ],
)
def test_psi_validation(kwargs: dict[str, Any], exc: type) -> None:
    args: dict[str, Any] = {"reference": [1.0, 2.0, 3.0], "current": [1.0], **kwargs}
    with pytest.raises(exc):
        psi(**args)

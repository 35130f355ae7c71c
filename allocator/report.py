"""GetReport: Bayesian and frequentist summary of one experiment, as a message.

Which estimate is which (also sent in ``notes``):

* ``mean`` / ``ci_*``: pooled mean of all rewards of the variant and an exact
  equal-tailed credible interval of its posterior mean (Beta quantiles, or the Student t
  marginal of the Normal-Gamma posterior).
* ``p_best`` / ``expected_loss``: Monte Carlo over the posterior.
* ``stratified_mean``: epoch-stratified, the estimate to trust when the allocation moved
  (pooled means can be flipped by Simpson's paradox when base rates drift while traffic
  shifts); ``ipw_mean``: Hajek inverse-propensity estimate over the same strata.
* ``lift``: pooled difference to control with an Agresti-Caffo interval (0/1 rewards)
  or a Welch one (others); ``stratified_lift``
  and the ``stratified_z`` test: the difference within the epochs where both have data,
  combined on common epoch weights (:func:`stats.stratified_difference`).
* Tests: chi-square (0/1 rewards) or Welch t (others, fractional Bernoulli rewards too) vs
  control; for continuous rewards also Mann-Whitney (:func:`rank_tests`, on the latest
  logged rewards: a rank test needs the values, not sufficient statistics). Holm-adjusted
  p-values over the comparisons; fixed-horizon
  semantics: under adaptive allocation with continuous looks, their p-values are not
  always-valid; the promotion rule does not use them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from allocator_client.v1 import allocator_pb2 as pb

from allocator import stats
from allocator.engine import Engine
from allocator.policies import RewardKind, make_policy

NOTES = (
    "mean/ci: pooled mean and exact posterior credible interval (interval_level); with a "
    "discount the interval, p_best and expected_loss are of the discounted posterior "
    "(recent rewards weigh more) and the mean is over all rewards, so it may lie outside."
    " p_best/expected_loss: Monte Carlo over the posterior. stratified_mean/se: "
    "within-epoch means combined with epoch-traffic weights, over the epochs where the "
    "variant has data - safe under changing allocation (Simpson's paradox), but after a "
    "promotion or a variant added later, variants cover different epochs. "
    "stratified_lift/ci and the stratified_z test: each challenger minus control over the"
    " epochs where both have data, on the same weights - the comparison to read when the "
    "allocation moved (still fixed-horizon, and inexact where the allocation also adapts "
    "within an epoch). ipw_mean: Hajek inverse-propensity-weighted estimate using the "
    "shares in force per epoch (NaN when some of a variant's rewards come from an epoch "
    "whose share for it is 0, as with index policies). lift: pooled difference vs "
    "control, Agresti-Caffo interval for 0/1 rewards, else Welch. Pooled tests "
    "(chi-square for 0/1 rewards, else Welch t; mann_whitney_u for continuous rewards, on"
    " the logged rewards of the recent span each replica's last 5,000 cover) are "
    "fixed-horizon tests on pooled data (p_value_adjusted: Holm over the comparisons with"
    " control, each kind of test - stratified_z too - a family of its own), which "
    "adaptive allocation makes anti-conservative even at a single look (simulated "
    "Thompson A/A: chi-square below 0.05 in ~12% of runs, pooled means ~4% low) and which"
    " are not always-valid under continuous monitoring: read them as descriptive; "
    "promotion uses the calibrated posterior rule. SRM: chi-square of the decisions drawn"
    " from the allocation table (srm.decisions of them) against the shares they were "
    "drawn from; exact-mode decisions are not covered."
)


def _f(x: float) -> float:
    return float(x) if math.isfinite(x) else float("nan")


def _holm_adjust(tests: Sequence[pb.TestResult]) -> None:
    """Set each test's p_value_adjusted: Holm over ``tests``, one family."""
    for test, p in zip(tests, stats.holm([t.p_value for t in tests]).tolist(), strict=True):
        test.p_value_adjusted = p


def build_report(engine: Engine, name: str, alpha: float = 0.05) -> pb.GetReportResponse:
    """Everything GetReport returns except the experiment and promotion status."""
    view = engine.view(name)
    cfg = view.config
    k = cfg.n_arms
    p_best, loss, _ = engine.prob_best(name)
    intervals = make_policy(cfg.policy, k).credible_intervals(view.stats, level=1 - alpha)
    es = view.epoch_stats  # E x K x 3, undiscounted
    n = es[:, :, 0].sum(axis=0)
    s = es[:, :, 1].sum(axis=0)
    ss = es[:, :, 2].sum(axis=0)
    moments = [
        stats.moments(n[i], s[i], ss[i]) if n[i] > 0 else stats.Moments(0.0, math.nan, math.nan)
        for i in range(k)
    ]
    # The chi-square counts successes: right for 0/1 rewards only. A Bernoulli experiment
    # also takes rewards in [0, 1], and fractional ones summed as counts leave the test
    # with almost no power; they show as ss < s (r * r < r), and get Welch instead.
    binary = cfg.policy.reward == RewardKind.BERNOULLI and bool(np.all(ss == s))
    strat = stats.stratified_means(es[:, :, 1], es[:, :, 0], es[:, :, 2])
    # Each challenger vs control on the epochs where both have data, on common weights.
    strata = [
        stats.stratified_difference(
            es[:, :, 1], es[:, :, 0], None if binary else es[:, :, 2], i, 0, alpha
        )
        for i in range(1, k)
    ]
    resp = pb.GetReportResponse(interval_level=1 - alpha, notes=NOTES)
    # Hajek IPW over strata: each epoch's arm mean weighted by epoch traffic / share.
    ipw = _ipw(view.epoch_shares, view.epoch_pulls, es)
    control = moments[0]
    for i, variant in enumerate(cfg.variants):
        m = moments[i]
        row = pb.VariantReport(
            name=variant,
            assignments=int(view.pulls[i]),
            rewards=int(n[i]),
            mean=_f(m.mean),
            ci_low=_f(intervals[i].lower),
            ci_high=_f(intervals[i].upper),
            p_best=float(p_best[i]),
            expected_loss=float(loss[i]),
            stratified_mean=_f(strat.mean[i]),
            stratified_se=_f(strat.se[i]),
            ipw_mean=_f(ipw[i]),
        )
        if i > 0 and m.n >= 2 and control.n >= 2:
            if binary:  # Agresti-Caffo: Wald's collapses near 0 and 1 and at small n
                diff = stats.proportion_difference(s[i], n[i], s[0], n[0], alpha)
            else:
                diff = stats.lift(
                    m.mean, m.var, m.n, control.mean, control.var, control.n, alpha
                ).absolute
            row.lift = _f(diff.estimate)
            row.lift_ci_low = _f(diff.lower)
            row.lift_ci_high = _f(diff.upper)
        if i > 0:
            d = strata[i - 1].difference
            row.stratified_lift = _f(d.estimate)
            row.stratified_lift_ci_low = _f(d.lower)
            row.stratified_lift_ci_high = _f(d.upper)
        resp.variants.append(row)
    for i in range(1, k):
        if n[i] < 2 or n[0] < 2:
            continue
        if binary:
            t = stats.chi_square([s[0], s[i]], [n[0], n[i]])
        else:
            t = stats.welch_t(
                moments[i].mean,
                moments[i].var,
                moments[i].n,
                control.mean,
                control.var,
                control.n,
            )
        resp.tests.append(
            pb.TestResult(
                name=t.name,
                variant=cfg.variants[i],
                # +-inf stays (two constant arms that differ: p = 0), NaN stays NaN.
                statistic=float(t.statistic),
                p_value=_f(t.p_value),
            )
        )
    # Several challengers against one control: adjusted so that the chance of any false
    # "significant" among them stays <= alpha (Holm; valid under any dependence).
    _holm_adjust(resp.tests)
    # The same comparisons, stratified by epoch: a family of their own.
    stratified = [
        pb.TestResult(
            name=d.test.name,
            variant=cfg.variants[i],
            statistic=float(d.test.statistic),
            p_value=_f(d.test.p_value),
        )
        for i, d in enumerate(strata, start=1)
        if not math.isnan(d.test.statistic)
    ]
    _holm_adjust(stratified)
    resp.tests.extend(stratified)
    # SRM covers the decisions drawn from the allocation table, whose split is known: the
    # expected counts sum, over refreshes, those decisions x the shares they were drawn
    # from. Exact-mode decisions follow the live posterior or index instead, and a check
    # against the last estimate of their split raises false alarms.
    resp.srm.decisions = int(view.srm_pulls.sum())
    resp.srm.p_value = (
        _f(stats.srm_against(view.srm_pulls, view.expected).p_value)
        if view.expected.sum() > 0
        else float("nan")
    )
    # Flagged by the sequential test, which stays valid when the report is read every
    # minute for months; the chi-square above is for one look.
    resp.srm.sequential_p_value = stats.sequential_p_value(float(view.srm_e[1]))
    resp.srm.flagged = resp.srm.sequential_p_value < stats.SRM_ALPHA
    for e in range(view.epoch + 1):
        snap = resp.allocation_history.add(epoch=e, shares=[float(x) for x in view.epoch_shares[e]])
        snap.time.FromNanoseconds(int(view.epoch_started[e] * 1e9))
    return resp


def spec_alpha(spec: pb.ExperimentSpec) -> float:
    """The significance level of a spec's tests, intervals and power analysis."""
    promo = spec.promotion
    return promo.alpha if promo.HasField("alpha") else 0.05


# Largest min_effect a Bernoulli experiment takes (a difference of two rates, so below 1;
# past 0.99 no experiment could show it, and the power analysis needs room for it).
MAX_BERNOULLI_MIN_EFFECT = 0.99


def power_analysis(engine: Engine, name: str, spec: pb.ExperimentSpec) -> pb.PowerAnalysis | None:
    """Fixed-horizon sample size for the spec's minimum effect, and what is still missing.

    Bernoulli: two-proportion test around the control's observed rate (0.5, the most
    conservative, before any data), for a change of min_effect in the harder direction;
    normal: two-sample test with the control's observed sd.
    Bonferroni over the k - 1 comparisons with control.
    """
    promo = spec.promotion
    if not promo.HasField("min_effect") or promo.min_effect <= 0:
        return None
    alpha = spec_alpha(spec)
    power = promo.power if promo.HasField("power") else 0.8
    view = engine.view(name)
    es = view.epoch_stats
    n = es[:, :, 0].sum(axis=0)
    k = view.config.n_arms
    if view.config.policy.reward == RewardKind.BERNOULLI:
        if promo.min_effect >= MAX_BERNOULLI_MIN_EFFECT:  # refused at creation since; unsized
            return None
        p0 = float(es[:, 0, 1].sum() / n[0]) if n[0] > 0 else 0.5
        p0 = min(max(p0, 1e-3), 1.0 - 1e-3)
        # The test is two-sided: size for the harder of the changes by min_effect that
        # can happen (the one nearer 0.5; near 1 only the fall is possible). When neither
        # fits in (0, 1), for a rise from a control rate moved down to make room.
        effect = promo.min_effect
        steps = [d for d in (effect, -effect) if 0.0 < p0 + d < 1.0]
        if not steps:
            p0, steps = min(p0, 1.0 - effect - 1e-3), [effect]
        required = max(
            stats.sample_size_proportions(p0, d, alpha=alpha, power=power, k_arms=k) for d in steps
        )
    else:
        if n[0] < 2:
            return None
        m = stats.moments(n[0], es[:, 0, 1].sum(), es[:, 0, 2].sum())
        if not m.var > 0:
            return None
        required = stats.sample_size_means(
            math.sqrt(m.var), promo.min_effect, alpha=alpha, power=power, k_arms=k
        )
    remaining = stats.samples_still_needed(n, required)
    return pb.PowerAnalysis(
        sample_size_per_variant=required,
        samples_remaining=remaining.total,
        min_effect=promo.min_effect,
        alpha=alpha,
        power=power,
    )


def _ipw(shares: np.ndarray, pulls: np.ndarray, es: np.ndarray) -> np.ndarray:
    """Hajek estimate per arm: sum_e (sum of rewards / share) / sum_e (count / share).

    NaN for an arm with rewards in an epoch whose recorded share for it is 0 (an index
    policy's decisions follow the index, not the split estimated at the refresh): their
    inverse propensity is undefined, and leaving them out would bias the estimate.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(shares > 0, 1.0 / shares, 0.0)
        num = (es[:, :, 1] * w).sum(axis=0)
        den = (es[:, :, 0] * w).sum(axis=0)
        unweighted = ((shares <= 0) & (es[:, :, 0] > 0)).any(axis=0)
        return np.where((den > 0) & ~unweighted, num / np.maximum(den, 1e-300), np.nan)


# The rank test reads the log, not the sufficient statistics: this many of the most recent
# rewards per replica, and each side needs this many of them.
RANK_SAMPLE_PER_REPLICA = 5_000
RANK_MIN_PER_VARIANT = 20


def common_window(
    windows: Mapping[str, Sequence[tuple[int, float, float]]], per_replica: int
) -> list[tuple[int, float]]:
    """(arm, value) of the rewards every replica's window covers completely.

    Each replica's window is its last ``per_replica`` rewards (arm, value, received_at).
    A full one starts wherever that many rewards ago was, so windows of replicas with
    different traffic, or of one that stopped long ago, span different times; mixing them
    as they are would weigh old rewards by how quiet their replica was. The sample keeps
    the rewards received at or after the latest start of a full window: in that span every
    replica's rewards are all there (a window that is not full holds its replica's whole
    history).
    """
    starts = [min(t for _, _, t in rows) for rows in windows.values() if len(rows) >= per_replica]
    cutoff = max(starts, default=-math.inf)
    return [(arm, value) for rows in windows.values() for arm, value, t in rows if t >= cutoff]


def rank_tests(variants: Sequence[str], sample: Sequence[tuple[int, float]]) -> list[pb.TestResult]:
    """Mann-Whitney U of each challenger vs control on ``sample`` ((arm, value) rows),
    Holm-adjusted among themselves; challengers with fewer than RANK_MIN_PER_VARIANT
    values on either side are left out."""
    by_arm: list[list[float]] = [[] for _ in variants]
    for arm, value in sample:
        if 0 <= arm < len(by_arm):
            by_arm[arm].append(value)
    control = by_arm[0]
    out: list[pb.TestResult] = []
    if len(control) < RANK_MIN_PER_VARIANT:
        return out
    for i in range(1, len(variants)):
        if len(by_arm[i]) < RANK_MIN_PER_VARIANT:
            continue
        t = stats.mann_whitney(by_arm[i], control)
        out.append(
            pb.TestResult(
                name=t.name, variant=variants[i], statistic=_f(t.statistic), p_value=_f(t.p_value)
            )
        )
    _holm_adjust(out)
    return out

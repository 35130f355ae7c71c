"""Statistics for the experiment report: pure functions over numbers (numpy / scipy only).

Frequentist tests, sample-ratio mismatch, power, lift, Bayesian summaries of posterior
draws, and estimators that stay honest when the allocation changes during the experiment.
Inputs are validated here and rejected with a ``ValueError`` naming the argument; results
are small frozen dataclasses.

Conventions:

* Larger rewards are better.
* ``var`` arguments are *sample* variances (ddof=1), which is what the service's sufficient
  statistics (n, sum, sum of squares) give through :func:`moments`.
* Valid but degenerate data (no variation at all, fewer than two arms with data) gives
  NaN statistics, as scipy does, rather than raising: a report shows "n/a", not an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as _st

_NAN = float("nan")
_SHARE_TOL = 1e-6  # allocation rows are floats written by the engine; rounding only
# The level at which the server flags a sample-ratio mismatch (one-look and sequential).
SRM_ALPHA = 0.001


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TestResult:
    """Outcome of a hypothesis test (``dof`` is None for rank tests).

    >>> r = welch_t(1.0, 1.0, 100, 0.8, 1.0, 100)
    >>> (r.name, round(r.statistic, 3), round(r.p_value, 3))
    ('welch_t', 1.414, 0.159)
    """

    __test__: ClassVar[bool] = False  # not a pytest class despite the name

    statistic: float
    p_value: float
    dof: float | None
    name: str


@dataclass(frozen=True, slots=True)
class SRMResult:
    """Sample-ratio-mismatch check; ``flagged`` means ``p_value < alpha``.

    >>> srm_check([50_000, 51_500], [[0.5, 0.5]], [101_500]).flagged
    True
    """

    statistic: float
    p_value: float
    dof: int
    flagged: bool
    alpha: float
    observed: tuple[float, ...]
    expected: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate with a two-sided interval at ``level``.

    >>> iv = beta_interval(1.0, 1.0, 0.95)
    >>> iv.estimate, round(iv.lower, 9), round(iv.upper, 9), iv.level
    (0.5, 0.025, 0.975, 0.95)
    """

    estimate: float
    lower: float
    upper: float
    level: float


@dataclass(frozen=True, slots=True)
class Lift:
    """Treatment vs control: ``absolute`` = mean_t - mean_c, ``relative`` = mean_t/mean_c - 1.

    >>> round(lift(0.12, 0.1056, 10_000, 0.10, 0.09, 10_000).relative.estimate, 6)
    0.2
    """

    absolute: Interval
    relative: Interval


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, mean and sample variance recovered from (n, sum, sum of squares).

    >>> moments(4, 2.0, 2.0)
    Moments(n=4.0, mean=0.5, var=0.3333333333333333)
    """

    n: float
    mean: float
    var: float


@dataclass(frozen=True, slots=True)
class Remaining:
    """Units each arm still needs to reach a required sample size, and their sum.

    >>> samples_still_needed([100, 250], 200)
    Remaining(per_arm=(100, 0), total=100)
    """

    per_arm: tuple[int, ...]
    total: int


@dataclass(frozen=True, slots=True)
class ArmEstimates:
    """Per-arm value estimates with standard errors (NaN where an arm has no data).

    >>> stratified_means([[3.0, 1.0]], [[10, 10]]).mean
    (0.3, 0.1)
    """

    mean: tuple[float, ...]
    se: tuple[float, ...]
    method: str


@dataclass(frozen=True, slots=True)
class IPWEstimates:
    """Inverse-propensity estimates of each arm's value had it received all traffic.

    >>> r = ipw_means([0, 1, 0, 1], [1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], 2)
    >>> r.horvitz_thompson.mean, r.hajek.mean
    ((0.5, 0.5), (0.5, 0.5))
    """

    horvitz_thompson: ArmEstimates
    hajek: ArmEstimates


# ----------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------


def _vector(x: ArrayLike, name: str, *, nonneg: bool = False) -> NDArray[np.float64]:
    """A finite 1-D float64 array, optionally non-negative."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    if nonneg and np.any(a < 0):
        raise ValueError(f"{name} must be >= 0")
    return a


def _matrix(x: ArrayLike, name: str, *, nonneg: bool = False) -> NDArray[np.float64]:
    """A finite, non-empty 2-D float64 array, optionally non-negative."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    if nonneg and np.any(a < 0):
        raise ValueError(f"{name} must be >= 0")
    return a


def _finite(x: float, name: str) -> float:
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return float(x)


def _positive(x: float, name: str) -> float:
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be finite and > 0, got {x}")
    return float(x)


def _open_unit(x: float, name: str) -> float:
    if not 0.0 < x < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {x}")
    return float(x)


def _summary(mean: float, var: float, n: float, tag: str) -> tuple[float, float, float]:
    if not math.isfinite(mean):
        raise ValueError(f"mean_{tag} must be finite, got {mean}")
    if not (math.isfinite(var) and var >= 0.0):
        raise ValueError(f"var_{tag} must be finite and >= 0, got {var}")
    if not n > 1:
        raise ValueError(f"n_{tag} must be > 1, got {n}")
    return float(mean), float(var), float(n)


def _tuple(a: NDArray[np.float64]) -> tuple[float, ...]:
    return tuple(float(v) for v in a)


# ----------------------------------------------------------------------------------------
# Sufficient statistics
# ----------------------------------------------------------------------------------------


def moments(n: float, total: float, total_sq: float) -> Moments:
    """Mean and sample variance (ddof=1) from n, sum and sum of squares; var is NaN if n <= 1."""
    if not (math.isfinite(n) and n > 0):
        raise ValueError(f"n must be finite and > 0, got {n}")
    _finite(total, "total")
    _finite(total_sq, "total_sq")
    mean = total / n
    # Clamped at 0: sum_sq - sum*mean cancels catastrophically when the variance is tiny
    # relative to mean**2 and can come out slightly negative.
    var = max(0.0, (total_sq - total * mean) / (n - 1)) if n > 1 else _NAN
    return Moments(n=float(n), mean=mean, var=var)


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------


def chi_square(successes: ArrayLike, trials: ArrayLike) -> TestResult:
    """Pearson chi-square test of equal success rates over a K x 2 table (no Yates correction)."""
    s = _vector(successes, "successes", nonneg=True)
    t = _vector(trials, "trials", nonneg=True)
    if s.shape != t.shape:
        raise ValueError(f"successes and trials differ in shape: {s.shape} vs {t.shape}")
    if s.size < 2:
        raise ValueError("need at least 2 arms")
    if np.any(s > t):
        raise ValueError("successes must be <= trials")
    # Arms without trials carry no information and would make an all-zero row.
    live = t > 0
    table = np.column_stack((s[live], t[live] - s[live]))
    dof = max(int(live.sum()) - 1, 0)
    if dof == 0 or np.any(table.sum(axis=0) == 0):
        return TestResult(statistic=_NAN, p_value=_NAN, dof=float(dof), name="pearson_chi2")
    # No Yates correction even for 2x2: it is conservative at experiment sample sizes, and
    # uncorrected 2x2 Pearson equals the squared pooled two-proportion z statistic, the test
    # that sample_size_proportions and power_proportions plan for.
    res = _st.chi2_contingency(table, correction=False)
    return TestResult(
        statistic=float(res.statistic),
        p_value=float(res.pvalue),
        dof=float(res.dof),
        name="pearson_chi2",
    )


def welch_t(
    mean_a: float, var_a: float, n_a: float, mean_b: float, var_b: float, n_b: float
) -> TestResult:
    """Welch's unequal-variance t test of mean_a == mean_b from summary statistics."""
    ma, va, na = _summary(mean_a, var_a, n_a, "a")
    mb, vb, nb = _summary(mean_b, var_b, n_b, "b")
    ea, eb = va / na, vb / nb
    se2 = ea + eb
    if se2 == 0.0:
        # Both arms constant: different values are certainly different (the limit of the
        # test as the variances go to 0, and scipy's answer); equal values say nothing.
        if ma == mb:
            return TestResult(statistic=_NAN, p_value=_NAN, dof=_NAN, name="welch_t")
        return TestResult(
            statistic=math.copysign(math.inf, ma - mb), p_value=0.0, dof=_NAN, name="welch_t"
        )
    stat = (ma - mb) / math.sqrt(se2)
    dof = se2**2 / (ea**2 / (na - 1) + eb**2 / (nb - 1))  # Welch-Satterthwaite
    p = float(2.0 * _st.t.sf(abs(stat), dof))
    return TestResult(statistic=stat, p_value=p, dof=dof, name="welch_t")


def mann_whitney(x: ArrayLike, y: ArrayLike) -> TestResult:
    """Two-sided Mann-Whitney U test; the statistic is U for ``x``."""
    a = _vector(x, "x")
    b = _vector(y, "y")
    # method="auto": exact for small samples without ties, else normal with tie correction.
    res = _st.mannwhitneyu(a, b, alternative="two-sided", method="auto")
    return TestResult(
        statistic=float(res.statistic), p_value=float(res.pvalue), dof=None, name="mann_whitney_u"
    )


def holm(p_values: ArrayLike) -> NDArray[np.float64]:
    """Holm-Bonferroni adjusted p-values: family-wise error <= alpha for any dependence.

    NaN entries (tests that could not run) are left NaN and do not count as comparisons.

    >>> holm([0.01, 0.04, 0.03]).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be one-dimensional, got shape {p.shape}")
    out = np.full(p.shape, _NAN)
    live = np.flatnonzero(~np.isnan(p))
    if np.any((p[live] < 0) | (p[live] > 1)):
        raise ValueError("p_values must be in [0, 1]")
    order = live[np.argsort(p[live], kind="stable")]
    m = order.size
    # Step-down: the i-th smallest is scaled by (m - i), then made monotone.
    scaled = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = scaled
    return out


# ----------------------------------------------------------------------------------------
# Sample-ratio mismatch
# ----------------------------------------------------------------------------------------


def srm_check(
    observed: ArrayLike,
    expected_share: ArrayLike,
    assignments: ArrayLike,
    alpha: float = SRM_ALPHA,
) -> SRMResult:
    """Chi-square goodness of fit of observed counts to the allocation in force per epoch.

    ``expected_share`` is E x K (each row the allocation of one epoch, summing to 1);
    ``assignments`` is either E x K assignment counts or the E per-epoch totals n_e.
    """
    obs = _vector(observed, "observed", nonneg=True)
    shares = _matrix(
        np.atleast_2d(np.asarray(expected_share, dtype=np.float64)), "expected_share", nonneg=True
    )
    raw = np.asarray(assignments, dtype=np.float64)
    if raw.ndim == 2:
        n_e = _matrix(raw, "assignments", nonneg=True).sum(axis=1)
    else:
        n_e = _vector(raw, "assignments", nonneg=True)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if shares.shape[1] != obs.size:
        raise ValueError(f"expected_share has {shares.shape[1]} arms, observed has {obs.size}")
    if n_e.size != shares.shape[0]:
        raise ValueError(f"assignments has {n_e.size} epochs, expected_share has {shares.shape[0]}")
    if np.any(np.abs(shares.sum(axis=1) - 1.0) > _SHARE_TOL):
        raise ValueError("each row of expected_share must sum to 1")
    if n_e.sum() == 0:
        raise ValueError("assignments contain no traffic")
    # Expected share of the whole run is the traffic-weighted mix of the in-force shares,
    # sum_e n_e p_e / sum_e n_e; scaled to the observed total it is a goodness-of-fit test
    # conditional on N (equal to sum_e n_e p_e,k when observed counts are those assignments).
    # Under H0 the counts are a sum of per-epoch multinomials; their covariance
    # N diag(q) - sum_e n_e p_e p_e' is at most (PSD order, by Jensen) the one-multinomial
    # covariance N (diag(q) - q q') assumed here, so the false-alarm rate stays <= alpha
    # (asymptotically; the chi-square approximation wants expected counts of 5 or more).
    q = n_e @ shares / n_e.sum()
    expected = obs.sum() * q
    live = expected > 0
    dof = max(int(live.sum()) - 1, 0)
    if np.any(obs[~live] > 0):
        # Traffic reached an arm that was never allocated any: a mismatch by definition.
        stat, p = math.inf, 0.0
    elif dof == 0:
        stat, p = 0.0, 1.0  # one live arm takes everything: observed == expected
    else:
        stat = float(np.sum((obs[live] - expected[live]) ** 2 / expected[live]))
        p = float(_st.chi2.sf(stat, dof))
    return SRMResult(
        statistic=stat,
        p_value=p,
        dof=dof,
        flagged=p < alpha,
        alpha=float(alpha),
        observed=_tuple(obs),
        expected=_tuple(expected),
    )


def srm_against(observed: ArrayLike, expected: ArrayLike, alpha: float = SRM_ALPHA) -> SRMResult:
    """``srm_check`` against expected counts already summed over the splits in force
    (sum_e n_e p_e, as the engine keeps them); they must total more than 0."""
    counts = _vector(expected, "expected", nonneg=True)
    total = float(counts.sum())
    return srm_check(observed, [counts / total], [total], alpha)


# Pseudo-count (in expected decisions) that shrinks the sequential SRM test's estimate of
# each arm's observed/expected ratio towards 1: large enough that the first few hundred
# decisions' noise does not cost the e-process much under H0, small enough that the ratio is
# learned quickly: a 5% excess on one arm of three is flagged at 0.001 within 100,000
# decisions (tests/test_stats.py); a 1% excess took about a million in an ad hoc simulation.
SRM_PSEUDO_COUNT = 1000.0


def srm_e_step(
    log_e: float,
    observed: ArrayLike,
    expected: ArrayLike,
    segment: ArrayLike,
    shares: ArrayLike,
    pseudo: float = SRM_PSEUDO_COUNT,
) -> float:
    """One segment of a sequential (anytime-valid) SRM test: the new log e-value.

    ``segment`` counts the decisions drawn independently from ``shares`` since the last
    step; ``observed`` / ``expected`` are the counts and expected counts before it. Each
    decision multiplies the e-value by q(arm) / shares(arm), where q is ``shares`` tilted by
    the smoothed observed/expected ratio of the past: a prediction fixed before the segment,
    so under H0 every factor has mean sum_i shares_i q_i / shares_i = 1, the product is a
    nonnegative martingale, and by Ville's inequality P(ever log_e >= log(1 / alpha)) <=
    alpha, however often it is checked and however the shares move (Ramdas et al. 2023,
    "Game-theoretic statistics and safe anytime-valid inference"; Lindon & Malek 2022 for
    the multinomial SRM setting). A decision to an arm with share 0 gives +inf.
    """
    obs = _vector(observed, "observed", nonneg=True)
    exp = _vector(expected, "expected", nonneg=True)
    seg = _vector(segment, "segment", nonneg=True)
    p = _vector(shares, "shares", nonneg=True)
    if not obs.shape == exp.shape == seg.shape == p.shape:
        raise ValueError("observed, expected, segment and shares must have one entry per arm")
    _positive(pseudo, "pseudo")
    if not seg.any():
        return float(log_e)
    live = p > 0
    if np.any(seg[~live] > 0):
        return math.inf
    q = np.where(live, p * (obs + pseudo) / (exp + pseudo), 0.0)
    q /= q.sum()
    hit = seg > 0
    return float(log_e + np.sum(seg[hit] * np.log(q[hit] / p[hit])))


def sequential_p_value(log_e_max: float) -> float:
    """Anytime-valid p-value of an e-process whose running maximum is ``exp(log_e_max)``.

    >>> round(sequential_p_value(math.log(1000.0)), 12), sequential_p_value(-2.0)
    (0.001, 1.0)
    """
    return math.exp(-log_e_max) if log_e_max > 0 else 1.0


# ----------------------------------------------------------------------------------------
# Power and sample size (two-sided, normal approximation)
# ----------------------------------------------------------------------------------------


def _z_alpha(alpha: float, k_arms: int) -> float:
    """Two-sided critical value, Bonferroni-corrected over the k_arms - 1 comparisons to control."""
    _open_unit(alpha, "alpha")
    if k_arms < 2:
        raise ValueError(f"k_arms must be >= 2, got {k_arms}")
    return float(_st.norm.isf(alpha / (2 * (k_arms - 1))))


def sample_size_proportions(
    p_control: float,
    mde: float,
    *,
    relative: bool = False,
    alpha: float = 0.05,
    power: float = 0.8,
    k_arms: int = 2,
) -> int:
    """Units per arm to detect p_control -> p_control + mde with the pooled two-proportion z test.

    ``relative=True`` reads ``mde`` as a lift (0.2 = +20%). With k_arms > 2, alpha is split
    over the k_arms - 1 comparisons to control (Bonferroni); k_arms=2 is uncorrected.
    """
    p1 = _open_unit(p_control, "p_control")
    d = _finite(mde, "mde") * (p1 if relative else 1.0)
    if d == 0.0:
        raise ValueError("mde must be non-zero")
    p2 = _open_unit(p1 + d, "p_control + effect")
    z_a = _z_alpha(alpha, k_arms)
    z_b = float(_st.norm.ppf(_open_unit(power, "power")))
    pbar = (p1 + p2) / 2
    # Pooled variance under H0 (what the test divides by), unpooled under H1 (Fleiss);
    # the far rejection tail is ignored, as in R's power.prop.test.
    root = z_a * math.sqrt(2 * pbar * (1 - pbar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil((root / d) ** 2)


def sample_size_means(
    sd: float, mde: float, *, alpha: float = 0.05, power: float = 0.8, k_arms: int = 2
) -> int:
    """Units per arm to detect a mean difference ``mde`` with common ``sd`` (two-sided z test)."""
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sd must be finite and > 0, got {sd}")
    if _finite(mde, "mde") == 0.0:
        raise ValueError("mde must be non-zero")
    z_a = _z_alpha(alpha, k_arms)
    z_b = float(_st.norm.ppf(_open_unit(power, "power")))
    return math.ceil(2.0 * (sd * (z_a + z_b) / mde) ** 2)


def power_proportions(
    p_a: float, p_b: float, n_per_arm: float, *, alpha: float = 0.05, k_arms: int = 2
) -> float:
    """Power of the two-sided pooled two-proportion z test with ``n_per_arm`` units per arm."""
    pa = _open_unit(p_a, "p_a")
    pb = _open_unit(p_b, "p_b")
    if not (math.isfinite(n_per_arm) and n_per_arm > 0):
        raise ValueError(f"n_per_arm must be finite and > 0, got {n_per_arm}")
    z_a = _z_alpha(alpha, k_arms)
    pbar = (pa + pb) / 2
    se0 = math.sqrt(2 * pbar * (1 - pbar) / n_per_arm)
    se1 = math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n_per_arm)
    d = abs(pb - pa)
    # Both rejection tails, so power_proportions(p, p, n) == alpha / (k_arms - 1).
    return float(_st.norm.cdf((d - z_a * se0) / se1) + _st.norm.cdf((-d - z_a * se0) / se1))


def samples_still_needed(n_per_arm: ArrayLike, n_required: int) -> Remaining:
    """Units each arm still lacks to reach ``n_required`` (as from sample_size_proportions)."""
    n = _vector(n_per_arm, "n_per_arm", nonneg=True)
    if n_required < 0:
        raise ValueError(f"n_required must be >= 0, got {n_required}")
    # ceil: fractional (discounted) counts still need a whole unit to reach the target.
    gap = [max(0, math.ceil(n_required - v)) for v in n.tolist()]
    return Remaining(per_arm=tuple(gap), total=sum(gap))


# ----------------------------------------------------------------------------------------
# Lift
# ----------------------------------------------------------------------------------------


def lift(
    mean_t: float,
    var_t: float,
    n_t: float,
    mean_c: float,
    var_c: float,
    n_c: float,
    alpha: float = 0.05,
) -> Lift:
    """Absolute (Welch t) and relative (delta-method normal) lift of treatment over control."""
    mt, vt, nt = _summary(mean_t, var_t, n_t, "t")
    mc, vc, nc = _summary(mean_c, var_c, n_c, "c")
    level = 1.0 - _open_unit(alpha, "alpha")
    et, ec = vt / nt, vc / nc
    diff = mt - mc
    se2 = et + ec
    if se2 == 0.0:
        absolute = Interval(diff, diff, diff, level)
    else:
        dof = se2**2 / (et**2 / (nt - 1) + ec**2 / (nc - 1))
        half = float(_st.t.isf(alpha / 2, dof)) * math.sqrt(se2)
        absolute = Interval(diff, diff - half, diff + half, level)
    if mc == 0.0:
        relative = Interval(_NAN, _NAN, _NAN, level)
    else:
        rel = mt / mc - 1.0
        # Delta method for mt/mc with independent arms: gradient (1/mc, -mt/mc**2).
        se_rel = math.sqrt(et / mc**2 + ec * mt**2 / mc**4)
        half = float(_st.norm.isf(alpha / 2)) * se_rel
        relative = Interval(rel, rel - half, rel + half, level)
    return Lift(absolute=absolute, relative=relative)


def proportion_difference(
    successes_t: float, n_t: float, successes_c: float, n_c: float, alpha: float = 0.05
) -> Interval:
    """Difference of two proportions with the Agresti-Caffo interval.

    The estimate is the observed difference; the interval is Wald's on the proportions
    with one success and one failure added to each arm (Agresti & Caffo 2000), which
    keeps close to its level where Wald's collapses: small samples, rates near 0 or 1,
    and no successes at all (0/200 vs 0/200: Wald gives [0, 0]).

    >>> iv = proportion_difference(0, 200, 0, 200)
    >>> iv.estimate, round(iv.upper, 4)
    (0.0, 0.0137)
    """
    level = 1.0 - _open_unit(alpha, "alpha")
    for x, n, tag in ((successes_t, n_t, "t"), (successes_c, n_c, "c")):
        if not (math.isfinite(x) and math.isfinite(n) and n > 0 and 0 <= x <= n):
            raise ValueError(f"arm {tag}: need 0 <= successes <= n and n > 0, got {x}/{n}")
    diff = successes_t / n_t - successes_c / n_c
    pt, pc = (successes_t + 1) / (n_t + 2), (successes_c + 1) / (n_c + 2)
    half = float(_st.norm.isf(alpha / 2)) * math.sqrt(
        pt * (1 - pt) / (n_t + 2) + pc * (1 - pc) / (n_c + 2)
    )
    # Centred on the adjusted difference (which the raw one can lie outside of at a large
    # alpha: 0/10 vs 10/10 at alpha 0.2); a difference of rates stays within [-1, 1].
    return Interval(diff, max(-1.0, pt - pc - half), min(1.0, pt - pc + half), level)


# ----------------------------------------------------------------------------------------
# Bayesian summaries of posterior draws (shape draws x K)
# ----------------------------------------------------------------------------------------


def _level(level: float) -> float:
    return _open_unit(level, "level")


def credible_interval(draws: ArrayLike, level: float = 0.95) -> tuple[Interval, ...]:
    """Per arm: posterior mean and equal-tailed credible interval from draws (D x K)."""
    d = _matrix(draws, "draws")
    q = (1.0 - _level(level)) / 2
    lo, hi = np.quantile(d, [q, 1.0 - q], axis=0)
    mean = d.mean(axis=0)
    return tuple(
        Interval(float(m), float(a), float(b), level) for m, a, b in zip(mean, lo, hi, strict=True)
    )


def prob_best(draws: ArrayLike) -> NDArray[np.float64]:
    """P(arm has the largest value) per arm, from draws (D x K); ties share the credit."""
    d = _matrix(draws, "draws")
    top = d == d.max(axis=1, keepdims=True)
    # Splitting ties keeps the vector summing to 1 for discrete or clipped posteriors.
    return np.asarray((top / top.sum(axis=1, keepdims=True)).mean(axis=0), dtype=np.float64)


def expected_loss(draws: ArrayLike) -> NDArray[np.float64]:
    """E[max_j theta_j - theta_k] per arm k: value given up by committing to arm k."""
    d = _matrix(draws, "draws")
    return np.asarray((d.max(axis=1, keepdims=True) - d).mean(axis=0), dtype=np.float64)


def beta_interval(alpha: float, beta: float, level: float = 0.95) -> Interval:
    """Posterior mean and equal-tailed credible interval of Beta(alpha, beta)."""
    _positive(alpha, "alpha")
    _positive(beta, "beta")
    q = (1.0 - _level(level)) / 2
    lo, hi = _st.beta.ppf([q, 1.0 - q], alpha, beta)
    return Interval(alpha / (alpha + beta), float(lo), float(hi), level)


def normal_gamma_interval(
    mu: float, kappa: float, shape: float, rate: float, level: float = 0.95
) -> Interval:
    """Posterior mean and equal-tailed credible interval of the mean under Normal-Gamma.

    With tau ~ Gamma(shape, rate) and mu | tau ~ N(mu_n, 1 / (kappa * tau)), the mean's
    marginal is Student t with 2 * shape degrees of freedom, location mu_n and scale
    sqrt(rate / (shape * kappa)).
    """
    _finite(mu, "mu")
    for v, name in ((kappa, "kappa"), (shape, "shape"), (rate, "rate")):
        _positive(v, name)
    q = (1.0 - _level(level)) / 2
    scale = math.sqrt(rate / (shape * kappa))
    lo, hi = _st.t.ppf([q, 1.0 - q], 2.0 * shape, loc=mu, scale=scale)
    return Interval(float(mu), float(lo), float(hi), level)


# ----------------------------------------------------------------------------------------
# Estimates that survive a changing allocation
# ----------------------------------------------------------------------------------------


def _strata(
    sums: ArrayLike, counts: ArrayLike, sums_sq: ArrayLike | None
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Checked E x K (counts, cell means, cell variances) of epoch-stratified data.

    Cells without data have mean 0 and variance NaN. A single-observation cell has no
    variance of its own: it borrows the arm's overall sample variance, which also counts
    between-epoch spread, so standard errors err wide.
    """
    s = _matrix(sums, "sums")
    n = _matrix(counts, "counts", nonneg=True)
    if s.shape != n.shape:
        raise ValueError(f"sums and counts differ in shape: {s.shape} vs {n.shape}")
    if sums_sq is None:
        if np.any(s < 0) or np.any(s > n):
            raise ValueError("without sums_sq rewards must be 0/1, so 0 <= sums <= counts")
        ss = s
    else:
        ss = _matrix(sums_sq, "sums_sq", nonneg=True)
        if ss.shape != n.shape:
            raise ValueError(f"sums_sq and counts differ in shape: {ss.shape} vs {n.shape}")
    if np.any((n == 0) & ((s != 0) | (ss != 0))):
        raise ValueError("cells with zero counts must have zero sums")
    has = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        cell_mean = np.where(has, s / n, 0.0)
        cell_var = np.where(n > 1, (ss - s * cell_mean) / (n - 1), _NAN)
        n_k, s_k = n.sum(axis=0), s.sum(axis=0)
        arm_var = np.where(n_k > 1, (ss.sum(axis=0) - s_k * s_k / n_k) / (n_k - 1), _NAN)
        cell_var = np.where(n == 1, arm_var, cell_var)
        cell_var = np.maximum(cell_var, 0.0)  # sum-of-squares cancellation, see moments()
    return n, cell_mean, cell_var


def stratified_means(
    sums: ArrayLike, counts: ArrayLike, sums_sq: ArrayLike | None = None
) -> ArmEstimates:
    """Per-arm mean standardized over allocation epochs (E x K inputs), with standard error.

    Within epoch e the arm mean is sum/count; epochs are combined with weights n_e (epoch
    traffic over all arms), renormalized over the epochs where the arm has data. Because
    the weights do not depend on how traffic was split between arms, an allocation that
    moves while the base rate drifts cannot reverse a comparison (Simpson's paradox); this
    is the idea of Optimizely's epoch stats engine. The estimand is the arm's mean over the
    traffic the experiment saw. Arm-specific weights (pooling, inverse variance) would
    reintroduce the bias; equal epoch weights would over-count quiet epochs. Two arms are
    compared on exactly the same weights only over epochs where both have data: after a
    promotion (the champion alone) or a variant added later, their stratified means cover
    different epochs; :func:`stratified_difference` compares two arms on common ones.

    ``sums_sq`` defaults to ``sums``, which is exact for 0/1 rewards (x**2 == x).
    """
    n, cell_mean, cell_var = _strata(sums, counts, sums_sq)
    has = n > 0
    n_k = n.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(has, n.sum(axis=1, keepdims=True), 0.0)
        w = w / w.sum(axis=0)  # NaN for an arm with no data at all
        mean = np.where(n_k > 0, (w * cell_mean).sum(axis=0), _NAN)
        se = np.sqrt(np.where(has, w**2 * cell_var / np.where(has, n, 1.0), 0.0).sum(axis=0))
        se = np.where(n_k > 0, se, _NAN)
    return ArmEstimates(mean=_tuple(mean), se=_tuple(se), method="epoch_stratified")


@dataclass(frozen=True, slots=True)
class StratifiedDifference:
    """Arm minus control over the epochs where both have data (:func:`stratified_difference`).

    ``difference``: estimate and interval; ``test``: its z test (``stratified_z``);
    ``epochs``: how many epochs it covers (NaN estimates when none).
    """

    difference: Interval
    test: TestResult
    epochs: int


def stratified_difference(
    sums: ArrayLike,
    counts: ArrayLike,
    sums_sq: ArrayLike | None,
    arm: int,
    control: int,
    alpha: float = 0.05,
) -> StratifiedDifference:
    """Epoch-stratified ``arm`` - ``control`` with a normal interval and z test.

    Within each epoch where both arms have data the two means are compared; the
    differences are combined with the epoch's traffic over all arms as weight (as
    :func:`stratified_means`), renormalized over those common epochs, so both sides of the
    comparison stand on the same weights. Epochs where either arm had no data are left
    out: their difference is not estimable (a positivity gap, as after a promotion or
    before a variant was added). Variance: sum_e w_e^2 (v_arm/n_arm + v_control/n_control);
    for 0/1 rewards (``sums_sq`` None) the test's uses the pooled rate of each epoch and
    the interval's the plus-two proportions (see the code). The interval is NaN when the
    rewards have no spread at all.
    Under an allocation that moves between epochs the pooled tests compare arms over
    different mixes of epochs; this one does not (a within-epoch allocation that still
    adapts to the data keeps it from being exact).

    >>> d = stratified_difference([[12.0, 10.0]], [[100, 100]], None, 0, 1)
    >>> round(d.difference.estimate, 3), d.epochs, d.test.name
    (0.02, 1, 'stratified_z')
    """
    n, cell_mean, cell_var = _strata(sums, counts, sums_sq)
    k = n.shape[1]
    if not (0 <= arm < k and 0 <= control < k) or arm == control:
        raise ValueError(f"arm and control must be two different columns of {k}")
    level = _level(1.0 - alpha)
    both = (n[:, arm] > 0) & (n[:, control] > 0)
    epochs = int(both.sum())
    nan = StratifiedDifference(
        Interval(_NAN, _NAN, _NAN, level), TestResult(_NAN, _NAN, None, "stratified_z"), epochs
    )
    if epochs == 0:
        return nan
    w = n[both].sum(axis=1)
    w = w / w.sum()
    n1, n0 = n[both, arm], n[both, control]
    m1, m0 = cell_mean[both, arm], cell_mean[both, control]
    diff = float((w * (m1 - m0)).sum())
    if sums_sq is None:
        # 0/1 rewards. A small cell often has no success, and its plug-in variance is then
        # 0: a starved arm's late epochs would carry weight with no spread, and the test
        # would reject far too often. The test takes each epoch's variance under its null,
        # the two arms' pooled rate (as Cochran-Mantel-Haenszel); the interval's variance,
        # the plus-two proportions of each cell, so no cell is without spread. Its centre
        # stays the observed difference: Agresti-Caffo's plus-two centre, taken in every
        # cell, shrinks each small epoch toward 0 and, summed over many, moved the
        # interval off the truth (coverage 0.54 at 50 epochs of 4, 0.1 vs 0.3, in a
        # review's simulation; 0.92 so). With one epoch, proportion_difference is the
        # Agresti-Caffo interval.
        pooled = (m1 * n1 + m0 * n0) / (n1 + n0)
        var_test = float((w**2 * pooled * (1 - pooled) * (1 / n1 + 1 / n0)).sum())
        t1, t0 = (m1 * n1 + 1) / (n1 + 2), (m0 * n0 + 1) / (n0 + 2)
        var_ci = float((w**2 * (t1 * (1 - t1) / (n1 + 2) + t0 * (1 - t0) / (n0 + 2))).sum())
        bounds = (-1.0, 1.0)
    else:
        var_test = var_ci = float(
            (w**2 * (cell_var[both, arm] / n1 + cell_var[both, control] / n0)).sum()
        )
        bounds = (-math.inf, math.inf)
    if not (math.isfinite(var_test) and math.isfinite(var_ci)):
        return nan
    se = math.sqrt(var_test)
    z = diff / se if se > 0 else (math.copysign(math.inf, diff) if diff else _NAN)
    p = float(2 * _st.norm.sf(abs(z))) if not math.isnan(z) else _NAN
    if var_ci > 0:
        half = float(_st.norm.isf(alpha / 2)) * math.sqrt(var_ci)
        lower, upper = max(bounds[0], diff - half), min(bounds[1], diff + half)
    else:
        # No spread at all (constant rewards): no interval to give; a difference is certain.
        # Set explicitly: max(-inf, nan) is -inf, which would pass for an infinite interval.
        lower = upper = _NAN
    return StratifiedDifference(
        Interval(diff, lower, upper, level),
        TestResult(float(z), p, None, "stratified_z"),
        epochs,
    )


def ipw_means(arms: ArrayLike, rewards: ArrayLike, propensities: ArrayLike, k: int) -> IPWEstimates:
    """Horvitz-Thompson and Hajek (self-normalized) estimates of each arm's value from a log.

    Row i is (arm played, reward, propensity of that arm at decision time). For arm a,
    HT = mean_i 1[a_i = a] r_i / p_i is unbiased for the arm's value over the logged
    traffic; Hajek divides by mean_i 1[a_i = a] / p_i instead of 1, trading a small bias for
    much lower variance when propensities are small. Propensities may change over time
    (adaptive allocation): HT stays unbiased as long as each row's propensity is the one in
    force when it was decided. Standard errors are the i.i.d. sandwich / linearization
    formulas; they err wide when the arm's mean drifts over the log.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    a = np.asarray(arms)
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError("arms must be a non-empty 1-D integer array")
    if np.any(a < 0) or np.any(a >= k):
        raise ValueError(f"arms must be in [0, {k})")
    r = _vector(rewards, "rewards")
    p = _vector(propensities, "propensities")
    if not (r.size == p.size == a.size):
        raise ValueError("arms, rewards and propensities must have the same length")
    if np.any(p <= 0) or np.any(p > 1):
        raise ValueError("propensities must be in (0, 1]")
    n = a.size
    z = r / p
    # An arm never played has no data: HT's sum is empty, and its 0 +- 0 would read as a
    # certain value of 0 (ArmEstimates promises NaN there, as Hajek's 0/0 gives).
    played = np.bincount(a, minlength=k) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        ht = np.bincount(a, weights=z, minlength=k) / n
        # Terms are z_i on the arm's rows and 0 elsewhere: variance about ht over all n rows.
        ht_var = (np.bincount(a, weights=z * z, minlength=k) - n * ht**2) / (n - 1)
        ht_se = np.sqrt(np.maximum(ht_var, 0.0) / n) if n > 1 else np.full(k, _NAN)
        ht, ht_se = np.where(played, ht, _NAN), np.where(played, ht_se, _NAN)
        den = np.bincount(a, weights=1.0 / p, minlength=k) / n
        hj = np.where(den > 0, ht / den, _NAN)
        # Linearization of a ratio estimator: residuals (r_i - hajek) / p_i on the arm's rows,
        # which sum to zero by construction.
        u = (r - hj[a]) / p
        hj_var = np.bincount(a, weights=u * u, minlength=k) / (n - 1) if n > 1 else _NAN
        hj_se = np.where(den > 0, np.sqrt(hj_var / n) / den, _NAN)
    return IPWEstimates(
        horvitz_thompson=ArmEstimates(mean=_tuple(ht), se=_tuple(ht_se), method="horvitz_thompson"),
        hajek=ArmEstimates(mean=_tuple(hj), se=_tuple(hj_se), method="hajek"),
    )

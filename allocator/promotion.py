"""The promotion rule: when one variant is good enough to get all the traffic.

:func:`evaluate` is pure: sufficient statistics (``float64[K, 3]``: n, sum, sum of squares
per arm), the policy's reward model and priors, the experiment's age and a generator state
or seed in; a :class:`PromotionDecision` out. Same inputs and seed, same decision.

The leader (highest posterior mean) is promoted when every condition holds:

``min_samples``    every variant has ``min_samples_per_variant`` rewards;
``min_duration``   the experiment is ``min_duration_seconds`` old;
``p_best``         P(leader within the margin of the best) >= ``p_best_threshold``;
``expected_loss``  E[max_k theta_k - theta_leader] <= the tolerance (default 1% of
                   |E theta_leader|): an expected-loss threshold in the spirit of Scott
                   2015's "value remaining", whose rule is instead that the 95th
                   percentile of (theta_max - theta_leader) / theta_leader is below 1%;
``always_valid``   the leader beats every other arm up to the margin at an always-valid
                   level (below);
``guardrail:<m>``  each guardrail metric of the leader is no worse than control's by more
                   than its tolerance.

Calibration under continuous monitoring
---------------------------------------
A plain "P(best) >= 0.95" looked at after every batch promotes a worse arm far more often
than 5%: each look is another chance for noise to cross a fixed bar (Johari et al. 2017).
A *wrong* promotion here is promoting an arm worse than the best by more than the
indifference margin ``eps``. The ``always_valid`` condition bounds its probability by
``alpha = 1 - p_best_threshold`` however often the rule is evaluated, and whatever the
(adaptive) allocation:

* For each pair (leader i, other arm j) the statistic is the one-sided normal-mixture
  likelihood ratio of Robbins / Howard et al. (2021) against the null
  ``theta_i - theta_j <= -eps``: mixing distribution ``N(theta_0, sigma_k^2 / c)`` per arm
  (``c = cs_prior_samples`` pseudo-observations), restricted to the half-plane where arm
  i is better than under the null. Its value at the true means is a non-negative
  martingale with mean 1 under any sampling rule that looks only at past data (the
  allocation terms cancel in a likelihood ratio), so by Ville's inequality it ever
  exceeds ``1/a`` with probability at most ``a``.
* Closed form: ``M = 2 prod_k sqrt(c/(c+n_k)) exp(n_k^2 u_k^2 / (2 sigma_k^2 (c+n_k)))
  Phi(m/s)`` with ``u_k`` the gap between the sample mean and the null value,
  ``m = n_i u_i/(c+n_i) - n_j u_j/(c+n_j)`` and ``s^2 = sum_k sigma_k^2/(c+n_k)``. ``log M``
  is strictly convex in ``u`` and its free minimum lies outside the null, so the worst null
  point is on the line ``theta_i - theta_j = -eps``: a one-dimensional Newton search.
* The leader is promoted only when every null point of every pair is rejected at
  ``a = alpha / (K - 1)``. A wrong promotion means the pair (promoted, true best) rejected
  its true means; a union bound over the K - 1 pairs containing the true best gives
  P(wrong promotion, ever) <= alpha.

This is exact for normal rewards with known variances; the rule plugs in estimated
variances (Bernoulli: ``p(1 - p)`` at the posterior mean, an upper bound for rewards in
[0, 1]; continuous: the sample variance), so elsewhere it holds asymptotically, as the
CLT does. ``benchmarks/promotion.py`` measures it on Bernoulli, normal, log-normal, delayed,
10-arm, equal-arm and least-favourable (gap just above the margin) scenarios. The
Bayesian conditions alone are *not* calibrated; ``always_valid=False`` gives that plain
rule for comparison. With discounting (``PolicyConfig.discount < 1``) n is an effective
sample size and the guarantee is approximate.

Allocation matters: plain Thompson sampling gives a losing arm only O(log T) rewards
(Lai & Robbins), so the always-valid bound on its gap tightens very slowly and a calibrated
rule may wait for a long time (``benchmarks/promotion.py``, scenario
``2arm_small_lift_pure_ts``: 89% undecided after 200,000 rewards where a fixed test needs
29,500). A traffic floor while learning (``Shaping.floor``; 0.2 per arm for two arms in the
benchmark) lets it decide at about the fixed-horizon size, with far less regret than the
fixed test. That is no weakness of this rule: no calibrated sequential test can be much
faster when the margin is small next to the true lift. Even Wald's SPRT, told the lift,
needs about ``2 log(1/alpha) sigma_D^2 / (lift + margin)^2`` pairs, 0.6-0.75 of the
fixed-horizon size.

Futility: when ``min_effect`` and ``futility_probability`` are set, the rule stops and keeps
the control once, for every challenger j, P(theta_j - theta_control >= min_effect) <
``futility_probability``, the expected gain of continuing (control's expected loss) is at
most the tolerance, the minimum samples and duration are met, and (with ``always_valid``)
the same mixture test rejects ``theta_j - theta_control >= min_effect`` at
``alpha / (K - 1)``: abandoning a real improvement of ``min_effect`` is then also at most
an ``alpha`` event.

>>> import numpy as np
>>> from allocator.policies import PolicyConfig
>>> stats = np.array([[20000.0, 2000.0, 2000.0], [20000.0, 2300.0, 2300.0]])
>>> d = evaluate(PromotionSettings(), stats, PolicyConfig(), age_seconds=0.0, rng=7)
>>> d.action, d.candidate
('promote', 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numba import njit

from allocator import kernels
from allocator.policies import PolicyConfig, RewardKind

__all__ = [
    "ALWAYS_VALID",
    "EXPECTED_LOSS",
    "FUTILITY",
    "MIN_DURATION",
    "MIN_SAMPLES",
    "P_BEST",
    "Action",
    "GuardrailCheck",
    "PromotionDecision",
    "PromotionSettings",
    "arm_moments",
    "decide_kernel",
    "evaluate",
    "pair_evidence",
    "pair_lower_bound",
]

Action = Literal["promote", "continue", "futility_stop"]

# Condition names, as they appear in PromotionDecision.unmet and at the start of reasons.
MIN_SAMPLES = "min_samples"
MIN_DURATION = "min_duration"
P_BEST = "p_best"
EXPECTED_LOSS = "expected_loss"
ALWAYS_VALID = "always_valid"
FUTILITY = "futility"

# Codes returned by decide_kernel.
CONTINUE_CODE = 0
PROMOTE_CODE = 1
FUTILITY_CODE = 2

_LOG_2 = math.log(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT1_2 = math.sqrt(0.5)
_VAR_FLOOR = 1e-12  # a constant reward stream has zero sample variance


# ----------------------------------------------------------------------------------------
# Settings and results
# ----------------------------------------------------------------------------------------


def _optional_positive(value: float | None, name: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")


@dataclass(frozen=True)
class PromotionSettings:
    """When to promote, and when to give up; validates itself when built.

    ``expected_loss_tolerance`` and ``indifference_margin`` are absolute, in reward units;
    None means 1% of the absolute value of the leader's posterior mean (after Scott 2015's
    1% of value remaining, there a bound on a percentile of the relative loss, here on the
    expected loss), and the margin defaults to the tolerance. ``cs_prior_samples`` tunes
    the always-valid bound: it is tightest when arms have about 4-5 times that many
    rewards (Howard et al. 2021, section 3.5).

    >>> round(PromotionSettings(p_best_threshold=0.99).error_rate, 6)
    0.01
    """

    p_best_threshold: float = 0.95
    expected_loss_tolerance: float | None = None
    indifference_margin: float | None = None
    min_samples_per_variant: int = 100
    min_duration_seconds: float = 0.0
    min_effect: float | None = None
    futility_probability: float | None = None
    mc_draws: int = 4000
    always_valid: bool = True
    cs_prior_samples: float = 1000.0

    def __post_init__(self) -> None:
        if not 0.5 < self.p_best_threshold < 1.0:
            raise ValueError(f"p_best_threshold must be in (0.5, 1), got {self.p_best_threshold!r}")
        _optional_positive(self.expected_loss_tolerance, "expected_loss_tolerance")
        m = self.indifference_margin
        if m is not None and not (math.isfinite(m) and m >= 0):
            raise ValueError(f"indifference_margin must be a finite number >= 0 or None, got {m!r}")
        if isinstance(self.min_samples_per_variant, bool) or not isinstance(
            self.min_samples_per_variant, int
        ):
            raise TypeError("min_samples_per_variant must be an int")
        if self.min_samples_per_variant < 0:
            raise ValueError(
                f"min_samples_per_variant must be >= 0, got {self.min_samples_per_variant}"
            )
        if not (math.isfinite(self.min_duration_seconds) and self.min_duration_seconds >= 0):
            raise ValueError(
                f"min_duration_seconds must be >= 0, got {self.min_duration_seconds!r}"
            )
        _optional_positive(self.min_effect, "min_effect")
        f = self.futility_probability
        if f is not None and not 0.0 < f < 1.0:
            raise ValueError(f"futility_probability must be in (0, 1) or None, got {f!r}")
        if f is not None and self.min_effect is None:
            raise ValueError("futility_probability needs min_effect")
        if isinstance(self.mc_draws, bool) or not isinstance(self.mc_draws, int):
            raise TypeError("mc_draws must be an int")
        if self.mc_draws < 100:
            raise ValueError(f"mc_draws must be >= 100, got {self.mc_draws}")
        if not isinstance(self.always_valid, bool):
            raise TypeError("always_valid must be a bool")
        if not (math.isfinite(self.cs_prior_samples) and self.cs_prior_samples > 0):
            raise ValueError(
                f"cs_prior_samples must be finite and > 0, got {self.cs_prior_samples!r}"
            )

    @property
    def error_rate(self) -> float:
        """The wrong-promotion rate the always-valid check guarantees: 1 - threshold."""
        return 1.0 - self.p_best_threshold

    @property
    def futility_enabled(self) -> bool:
        """True when both futility knobs are set."""
        return self.futility_probability is not None and self.min_effect is not None


@dataclass(frozen=True)
class GuardrailCheck:
    """A secondary metric the winner must not degrade: per-variant means and a tolerance.

    Degradation is ``control - candidate`` (or ``candidate - control`` when lower is
    better), divided by ``|control|`` when ``relative``; promotion needs it to be at most
    ``max_degradation``. E.g. p95 latency may rise by at most 5%:

    >>> g = GuardrailCheck(means=(120.0, 124.0), max_degradation=0.05,
    ...                    lower_is_better=True, relative=True)
    >>> round(g.degradation(candidate=1, control=0), 4)
    0.0333
    """

    means: tuple[float, ...]
    max_degradation: float
    lower_is_better: bool = False
    relative: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "means", tuple(float(x) for x in self.means))
        if len(self.means) < 2:
            raise ValueError(f"means needs one value per variant (>= 2), got {len(self.means)}")
        if not all(math.isfinite(x) for x in self.means):
            raise ValueError(f"means must be finite, got {self.means!r}")
        if not (math.isfinite(self.max_degradation) and self.max_degradation >= 0):
            raise ValueError(
                f"max_degradation must be finite and >= 0, got {self.max_degradation!r}"
            )

    def degradation(self, candidate: int, control: int) -> float:
        """How much worse the candidate is than control (negative: better)."""
        c, t = self.means[control], self.means[candidate]
        worse = t - c if self.lower_is_better else c - t
        if not self.relative:
            return worse
        # Relative to a zero baseline any degradation is infinite and any gain is free.
        if c == 0.0:
            return math.inf if worse > 0 else 0.0 if worse == 0 else -math.inf
        return worse / abs(c)


@dataclass(frozen=True, eq=False)
class PromotionDecision:
    """What the rule decided and why.

    ``reasons`` has one line per condition, met or not; ``unmet`` names the conditions that
    blocked promotion (``"guardrail:<metric>"`` for guardrails). ``candidate`` is the arm to
    promote, the control for a futility stop, the leader when continuing, and None before
    any data. ``p_best`` and ``expected_loss`` are per arm; ``p_within_margin[k]`` is
    P(arm k within the margin of the best); ``lower_bounds[k]`` is the always-valid lower
    bound on theta_candidate - theta_k (NaN for the candidate itself or without a bound).
    """

    action: Action
    candidate: int | None
    p_best: np.ndarray
    expected_loss: np.ndarray
    reasons: tuple[str, ...]
    unmet: tuple[str, ...]
    p_within_margin: np.ndarray
    lower_bounds: np.ndarray
    tolerance: float
    margin: float


# ----------------------------------------------------------------------------------------
# Kernels: the always-valid pair test
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _log_ndtr(x: float) -> float:
    """log Phi(x), accurate far into the lower tail."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x * _SQRT1_2))
    # Mills-ratio expansion: erfc loses all digits around -37.
    x2 = x * x
    return -0.5 * x2 - math.log(-x) - _LOG_SQRT_2PI + math.log1p(-1.0 / x2 + 3.0 / (x2 * x2))


@njit(cache=True, nogil=True)
def _mills(x: float) -> float:
    """phi(x) / Phi(x), the derivative of log Phi."""
    if x > -30.0:
        return math.exp(-0.5 * x * x - _LOG_SQRT_2PI - _log_ndtr(x))
    x2 = x * x
    return -x / (1.0 - 1.0 / x2 + 3.0 / (x2 * x2))


@njit(cache=True, nogil=True)
def pair_evidence(
    n_i: float,
    mean_i: float,
    var_i: float,
    n_j: float,
    mean_j: float,
    var_j: float,
    d0: float,
    c: float,
) -> float:
    """min over the null {theta_i - theta_j <= d0} of log M, the one-sided mixture e-value.

    -inf when the sample means themselves lie in the null or an arm has fewer than 2
    rewards (no evidence at all).
    """
    delta = (mean_i - mean_j) - d0
    if n_i < 2.0 or n_j < 2.0 or not delta > 0.0:
        return -math.inf
    var_i = max(var_i, _VAR_FLOOR)
    var_j = max(var_j, _VAR_FLOOR)
    ci = c + n_i
    cj = c + n_j
    a_i = n_i * n_i / (var_i * ci)
    a_j = n_j * n_j / (var_j * cj)
    b_i = n_i / ci
    b_j = n_j / cj
    s = math.sqrt(var_i / ci + var_j / cj)
    bd = (b_i - b_j) / s
    const = _LOG_2 + 0.5 * (math.log(c / ci) + math.log(c / cj))
    # On the boundary u_i = delta + t, u_j = t; f is strictly convex in t (the Hessian of
    # log M is diag(a) - kappa b b'/s^2 with kappa < 1 and b' diag(a)^-1 b = s^2).
    t = -a_i * delta / (a_i + a_j)
    x = (b_i * (delta + t) - b_j * t) / s
    f = 0.5 * a_i * (delta + t) ** 2 + 0.5 * a_j * t * t + _log_ndtr(x)
    for _ in range(100):
        lam = _mills(x)
        g = a_i * (delta + t) + a_j * t + lam * bd
        h = a_i + a_j - lam * (x + lam) * bd * bd
        step = g / h
        # Damped Newton: the log Phi term bends the quadratic, so a full step can overshoot.
        for _half in range(60):
            t_new = t - step
            x_new = (b_i * (delta + t_new) - b_j * t_new) / s
            f_new = 0.5 * a_i * (delta + t_new) ** 2 + 0.5 * a_j * t_new * t_new + _log_ndtr(x_new)
            if f_new <= f:
                break
            step *= 0.5
        else:
            break
        done = abs(step) <= 1e-13 * (1.0 + abs(t)) or f - f_new <= 1e-14 * (1.0 + abs(f))
        t = t_new
        x = x_new
        f = f_new
        if done:
            break
    return const + f


@njit(cache=True, nogil=True)
def pair_lower_bound(
    n_i: float,
    mean_i: float,
    var_i: float,
    n_j: float,
    mean_j: float,
    var_j: float,
    log_threshold: float,
    c: float,
) -> float:
    """The always-valid lower bound on theta_i - theta_j: the largest d0 whose null
    {theta_i - theta_j <= d0} is rejected at e-value exp(log_threshold); -inf if none."""
    if n_i < 2.0 or n_j < 2.0:
        return -math.inf
    d_hat = mean_i - mean_j
    se = math.sqrt(max(var_i, _VAR_FLOOR) / n_i + max(var_j, _VAR_FLOOR) / n_j)
    lo = 4.0 * se  # gap below d_hat that is rejected; grown until it is
    for _ in range(200):
        if pair_evidence(n_i, mean_i, var_i, n_j, mean_j, var_j, d_hat - lo, c) >= log_threshold:
            break
        lo *= 2.0
    hi = 0.0  # gap 0 is never rejected (-inf evidence)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if pair_evidence(n_i, mean_i, var_i, n_j, mean_j, var_j, d_hat - mid, c) >= log_threshold:
            lo = mid
        else:
            hi = mid
        if lo - hi <= 1e-12 * (se + abs(d_hat)):
            break
    return d_hat - lo


@njit(cache=True, nogil=True)
def arm_moments(
    stats: np.ndarray, kind: int, alpha0: float, beta0: float, mean: np.ndarray, var: np.ndarray
) -> None:
    """Sample mean and plug-in reward variance per arm for the always-valid test.

    kind 0 (rewards in [0, 1]): p(1 - p) at the Beta posterior mean, the largest variance
    a [0, 1] reward with that mean can have. kind 1: the sample variance (ddof=1).
    """
    for k in range(stats.shape[0]):
        n = stats[k, 0]
        s = stats[k, 1]
        mean[k] = s / n if n > 0.0 else 0.0
        if kind == 0:
            p = (alpha0 + s) / (alpha0 + beta0 + max(n, 0.0))
            p = min(max(p, 0.0), 1.0)
            var[k] = p * (1.0 - p)
        elif n > 1.0:
            var[k] = max(stats[k, 2] - s * mean[k], 0.0) / (n - 1.0)
        else:
            var[k] = math.inf


# ----------------------------------------------------------------------------------------
# Kernels: posterior summaries and the whole rule for simulations
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _posterior_means(
    stats: np.ndarray, kind: int, p0: float, p1: float, p2: float, p3: float, out: np.ndarray
) -> None:
    """Posterior mean reward per arm (Beta or Normal-Gamma)."""
    for k in range(stats.shape[0]):
        n = stats[k, 0]
        s = stats[k, 1]
        if kind == 0:
            a = p0 + s
            b = p1 + max(n - s, 0.0)
            out[k] = a / (a + b)
        else:
            out[k] = (p1 * p0 + s) / (p1 + n)


@njit(cache=True, nogil=True)
def _leader(means: np.ndarray) -> int:
    """Arm with the highest posterior mean; the lowest index among ties."""
    best = 0
    for k in range(1, means.shape[0]):
        if means[k] > means[best]:
            best = k
    return best


@njit(cache=True, nogil=True)
def _posterior_draws(
    rng: np.ndarray,
    stats: np.ndarray,
    kind: int,
    p0: float,
    p1: float,
    p2: float,
    p3: float,
    draws: int,
) -> np.ndarray:
    """``draws x K`` posterior draws of each arm's mean."""
    k_arms = stats.shape[0]
    if kind == 0:
        params = np.empty((k_arms, 2), dtype=np.float64)
        kernels.beta_params(stats, p0, p1, params)
        return kernels.beta_posterior_draws(rng, params, draws)
    params = np.empty((k_arms, 4), dtype=np.float64)
    kernels.normal_gamma_params(stats, p0, p1, p2, p3, params)
    return kernels.normal_posterior_draws(rng, params, draws)


@njit(cache=True, nogil=True)
def _margin_and_gain(
    samples: np.ndarray,
    margin: float,
    control: int,
    min_effect: float,
    p_within: np.ndarray,
    p_beats: np.ndarray,
) -> None:
    """P(arm within ``margin`` of the best) and P(arm - control >= ``min_effect``) per arm."""
    d_draws, k_arms = samples.shape
    p_within[:] = 0.0
    p_beats[:] = 0.0
    for d in range(d_draws):
        m = -math.inf
        for k in range(k_arms):
            m = max(m, samples[d, k])
        base = samples[d, control]
        for k in range(k_arms):
            v = samples[d, k]
            if v >= m - margin:
                p_within[k] += 1.0
            if v - base >= min_effect:
                p_beats[k] += 1.0
    for k in range(k_arms):
        p_within[k] /= d_draws
        p_beats[k] /= d_draws


@njit(cache=True, nogil=True)
def _all_pairs_reject(
    cand: int,
    n: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    d0: float,
    c: float,
    log_thr: float,
    skip: int,
) -> bool:
    """True if the pair test (cand, j) rejects theta_cand - theta_j <= d0 for every j != cand
    (and != ``skip``)."""
    for j in range(n.shape[0]):
        if j in (cand, skip):
            continue
        if (
            not pair_evidence(n[cand], mean[cand], var[cand], n[j], mean[j], var[j], d0, c)
            >= log_thr
        ):
            return False
    return True


@njit(cache=True, nogil=True)
def decide_kernel(
    rng: np.ndarray,
    stats: np.ndarray,
    kind: int,
    p0: float,
    p1: float,
    p2: float,
    p3: float,
    threshold: float,
    tolerance: float,
    margin: float,
    min_samples: float,
    always_valid: bool,
    cs_c: float,
    draws: int,
    control: int,
    min_effect: float,
    futility_prob: float,
) -> tuple[int, int]:
    """The rule without guardrails and duration, for simulations: (action code, candidate).

    Codes: 0 continue, 1 promote, 2 futility stop. ``tolerance`` or ``margin`` < 0 mean the
    defaults; ``futility_prob`` <= 0 disables futility. The cheap conditions are checked
    first and the Monte Carlo only runs when they pass, so it consumes ``rng`` only then;
    from the same state it decides exactly as :func:`evaluate` does without
    ``reward_counts`` (``min_samples`` against the counts in ``stats``: for a discounted
    experiment pass the rewards received, as the server does).
    """
    k_arms = stats.shape[0]
    pmean = np.empty(k_arms)
    _posterior_means(stats, kind, p0, p1, p2, p3, pmean)
    cand = _leader(pmean)
    tol = tolerance if tolerance >= 0.0 else 0.01 * abs(pmean[cand])
    eps = margin if margin >= 0.0 else tol
    enough = True
    for k in range(k_arms):
        if stats[k, 0] < min_samples:
            enough = False
    if not enough:
        return CONTINUE_CODE, cand
    n = stats[:, 0].copy()
    mean = np.empty(k_arms)
    var = np.empty(k_arms)
    arm_moments(stats, kind, p0, p1, mean, var)
    log_thr = math.log((k_arms - 1) / (1.0 - threshold))
    promote_ok = not always_valid or _all_pairs_reject(cand, n, mean, var, -eps, cs_c, log_thr, -1)
    fut_on = futility_prob > 0.0
    fut_ok = fut_on and (
        not always_valid or _all_pairs_reject(control, n, mean, var, -min_effect, cs_c, log_thr, -1)
    )
    if not (promote_ok or fut_ok):
        return CONTINUE_CODE, cand
    samples = _posterior_draws(rng, stats, kind, p0, p1, p2, p3, draws)
    p_best = np.empty(k_arms)
    loss = np.empty(k_arms)
    kernels.best_and_loss(samples, p_best, loss)
    p_within = np.empty(k_arms)
    p_beats = np.empty(k_arms)
    _margin_and_gain(samples, eps, control, min_effect if fut_on else 0.0, p_within, p_beats)
    if promote_ok and p_within[cand] >= threshold and loss[cand] <= tol:
        return PROMOTE_CODE, cand
    if fut_ok and loss[control] <= tol:
        for j in range(k_arms):
            if j != control and p_beats[j] >= futility_prob:
                return CONTINUE_CODE, cand
        return FUTILITY_CODE, control
    return CONTINUE_CODE, cand


# ----------------------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------------------


def _reward_code(policy: PolicyConfig) -> tuple[int, float, float, float, float]:
    """(kind, p0..p3) as the kernels take them."""
    if policy.reward == RewardKind.BERNOULLI:
        return 0, policy.prior_alpha, policy.prior_beta, 0.0, 0.0
    return 1, policy.prior_mean, policy.prior_kappa, policy.prior_shape, policy.prior_rate


def _as_rng(rng: np.ndarray | int) -> np.ndarray:
    if isinstance(rng, np.ndarray):
        if rng.dtype != np.uint64 or rng.shape != (4,):
            raise TypeError("rng must be a kernels generator state (uint64[4]) or an int seed")
        return rng
    if isinstance(rng, bool) or not isinstance(rng, int | np.integer):
        raise TypeError(f"rng must be a uint64[4] state or an int seed, got {type(rng).__name__}")
    if not 0 <= int(rng) < 2**64:
        raise ValueError(f"seed must be a 64-bit unsigned integer, got {rng!r}")
    return kernels.seed_state(np.uint64(int(rng)))  # type: ignore[arg-type]


def _check_stats(stats: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(stats, dtype=np.float64))
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"stats must be float64[K, 3] (n, sum, sum of squares), got {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"promotion needs at least 2 arms, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError("stats must be finite")
    if (a[:, 0] < 0).any() or (a[:, 2] < 0).any():
        raise ValueError("counts and sums of squares in stats must be >= 0")
    return a


def _name(variants: Sequence[str] | None, k: int) -> str:
    return variants[k] if variants is not None else f"arm {k}"


def evaluate(
    settings: PromotionSettings,
    stats: np.ndarray,
    policy: PolicyConfig,
    age_seconds: float,
    rng: np.ndarray | int,
    control: int = 0,
    guardrails: Mapping[str, GuardrailCheck] | None = None,
    variants: Sequence[str] | None = None,
    reward_counts: np.ndarray | None = None,
) -> PromotionDecision:
    """Apply the promotion rule to ``stats``; ``rng`` (a state, advanced, or a seed) drives
    the Monte Carlo. ``variants`` only names arms in the reasons.

    ``reward_counts``: rewards received per arm, for ``min_samples`` (default: the counts
    in ``stats``). With discounting the weight in ``stats`` levels off near 1 / (1 - gamma)
    however many rewards arrive, so it cannot stand for "enough rewards seen".
    """
    a = _check_stats(stats)
    k_arms = a.shape[0]
    if reward_counts is not None and np.shape(reward_counts) != (k_arms,):
        raise ValueError(f"reward_counts must have {k_arms} entries, got {np.shape(reward_counts)}")
    if not (math.isfinite(age_seconds) and age_seconds >= 0):
        raise ValueError(f"age_seconds must be finite and >= 0, got {age_seconds!r}")
    if isinstance(control, bool) or not 0 <= int(control) < k_arms:
        raise ValueError(f"control must be an arm index in [0, {k_arms}), got {control!r}")
    control = int(control)
    if variants is not None and len(variants) != k_arms:
        raise ValueError(f"variants names {len(variants)} arms, stats has {k_arms}")
    checks = dict(guardrails or {})
    for metric, g in checks.items():
        if not isinstance(g, GuardrailCheck):
            raise TypeError(f"guardrail {metric!r} must be a GuardrailCheck")
        if len(g.means) != k_arms:
            raise ValueError(f"guardrail {metric!r} has {len(g.means)} means for {k_arms} arms")
    state = _as_rng(rng)
    kind, p0, p1, p2, p3 = _reward_code(policy)
    s = settings

    # Monte Carlo first, from the caller's state, exactly as decide_kernel draws it.
    samples = _posterior_draws(state, a, kind, p0, p1, p2, p3, s.mc_draws)
    p_best = np.empty(k_arms)
    loss = np.empty(k_arms)
    kernels.best_and_loss(samples, p_best, loss)
    pmean = np.empty(k_arms)
    _posterior_means(a, kind, p0, p1, p2, p3, pmean)
    cand = int(_leader(pmean))
    tol_setting = s.expected_loss_tolerance
    default_tol = tol_setting is None
    tol = 0.01 * abs(float(pmean[cand])) if tol_setting is None else float(tol_setting)
    eps = tol if s.indifference_margin is None else float(s.indifference_margin)
    min_effect = s.min_effect if s.futility_enabled else 0.0
    p_within = np.empty(k_arms)
    p_beats = np.empty(k_arms)
    _margin_and_gain(samples, eps, control, float(min_effect or 0.0), p_within, p_beats)

    mean = np.empty(k_arms)
    var = np.empty(k_arms)
    arm_moments(a, kind, p0, p1, mean, var)
    n = a[:, 0].copy()
    log_thr = math.log((k_arms - 1) / s.error_rate)
    c = s.cs_prior_samples
    lower = np.full(k_arms, np.nan)
    for j in range(k_arms):
        if j != cand:
            lower[j] = pair_lower_bound(
                n[cand], mean[cand], var[cand], n[j], mean[j], var[j], log_thr, c
            )
    reasons: list[str] = []
    unmet: list[str] = []

    def check(ok: bool, label: str, text: str) -> None:
        reasons.append(f"{label}: {text}" + ("" if ok else " (blocks promotion)"))
        if not ok:
            unmet.append(label)

    received = n if reward_counts is None else np.asarray(reward_counts, dtype=np.float64)
    fewest = int(np.argmin(received))
    samples_ok = bool(received[fewest] >= s.min_samples_per_variant)
    check(
        samples_ok,
        MIN_SAMPLES,
        f"fewest rewards {received[fewest]:.0f} ({_name(variants, fewest)}) "
        f"{'>=' if samples_ok else '<'} {s.min_samples_per_variant}",
    )
    age_ok = age_seconds >= s.min_duration_seconds
    check(
        age_ok,
        MIN_DURATION,
        f"age {age_seconds:.0f} s {'>=' if age_ok else '<'} {s.min_duration_seconds:.0f} s",
    )
    pw = float(p_within[cand])
    pb_ok = pw >= s.p_best_threshold
    what = "best" if eps == 0 else f"within {eps:.4g} of best"
    check(
        pb_ok,
        P_BEST,
        f"P({_name(variants, cand)} {what}) {pw:.3f} "
        f"{'>=' if pb_ok else '<'} {s.p_best_threshold:g}",
    )
    el = float(loss[cand])
    el_ok = el <= tol
    check(
        el_ok,
        EXPECTED_LOSS,
        f"{el:.4g} {'<=' if el_ok else '>'} {tol:.4g}"
        + (" (1% of leader mean)" if default_tol else ""),
    )
    if s.always_valid:
        others = [j for j in range(k_arms) if j != cand]
        worst = min(others, key=lambda j: float(lower[j]))
        av_ok = all(
            pair_evidence(n[cand], mean[cand], var[cand], n[j], mean[j], var[j], -eps, c) >= log_thr
            for j in others
        )
        check(
            av_ok,
            ALWAYS_VALID,
            f"lower bound on {_name(variants, cand)} - {_name(variants, worst)} "
            f"{lower[worst]:.4g} {'>' if av_ok else '<='} -{eps:.4g} "
            f"at level {s.error_rate / (k_arms - 1):.3g}",
        )
    for metric, g in checks.items():
        deg = g.degradation(cand, control)
        ok = deg <= g.max_degradation
        check(
            ok,
            f"guardrail:{metric}",
            f"degradation vs control {deg:.4g} {'<=' if ok else '>'} {g.max_degradation:.4g}",
        )

    if not unmet:
        return PromotionDecision(
            "promote", cand, p_best, loss, tuple(reasons), (), p_within, lower, tol, eps
        )

    action: Action = "continue"
    out_cand: int | None = cand if float(n.sum()) > 0 else None
    if s.futility_enabled:
        assert s.futility_probability is not None and s.min_effect is not None
        challengers = [j for j in range(k_arms) if j != control]
        top = max(challengers, key=lambda j: float(p_beats[j]))
        fut_p_ok = bool(p_beats[top] < s.futility_probability)
        gain_ok = float(loss[control]) <= tol
        fut_av_ok = not s.always_valid or all(
            pair_evidence(
                n[control], mean[control], var[control], n[j], mean[j], var[j], -s.min_effect, c
            )
            >= log_thr
            for j in challengers
        )
        fut_ok = samples_ok and age_ok and fut_p_ok and gain_ok and fut_av_ok
        parts = [
            f"max P(variant - control >= {s.min_effect:g}) {p_beats[top]:.3f} "
            f"{'<' if fut_p_ok else '>='} {s.futility_probability:g}",
            f"expected gain of continuing {loss[control]:.4g} {'<=' if gain_ok else '>'} {tol:.4g}",
        ]
        if s.always_valid:
            parts.append(
                "always-valid bound rules out the min effect"
                if fut_av_ok
                else "always-valid bound cannot yet rule out the min effect"
            )
        reasons.append(
            f"{FUTILITY}: "
            + "; ".join(parts)
            + (" -> stop, keep control" if fut_ok else " -> keep learning")
        )
        if fut_ok:
            action = "futility_stop"
            out_cand = control
    return PromotionDecision(
        action, out_cand, p_best, loss, tuple(reasons), tuple(unmet), p_within, lower, tol, eps
    )

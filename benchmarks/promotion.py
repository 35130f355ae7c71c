"""Promotion under continuous monitoring: wrong promotions, time to decision, regret.

For every scenario of a JSON file and every seeded run, Thompson sampling allocates in
batches (default 100 decisions), rewards arrive ``delay`` decisions late, and the promotion
rule (:func:`allocator.promotion.decide_kernel`, the same rule as ``evaluate`` minus
guardrails and duration) is evaluated after every batch: continuous monitoring. After a
promotion all traffic goes to the winner and a CUSUM on its batch means
(:class:`allocator.monitor.Cusum`) watches it; an alarm reopens the experiment (fresh
statistics, Thompson again). On the same per-arm reward streams (the k-th reward of arm a
is the same number in every procedure: stack-of-rewards coupling) a fixed-horizon A/B test
with an equal split, sized by :mod:`allocator.stats` for the true effect (alpha 0.05
two-sided, power 0.8, Bonferroni over K - 1 comparisons), ships its significant winner
(or keeps control) and is watched by the same CUSUM, rolling back to control on an alarm.
The plain Bayesian rule (``always_valid=False``: P(within margin of best) and expected loss
only) runs on the same streams too, to show what the always-valid check buys.

A promotion is *wrong* when the promoted arm's true mean is below the best by more than
the scenario's indifference margin (default: 1% of the best mean, the rule's default).
Samples to decision count decisions until the first promotion or futility stop (delayed
rewards included); undecided runs count as the budget. With K > 2 arms the fixed test is
sized for best vs runner-up, the difference it must resolve not to ship the runner-up.

Allocation: Thompson sampling through the kernels the engine uses, with the engine's
traffic floor (``floor``: a minimum share per arm, drawn as a uniform mixture like
``Shaping.floor``). Plain Thompson (``floor`` 0) gives losing arms O(log T) rewards, too
few for any calibrated stopping rule to conclude soon (``2arm_small_lift_pure_ts``), so
the default scenarios keep 40-50% of traffic uniform until promotion; regret still stays
far below the fixed test's.

Scenario file::

    {"scenarios": [{"name": "...", "reward": "bernoulli" | "normal" | "lognormal",
                    "means": [...], "sds": [...],        # sds: continuous only
                    "budget": 100000, "delay": 0, "margin": 0.002,
                    "change": {"at": 60000, "means": [...], "sds": [...]},
                    "min_effect": 0.01, "futility_probability": 0.05, "floor": 0.0,
                    "batch": 100}]}

Only ``name``, ``reward`` and ``means`` are required. ``change`` switches every arm to the
new means at decision ``at`` (the promoted arm's drop is what the monitor must catch);
``change_detected_rate`` is over the runs that promoted before it.

For ``lognormal`` ``means``/``sds`` are those of the reward itself; the underlying normal
has ``sigma^2 = log(1 + sd^2/mean^2)`` and ``mu = log(mean) - sigma^2/2``.

``python -m benchmarks.promotion [--scenarios FILE] [--runs N] [--json PATH] [--png PATH]
[--quick]``
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit
from scipy import stats as sps

from allocator import kernels, stats
from allocator.monitor import Cusum, CusumSettings, cusum_threshold_for_arl
from allocator.policies import PolicyConfig, RewardKind
from allocator.promotion import PromotionSettings, decide_kernel
from benchmarks.common import (
    BENCH_DIR,
    SummaryRow,
    base_parser,
    format_value,
    machine_info,
    update_summary,
    write_json,
)

NAME = "promotion"
DEFAULT_SCENARIOS = BENCH_DIR / "scenarios" / "default.json"
REWARD_KINDS = {"bernoulli": 0, "normal": 1, "lognormal": 2}

# Targets (the brief): wrong promotions at most 1 - threshold in every scenario, median
# samples to decision at most 40% of the fixed-horizon test on 2-arm scenarios, less regret
# than that test, and a post-promotion change caught in 90% of runs.
WRONG_TARGET = 0.05
SAMPLES_TARGET = 0.40
CHANGE_TARGET = 0.90

# Post-promotion monitor: CUSUM on batch means with allowance k = 0.5 sd (tuned to a one-sd
# drop of a batch mean) and h for an in-control run length (ARL0) of 1e6 batches, with the
# reference mean and sd estimated from a burn-in of 200 batches. The burn-in matters more
# than h: a reference mean that is off by 1-2 of its standard errors turns the in-control
# drift of the walk from -k towards 0, and the run length collapses. Measured on
# Bernoulli(0.11) batch means over 2,000 batches: burn-in 20 / ARL0 1e4 (the supervisor's
# defaults) false-alarms in 37% of runs, 50 / 1e6 in 4.5%, 200 / 1e6 in 0.3%, all three
# catching a drop to 0.08 in 14-23 batches.
MONITOR_K = 0.5
MONITOR_BURN_IN = 200
MONITOR_ARL0 = 1e6


# ----------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One simulated experiment; validates itself.

    >>> Scenario("ab", "bernoulli", (0.10, 0.11), budget=1000).n_arms
    2
    """

    name: str
    reward: str
    means: tuple[float, ...]
    sds: tuple[float, ...] = ()
    budget: int = 100_000
    delay: int = 0
    margin: float | None = None
    change_at: int | None = None
    change_means: tuple[float, ...] = ()
    change_sds: tuple[float, ...] = ()
    min_effect: float | None = None
    futility_probability: float | None = None
    floor: float = 0.0
    batch: int = 100

    def __post_init__(self) -> None:
        for name in ("means", "sds", "change_means", "change_sds"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if not self.name:
            raise ValueError("scenario name must be non-empty")
        if self.reward not in REWARD_KINDS:
            raise ValueError(f"{self.name}: reward must be one of {sorted(REWARD_KINDS)}")
        k = len(self.means)
        if k < 2:
            raise ValueError(f"{self.name}: needs at least 2 means")
        if not all(math.isfinite(m) for m in self.means + self.change_means):
            raise ValueError(f"{self.name}: means must be finite")
        if self.reward == "bernoulli":
            if self.sds or self.change_sds:
                raise ValueError(f"{self.name}: sds are for continuous rewards only")
            if not all(0.0 < m < 1.0 for m in self.means + self.change_means):
                raise ValueError(f"{self.name}: bernoulli means must be in (0, 1)")
        else:
            if len(self.sds) != k:
                raise ValueError(f"{self.name}: needs one sd per arm, got {len(self.sds)}")
            if not all(math.isfinite(s) and s > 0 for s in self.sds + self.change_sds):
                raise ValueError(f"{self.name}: sds must be finite and > 0")
        if self.reward == "lognormal" and not all(m > 0 for m in self.means + self.change_means):
            raise ValueError(f"{self.name}: log-normal means must be > 0")
        if self.batch < 1 or self.budget < self.batch:
            raise ValueError(f"{self.name}: need 1 <= batch <= budget")
        if self.delay < 0:
            raise ValueError(f"{self.name}: delay must be >= 0")
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"{self.name}: margin must be >= 0")
        if self.change_at is not None:
            if not 0 < self.change_at < self.budget:
                raise ValueError(f"{self.name}: change.at must be inside the budget")
            if len(self.change_means) != k:
                raise ValueError(f"{self.name}: change.means needs one mean per arm")
            if self.change_sds and len(self.change_sds) != k:
                raise ValueError(f"{self.name}: change.sds needs one sd per arm")
        if not 0.0 <= self.floor * k < 1.0:
            raise ValueError(f"{self.name}: floor * arms must be in [0, 1)")
        if (self.futility_probability is None) != (self.min_effect is None):
            raise ValueError(f"{self.name}: min_effect and futility_probability go together")

    @property
    def n_arms(self) -> int:
        """Number of arms."""
        return len(self.means)

    def policy(self) -> PolicyConfig:
        """The Thompson policy the service would run (default priors)."""
        return PolicyConfig(
            reward=RewardKind.BERNOULLI if self.reward == "bernoulli" else RewardKind.NORMAL
        )

    @property
    def best_mean(self) -> float:
        """The best true mean before any change."""
        return max(self.means)

    @property
    def effective_margin(self) -> float:
        """Indifference margin: the given one, else 1% of the best mean (the rule's default)."""
        return self.margin if self.margin is not None else 0.01 * abs(self.best_mean)

    def reward_params(self, after_change: bool) -> np.ndarray:
        """``[K, 2]`` generator parameters: (p, 0), (mu, sd) or the log-normal (mu, sigma)."""
        means = self.change_means if after_change and self.change_at is not None else self.means
        sds = self.sds
        if after_change and self.change_sds:
            sds = self.change_sds
        out = np.zeros((self.n_arms, 2))
        for a, m in enumerate(means):
            if self.reward == "bernoulli":
                out[a] = (m, 0.0)
            elif self.reward == "normal":
                out[a] = (m, sds[a])
            else:
                sigma2 = math.log1p((sds[a] / m) ** 2)
                out[a] = (math.log(m) - 0.5 * sigma2, math.sqrt(sigma2))
        return out

    def true_means(self, after_change: bool) -> np.ndarray:
        """True mean reward per arm before / after the change."""
        if after_change and self.change_at is not None:
            return np.array(self.change_means)
        return np.array(self.means)


def scenario_from_mapping(raw: dict[str, Any]) -> Scenario:
    """A :class:`Scenario` from one JSON object (``change`` nested as in the file)."""
    known = {
        "name",
        "reward",
        "means",
        "sds",
        "budget",
        "delay",
        "margin",
        "change",
        "min_effect",
        "futility_probability",
        "floor",
        "batch",
    }
    extra = set(raw) - known
    if extra:
        raise ValueError(f"scenario {raw.get('name')!r}: unknown keys {sorted(extra)}")
    change = raw.get("change")
    return Scenario(
        name=str(raw["name"]),
        reward=str(raw["reward"]),
        means=tuple(raw["means"]),
        sds=tuple(raw.get("sds", ())),
        budget=int(raw.get("budget", 100_000)),
        delay=int(raw.get("delay", 0)),
        margin=None if raw.get("margin") is None else float(raw["margin"]),
        change_at=None if change is None else int(change["at"]),
        change_means=() if change is None else tuple(change["means"]),
        change_sds=() if change is None else tuple(change.get("sds", ())),
        min_effect=None if raw.get("min_effect") is None else float(raw["min_effect"]),
        futility_probability=(
            None if raw.get("futility_probability") is None else float(raw["futility_probability"])
        ),
        floor=float(raw.get("floor", 0.0)),
        batch=int(raw.get("batch", 100)),
    )


def load_scenarios(path: Path) -> list[Scenario]:
    """All scenarios of a scenario file."""
    doc = json.loads(path.read_text())
    items = doc.get("scenarios") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected {{'scenarios': [...]}} with at least one scenario")
    scenarios = [scenario_from_mapping(item) for item in items]
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: scenario names must be unique")
    return scenarios


def rule_settings(
    sc: Scenario, *, always_valid: bool = True, mc_draws: int = 2000
) -> PromotionSettings:
    """The promotion settings a scenario is run with (defaults plus its margin/futility)."""
    return PromotionSettings(
        indifference_margin=sc.margin,
        min_effect=sc.min_effect,
        futility_probability=sc.futility_probability,
        always_valid=always_valid,
        mc_draws=mc_draws,
    )


# ----------------------------------------------------------------------------------------
# Simulation kernels
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _reward(
    arm_rng: np.ndarray,
    kind: int,
    a: int,
    t: int,
    par0: np.ndarray,
    par1: np.ndarray,
    change_at: int,
) -> float:
    """The next reward on arm ``a``'s own stream, drawn at decision time ``t``."""
    p = par0 if t < change_at else par1
    s = arm_rng[a]
    if kind == 0:
        return 1.0 if kernels.uniform(s) < p[a, 0] else 0.0
    z = kernels.normal(s)
    if kind == 1:
        return p[a, 0] + p[a, 1] * z
    return math.exp(p[a, 0] + p[a, 1] * z)


@njit(cache=True, nogil=True)
def _advance(
    arm_rng: np.ndarray,
    kind: int,
    a: int,
    t0: int,
    t1: int,
    par0: np.ndarray,
    par1: np.ndarray,
    change_at: int,
) -> None:
    """Consume arm ``a``'s rewards for decisions t0..t1-1 (all on that arm)."""
    for t in range(t0, t1):
        _reward(arm_rng, kind, a, t, par0, par1, change_at)


@njit(cache=True, nogil=True)
def _learn(
    t0: int,
    budget: int,
    batch: int,
    delay: int,
    floor: float,
    kind: int,
    par0: np.ndarray,
    par1: np.ndarray,
    change_at: int,
    mu0: np.ndarray,
    mu1: np.ndarray,
    arm_rng: np.ndarray,
    ts_rng: np.ndarray,
    mc_rng: np.ndarray,
    pkind: int,
    q: np.ndarray,
    threshold: float,
    tol: float,
    margin: float,
    min_samples: float,
    always_valid: bool,
    cs_c: float,
    draws: int,
    min_effect: float,
    fut_prob: float,
    arms_buf: np.ndarray,
    rewards_buf: np.ndarray,
) -> tuple[int, int, int, float]:
    """Thompson sampling from fresh statistics at decision ``t0``, the rule after every batch.

    Returns (decision time, action code, candidate, regret of the decisions made).
    """
    k_arms = mu0.shape[0]
    stats = np.zeros((k_arms, 3))
    out = np.empty(batch, dtype=np.int64)
    best0 = mu0.max()
    best1 = mu1.max()
    t = t0
    applied = t0
    regret = 0.0
    while t < budget:
        nb = min(batch, budget - t)
        o = out[:nb]
        if pkind == 0:
            kernels.thompson_beta(ts_rng, stats, q[0], q[1], o)
        else:
            kernels.thompson_normal(ts_rng, stats, q[0], q[1], q[2], q[3], o)
        if floor > 0.0:
            for i in range(nb):
                if kernels.uniform(ts_rng) < floor * k_arms:
                    o[i] = min(int(kernels.uniform(ts_rng) * k_arms), k_arms - 1)
        for i in range(nb):
            a = o[i]
            tt = t + i
            arms_buf[tt] = a
            rewards_buf[tt] = _reward(arm_rng, kind, a, tt, par0, par1, change_at)
            regret += (best0 - mu0[a]) if tt < change_at else (best1 - mu1[a])
        t += nb
        while applied < t - delay:
            kernels.update(stats, arms_buf[applied], rewards_buf[applied], 1.0)
            applied += 1
        action, cand = decide_kernel(
            mc_rng,
            stats,
            pkind,
            q[0],
            q[1],
            q[2],
            q[3],
            threshold,
            tol,
            margin,
            min_samples,
            always_valid,
            cs_c,
            draws,
            0,
            min_effect,
            fut_prob,
        )
        if action != 0:
            return t, action, cand, regret
    return budget, 0, -1, regret


@njit(cache=True, nogil=True)
def _batch_means(
    arm_rng: np.ndarray,
    kind: int,
    a: int,
    t0: int,
    budget: int,
    batch: int,
    par0: np.ndarray,
    par1: np.ndarray,
    change_at: int,
) -> np.ndarray:
    """Means of consecutive full batches of arm ``a``'s rewards for decisions t0..budget."""
    n = (budget - t0) // batch
    out = np.empty(n)
    t = t0
    for j in range(n):
        acc = 0.0
        for _ in range(batch):
            acc += _reward(arm_rng, kind, a, t, par0, par1, change_at)
            t += 1
        out[j] = acc / batch
    return out


@njit(cache=True, nogil=True)
def _fixed_sums(
    arm_rng: np.ndarray,
    kind: int,
    n_per_arm: int,
    total: int,
    par0: np.ndarray,
    par1: np.ndarray,
    change_at: int,
) -> np.ndarray:
    """Round-robin equal split for decisions 0..total-1; (n, sum, sumsq) per arm over each
    arm's first ``n_per_arm`` rewards (the later ones are drawn and discarded)."""
    k_arms = par0.shape[0]
    out = np.zeros((k_arms, 3))
    for t in range(total):
        a = t % k_arms
        x = _reward(arm_rng, kind, a, t, par0, par1, change_at)
        if out[a, 0] < n_per_arm:
            out[a, 0] += 1.0
            out[a, 1] += x
            out[a, 2] += x * x
    return out


def warm() -> None:
    """Compile the simulation kernels on a tiny scenario."""
    sc = Scenario("warm", "bernoulli", (0.1, 0.2), budget=400, batch=100)
    simulate_run(sc, rule_settings(sc, mc_draws=100), seed=1)


# ----------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------


def _streams(seed: int, k_arms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-arm reward generators [K, 4], Thompson generator, Monte Carlo generator).

    xoshiro jumps give non-overlapping streams; a procedure that pulls arm a for the k-th
    time gets the same reward whatever it did before (stack of rewards).
    """
    base = kernels.seed_state(np.uint64(seed))  # type: ignore[arg-type]
    arm_rng = np.empty((k_arms, 4), dtype=np.uint64)
    for a in range(k_arms):
        kernels.jump(base)
        arm_rng[a] = base
    kernels.jump(base)
    ts_rng = base.copy()
    kernels.jump(base)
    return arm_rng, ts_rng, base.copy()


def _gap_sum(gap0: np.ndarray, gap1: np.ndarray, change_at: int, a: int, t1: int, t2: int) -> float:
    """Regret of sending decisions t1..t2-1 all to arm ``a``."""
    before = max(0, min(t2, change_at) - t1)
    after = max(0, t2 - max(t1, change_at))
    return before * float(gap0[a]) + after * float(gap1[a])


def _monitor() -> CusumSettings:
    return CusumSettings(
        k=MONITOR_K, h=cusum_threshold_for_arl(MONITOR_ARL0, MONITOR_K), burn_in=MONITOR_BURN_IN
    )


def _alarm_time(
    sc: Scenario,
    arm_rng: np.ndarray,
    kind: int,
    arm: int,
    start: int,
    par0: np.ndarray,
    par1: np.ndarray,
    change_at: int,
) -> int:
    """When the post-decision CUSUM on ``arm``'s batch means (from ``start``) alarms and its
    reward arrives; ``sc.budget`` if it never does."""
    means = _batch_means(
        arm_rng[arm : arm + 1].copy(),
        kind,
        0,
        start,
        sc.budget,
        sc.batch,
        par0[arm : arm + 1],
        par1[arm : arm + 1],
        change_at,
    )
    j = Cusum(_monitor()).update_many(means) if means.size else None
    return sc.budget if j is None else start + (j + 1) * sc.batch + sc.delay


@dataclass
class RunResult:
    """What one seeded run of the adaptive procedure did."""

    first_decision: int  # decisions made before the first promotion / futility stop (budget: none)
    first_action: int  # 0 none, 1 promote, 2 futility
    wrong: bool  # some promotion (or futility stop) chose an arm worse than best - margin
    wrong_futility: bool
    regret: float
    promotions: list[tuple[int, int]] = field(default_factory=list)  # (time, arm)
    alarms: list[int] = field(default_factory=list)
    change_eligible: bool = False  # first promotion before the change
    change_detected: bool = False  # an alarm after the change, within the budget
    detection_delay: int | None = None
    false_alarm: bool = False  # an alarm with no change before it


def simulate_run(
    sc: Scenario, settings: PromotionSettings, seed: int, *, first_only: bool = False
) -> RunResult:
    """One seeded run of Thompson + the promotion rule + the post-promotion monitor.

    ``first_only`` stops at the first decision (regret then covers only the decisions made).
    """
    k = sc.n_arms
    kind = REWARD_KINDS[sc.reward]
    par0, par1 = sc.reward_params(False), sc.reward_params(True)
    mu0, mu1 = sc.true_means(False), sc.true_means(True)
    gap0, gap1 = mu0.max() - mu0, mu1.max() - mu1
    change_at = sc.change_at if sc.change_at is not None else sc.budget + 1
    margin = sc.effective_margin
    arm_rng, ts_rng, mc_rng = _streams(seed, k)
    policy = sc.policy()
    pkind = 0 if policy.reward == RewardKind.BERNOULLI else 1
    q = (
        np.array([policy.prior_alpha, policy.prior_beta, 0.0, 0.0])
        if pkind == 0
        else np.array(
            [policy.prior_mean, policy.prior_kappa, policy.prior_shape, policy.prior_rate]
        )
    )
    tol = -1.0 if settings.expected_loss_tolerance is None else settings.expected_loss_tolerance
    eps = -1.0 if settings.indifference_margin is None else settings.indifference_margin
    fut_p = settings.futility_probability or 0.0
    min_eff = settings.min_effect or 0.0
    arms_buf = np.zeros(sc.budget, dtype=np.int64)
    rewards_buf = np.zeros(sc.budget)
    res = RunResult(sc.budget, 0, False, False, 0.0)
    t = 0
    while t < sc.budget:
        t_dec, action, cand, reg = _learn(
            t,
            sc.budget,
            sc.batch,
            sc.delay,
            sc.floor,
            kind,
            par0,
            par1,
            change_at,
            mu0,
            mu1,
            arm_rng,
            ts_rng,
            mc_rng,
            pkind,
            q,
            settings.p_best_threshold,
            tol,
            eps,
            float(settings.min_samples_per_variant),
            settings.always_valid,
            settings.cs_prior_samples,
            settings.mc_draws,
            min_eff,
            fut_p,
            arms_buf,
            rewards_buf,
        )
        res.regret += reg
        if action == 0:
            break
        gaps = gap0 if t_dec < change_at else gap1
        if res.first_action == 0:
            res.first_decision, res.first_action = t_dec, action
        if gaps[cand] > margin:
            res.wrong = True
            res.wrong_futility |= action == 2
        if first_only:
            break
        if action == 2:
            res.regret += _gap_sum(gap0, gap1, change_at, cand, t_dec, sc.budget)
            break
        res.promotions.append((t_dec, cand))
        if len(res.promotions) == 1:
            res.change_eligible = (
                sc.change_at is not None and t_dec < change_at and (mu1[cand] < mu0[cand])
            )
        t_alarm = _alarm_time(sc, arm_rng, kind, cand, t_dec, par0, par1, change_at)
        if t_alarm >= sc.budget:
            res.regret += _gap_sum(gap0, gap1, change_at, cand, t_dec, sc.budget)
            break
        res.regret += _gap_sum(gap0, gap1, change_at, cand, t_dec, t_alarm)
        _advance(arm_rng, kind, cand, t_dec, t_alarm, par0, par1, change_at)
        res.alarms.append(t_alarm)
        if t_alarm - sc.delay <= change_at:
            res.false_alarm = True  # the batch that alarmed was complete before the change
        elif len(res.promotions) == 1 and res.change_eligible:
            res.change_detected = True
            res.detection_delay = t_alarm - change_at
        t = t_alarm  # reopen: fresh statistics, Thompson over every arm again
    return res


# ----------------------------------------------------------------------------------------
# Fixed-horizon comparator
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedPlan:
    """Per-arm sample size of the equal-split test and what it is sized for."""

    n_per_arm: int
    reference: int  # control, or the runner-up when control is best
    effect: float


def fixed_plan(sc: Scenario, alpha: float = 0.05, power: float = 0.8) -> FixedPlan:
    """Power analysis for the true effect between the best arm and its reference: control
    with 2 arms (or the other arm when control is best), the runner-up with more arms.

    With K > 2 the test has to tell the best from the runner-up, or it ships the runner-up
    (a wrong promotion here); sizing it on best vs control would make it look cheaper than
    it can be. Equal arms are sized for the margin.
    """
    mu = np.array(sc.means)
    order = np.argsort(-mu, kind="stable")
    best = int(order[0])
    ref = 0 if (sc.n_arms == 2 and best != 0) else int(order[1])
    effect = float(mu[best] - mu[ref])
    if effect <= 0:
        effect = sc.effective_margin
    if effect <= 0:
        raise ValueError(f"{sc.name}: equal arms need a margin > 0 to size a fixed test")
    k = sc.n_arms
    if sc.reward == "bernoulli":
        p_ref = float(mu[ref])
        if p_ref + effect >= 1.0:
            p_ref = float(mu[best]) - effect
        n = stats.sample_size_proportions(p_ref, effect, alpha=alpha, power=power, k_arms=k)
    else:
        sd = math.sqrt(0.5 * (sc.sds[best] ** 2 + sc.sds[ref] ** 2))
        n = stats.sample_size_means(sd, effect, alpha=alpha, power=power, k_arms=k)
    return FixedPlan(n, ref, effect)


def _fixed_winner(sc: Scenario, sums: np.ndarray, alpha: float = 0.05) -> int:
    """Ship the best variant significantly better than control (Bonferroni), else control."""
    k = sc.n_arms
    z_crit = float(sps.norm.isf(alpha / (2 * (k - 1))))
    n = sums[:, 0]
    mean = sums[:, 1] / n
    var = np.maximum(sums[:, 2] - sums[:, 1] * mean, 0.0) / (n - 1)
    winner, best = 0, -math.inf
    for a in range(1, k):
        if sc.reward == "bernoulli":
            pooled = (sums[0, 1] + sums[a, 1]) / (n[0] + n[a])
            se = math.sqrt(pooled * (1 - pooled) * (1 / n[0] + 1 / n[a]))
        else:
            se = math.sqrt(var[0] / n[0] + var[a] / n[a])
        z = (mean[a] - mean[0]) / se if se > 0 else 0.0
        if z > z_crit and mean[a] > best:
            winner, best = a, float(mean[a])
    return winner


@dataclass
class FixedResult:
    """The fixed-horizon test on one run's streams."""

    shipped: int | None  # None: the test did not finish within the budget
    wrong: bool
    regret: float


def simulate_fixed(sc: Scenario, plan: FixedPlan, seed: int) -> FixedResult:
    """Equal split for K * n_per_arm decisions (+ the delay), test, ship, monitor."""
    k = sc.n_arms
    kind = REWARD_KINDS[sc.reward]
    par0, par1 = sc.reward_params(False), sc.reward_params(True)
    mu0, mu1 = sc.true_means(False), sc.true_means(True)
    gap0, gap1 = mu0.max() - mu0, mu1.max() - mu1
    change_at = sc.change_at if sc.change_at is not None else sc.budget + 1
    arm_rng, _, _ = _streams(seed, k)
    test_end = min(plan.n_per_arm * k + sc.delay, sc.budget)
    t = np.arange(test_end)
    arms = t % k
    regret = float(np.where(t < change_at, gap0[arms], gap1[arms]).sum())
    if plan.n_per_arm * k + sc.delay >= sc.budget:
        return FixedResult(None, False, regret)
    sums = _fixed_sums(arm_rng, kind, plan.n_per_arm, test_end, par0, par1, change_at)
    ship = _fixed_winner(sc, sums)
    gaps = gap0 if test_end < change_at else gap1
    wrong = bool(gaps[ship] > sc.effective_margin)
    t_alarm = min(sc.budget, _alarm_time(sc, arm_rng, kind, ship, test_end, par0, par1, change_at))
    regret += _gap_sum(gap0, gap1, change_at, ship, test_end, t_alarm)
    # Rollback to control on an alarm: what a team without a bandit would do.
    regret += _gap_sum(gap0, gap1, change_at, 0, t_alarm, sc.budget)
    return FixedResult(ship, wrong, regret)


# ----------------------------------------------------------------------------------------
# A scenario
# ----------------------------------------------------------------------------------------


def clopper_pearson_upper(k: int, n: int, level: float = 0.95) -> float:
    """One-sided upper confidence bound on a binomial proportion."""
    if k >= n:
        return 1.0
    return float(sps.beta.ppf(level, k + 1, n - k))


def run_scenario(
    sc: Scenario, runs: int, seed: int = 20250101, *, naive: bool = True, mc_draws: int = 2000
) -> dict[str, Any]:
    """All runs of one scenario: the adaptive rule, the plain Bayesian rule, the fixed test."""
    settings = rule_settings(sc, mc_draws=mc_draws)
    plan = fixed_plan(sc)
    seeds = [seed + 7919 * r for r in range(runs)]
    start = time.perf_counter()
    results = [simulate_run(sc, settings, s) for s in seeds]
    fixed = [simulate_fixed(sc, plan, s) for s in seeds]
    naive_res = (
        [
            simulate_run(
                sc, rule_settings(sc, always_valid=False, mc_draws=mc_draws), s, first_only=True
            )
            for s in seeds
        ]
        if naive
        else []
    )
    elapsed = time.perf_counter() - start
    first = np.array([r.first_decision for r in results], dtype=np.float64)
    wrong = sum(r.wrong for r in results)
    eligible = [r for r in results if r.change_eligible]
    delays = [r.detection_delay for r in eligible if r.detection_delay is not None]
    fixed_total = plan.n_per_arm * sc.n_arms
    median = float(np.median(first))
    out: dict[str, Any] = {
        "name": sc.name,
        "reward": sc.reward,
        "arms": sc.n_arms,
        "means": list(sc.means),
        "margin": sc.effective_margin,
        "budget": sc.budget,
        "delay": sc.delay,
        "floor": sc.floor,
        "runs": runs,
        "wrong_promotion_rate": wrong / runs,
        "wrong_promotion_upper95": clopper_pearson_upper(wrong, runs),
        "wrong_futility_rate": sum(r.wrong_futility for r in results) / runs,
        "promoted_rate": sum(r.first_action == 1 for r in results) / runs,
        "futility_rate": sum(r.first_action == 2 for r in results) / runs,
        "undecided_rate": sum(r.first_action == 0 for r in results) / runs,
        "median_samples": median,
        "p90_samples": float(np.quantile(first, 0.9)),
        "fixed_horizon_samples": fixed_total,
        "samples_ratio": median / fixed_total,
        "regret": float(np.mean([r.regret for r in results])),
        "regret_se": float(np.std([r.regret for r in results], ddof=1) / math.sqrt(runs))
        if runs > 1
        else 0.0,
        "fixed_horizon_regret": float(np.mean([f.regret for f in fixed])),
        "fixed_horizon_completes": fixed[0].shipped is not None,
        "fixed_horizon_wrong_rate": sum(f.wrong for f in fixed) / runs,
        "false_alarm_rate": sum(r.false_alarm for r in results) / runs,
        "change_detected_rate": (
            sum(r.change_detected for r in eligible) / len(eligible) if eligible else None
        )
        if sc.change_at is not None
        else None,
        "change_eligible_runs": len(eligible) if sc.change_at is not None else None,
        "median_detection_delay": float(np.median(delays)) if delays else None,
        "seconds": round(elapsed, 2),
    }
    if naive_res:
        nf = np.array([r.first_decision for r in naive_res], dtype=np.float64)
        out["naive_wrong_promotion_rate"] = sum(r.wrong for r in naive_res) / runs
        out["naive_median_samples"] = float(np.median(nf))
    return out


# ----------------------------------------------------------------------------------------
# Targets, outputs, CLI
# ----------------------------------------------------------------------------------------


def _samples_target(r: dict[str, Any]) -> bool | None:
    """Median samples vs 40% of the fixed test, on 2-arm scenarios; None when unknowable
    (most runs undecided, so the median is censored at a budget below the target)."""
    if r["arms"] != 2:
        return None
    limit = SAMPLES_TARGET * r["fixed_horizon_samples"]
    if r["undecided_rate"] >= 0.5 and r["budget"] <= limit:
        return None
    return bool(r["median_samples"] <= limit)


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Which targets each scenario meets, and overall."""
    per: dict[str, dict[str, bool | None]] = {}
    for r in rows:
        per[r["name"]] = {
            "wrong_promotion_le_5pct": r["wrong_promotion_rate"] <= WRONG_TARGET,
            "median_samples_le_40pct_fixed": _samples_target(r),
            # Equal arms: neither procedure can lose anything, so there is nothing to compare.
            "regret_below_fixed": (
                r["regret"] < r["fixed_horizon_regret"] if r["fixed_horizon_regret"] > 0 else None
            ),
            "change_detected_ge_90pct": (
                r["change_detected_rate"] >= CHANGE_TARGET
                if r["change_detected_rate"] is not None
                else None
            ),
        }
    overall = {
        key: all(v[key] for v in per.values() if v[key] is not None)
        for key in (
            "wrong_promotion_le_5pct",
            "median_samples_le_40pct_fixed",
            "regret_below_fixed",
            "change_detected_ge_90pct",
        )
    }
    return {
        "definitions": {
            "wrong_promotion_le_5pct": f"wrong_promotion_rate <= {WRONG_TARGET} (every scenario)",
            "median_samples_le_40pct_fixed": (
                f"median_samples <= {SAMPLES_TARGET} * fixed_horizon_samples (2-arm scenarios)"
            ),
            "regret_below_fixed": "regret < fixed_horizon_regret (scenarios with any regret)",
            "change_detected_ge_90pct": (
                f"change_detected_rate >= {CHANGE_TARGET} (change scenarios)"
            ),
        },
        "per_scenario": per,
        "overall": overall,
    }


def plot(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Three panels: wrong promotions (vs the plain rule), samples vs fixed, regret."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(19, 6.5))
    ax = axes[0]
    ax.bar(x - 0.2, [r["wrong_promotion_rate"] for r in rows], 0.4, label="shipped rule")
    if all("naive_wrong_promotion_rate" in r for r in rows):
        ax.bar(
            x + 0.2,
            [r["naive_wrong_promotion_rate"] for r in rows],
            0.4,
            label="plain P(best) + expected loss (no always-valid check)",
        )
    ax.axhline(WRONG_TARGET, color="red", linestyle=":", label="target 5%")
    ax.set_title("wrong-promotion rate under continuous monitoring")
    ax.set_ylabel("share of runs")
    ax = axes[1]
    ax.bar(x - 0.2, [r["median_samples"] for r in rows], 0.4, label="median samples to decision")
    ax.bar(
        x + 0.2,
        [r["fixed_horizon_samples"] for r in rows],
        0.4,
        label="fixed-horizon test (power 0.8)",
    )
    for i, r in enumerate(rows):
        if r["undecided_rate"] > 0:
            ax.annotate(
                f"{100 * r['undecided_rate']:.0f}% undecided",
                (i - 0.2, r["median_samples"]),
                rotation=90,
                fontsize=7,
                ha="center",
                va="bottom",
            )
    ax.set_yscale("log")
    ax.set_title("samples to decision (log scale; undecided runs count as the budget)")
    ax = axes[2]
    ax.bar(x - 0.2, [r["regret"] for r in rows], 0.4, label="Thompson + promotion")
    ax.bar(x + 0.2, [r["fixed_horizon_regret"] for r in rows], 0.4, label="fixed-horizon test")
    ax.set_yscale("log")
    ax.set_title("mean regret over the budget (log scale)")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[SummaryRow]:
    """One summary.md row per scenario and headline metric."""
    out = []
    for r in rows:
        out.append(
            SummaryRow(
                NAME,
                f"{r['name']} wrong promotions",
                format_value(100 * r["wrong_promotion_rate"]),
                "%",
                "<= 5",
                r["wrong_promotion_rate"] <= WRONG_TARGET,
                f"{r['runs']} runs; plain rule "
                f"{100 * r.get('naive_wrong_promotion_rate', math.nan):.1f}%",
            )
        )
        if _samples_target(r) is not None:
            out.append(
                SummaryRow(
                    NAME,
                    f"{r['name']} median samples / fixed",
                    format_value(r["samples_ratio"]),
                    "",
                    "<= 0.4",
                    _samples_target(r),
                    f"{r['median_samples']:.0f} vs {r['fixed_horizon_samples']}",
                )
            )
        if r["change_detected_rate"] is not None:
            out.append(
                SummaryRow(
                    NAME,
                    f"{r['name']} change detected",
                    format_value(100 * r["change_detected_rate"]),
                    "%",
                    ">= 90",
                    r["change_detected_rate"] >= CHANGE_TARGET,
                )
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = base_parser(NAME, "wrong promotions, samples to decision and regret vs a fixed test")
    parser.add_argument(
        "--scenarios",
        type=Path,
        default=DEFAULT_SCENARIOS,
        help="scenario JSON file (default: %(default)s)",
    )
    parser.add_argument("--runs", type=int, help="seeded runs per scenario (default 200; quick 30)")
    parser.add_argument("--seed", type=int, default=20250101, help="base seed")
    parser.add_argument("--only", nargs="*", help="run only these scenario names")
    parser.add_argument("--no-naive", action="store_true", help="skip the plain-rule comparison")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (30 if args.quick else 200)
    if runs < 1:
        parser.error("--runs must be >= 1")
    try:
        scenarios = load_scenarios(args.scenarios)
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"bad scenario file: {err}")
    if args.only:
        scenarios = [s for s in scenarios if s.name in set(args.only)]
        if not scenarios:
            parser.error(f"no scenario named {args.only}")
    start = time.perf_counter()
    warm()
    rows = []
    for sc in scenarios:
        row = run_scenario(sc, runs, args.seed, naive=not args.no_naive)
        rows.append(row)
        print(
            f"{sc.name:24s} wrong {row['wrong_promotion_rate']:.3f} "
            f"(plain {row.get('naive_wrong_promotion_rate', math.nan):.3f}) "
            f"undecided {row['undecided_rate']:.2f} median {row['median_samples']:.0f} "
            f"/ fixed {row['fixed_horizon_samples']} = {row['samples_ratio']:.2f} "
            f"regret {row['regret']:.0f} vs {row['fixed_horizon_regret']:.0f} "
            f"change {row['change_detected_rate']} [{row['seconds']:.1f}s]",
            flush=True,
        )
    doc = {
        "benchmark": NAME,
        "command": "python -m benchmarks.promotion "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "scenario_file": str(args.scenarios),
        "seconds": round(time.perf_counter() - start, 1),
        "rule": {
            k: v
            for k, v in vars(rule_settings(scenarios[0])).items()
            if k not in ("indifference_margin", "min_effect", "futility_probability")
        },
        "monitor": {
            "detector": "cusum",
            "k": MONITOR_K,
            "burn_in_batches": MONITOR_BURN_IN,
            "arl0_batches": MONITOR_ARL0,
        },
        "machine": machine_info(),
        "scenarios": rows,
        "targets": targets(rows),
    }
    write_json(args.json, doc)
    plot(args.png, rows)
    if not args.no_summary:
        update_summary(summary_rows(rows), args.summary, replace_benchmarks=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

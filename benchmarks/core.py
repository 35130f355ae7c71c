"""Core speed: nanoseconds per decision and per reward, by policy, K and mode, with baselines.

Everything is measured in one process and one run, so the ratios to the baselines are
comparable even on a noisy machine:

* ``single``: one decision per call through ``Engine.assign`` (and the raw
  ``kernels.thompson_beta_one``), the cost a caller in the same process pays per request;
* ``batch``: ``Engine.assign_batch`` (10,000 decisions per call; fewer at large K so a call
  stays under ``max_draws`` posterior draws) and the raw ``kernels.ts_beta_batch``;
* ``table``: decisions drawn from the allocation table (Vose alias), which the engine uses
  in ``AllocationMode.TABLE``, for fixed splits, and the raw ``kernels.alias_batch``;
* rewards: ``Engine.reward`` (one per call), ``Engine.reward_batch`` and
  ``kernels.update_epochs``, per reward.

Baselines, same run, same K, same posterior: a plain NumPy Thompson sampler, a plain numba
loop over ``np.random.beta``, and MABWiser (ThompsonSampling, UCB1, EpsilonGreedy).

``python -m benchmarks.core [--quick] [--json PATH] [--png PATH]``
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from allocator import kernels
from allocator.engine import AllocationMode, Engine, ExperimentConfig
from allocator.policies import PolicyConfig, PolicyKind, RewardKind
from benchmarks.common import (
    Panel,
    Series,
    SummaryRow,
    Timing,
    base_parser,
    format_value,
    machine_info,
    measure_interleaved,
    plot_panels,
    print_targets,
    target_entry,
    target_rows,
    update_summary,
    write_json,
)

NAME = "core"

# Engine policies: name -> (policy config, allocation mode).
POLICIES: dict[str, tuple[PolicyConfig, AllocationMode]] = {
    "thompson": (PolicyConfig(kind=PolicyKind.THOMPSON), AllocationMode.EXACT),
    "thompson_normal": (
        PolicyConfig(kind=PolicyKind.THOMPSON, reward=RewardKind.NORMAL),
        AllocationMode.EXACT,
    ),
    "ucb1": (PolicyConfig(kind=PolicyKind.UCB1), AllocationMode.EXACT),
    "kl_ucb": (PolicyConfig(kind=PolicyKind.KL_UCB), AllocationMode.EXACT),
    "epsilon_greedy": (PolicyConfig(kind=PolicyKind.EPSILON_GREEDY), AllocationMode.EXACT),
    "fixed_split": (PolicyConfig(kind=PolicyKind.FIXED_SPLIT), AllocationMode.EXACT),
    "table": (PolicyConfig(kind=PolicyKind.THOMPSON), AllocationMode.TABLE),
}
# The engine serves these from its alias table: their batch mode is "table".
TABLE_SERVED = frozenset({"fixed_split", "table"})
# The MABWiser learning policy that makes the same kind of decision.
MABWISER_OF = {
    "thompson": "mabwiser_ts",
    "table": "mabwiser_ts",
    "ucb1": "mabwiser_ucb1",
    "epsilon_greedy": "mabwiser_eps",
}

TARGET_TS_BATCH_NS = 300.0
TARGET_TABLE_NS = 15.0
TARGET_SINGLE_NS = 2000.0
TARGET_MABWISER_SPEEDUP = 50.0


@dataclass(frozen=True)
class CoreSettings:
    """Sizes of one run; validates itself.

    >>> CoreSettings(ks=(2, 10), repeats=3).ks
    (2, 10)
    """

    ks: tuple[int, ...] = (2, 10, 100, 1000)
    repeats: int = 5
    min_time_s: float = 0.05
    batch: int = 10_000
    # Caps decisions x K per exact batch call (time and the n x K NumPy baseline's memory).
    max_draws: int = 2_000_000
    mabwiser: bool = True
    mabwiser_batch: int = 2_000
    prior_rewards: int = 100
    seed: int = 20_240_601

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if not self.ks or any(not 2 <= k <= 1000 for k in self.ks):
            raise ValueError(f"ks must be a non-empty list of K in [2, 1000], got {self.ks}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not (math.isfinite(self.min_time_s) and self.min_time_s >= 0):
            raise ValueError(f"min_time_s must be >= 0, got {self.min_time_s!r}")
        if not 1 <= self.batch <= 100_000:
            raise ValueError(f"batch must be in [1, 100000], got {self.batch}")
        if self.max_draws < 1000:
            raise ValueError(f"max_draws must be >= 1000, got {self.max_draws}")
        if self.mabwiser_batch < 1:
            raise ValueError(f"mabwiser_batch must be >= 1, got {self.mabwiser_batch}")
        if self.prior_rewards < 1:
            raise ValueError(f"prior_rewards must be >= 1, got {self.prior_rewards}")

    def exact_batch(self, k: int) -> int:
        """Decisions per exact-sampling batch call at ``k`` arms."""
        return max(1, min(self.batch, self.max_draws // k))

    def mw_batch(self, k: int) -> int:
        """Decisions per MABWiser batch call: it builds a dict per decision, O(n K) objects."""
        return max(10, min(self.mabwiser_batch, 200_000 // k))


QUICK = CoreSettings(ks=(10, 1000), repeats=3, min_time_s=0.01, mabwiser_batch=500)
FULL = CoreSettings(repeats=7)


@dataclass(frozen=True)
class Measured:
    """One timed operation: who (name, path), how (mode, per-call batch), K, and the timing."""

    name: str
    path: str  # engine | kernel | numpy | numba | mabwiser
    mode: str  # single | batch | table | reward_single | reward_batch | refresh
    k: int
    batch: int
    timing: Timing
    what: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "name": self.name,
            "path": self.path,
            "mode": self.mode,
            "k": self.k,
            "batch": self.batch,
            "ns_per_op": self.timing.median_ns,
            **{f"timing_{k}": v for k, v in self.timing.to_dict().items()},
            "what": self.what,
        }


# ----------------------------------------------------------------------------------------
# Baseline: a plain numba loop over np.random.beta (numba's generator, no custom sampler)
# ----------------------------------------------------------------------------------------


@njit(cache=True)
def _numba_seed(seed: int) -> None:
    np.random.seed(seed)


@njit(cache=True)
def _numba_beta_choose(a: np.ndarray, b: np.ndarray) -> int:
    best = 0
    best_v = -1.0
    for k in range(a.shape[0]):
        v = np.random.beta(a[k], b[k])
        if v > best_v:
            best_v = v
            best = k
    return best


@njit(cache=True)
def _numba_beta_batch(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    for i in range(out.shape[0]):
        out[i] = _numba_beta_choose(a, b)


# ----------------------------------------------------------------------------------------
# The data every contender learns from
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Rewards already observed at K arms (counts vary per arm, so index ties are rare)."""

    k: int
    arms: np.ndarray
    bernoulli: np.ndarray
    normal: np.ndarray

    @property
    def beta_ab(self) -> tuple[np.ndarray, np.ndarray]:
        """Beta(1 + successes, 1 + failures) per arm: the engine's default prior."""
        n = np.bincount(self.arms, minlength=self.k).astype(np.float64)
        s = np.bincount(self.arms, weights=self.bernoulli, minlength=self.k)
        return 1.0 + s, 1.0 + n - s

    def normal_gamma(self, config: PolicyConfig) -> np.ndarray:
        """Normal-Gamma posterior ``[K, 4]`` (mu, kappa, shape, rate) under ``config``'s prior."""
        stats = np.zeros((self.k, 3))
        kernels.update_batch(stats, self.arms, self.normal, 1.0)
        out = np.empty((self.k, 4))
        c = config
        kernels.normal_gamma_params(
            stats, c.prior_mean, c.prior_kappa, c.prior_shape, c.prior_rate, out
        )
        return out


def make_workload(k: int, settings: CoreSettings) -> Workload:
    """Bernoulli rates 4%..6% and normal means 0..0.2 spread over the arms."""
    rng = np.random.default_rng(settings.seed + k)
    n = settings.prior_rewards * k
    arms = rng.integers(0, k, size=n).astype(np.int64)
    p = np.linspace(0.04, 0.06, k)
    mu = np.linspace(0.0, 0.2, k)
    bernoulli = (rng.random(n) < p[arms]).astype(np.float64)
    normal = rng.normal(mu[arms], 1.0)
    return Workload(k, arms, bernoulli, normal)


# The engine refreshes the allocation every min(refresh_rewards, rewards_total // 50)
# rewards; past 50 x refresh_rewards rewards that is every refresh_rewards: its steady state.
_REFRESH_REWARDS = ExperimentConfig(name="x", variants=("a", "b")).refresh_rewards
STEADY_REWARDS = 50 * _REFRESH_REWARDS


def make_engine(work: Workload, settings: CoreSettings) -> Engine:
    """One experiment per policy loaded with ``work``, one for rewards, one for refreshes.

    Decisions never trigger a refresh, so the decision experiments are timed on a fixed
    posterior. The rewards experiment has the default refresh schedule and enough history
    (``STEADY_REWARDS``) to be in its steady state: reward timings include the amortized
    Monte Carlo refresh, as a long-running experiment pays it.
    """
    engine = Engine()
    variants = tuple(f"v{i}" for i in range(work.k))
    seed = settings.seed + work.k
    for policy, (config, mode) in POLICIES.items():
        name = f"{policy}-k{work.k}"
        engine.create(
            ExperimentConfig(
                name=name, variants=variants, policy=config, mode=mode, refresh_ms=10**9, seed=seed
            )
        )
        values = work.normal if config.reward == RewardKind.NORMAL else work.bernoulli
        engine.reward_batch(name, work.arms, values)
        engine.refresh(name)
    reps = -(-STEADY_REWARDS // work.arms.size)
    for name in (f"rewards-k{work.k}", f"refresh-k{work.k}"):
        engine.create(ExperimentConfig(name=name, variants=variants, refresh_ms=10**9, seed=seed))
        engine.reward_batch(name, np.tile(work.arms, reps), np.tile(work.bernoulli, reps))
        engine.refresh(name)
    return engine


# ----------------------------------------------------------------------------------------
# What is timed: each factory returns run(n), which performs n calls
# ----------------------------------------------------------------------------------------


def _repeat(call: Callable[[], object]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            call()

    return run


def _engine_single(engine: Engine, name: str) -> Callable[[int], None]:
    assign = engine.assign

    def run(n: int) -> None:
        for _ in range(n):
            assign(name)

    return run


def _numpy_ts_single(rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> Callable[[], int]:
    return lambda: int(rng.beta(a, b).argmax())


def _numpy_ts_batch(
    rng: np.random.Generator, a: np.ndarray, b: np.ndarray, n: int
) -> Callable[[], np.ndarray]:
    return lambda: rng.beta(a, b, size=(n, a.shape[0])).argmax(axis=1)


def _numpy_ng_draw(rng: np.random.Generator, params: np.ndarray, n: int | None) -> np.ndarray:
    """Posterior draws of the means: tau ~ Gamma(shape, 1/rate), mu ~ N(mu_n, 1/(kappa tau))."""
    size = None if n is None else (n, params.shape[0])
    tau = rng.gamma(params[:, 2], 1.0 / params[:, 3], size=size)
    return params[:, 0] + rng.standard_normal(size=tau.shape) / np.sqrt(params[:, 1] * tau)


class _MabwiserModels:
    """MABWiser bandits fitted on the same data as the engine (imported lazily: slow import)."""

    def __init__(self, work: Workload, seed: int) -> None:
        from mabwiser.mab import MAB, LearningPolicy

        arms = list(range(work.k))
        self.models = {
            "mabwiser_ts": MAB(arms, LearningPolicy.ThompsonSampling(), seed=seed),
            "mabwiser_ucb1": MAB(arms, LearningPolicy.UCB1(alpha=1.0), seed=seed),
            "mabwiser_eps": MAB(arms, LearningPolicy.EpsilonGreedy(epsilon=0.1), seed=seed),
        }
        for model in self.models.values():
            model.fit(work.arms, work.bernoulli)
        # A separate TS model takes the partial_fit timings so decisions see fixed data.
        self.updates = MAB(arms, LearningPolicy.ThompsonSampling(), seed=seed)
        self.updates.fit(work.arms, work.bernoulli)


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


@dataclass
class _Fixture:
    """Everything the timings at one K share: data, engine, posterior, buffers."""

    settings: CoreSettings
    work: Workload
    engine: Engine
    rng: np.random.Generator
    a: np.ndarray
    b: np.ndarray
    stats: np.ndarray
    state: np.ndarray
    alloc: np.ndarray

    @property
    def k(self) -> int:
        return self.work.k

    @property
    def nb(self) -> int:
        return self.settings.exact_batch(self.work.k)


def make_fixture(k: int, settings: CoreSettings) -> _Fixture:
    """Data, a loaded engine and the raw-kernel inputs for K arms."""
    work = make_workload(k, settings)
    engine = make_engine(work, settings)
    a, b = work.beta_ab
    stats = np.zeros((k, 3))
    kernels.update_batch(stats, work.arms, work.bernoulli, 1.0)
    return _Fixture(
        settings=settings,
        work=work,
        engine=engine,
        rng=np.random.default_rng(settings.seed),
        a=a,
        b=b,
        stats=stats,
        state=kernels.seed_state(settings.seed),
        alloc=engine.view(f"table-k{k}").alloc,
    )


class _Runner:
    """Queues every timing at one K, then times the queue in interleaved rounds."""

    def __init__(self, settings: CoreSettings, log: Callable[[str], None]) -> None:
        self.s = settings
        self.log = log
        self.out: list[Measured] = []
        self._k = 0
        self._pending: list[tuple[str, str, str, Callable[[int], object], str, int]] = []

    def time(
        self,
        name: str,
        path: str,
        mode: str,
        run: Callable[[int], object],
        what: str,
        batch: int = 1,
    ) -> None:
        """Queue a measurement; :meth:`flush` times the queue."""
        self._pending.append((name, path, mode, run, what, batch))

    def flush(self) -> None:
        """Time every queued measurement; log and keep the results."""
        tasks = [(run, batch) for (*_, run, _what, batch) in self._pending]
        timings = measure_interleaved(tasks, repeats=self.s.repeats, min_time_s=self.s.min_time_s)
        for (name, path, mode, _run, what, batch), t in zip(self._pending, timings, strict=True):
            self.out.append(Measured(name, path, mode, self._k, batch, t, what))
            self.log(f"  K={self._k:<5d} {path:8s} {name:16s} {mode:13s} {t.median_ns:12,.1f} ns")
        self._pending = []

    def run_k(self, k: int) -> None:
        """Everything at K arms."""
        fx = make_fixture(k, self.s)
        self._k = k
        self.engine_decisions(fx)
        self.kernel_decisions(fx)
        self.numpy_numba_baselines(fx)
        mw = _MabwiserModels(fx.work, self.s.seed) if self.s.mabwiser else None
        if mw is not None:
            self.mabwiser_decisions(fx, mw)
        self.rewards(fx, mw)
        self.flush()

    def engine_decisions(self, fx: _Fixture) -> None:
        """Every policy through the engine, single and batch (table-served: table)."""
        for policy in POLICIES:
            name = f"{policy}-k{fx.k}"
            self.time(
                policy,
                "engine",
                "single",
                _engine_single(fx.engine, name),
                "Engine.assign(name) per decision, in-process, Python loop",
            )
            table = policy in TABLE_SERVED
            count = self.s.batch if table else fx.nb
            self.time(
                policy,
                "engine",
                "table" if table else "batch",
                _repeat(functools.partial(fx.engine.assign_batch, name, count)),
                f"Engine.assign_batch(name, {count}) incl. propensities and counts",
                batch=count,
            )

    def kernel_decisions(self, fx: _Fixture) -> None:
        """The raw kernels: what the engine adds on top of them."""
        params = np.empty((fx.k, 2))
        kernels.beta_params(fx.stats, 1.0, 1.0, params)
        pulls = np.zeros(fx.k, dtype=np.int64)
        out = np.empty(fx.nb, dtype=np.int64)
        self.time(
            "thompson",
            "kernel",
            "single",
            _repeat(lambda: kernels.thompson_beta_one(fx.state, fx.stats, pulls, 1.0, 1.0)),
            "kernels.thompson_beta_one per call from Python (dispatch included)",
        )
        self.time(
            "thompson",
            "kernel",
            "batch",
            _repeat(lambda: kernels.ts_beta_batch(fx.state, params, out)),
            f"kernels.ts_beta_batch, {fx.nb} decisions per call",
            batch=fx.nb,
        )
        prob = np.empty(fx.k)
        alias = np.empty(fx.k, dtype=np.int64)
        kernels.alias_build(fx.alloc, prob, alias)
        tout = np.empty(self.s.batch, dtype=np.int64)
        self.time(
            "table",
            "kernel",
            "table",
            _repeat(lambda: kernels.alias_batch(fx.state, prob, alias, tout)),
            f"kernels.alias_batch over the table mode's allocation, {self.s.batch} draws per call",
            batch=self.s.batch,
        )

    def numpy_numba_baselines(self, fx: _Fixture) -> None:
        """Plain NumPy and plain numba on the same posterior at the same K."""
        rng, a, b, k, nb, batch = fx.rng, fx.a, fx.b, fx.k, fx.nb, self.s.batch
        self.time(
            "numpy_ts",
            "numpy",
            "single",
            _repeat(_numpy_ts_single(rng, a, b)),
            "rng.beta(a, b).argmax() per call, a, b: float64[K]",
        )
        self.time(
            "numpy_ts",
            "numpy",
            "batch",
            _repeat(_numpy_ts_batch(rng, a, b, nb)),
            f"rng.beta(a, b, size=({nb}, K)).argmax(axis=1)",
            batch=nb,
        )
        ng = fx.work.normal_gamma(POLICIES["thompson_normal"][0])
        self.time(
            "numpy_ts_normal",
            "numpy",
            "single",
            _repeat(lambda: int(_numpy_ng_draw(rng, ng, None).argmax())),
            "Normal-Gamma Thompson in NumPy: rng.gamma + rng.standard_normal, argmax",
        )
        self.time(
            "numpy_ts_normal",
            "numpy",
            "batch",
            _repeat(lambda: _numpy_ng_draw(rng, ng, nb).argmax(axis=1)),
            f"Normal-Gamma Thompson in NumPy, size=({nb}, K), argmax(axis=1)",
            batch=nb,
        )
        self.time(
            "numpy_choice",
            "numpy",
            "single",
            _repeat(lambda: rng.choice(k, p=fx.alloc)),
            "rng.choice(K, p=allocation) per call",
        )
        self.time(
            "numpy_choice",
            "numpy",
            "batch",
            _repeat(lambda: rng.choice(k, size=batch, p=fx.alloc)),
            f"rng.choice(K, size={batch}, p=allocation)",
            batch=batch,
        )
        _numba_seed(self.s.seed)
        out = np.empty(nb, dtype=np.int64)
        self.time(
            "numba_np_beta",
            "numba",
            "single",
            _repeat(lambda: _numba_beta_choose(a, b)),
            "@njit loop over np.random.beta(a[k], b[k]), argmax; one call per decision",
        )
        self.time(
            "numba_np_beta",
            "numba",
            "batch",
            _repeat(lambda: _numba_beta_batch(a, b, out)),
            f"@njit loop over np.random.beta, {nb} decisions per call",
            batch=nb,
        )

    def mabwiser_decisions(self, fx: _Fixture, mw: _MabwiserModels) -> None:
        """MABWiser: predict() per decision, and predict(contexts) for a list of them."""
        mwb = self.s.mw_batch(fx.k)
        contexts = np.zeros((mwb, 1))
        for mname, model in mw.models.items():
            self.time(
                mname, "mabwiser", "single", _repeat(model.predict), "MAB.predict() per decision"
            )
            self.time(
                mname,
                "mabwiser",
                "batch",
                _repeat(functools.partial(model.predict, contexts)),
                f"MAB.predict(contexts) with {mwb} dummy context rows: the documented "
                "way to get a list of decisions from a context-free bandit",
                batch=mwb,
            )

    def rewards(self, fx: _Fixture, mw: _MabwiserModels | None) -> None:
        """Reward updates (engine, kernel, NumPy, MABWiser) and the allocation refresh."""
        k, batch, engine = fx.k, self.s.batch, fx.engine
        rname = f"rewards-k{k}"
        r_arms = fx.rng.integers(0, k, size=batch).astype(np.int64)
        r_vals = (fx.rng.random(batch) < 0.05).astype(np.float64)
        r_epochs = np.zeros(batch, dtype=np.int64)
        self.time(
            "engine_reward",
            "engine",
            "reward_single",
            _repeat(lambda: engine.reward(rname, 1, 1.0)),
            "Engine.reward(name, arm, value) per reward: validation, update, amortized refresh",
        )
        self.time(
            "engine_reward",
            "engine",
            "reward_batch",
            _repeat(lambda: engine.reward_batch(rname, r_arms, r_vals, r_epochs)),
            f"Engine.reward_batch(name, arms, values, epochs), {batch} per call, incl. "
            "one refresh per call",
            batch=batch,
        )
        stats = fx.stats.copy()
        epoch_stats = np.zeros((1, k, 3))
        self.time(
            "engine_reward",
            "kernel",
            "reward_batch",
            _repeat(
                lambda: kernels.update_epochs(stats, epoch_stats, r_arms, r_epochs, r_vals, 1.0)
            ),
            f"kernels.update_epochs, {batch} rewards per call",
            batch=batch,
        )
        np_stats = np.zeros((k, 3))

        def np_single() -> None:
            np_stats[1, 0] += 1.0
            np_stats[1, 1] += 1.0
            np_stats[1, 2] += 1.0

        def np_batch() -> None:
            np_stats[:, 0] += np.bincount(r_arms, minlength=k)
            np_stats[:, 1] += np.bincount(r_arms, weights=r_vals, minlength=k)
            np_stats[:, 2] += np.bincount(r_arms, weights=r_vals * r_vals, minlength=k)

        self.time(
            "numpy_update",
            "numpy",
            "reward_single",
            _repeat(np_single),
            "three NumPy scalar += on float64[K, 3] sufficient statistics",
        )
        self.time(
            "numpy_update",
            "numpy",
            "reward_batch",
            _repeat(np_batch),
            f"three np.bincount over {batch} rewards added to float64[K, 3]",
            batch=batch,
        )
        if mw is not None:
            mwb = self.s.mw_batch(k)
            updates = mw.updates
            self.time(
                "mabwiser_update",
                "mabwiser",
                "reward_single",
                _repeat(lambda: updates.partial_fit([1], [1.0])),
                "MAB.partial_fit([arm], [reward]) per reward (ThompsonSampling)",
            )
            self.time(
                "mabwiser_update",
                "mabwiser",
                "reward_batch",
                _repeat(lambda: updates.partial_fit(r_arms[:mwb], r_vals[:mwb])),
                f"MAB.partial_fit(arms, rewards) with {mwb} per call (ThompsonSampling)",
                batch=mwb,
            )
        # The refresh (Monte Carlo P(best)) behind table mode and exact Thompson propensities.
        self.time(
            "engine_refresh",
            "engine",
            "refresh",
            _repeat(lambda: engine.refresh(f"refresh-k{k}")),
            "Engine.refresh(name): Monte Carlo P(best) with 2000 draws + alias table",
        )


# ----------------------------------------------------------------------------------------
# Results: rows against baselines, targets, plot, summary
# ----------------------------------------------------------------------------------------


def _index(measured: Sequence[Measured]) -> dict[tuple[str, str, str, int], Measured]:
    return {(m.name, m.path, m.mode, m.k): m for m in measured}


def _numpy_baseline_of(policy: str) -> str:
    if policy == "thompson_normal":
        return "numpy_ts_normal"
    return "numpy_choice" if policy in TABLE_SERVED else "numpy_ts"


def _row(m: Measured, base: Measured, baseline: str) -> dict[str, Any]:
    return {
        "policy": m.name,
        "k": m.k,
        "mode": m.mode,
        "path": m.path,
        "batch": m.batch,
        "ns_per_decision": m.timing.median_ns,
        "baseline": baseline,
        "baseline_name": base.name,
        "baseline_ns_per_decision": base.timing.median_ns,
        "speedup": base.timing.median_ns / m.timing.median_ns,
        "what": m.what,
        "baseline_what": base.what,
    }


def decision_rows(measured: Sequence[Measured]) -> list[dict[str, Any]]:
    """One row per (engine or kernel decision timing, baseline) at the same K."""
    idx = _index(measured)
    rows: list[dict[str, Any]] = []
    for m in measured:
        if m.path not in ("engine", "kernel") or m.mode not in ("single", "batch", "table"):
            continue
        bmode = "single" if m.mode == "single" else "batch"
        candidates = [("numpy", _numpy_baseline_of(m.name), "numpy")]
        if m.name in MABWISER_OF:
            candidates.append(("mabwiser", MABWISER_OF[m.name], "mabwiser"))
        for baseline, bname, bpath in candidates:
            base = idx.get((bname, bpath, bmode, m.k))
            if base is not None:
                rows.append(_row(m, base, baseline))
    return rows


def update_rows(measured: Sequence[Measured]) -> list[dict[str, Any]]:
    """Per-reward update timings against NumPy and MABWiser at the same K."""
    idx = _index(measured)
    rows: list[dict[str, Any]] = []
    for m in measured:
        if m.name != "engine_reward":
            continue
        for baseline, bname in (("numpy", "numpy_update"), ("mabwiser", "mabwiser_update")):
            base = idx.get((bname, baseline, m.mode, m.k))
            if base is not None:
                rows.append(
                    {
                        "k": m.k,
                        "mode": m.mode,
                        "path": m.path,
                        "batch": m.batch,
                        "ns_per_reward": m.timing.median_ns,
                        "baseline": baseline,
                        "baseline_ns_per_reward": base.timing.median_ns,
                        "speedup": base.timing.median_ns / m.timing.median_ns,
                        "what": m.what,
                        "baseline_what": base.what,
                    }
                )
    return rows


def _ns(
    idx: dict[tuple[str, str, str, int], Measured], key: tuple[str, str, str, int]
) -> float | None:
    m = idx.get(key)
    return None if m is None else m.timing.median_ns


def evaluate_targets(measured: Sequence[Measured]) -> list[dict[str, Any]]:
    """The four performance targets, measured value against target (None if not measured)."""
    idx = _index(measured)
    ts_batch = _ns(idx, ("thompson", "engine", "batch", 10))
    ts_kernel = _ns(idx, ("thompson", "kernel", "batch", 10))
    table = {
        m.k: m.timing.median_ns
        for m in measured
        if (m.name, m.path, m.mode) == ("table", "engine", "table")
    }
    table_kernel = {
        m.k: m.timing.median_ns
        for m in measured
        if (m.name, m.path, m.mode) == ("table", "kernel", "table")
    }
    single = _ns(idx, ("thompson", "engine", "single", 10))
    mw_batch = _ns(idx, ("mabwiser_ts", "mabwiser", "batch", 10))
    mw_single = _ns(idx, ("mabwiser_ts", "mabwiser", "single", 10))
    table10 = table.get(10)

    def ratio(num: float | None, den: float | None) -> float | None:
        return None if num is None or den is None else num / den

    return [
        target_entry(
            "exact_thompson_batch_k10",
            "exact Thompson (Beta) batch, Engine.assign_batch, ns/decision at K=10",
            ts_batch,
            "<=",
            TARGET_TS_BATCH_NS,
            "ns/decision",
            {"raw_kernel_ts_beta_batch_ns": ts_kernel},
        ),
        target_entry(
            "table_mode_max_k_le_1000",
            "allocation-table mode, Engine.assign_batch, worst ns/decision over K <= 1000",
            max(table.values()) if table else None,
            "<=",
            TARGET_TABLE_NS,
            "ns/decision",
            {"engine_ns_by_k": table, "raw_kernel_alias_batch_ns_by_k": table_kernel},
        ),
        target_entry(
            "single_assign_k10",
            "Engine.assign (exact Thompson), one decision per call in-process, ns at K=10",
            single,
            "<=",
            TARGET_SINGLE_NS,
            "ns/decision",
            {"raw_kernel_thompson_beta_one_ns": _ns(idx, ("thompson", "kernel", "single", 10))},
        ),
        target_entry(
            "speedup_vs_mabwiser_batch_k10",
            "MABWiser ThompsonSampling batch (predict with n contexts) / exact Thompson "
            "Engine.assign_batch, at K=10",
            ratio(mw_batch, ts_batch),
            ">=",
            TARGET_MABWISER_SPEEDUP,
            "x",
            {
                "mabwiser_batch_ns": mw_batch,
                "engine_batch_ns": ts_batch,
                "table_mode_speedup": ratio(mw_batch, table10),
                "vs_mabwiser_predict_loop": ratio(mw_single, ts_batch),
            },
        ),
    ]


_ENGINE_STYLE = {"engine": "-", "kernel": "-."}


def _series(
    measured: Sequence[Measured],
    modes: set[str],
    label: Callable[[Measured], str],
    style: Callable[[Measured], str],
) -> list[Series]:
    groups: dict[str, list[Measured]] = {}
    for m in measured:
        if m.mode in modes and m.name not in ("engine_refresh",):
            groups.setdefault(label(m), []).append(m)
    out = []
    for lab, ms in groups.items():
        ms.sort(key=lambda m: m.k)
        out.append(
            Series(
                lab,
                [m.k for m in ms],
                [m.timing.median_ns for m in ms],
                style=style(ms[0]),
                marker="s" if ms[0].path == "kernel" else "o",
            )
        )
    return out


def _style(m: Measured) -> str:
    return _ENGINE_STYLE.get(m.path, "--")


def make_plot(measured: Sequence[Measured], path: Path) -> None:
    """ns/decision vs K (log-log): single calls, batch/table, reward updates."""

    def label(m: Measured) -> str:
        return f"{m.path}: {m.name}" + (f" ({m.mode})" if m.mode == "table" else "")

    panels = [
        Panel(
            "one decision per call (in-process)",
            "K (variants)",
            "ns per decision",
            _series(measured, {"single"}, label, _style),
            hlines=((TARGET_SINGLE_NS, "target 2 us (engine, K=10)"),),
        ),
        Panel(
            "batch and table (per decision)",
            "K (variants)",
            "ns per decision",
            _series(measured, {"batch", "table"}, label, _style),
            hlines=(
                (TARGET_TS_BATCH_NS, "target 300 ns (exact TS, K=10)"),
                (TARGET_TABLE_NS, "target 15 ns (table)"),
            ),
        ),
        Panel(
            "reward updates (per reward)",
            "K (variants)",
            "ns per reward",
            _series(
                measured,
                {"reward_single", "reward_batch"},
                lambda m: f"{m.path}: {m.name} ({m.mode.removeprefix('reward_')})",
                _style,
            ),
        ),
    ]
    plot_panels(
        path,
        panels,
        "allocator core: ns per decision vs K (lower is better; dashed = baselines, same run)",
    )


def summary_rows(
    targets: Sequence[dict[str, Any]], measured: Sequence[Measured]
) -> list[SummaryRow]:
    """The core rows of results/summary.md: the targets and a few reference numbers."""
    rows = target_rows(NAME, targets, label="description", missing="not measured")
    speed = next(t for t in targets if t["name"] == "speedup_vs_mabwiser_batch_k10")["detail"]
    for detail, metric in (
        ("table_mode_speedup", "MABWiser TS batch / table-mode Engine.assign_batch, at K=10"),
        ("vs_mabwiser_predict_loop", "MABWiser TS predict() loop / exact Thompson batch, K=10"),
    ):
        if speed[detail] is not None:
            rows.append(SummaryRow(NAME, metric, format_value(speed[detail]), "x"))
    idx = _index(measured)
    refs = [
        (
            ("numpy_ts", "numpy", "batch", 10),
            "NumPy Thompson batch ns/decision at K=10",
            "ns/decision",
        ),
        (
            ("numba_np_beta", "numba", "batch", 10),
            "numba loop over np.random.beta, batch ns/decision at K=10",
            "ns/decision",
        ),
        (
            ("mabwiser_ts", "mabwiser", "batch", 10),
            "MABWiser ThompsonSampling batch ns/decision at K=10",
            "ns/decision",
        ),
        (
            ("engine_reward", "engine", "reward_batch", 10),
            "Engine.reward_batch ns/reward at K=10",
            "ns/reward",
        ),
        (
            ("engine_reward", "engine", "reward_single", 10),
            "Engine.reward (one per call) ns at K=10",
            "ns/reward",
        ),
        (
            ("engine_refresh", "engine", "refresh", 10),
            "Engine.refresh (P(best), 2000 draws) at K=10",
            "ns/call",
        ),
    ]
    for key, metric, unit in refs:
        m = idx.get(key)
        if m is not None:
            rows.append(SummaryRow(NAME, metric, format_value(m.timing.median_ns), unit))
    return rows


def run(settings: CoreSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure everything in ``settings``; return the JSON document."""
    runner = _Runner(settings, log)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    for k in settings.ks:
        runner.run_k(k)
    measured = runner.out
    targets = evaluate_targets(measured)
    return {
        "benchmark": NAME,
        "description": __doc__.split("\n\n")[0] if __doc__ else NAME,
        "machine": machine_info(("numpy", "numba", "mabwiser", "matplotlib")),
        "load_average_at_start": load_at_start,
        "settings": asdict(settings),
        "elapsed_s": round(time.perf_counter() - started, 2),
        "targets": targets,
        "results": decision_rows(measured),
        "updates": update_rows(measured),
        "measurements": [m.to_dict() for m in measured],
        "notes": [
            "ns_per_decision is the median over repeats of (wall time / decisions); each repeat"
            " is calibrated to last at least settings.min_time_s.",
            "Rows have one baseline each; a timing compared with NumPy and MABWiser appears"
            " twice. The NumPy baseline is Beta Thompson for thompson and the index policies,"
            " Normal-Gamma Thompson for thompson_normal, and rng.choice over the same"
            " allocation for table-served policies (table, fixed_split).",
            "MABWiser batch = MAB.predict(contexts) with n dummy context rows (documented for"
            " context-free bandits); MABWiser single = MAB.predict() per call.",
            "Decision timings run on a fixed posterior (assign never refreshes). Reward timings"
            " use the default refresh schedule in its steady state (one Monte Carlo refresh per"
            " refresh_rewards rewards, at most one per reward_batch call), so they include the"
            " amortized refresh; the refresh itself is timed separately (mode 'refresh') and"
            " the raw update as path 'kernel'.",
            "The machine may be shared: trust the ratios more than the absolute numbers.",
        ],
        "_measured": measured,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = base_parser(NAME, "ns per decision / per reward vs K, against baselines")
    parser.add_argument(
        "--ks",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        help="comma-separated K values (default: 2,10,100,1000; quick: 10,1000)",
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement")
    parser.add_argument("--min-time", type=float, help="seconds per timed repeat, at least")
    parser.add_argument("--batch", type=int, help="decisions per batch call")
    parser.add_argument("--no-mabwiser", action="store_true", help="skip the MABWiser baseline")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    for field_name, value in (
        ("ks", args.ks),
        ("repeats", args.repeats),
        ("min_time_s", args.min_time),
        ("batch", args.batch),
    ):
        if value is not None:
            overrides[field_name] = value
    if args.no_mabwiser:
        overrides["mabwiser"] = False
    try:
        settings = CoreSettings(**{**asdict(base), **overrides})
    except ValueError as err:
        parser.error(str(err))
    doc = run(settings)
    measured: list[Measured] = doc.pop("_measured")
    write_json(args.json, doc)
    make_plot(measured, args.png)
    if not args.no_summary:
        update_summary(
            summary_rows(doc["targets"], measured), args.summary, replace_benchmarks=True
        )
    print_targets(doc["targets"])
    print(f"wrote {args.json} and {args.png} in {doc['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

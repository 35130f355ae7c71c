"""In-memory experiment state and the only object the servicer talks to.

Per experiment the engine keeps contiguous arrays (posterior statistics, generator states,
the allocation in force and its alias table, per-epoch counts) and one lock. Public methods
validate their arguments and then call exactly one kernel on the hot path; they never touch
a database.

Allocation epochs: the allocation in force (the propensity vector) is re-estimated on a
schedule (every ``refresh_rewards`` rewards or ``refresh_ms`` milliseconds). A new epoch
opens when that vector has moved by more than ``epoch_tv`` in total variation, or when an
operator overrides it. Each epoch records its shares, its decisions per arm and the rewards
of its decisions, which is what the SRM check and the epoch-stratified estimates need.

>>> from allocator.policies import PolicyConfig
>>> engine = Engine()
>>> _ = engine.create(ExperimentConfig(name="ranker", variants=("a", "b"), seed=1))
>>> d = engine.assign("ranker")
>>> engine.reward("ranker", d.arm, 1.0, epoch=d.epoch)
>>> engine.counts("ranker")["a"] + engine.counts("ranker")["b"]
1
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np

from allocator import kernels
from allocator.errors import (
    Busy,
    ExperimentExists,
    InvalidArgument,
    UnknownExperiment,
    WrongState,
)
from allocator.guardrails import GuardrailStats
from allocator.policies import (
    FixedSplit,
    IndexPolicy,
    PolicyConfig,
    PolicyKind,
    RewardKind,
    make_policy,
)
from allocator.stats import srm_e_step

MAX_VARIANTS = 1000
MAX_BATCH = 100_000
# Largest |reward| (and guardrail value) taken. Statistics keep running sums of squares,
# and the report's Welch degrees of freedom square a variance again: at 1e50 a square is
# at most 1e100, so sums of squares stay finite up to ~1e208 rewards, and a squared
# variance up to ~1e200. A finite 1e200 would make the sum of squares inf (a NaN
# posterior, logged and replayed for ever); no real reward (revenue, latency, a score)
# comes within dozens of orders of magnitude of the bound.
MAX_ABS_REWARD = 1e50
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class AllocationMode(StrEnum):
    """EXACT: a fresh posterior draw per decision. TABLE: draws from the refreshed P(best)."""

    EXACT = "exact"
    TABLE = "table"


@dataclass(frozen=True)
class Shaping:
    """Traffic shaping around the policy.

    ``control_share`` is a fixed holdout on variant 0; ``floor`` a minimum share for every
    variant, added as a mixture so the policy's relative weights are not distorted; ``cap``
    a maximum share per variant (applied to the allocation table, so a cap serves from the
    table); ``exploration_samples``: equal split until every variant has that many rewards.
    """

    control_share: float = 0.0
    floor: float = 0.0
    cap: float = 1.0
    exploration_samples: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.control_share < 1.0:
            raise ValueError(f"control_share must be in [0, 1), got {self.control_share!r}")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"floor must be in [0, 1), got {self.floor!r}")
        if not 0.0 < self.cap <= 1.0:
            raise ValueError(f"cap must be in (0, 1], got {self.cap!r}")
        if self.exploration_samples < 0:
            raise ValueError(f"exploration_samples must be >= 0, got {self.exploration_samples}")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines an experiment; immutable, validated when built.

    >>> ExperimentConfig(name="checkout", variants=("control", "v2")).n_arms
    2
    """

    name: str
    variants: tuple[str, ...]
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    mode: AllocationMode = AllocationMode.EXACT
    refresh_rewards: int = 1000
    refresh_ms: int = 1000
    epoch_tv: float = 0.05
    seed: int = 0
    shaping: Shaping = field(default_factory=Shaping)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "mode", AllocationMode(self.mode))
        if not self.name or len(self.name) > 128 or not set(self.name) <= _NAME_OK:
            raise ValueError(f"name must be 1-128 characters of [A-Za-z0-9_.-], got {self.name!r}")
        if len(self.variants) < 2:
            raise ValueError(f"variants must name at least 2 variants, got {len(self.variants)}")
        if len(self.variants) > MAX_VARIANTS:
            raise ValueError(f"at most {MAX_VARIANTS} variants, got {len(self.variants)}")
        if any(not v or len(v) > 200 for v in self.variants):
            raise ValueError("every variant name must be 1-200 characters")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variant names must be unique, got {list(self.variants)}")
        if self.refresh_rewards < 1 or self.refresh_ms < 1:
            raise ValueError("refresh_rewards and refresh_ms must be >= 1")
        if not 0.0 < self.epoch_tv <= 1.0:
            raise ValueError(f"epoch_tv must be in (0, 1], got {self.epoch_tv!r}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be a 64-bit unsigned integer, got {self.seed!r}")
        fixed = self.shaping.control_share + self.shaping.floor * len(self.variants)
        if fixed >= 1.0:
            raise ValueError(f"control_share + floor * variants must be < 1, got {fixed:.3f}")
        if self.shaping.cap * len(self.variants) < 1.0:
            raise ValueError("cap * variants must be >= 1 or no allocation fits under it")
        if self.policy.weights and len(self.policy.weights) != len(self.variants):
            raise ValueError(
                f"weights has {len(self.policy.weights)} entries for {len(self.variants)} variants"
            )

    @property
    def n_arms(self) -> int:
        """Number of variants."""
        return len(self.variants)

    def to_json(self) -> str:
        """Stable JSON form, for the store."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        """Inverse of :meth:`to_json`."""
        raw = json.loads(text)
        raw["policy"] = PolicyConfig(
            **{**raw["policy"], "weights": tuple(raw["policy"]["weights"])}
        )
        raw["shaping"] = Shaping(**raw["shaping"])
        raw["variants"] = tuple(raw["variants"])
        return cls(**raw)


class Decision(NamedTuple):
    """One assignment: the arm, its name, the probability it had, the allocation epoch."""

    arm: int
    variant: str
    propensity: float
    epoch: int


@dataclass(frozen=True)
class BatchDecision:
    """Columnar decisions: ``arms[i]`` was chosen with probability ``propensities[i]``."""

    arms: np.ndarray
    propensities: np.ndarray
    epoch: int
    variants: tuple[str, ...]


@dataclass(frozen=True)
class ExperimentSnapshot:
    """All of one experiment's state as arrays: restore gives back identical arrays."""

    config: ExperimentConfig
    arrays: Mapping[str, np.ndarray]
    scalars: Mapping[str, float | int | bool]

    def to_bytes(self) -> bytes:
        """Self-describing bytes (npz + JSON header), for the store."""
        buf = io.BytesIO()
        np.savez(buf, **dict(self.arrays))  # type: ignore[arg-type]
        header = json.dumps({"config": json.loads(self.config.to_json()), "scalars": self.scalars})
        head = header.encode()
        return struct.pack(">I", len(head)) + head + buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ExperimentSnapshot:
        """Inverse of :meth:`to_bytes`."""
        (n,) = struct.unpack(">I", data[:4])
        header = json.loads(data[4 : 4 + n])
        with np.load(io.BytesIO(data[4 + n :])) as npz:
            arrays = {k: npz[k] for k in npz.files}
        config = ExperimentConfig.from_json(json.dumps(header["config"]))
        return cls(config=config, arrays=arrays, scalars=header["scalars"])


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def _cap_shares(p: np.ndarray, cap: float) -> np.ndarray:
    """Water-filling: clip at ``cap`` and hand the excess to the uncapped, in proportion."""
    p = p / p.sum()
    for _ in range(p.shape[0]):
        over = p > cap + 1e-12
        if not over.any():
            break
        excess = float((p[over] - cap).sum())
        p[over] = cap
        free = ~over & (p < cap)
        if not free.any():
            break
        base = p[free]
        p[free] = base + excess * (base / base.sum() if base.sum() > 0 else 1.0 / base.size)
    return p


class _Experiment:
    """Mutable state of one experiment. Every method is called with ``lock`` held."""

    def __init__(self, config: ExperimentConfig, now: float) -> None:
        # Lock order: refresh_lock, then lock. ``lock`` guards every array and is held only
        # for O(K) work; ``refresh_lock`` guards ``mc_rng`` and is held across the Monte
        # Carlo estimate of P(best) (milliseconds at large K), so Assign never waits on it.
        self.refresh_lock = threading.Lock()
        self.lock = threading.Lock()
        self.set_config(config)
        k = config.n_arms
        self.stats = np.zeros((k, 3), dtype=np.float64)
        self.rng = kernels.seed_state(np.uint64(config.seed))  # type: ignore[arg-type]
        # P(best) and reports draw from their own stream, so refreshing on a timer never
        # perturbs the sequence of decisions that a seed reproduces.
        self.mc_rng = self.rng.copy()
        kernels.jump(self.mc_rng)
        self.override: np.ndarray | None = None
        self.archived = False
        self.alloc = np.full(k, 1.0 / k)
        self.prob = np.ones(k)
        self.alias = np.arange(k, dtype=np.int64)
        self.fixed_prob = np.ones(k)
        self.fixed_alias = np.arange(k, dtype=np.int64)
        self.fixed_mass = 0.0
        self.table_active = True
        self.epoch_shares = np.zeros((4, k))
        self.epoch_pulls = np.zeros((4, k), dtype=np.int64)
        self.epoch_stats = np.zeros((4, k, 3))
        self.epoch_started = np.zeros(4)
        self.epoch = 0
        # SRM bookkeeping: only decisions drawn from the allocation table have a split known
        # in advance (`alloc`); exact-mode decisions follow the live posterior or index, and
        # unit ids hash onto the epoch's shares. `srm_pulls` counts the table's decisions,
        # `expected` their split, `srm_mark` the table-eligible total at the last refresh.
        self.expected = np.zeros(k)
        self.srm_pulls = np.zeros(k, dtype=np.int64)
        self.unit_pulls = np.zeros(k, dtype=np.int64)
        self.srm_mark = np.zeros(k, dtype=np.int64)
        # The sequential SRM test's e-process over those decisions: (log e now, running
        # max of log e); see stats.srm_e_step.
        self.srm_e = np.zeros(2)
        self.guardrails = GuardrailStats(k)
        self.pending = 0  # decisions since the last refresh (a refresh trigger)
        self.rewards_since = 0
        self.rewards_total = 0
        self.last_refresh = now
        self.unit_prob = np.ones(k)
        self.unit_alias = np.arange(k, dtype=np.int64)
        self.one = np.empty(1, dtype=np.int64)
        self._compute_allocation(now, first=True)

    def set_config(self, config: ExperimentConfig) -> None:
        self.config = config
        self.variants = config.variants
        self.policy = make_policy(config.policy, config.n_arms)
        self.gamma = config.policy.discount

    # -- allocation ------------------------------------------------------------------
    def exploring(self) -> bool:
        need = self.config.shaping.exploration_samples
        if need <= 0:
            return False
        # Rewards received, undiscounted (as promotion's min_samples): with a discount the
        # weight in ``stats`` levels off below 1 / (1 - gamma) in total, so a warm-up
        # measured on it might never end.
        received = self.epoch_stats[: self.epoch + 1, :, 0].sum(axis=0)
        return bool((received < need).any())

    def needs_estimate(self) -> bool:
        """Whether the next refresh needs the policy's (possibly Monte Carlo) allocation."""
        return self.override is None and not self.exploring()

    def estimate(self, stats: np.ndarray) -> np.ndarray:
        """The policy's allocation for ``stats``; caller holds ``refresh_lock``, not ``lock``."""
        return self.policy.allocation(self.mc_rng, stats)

    def _compute_allocation(
        self,
        now: float,
        *,
        force_epoch: bool = False,
        first: bool = False,
        estimate: np.ndarray | None = None,
    ) -> None:
        """Install the allocation in force; open a new epoch if it moved enough.

        ``estimate`` is the policy's allocation computed outside ``lock``; without it the
        estimate is made here (the caller then holds ``refresh_lock`` too).
        """
        k = self.config.n_arms
        sh = self.config.shaping
        if self.override is not None:
            policy_alloc = self.override.copy()
            self.fixed_mass = 0.0
        else:
            if self.exploring():
                policy_alloc = np.full(k, 1.0 / k)
            elif estimate is not None and estimate.shape == (k,):
                policy_alloc = estimate.copy()
            else:
                policy_alloc = self.policy.allocation(self.mc_rng, self.stats)
            fixed = self._build_fixed()
            if self.fixed_mass > 0:
                policy_alloc = fixed + (1.0 - self.fixed_mass) * policy_alloc
            if sh.cap < 1.0:
                policy_alloc = _cap_shares(policy_alloc, sh.cap)
        alloc = policy_alloc / policy_alloc.sum()
        # Decisions since the last refresh were made under the old allocation and mode.
        seg = self._srm_segment()
        self.srm_e = self._srm_e_after(seg)
        self.srm_pulls += seg
        self.expected += seg.sum() * self.alloc
        self.srm_mark = self._served()
        kernels.alias_build(alloc, self.prob, self.alias)
        self.table_active = self._serves_from_table()
        self.pending = 0
        self.alloc = alloc
        self.rewards_since = 0
        self.last_refresh = now
        if first or force_epoch or _tv(alloc, self.epoch_shares[self.epoch]) > self.config.epoch_tv:
            self._open_epoch(now, first=first)
        self._bind()

    def _open_epoch(self, now: float, first: bool) -> None:
        if not first:
            self.epoch += 1
        if self.epoch >= self.epoch_shares.shape[0]:
            grow = self.epoch_shares.shape[0]
            k = self.config.n_arms
            self.epoch_shares = np.concatenate([self.epoch_shares, np.zeros((grow, k))])
            self.epoch_pulls = np.concatenate(
                [self.epoch_pulls, np.zeros((grow, k), dtype=np.int64)]
            )
            self.epoch_stats = np.concatenate([self.epoch_stats, np.zeros((grow, k, 3))])
            self.epoch_started = np.concatenate([self.epoch_started, np.zeros(grow)])
        self.epoch_shares[self.epoch] = self.alloc
        self.epoch_started[self.epoch] = now
        # Units hash onto the epoch's own table, so a unit keeps its arm for the whole
        # epoch even while the live allocation is refreshed within it.
        kernels.alias_build(self.alloc, self.unit_prob, self.unit_alias)
        self._bind()

    def _bind(self) -> None:
        """Pick the single-decision fast path for the current arrays and mode.

        A partial over the kernel skips two Python frames per request; it must be rebound
        whenever an array it holds is replaced (epoch growth, restore, a new variant).
        """
        pulls = self.epoch_pulls[self.epoch]
        # Index policies (UCBs, epsilon-greedy) report the exact probability of each
        # decision, computed with it; the others the refreshed allocation in force.
        self.live_props = not self.table_active and isinstance(self.policy, IndexPolicy)
        self.last_props = self.alloc
        # The allocation as a list too: a request reads its propensity without a NumPy
        # call (each costs microseconds at the tail under load; see README, Performance).
        self.alloc_list: list[float] = self.alloc.tolist()
        pc = self.config.policy
        self.assign_one: Callable[[], int]
        if self.table_active:
            self.assign_one = functools.partial(
                kernels.table_one, self.rng, self.prob, self.alias, pulls
            )
        elif (
            pc.kind == PolicyKind.THOMPSON
            and pc.reward == RewardKind.BERNOULLI
            and self.fixed_mass == 0.0
        ):
            self.assign_one = functools.partial(
                kernels.thompson_beta_one,
                self.rng,
                self.stats,
                pulls,
                pc.prior_alpha,
                pc.prior_beta,
            )
        else:
            self.assign_one = self._assign_general

    def _served(self) -> np.ndarray:
        """Decisions per arm made without a unit id, all epochs."""
        return self.epoch_pulls[: self.epoch + 1].sum(axis=0) - self.unit_pulls

    def _srm_segment(self) -> np.ndarray:
        """Table-served decisions per arm since the last refresh (zeros in exact mode)."""
        if not self.table_active:
            return np.zeros_like(self.srm_pulls)
        return self._served() - self.srm_mark

    def _srm_e_after(self, seg: np.ndarray) -> np.ndarray:
        """The SRM e-process after a segment of table decisions drawn from ``alloc``."""
        log_e = srm_e_step(float(self.srm_e[0]), self.srm_pulls, self.expected, seg, self.alloc)
        return np.array([log_e, max(float(self.srm_e[1]), log_e)])

    def _assign_general(self) -> int:
        self.last_props = self.decide(self.one)
        arm = int(self.one[0])
        self.epoch_pulls[self.epoch, arm] += 1
        return arm

    def refresh(
        self, now: float, *, force_epoch: bool = False, estimate: np.ndarray | None = None
    ) -> None:
        self._compute_allocation(now, force_epoch=force_epoch, estimate=estimate)

    # -- decisions ---------------------------------------------------------------------
    def decide(self, out: np.ndarray) -> np.ndarray:
        """Decisions into ``out``; returns the choice probabilities they were made with.

        Exact for index policies (computed with the decisions, from the same index),
        else the refreshed allocation in force.
        """
        if self.table_active:
            kernels.table_decide(self.rng, self.prob, self.alias, out)
            return self.alloc
        live: np.ndarray | None = None
        if isinstance(self.policy, IndexPolicy):
            live = self.policy.decide_with_allocation(self.rng, self.stats, out)
        else:
            self.policy.decide(self.rng, self.stats, out)
        if self.fixed_mass > 0:
            kernels.mix_fixed(self.rng, self.fixed_prob, self.fixed_alias, self.fixed_mass, out)
            if live is not None:
                live = self._fixed_shares() + (1.0 - self.fixed_mass) * live
        return self.alloc if live is None else live

    # -- growth --------------------------------------------------------------------------
    def add_arm(self, config: ExperimentConfig, now: float) -> None:
        self.set_config(config)
        k = config.n_arms
        self.stats = np.concatenate([self.stats, np.zeros((1, 3))])
        self.alloc = np.append(self.alloc, 0.0)
        self.expected = np.append(self.expected, 0.0)
        self.srm_pulls = np.append(self.srm_pulls, 0)
        self.unit_pulls = np.append(self.unit_pulls, 0)
        self.srm_mark = np.append(self.srm_mark, 0)
        self.prob = np.ones(k)
        self.alias = np.arange(k, dtype=np.int64)
        self.fixed_prob = np.ones(k)
        self.fixed_alias = np.arange(k, dtype=np.int64)
        self.unit_prob = np.ones(k)
        self.unit_alias = np.arange(k, dtype=np.int64)
        e = self.epoch_shares.shape[0]
        self.epoch_shares = np.concatenate([self.epoch_shares, np.zeros((e, 1))], axis=1)
        self.epoch_pulls = np.concatenate(
            [self.epoch_pulls, np.zeros((e, 1), dtype=np.int64)], axis=1
        )
        self.epoch_stats = np.concatenate([self.epoch_stats, np.zeros((e, 1, 3))], axis=1)
        self.guardrails.add_arm()
        if self.override is not None:
            self.override = np.append(self.override, 0.0)
        self._compute_allocation(now, force_epoch=True)

    # -- persistence ---------------------------------------------------------------------
    def snapshot(self) -> ExperimentSnapshot:
        n = self.epoch + 1
        arrays = {
            "stats": self.stats.copy(),
            "rng": self.rng.copy(),
            "mc_rng": self.mc_rng.copy(),
            "alloc": self.alloc.copy(),
            "expected": self.expected.copy(),
            "srm_pulls": self.srm_pulls.copy(),
            "unit_pulls": self.unit_pulls.copy(),
            "srm_mark": self.srm_mark.copy(),
            "srm_e": self.srm_e.copy(),
            "epoch_shares": self.epoch_shares[:n].copy(),
            "epoch_pulls": self.epoch_pulls[:n].copy(),
            "epoch_stats": self.epoch_stats[:n].copy(),
            "epoch_started": self.epoch_started[:n].copy(),
            **self.guardrails.to_arrays(),
        }
        if self.override is not None:
            arrays["override"] = self.override.copy()
        scalars: dict[str, float | int | bool] = {
            "epoch": self.epoch,
            "pending": self.pending,
            "rewards_since": self.rewards_since,
            "rewards_total": self.rewards_total,
            "last_refresh": self.last_refresh,
            "archived": self.archived,
        }
        return ExperimentSnapshot(self.config, arrays, scalars)

    def restore(self, snap: ExperimentSnapshot) -> None:
        a = snap.arrays
        self.set_config(snap.config)
        self.stats = a["stats"].astype(np.float64, copy=True)
        self.rng = a["rng"].astype(np.uint64, copy=True)
        self.mc_rng = a["mc_rng"].astype(np.uint64, copy=True)
        self.override = a["override"].copy() if "override" in a else None
        self.epoch = int(snap.scalars["epoch"])
        n = self.epoch + 1
        cap = max(4, 1 << n.bit_length())
        k = snap.config.n_arms
        self.epoch_shares = np.zeros((cap, k))
        self.epoch_pulls = np.zeros((cap, k), dtype=np.int64)
        self.epoch_stats = np.zeros((cap, k, 3))
        self.epoch_started = np.zeros(cap)
        self.epoch_shares[:n] = a["epoch_shares"]
        self.epoch_pulls[:n] = a["epoch_pulls"]
        self.epoch_stats[:n] = a["epoch_stats"]
        self.epoch_started[:n] = a["epoch_started"]
        self.archived = bool(snap.scalars["archived"])
        self.guardrails = GuardrailStats.from_arrays(k, a)
        self.prob = np.ones(k)
        self.alias = np.arange(k, dtype=np.int64)
        self.fixed_prob = np.ones(k)
        self.fixed_alias = np.arange(k, dtype=np.int64)
        self.unit_prob = np.ones(k)
        self.unit_alias = np.arange(k, dtype=np.int64)
        kernels.alias_build(self.epoch_shares[self.epoch], self.unit_prob, self.unit_alias)
        # Rebuild the tables the same way a refresh did, without consuming randomness.
        self._rebuild_tables(a["alloc"].astype(np.float64, copy=True))
        if "srm_pulls" in a:
            self.expected = a["expected"].astype(np.float64, copy=True)
            self.srm_pulls = a["srm_pulls"].astype(np.int64, copy=True)
            self.unit_pulls = a["unit_pulls"].astype(np.int64, copy=True)
            self.srm_mark = a["srm_mark"].astype(np.int64, copy=True)
            # A snapshot from before the sequential test: the test starts from here.
            self.srm_e = a["srm_e"].astype(np.float64, copy=True) if "srm_e" in a else np.zeros(2)
        else:  # a snapshot from before table-only SRM: its counts restart from here
            self.expected = np.zeros(k)
            self.srm_pulls = np.zeros(k, dtype=np.int64)
            self.unit_pulls = np.zeros(k, dtype=np.int64)
            self.srm_mark = self.epoch_pulls[:n].sum(axis=0)
            self.srm_e = np.zeros(2)
        self.pending = int(snap.scalars["pending"])
        self.rewards_since = int(snap.scalars["rewards_since"])
        self.rewards_total = int(snap.scalars["rewards_total"])
        self.last_refresh = float(snap.scalars["last_refresh"])
        self._bind()

    def _rebuild_tables(self, alloc: np.ndarray) -> None:
        self.alloc = alloc
        kernels.alias_build(alloc, self.prob, self.alias)
        if self.override is not None:
            self.fixed_mass = 0.0
        else:
            self._build_fixed()
        self.table_active = self._serves_from_table()

    def _fixed_shares(self) -> np.ndarray:
        """The fixed part of the mixture: the control holdout plus every arm's floor."""
        sh = self.config.shaping
        fixed = np.full(self.config.n_arms, sh.floor)
        fixed[0] += sh.control_share
        return fixed

    def _build_fixed(self) -> np.ndarray:
        """The fixed shares and their alias table; sets ``fixed_mass``."""
        fixed = self._fixed_shares()
        self.fixed_mass = float(fixed.sum())
        if self.fixed_mass > 0:
            kernels.alias_build(fixed, self.fixed_prob, self.fixed_alias)
        return fixed

    def _serves_from_table(self) -> bool:
        """Whether decisions come from the allocation table rather than the policy."""
        return (
            self.override is not None
            or self.config.mode == AllocationMode.TABLE
            or isinstance(self.policy, FixedSplit)
            or self.config.shaping.cap < 1.0
            or self.exploring()
        )


def mc_seed(seed: int, rewards: int) -> int:
    """Seed of a read-only Monte Carlo over a posterior: the experiment's seed and how many
    rewards it has seen, so the same data give the same estimate."""
    return (seed * 1_000_003 + rewards) % (2**63)


def _unit_uniform(experiment: str, unit_id: str, epoch: int) -> float:
    """A uniform in [0, 1) fixed by (experiment, unit, epoch): sticky units per epoch."""
    h = hashlib.blake2b(f"{experiment}\x00{epoch}\x00{unit_id}".encode(), digest_size=8)
    return (int.from_bytes(h.digest(), "little") >> 11) * (1.0 / 9007199254740992.0)


def finite_rewards(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Reward values as contiguous float64, refusing NaN, infinities and values beyond
    +-``MAX_ABS_REWARD`` (any reward kind)."""
    v = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    if v.size and not np.isfinite(v).all():
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise InvalidArgument("values", f"reward {bad} is not a finite number: {float(v[bad])!r}")
    if v.size and np.abs(v).max() > MAX_ABS_REWARD:
        bad = int(np.flatnonzero(np.abs(v) > MAX_ABS_REWARD)[0])
        raise InvalidArgument(
            "values", f"reward {bad} is {float(v[bad])!r}, beyond +-{MAX_ABS_REWARD:g}"
        )
    return v


def _as_arms(arms: Sequence[int] | np.ndarray, k: int, what: str = "variant_indices") -> np.ndarray:
    a = np.asarray(arms)
    if a.ndim != 1:
        raise InvalidArgument(what, "must be a flat list")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InvalidArgument(what, "must be integers")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= k):
        raise InvalidArgument(what, f"variant index out of range [0, {k})")
    return np.ascontiguousarray(a)


class Engine:
    """The registry of experiments: create, assign, reward, refresh, snapshot, restore.

    Thread-safe: a registry lock guards creation; each experiment has its own lock, held
    for the duration of one kernel call, so experiments never contend with each other.
    ``clock`` is injectable so tests control time.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._experiments: dict[str, _Experiment] = {}
        self._lock = threading.Lock()
        self._clock = clock

    # -- registry ------------------------------------------------------------------------
    def create(self, config: ExperimentConfig) -> ExperimentConfig:
        """Register a new experiment; ``ExperimentExists`` if the name is taken.

        A seed of 0 is replaced by a random one and returned in the config, so what is
        persisted replays the same decision stream after a restart.
        """
        if config.seed == 0:
            config = replace(config, seed=int.from_bytes(np.random.bytes(8), "little") | 1)
        with self._lock:
            if config.name in self._experiments:
                raise ExperimentExists(config.name)
            self._experiments[config.name] = _Experiment(config, self._clock())
        return config

    def _get(self, name: str) -> _Experiment:
        try:
            return self._experiments[name]
        except KeyError:
            raise UnknownExperiment(name) from None

    def config(self, name: str) -> ExperimentConfig:
        """The experiment's configuration."""
        return self._get(name).config

    def names(self) -> list[str]:
        """All experiment names, sorted."""
        return sorted(self._experiments)

    def __contains__(self, name: object) -> bool:
        return name in self._experiments

    def remove(self, name: str) -> None:
        """Forget an experiment (after it was archived and persisted)."""
        with self._lock:
            self._experiments.pop(name, None)

    def archive(self, name: str) -> None:
        """Stop serving: assign then fails with ``WrongState``; rewards are still taken."""
        exp = self._get(name)
        with exp.lock:
            exp.archived = True

    def add_variant(self, name: str, variant: str, weight: float | None = None) -> ExperimentConfig:
        """Add a variant (e.g. a retrained model); it starts with no data and a new epoch.

        ``weight``: its fixed-split weight (see :func:`weights_with`).
        """
        exp = self._get(name)
        with exp.refresh_lock, exp.lock:
            if variant in exp.variants:
                raise InvalidArgument("variant", f"{variant!r} already exists in {name!r}")
            try:
                config = replace(
                    exp.config,
                    variants=(*exp.variants, variant),
                    policy=replace(
                        exp.config.policy,
                        weights=weights_with(exp.config.policy.weights, len(exp.variants), weight),
                    ),
                )
            except ValueError as err:
                raise InvalidArgument("variant", str(err)) from None
            exp.add_arm(config, self._clock())
            return config

    # -- decisions -----------------------------------------------------------------------
    def assign(self, name: str, unit_id: str | None = None, *, wait: bool = True) -> Decision:
        """One decision. With ``unit_id``, the same unit gets the same arm within an epoch.

        ``wait=False``: raise :class:`Busy`, having changed nothing, when another thread
        holds the experiment (an event loop must not wait out a batch or an estimate).
        """
        try:
            exp = self._experiments[name]
        except KeyError:
            raise UnknownExperiment(name) from None
        if not exp.lock.acquire(wait):
            raise Busy(name)
        try:
            if exp.archived:
                raise WrongState(name, "archived", "assign")
            if unit_id is None:
                arm = exp.assign_one()
                prop = exp.last_props[arm] if exp.live_props else exp.alloc_list[arm]
            else:
                u = _unit_uniform(name, unit_id, exp.epoch)
                arm = kernels.alias_at(exp.unit_prob, exp.unit_alias, u)
                exp.epoch_pulls[exp.epoch, arm] += 1
                exp.unit_pulls[arm] += 1
                prop = exp.epoch_shares[exp.epoch, arm]
            exp.pending += 1
            return Decision(arm, exp.variants[arm], float(prop), exp.epoch)
        finally:
            exp.lock.release()

    def assign_batch(
        self, name: str, count: int, unit_ids: Sequence[str] | None = None
    ) -> BatchDecision:
        """``count`` decisions in one kernel call (or one per unit when ``unit_ids`` given)."""
        if unit_ids is not None and len(unit_ids) > 0:
            count = len(unit_ids)
        if not 1 <= count <= MAX_BATCH:
            raise InvalidArgument("count", f"must be between 1 and {MAX_BATCH}, got {count}")
        exp = self._get(name)
        out = np.empty(count, dtype=np.int64)
        # Units are hashed before the lock is taken (a hash per unit, up to MAX_BATCH of
        # them), for the epoch read now; rehashed under it in the rare case it moved on.
        epoch = exp.epoch
        uniforms = [_unit_uniform(name, unit, epoch) for unit in unit_ids or ()]
        with exp.lock:
            if exp.archived:
                raise WrongState(name, "archived", "assign")
            if unit_ids:
                if exp.epoch != epoch:
                    uniforms = [_unit_uniform(name, unit, exp.epoch) for unit in unit_ids]
                for i, u in enumerate(uniforms):
                    out[i] = kernels.alias_at(exp.unit_prob, exp.unit_alias, u)
                props = exp.epoch_shares[exp.epoch][out]
            else:
                props = exp.decide(out)[out]
            kernels.count_arms(out, exp.epoch_pulls[exp.epoch])
            if unit_ids:
                kernels.count_arms(out, exp.unit_pulls)
            exp.pending += count
            return BatchDecision(out, props, exp.epoch, exp.variants)

    # -- rewards -------------------------------------------------------------------------
    def reward(self, name: str, arm: int, value: float, epoch: int | None = None) -> None:
        """Add one reward for ``arm`` (from a decision of ``epoch``, default current)."""
        self.reward_batch(name, [arm], [value], None if epoch is None else [epoch])

    def validate_rewards(
        self,
        name: str,
        arms: Sequence[int] | np.ndarray,
        values: Sequence[float] | np.ndarray,
        epochs: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Check and convert a reward batch without applying it (callers log it first)."""
        exp = self._get(name)
        k = exp.config.n_arms
        a = _as_arms(arms, k)
        v = finite_rewards(values)
        if v.shape != a.shape:
            raise InvalidArgument("values", f"{v.size} values for {a.size} variants")
        if (
            exp.config.policy.reward == RewardKind.BERNOULLI
            and v.size
            and (v.min() < 0.0 or v.max() > 1.0)
        ):
            bad = int(np.flatnonzero((v < 0.0) | (v > 1.0))[0])
            raise InvalidArgument(
                "values", f"bernoulli rewards must be in [0, 1], reward {bad} is {float(v[bad])!r}"
            )
        e: np.ndarray | None = None
        if epochs is not None:
            e = np.ascontiguousarray(np.asarray(epochs, dtype=np.int64))
            if e.shape != a.shape:
                raise InvalidArgument("epochs", f"{e.size} epochs for {a.size} variants")
            if e.size and e.min() < 0:
                raise InvalidArgument("epochs", "allocation epoch must be >= 0")
            # A signed decision id can name an epoch this engine has not opened (another
            # replica's, or one lost with the last snapshot): count it in the current one.
            if e.size and e.max() > exp.epoch:
                e = np.minimum(e, exp.epoch)
        return a, v, e

    def reward_batch(
        self,
        name: str,
        arms: Sequence[int] | np.ndarray,
        values: Sequence[float] | np.ndarray,
        epochs: Sequence[int] | np.ndarray | None = None,
        guardrails: Sequence[Mapping[str, float]] | None = None,
    ) -> None:
        """Apply rewards in order; nothing is applied if any item is invalid.

        ``guardrails``: per item its guardrail metrics (an empty mapping for none), added
        under the same lock as the rewards, so a snapshot holds both or neither.
        """
        a, v, e = self.validate_rewards(name, arms, values, epochs)
        if guardrails is not None and len(guardrails) != a.size:
            raise InvalidArgument("guardrails", f"{len(guardrails)} items for {a.size} rewards")
        exp = self._get(name)
        with exp.lock:
            if e is None:
                e = np.full(a.shape, exp.epoch, dtype=np.int64)
            kernels.update_epochs(exp.stats, exp.epoch_stats, a, e, v, exp.gamma)
            if guardrails is not None:
                exp.guardrails.add(a.tolist(), guardrails)
            exp.rewards_since += a.size
            exp.rewards_total += a.size
            # Early on one reward moves the posterior a lot, so the estimate of the allocation
            # in force (propensities, SRM expectations) is refreshed once the data grew by 2%,
            # not only every refresh_rewards rewards.
            due = min(exp.config.refresh_rewards, max(1, exp.rewards_total // 50))
            if exp.rewards_since < due:
                return
        self._refresh(exp)

    def _refresh(self, exp: _Experiment, *, force_epoch: bool = False) -> None:
        """Estimate outside ``lock`` (Assign keeps going), then install under it."""
        with exp.refresh_lock:
            with exp.lock:
                stats = exp.stats.copy() if exp.needs_estimate() else None
            estimate = exp.estimate(stats) if stats is not None else None
            with exp.lock:
                exp.refresh(self._clock(), force_epoch=force_epoch, estimate=estimate)

    # -- allocation ----------------------------------------------------------------------
    def refresh(self, name: str, *, force_epoch: bool = False) -> None:
        """Re-estimate the allocation in force now."""
        self._refresh(self._get(name), force_epoch=force_epoch)

    def refresh_due(self) -> int:
        """Refresh every experiment whose ``refresh_ms`` has elapsed; returns how many."""
        now = self._clock()
        done = 0
        for exp in list(self._experiments.values()):
            if (now - exp.last_refresh) * 1000.0 >= exp.config.refresh_ms and (
                exp.rewards_since > 0 or exp.pending > 0
            ):
                self._refresh(exp)
                done += 1
        return done

    def set_override(self, name: str, shares: Sequence[float] | np.ndarray | None) -> None:
        """Fix the allocation (promotion, rollback, pause) or hand it back to the policy."""
        exp = self._get(name)
        with exp.refresh_lock, exp.lock:
            if shares is None:
                if exp.override is None:
                    return
                exp.override = None
            else:
                s = np.asarray(shares, dtype=np.float64)
                if s.shape != (exp.config.n_arms,) or (s < 0).any() or s.sum() <= 0:
                    raise InvalidArgument("shares", "must be one non-negative share per variant")
                s = s / s.sum()
                # Unchanged (a restart, or adopting another replica's version, applies the
                # state again): no new epoch, so units keep their arms.
                if exp.override is not None and np.array_equal(s, exp.override):
                    return
                exp.override = s
            exp.refresh(self._clock(), force_epoch=True)

    # -- reading -------------------------------------------------------------------------
    def counts(self, name: str) -> dict[str, int]:
        """Rewards received per variant (undiscounted)."""
        exp = self._get(name)
        with exp.lock:
            n = exp.epoch_stats[: exp.epoch + 1, :, 0].sum(axis=0)
            return {v: int(np.rint(x)) for v, x in zip(exp.variants, n, strict=True)}

    def view(self, name: str) -> ExperimentView:
        """A consistent copy of what reports need."""
        exp = self._get(name)
        with exp.lock:
            n = exp.epoch + 1
            seg = exp._srm_segment()  # table decisions since the last refresh
            return ExperimentView(
                config=exp.config,
                stats=exp.stats.copy(),
                alloc=exp.alloc.copy(),
                expected=exp.expected + seg.sum() * exp.alloc,
                srm_pulls=exp.srm_pulls + seg,
                srm_e=exp._srm_e_after(seg),
                epoch=exp.epoch,
                epoch_shares=exp.epoch_shares[:n].copy(),
                epoch_pulls=exp.epoch_pulls[:n].copy(),
                epoch_stats=exp.epoch_stats[:n].copy(),
                epoch_started=exp.epoch_started[:n].copy(),
                override=None if exp.override is None else exp.override.copy(),
                archived=exp.archived,
            )

    def prob_best(
        self, name: str, draws: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P(best), expected loss, posterior draws) from the current posterior.

        Seeded by :func:`mc_seed`, not from ``mc_rng``: a report or an audit row reads the
        same numbers for the same data, and reading never shifts the stream the
        allocation's estimates draw from (which a seed must reproduce).
        """
        exp = self._get(name)
        with exp.lock:
            stats = exp.stats.copy()
            policy = exp.policy
            seed = np.uint64(mc_seed(exp.config.seed, exp.rewards_total))
        rng = kernels.seed_state(seed)  # type: ignore[arg-type]
        samples = policy.posterior_samples(rng, stats, draws or exp.config.policy.mc_draws)
        p_best = np.empty(stats.shape[0])
        loss = np.empty(stats.shape[0])
        kernels.best_and_loss(samples, p_best, loss)
        return p_best, loss, samples

    # -- persistence ---------------------------------------------------------------------
    def guardrail_stats(self, name: str) -> dict[str, np.ndarray]:
        """Per guardrail metric a copy of its ``[K, 3]`` (n, sum, sum of squares)."""
        exp = self._get(name)
        with exp.lock:
            return exp.guardrails.snapshot()

    def snapshot(self, names: Iterable[str] | None = None) -> dict[str, ExperimentSnapshot]:
        """Copies of every (or the named) experiment's arrays."""
        out: dict[str, ExperimentSnapshot] = {}
        for name in list(self._experiments) if names is None else names:
            exp = self._get(name)
            with exp.refresh_lock, exp.lock:
                out[name] = exp.snapshot()
        return out

    def restore(self, snapshots: Mapping[str, ExperimentSnapshot]) -> None:
        """Replace (or create) experiments from snapshots: identical arrays afterwards."""
        for name, snap in snapshots.items():
            with self._lock:
                exp = self._experiments.get(name)
                if exp is None:
                    exp = _Experiment(snap.config, self._clock())
                    self._experiments[name] = exp
            with exp.refresh_lock, exp.lock:
                exp.restore(snap)


@dataclass(frozen=True)
class ExperimentView:
    """A read-only copy of one experiment's arrays, taken under its lock."""

    config: ExperimentConfig
    stats: np.ndarray
    alloc: np.ndarray
    expected: np.ndarray  # SRM: expected split of the table-served decisions
    srm_pulls: np.ndarray  # SRM: table-served decisions per arm (no unit ids)
    srm_e: np.ndarray  # SRM: (log e-value now, its running max) of the sequential test
    epoch: int
    epoch_shares: np.ndarray
    epoch_pulls: np.ndarray
    epoch_stats: np.ndarray
    epoch_started: np.ndarray
    override: np.ndarray | None
    archived: bool

    @property
    def pulls(self) -> np.ndarray:
        """Decisions per arm, all epochs."""
        return self.epoch_pulls.sum(axis=0)

    @property
    def reward_counts(self) -> np.ndarray:
        """Rewards per arm, undiscounted."""
        return self.epoch_stats[:, :, 0].sum(axis=0)


def weights_with(weights: Sequence[float], n_arms: int, weight: float | None) -> tuple[float, ...]:
    """Fixed-split weights after adding an arm of ``weight`` to ``n_arms`` arms.

    Default: the mean weight, so an equal split (no weights) stays equal.

    >>> weights_with((1.0, 3.0), 2, None), weights_with((), 2, 2.0), weights_with((), 2, None)
    ((1.0, 3.0, 2.0), (1.0, 1.0, 2.0), ())
    """
    if not weights and weight is None:
        return ()
    have = tuple(weights) or (1.0,) * n_arms
    return (*have, sum(have) / len(have) if weight is None else float(weight))


def config_from_mapping(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build a config from plain data (CLI/JSON), turning errors into ``InvalidArgument``."""
    try:
        policy = PolicyConfig(**dict(raw.get("policy", {})))
        shaping = Shaping(**dict(raw.get("shaping", {})))
        rest = {k: v for k, v in raw.items() if k not in ("policy", "shaping")}
        return ExperimentConfig(policy=policy, shaping=shaping, **rest)
    except (TypeError, ValueError) as err:
        raise InvalidArgument("spec", str(err)) from None


def warm() -> None:
    """Compile (or load from cache) every kernel the engine calls, on tiny inputs."""
    engine = Engine()
    for i, kind in enumerate(PolicyKind):
        reward = RewardKind.NORMAL if kind == PolicyKind.UCB_NORMAL else RewardKind.BERNOULLI
        for mode in AllocationMode:
            for rk in {reward, RewardKind.NORMAL} if kind == PolicyKind.THOMPSON else {reward}:
                name = f"warm-{i}-{mode}-{rk}"
                engine.create(
                    ExperimentConfig(
                        name=name,
                        variants=("a", "b"),
                        policy=PolicyConfig(kind=kind, reward=rk, mc_draws=100),
                        mode=mode,
                        seed=1,
                        shaping=Shaping(control_share=0.1),
                    )
                )
                engine.assign(name)
                engine.assign(name, unit_id="u")
                engine.assign_batch(name, 4)
                engine.reward_batch(name, [0, 1], [1.0, 0.0], [0, 0])
                engine.refresh(name)
                engine.prob_best(name)
    kernels.gamma_variate(kernels.seed_state(1), 0.5)
    kernels.fill_normal(kernels.seed_state(1), np.empty(2))


_WARMED = False


def ensure_warm() -> None:
    """Warm the kernels once per process."""
    global _WARMED
    if not _WARMED:
        warm()
        _WARMED = True


ensure_warm()

__all__ = [
    "AllocationMode",
    "BatchDecision",
    "Decision",
    "Engine",
    "ExperimentConfig",
    "ExperimentSnapshot",
    "ExperimentView",
    "Shaping",
    "config_from_mapping",
    "mc_seed",
]

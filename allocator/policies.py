"""Bandit policies: small immutable objects that call the kernels.

A policy knows how to turn sufficient statistics (``float64[K, 3]``: n, sum, sum of squares)
into decisions, into the probability it had of choosing each arm (the propensities), and
into posterior draws for reports. It holds no mutable state: the engine owns the arrays and
the generator, so a snapshot of those is a snapshot of everything.

>>> import numpy as np
>>> from allocator import kernels
>>> policy = make_policy(PolicyConfig(kind=PolicyKind.THOMPSON), n_arms=2)
>>> stats = np.zeros((2, 3)); out = np.empty(4, dtype=np.int64)
>>> policy.decide(kernels.seed_state(7), stats, out)
>>> sorted(set(out.tolist())) <= [0, 1]
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np

from allocator import kernels
from allocator.stats import Interval, beta_interval, normal_gamma_interval


class PolicyKind(StrEnum):
    """Which bandit algorithm decides."""

    THOMPSON = "thompson"
    UCB1 = "ucb1"
    KL_UCB = "kl_ucb"
    UCB_NORMAL = "ucb_normal"
    EPSILON_GREEDY = "epsilon_greedy"
    FIXED_SPLIT = "fixed_split"


class RewardKind(StrEnum):
    """The reward model: Bernoulli (0/1, or any value in [0, 1]) or continuous normal."""

    BERNOULLI = "bernoulli"
    NORMAL = "normal"


# Index kinds understood by kernels.policy_index.
_INDEX_KIND = {
    PolicyKind.UCB1: 0,
    PolicyKind.KL_UCB: 1,
    PolicyKind.UCB_NORMAL: 2,
    PolicyKind.EPSILON_GREEDY: 3,
}


@dataclass(frozen=True)
class PolicyConfig:
    """How one experiment decides; validates itself when built.

    >>> PolicyConfig(kind=PolicyKind.UCB1, ucb_c=0.5).kind
    <PolicyKind.UCB1: 'ucb1'>
    """

    kind: PolicyKind = PolicyKind.THOMPSON
    reward: RewardKind = RewardKind.BERNOULLI
    prior_alpha: float = 1.0
    prior_beta: float = 1.0
    prior_mean: float = 0.0
    # A tiny kappa0 makes the prior on the mean nearly flat: the data decide, whatever
    # the scale of the reward.
    prior_kappa: float = 1e-3
    prior_shape: float = 1.0
    prior_rate: float = 1.0
    ucb_c: float = 1.0
    klucb_c: float = 0.0
    epsilon: float = 0.1
    weights: tuple[float, ...] = ()
    discount: float = 1.0
    mc_draws: int = 2000

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PolicyKind(self.kind))
        object.__setattr__(self, "reward", RewardKind(self.reward))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        for name in ("prior_alpha", "prior_beta", "prior_kappa", "prior_shape", "prior_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not math.isfinite(self.prior_mean):
            raise ValueError(f"prior_mean must be finite, got {self.prior_mean!r}")
        if not (math.isfinite(self.ucb_c) and self.ucb_c >= 0):
            raise ValueError(f"ucb_c must be >= 0, got {self.ucb_c!r}")
        if not (math.isfinite(self.klucb_c) and self.klucb_c >= 0):
            raise ValueError(f"klucb_c must be >= 0, got {self.klucb_c!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon!r}")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount!r}")
        if self.mc_draws < 100:
            raise ValueError(f"mc_draws must be >= 100, got {self.mc_draws!r}")
        if any(not (math.isfinite(w) and w >= 0) for w in self.weights):
            raise ValueError(f"weights must be finite and >= 0, got {self.weights!r}")
        if self.weights and sum(self.weights) <= 0:
            raise ValueError("weights must not all be 0")
        # Messages start with the setting at fault: the service names it as the bad field.
        if self.kind == PolicyKind.KL_UCB and self.reward != RewardKind.BERNOULLI:
            raise ValueError("policy kl_ucb needs rewards in [0, 1] (reward=bernoulli)")
        if self.kind == PolicyKind.UCB_NORMAL and self.reward != RewardKind.NORMAL:
            raise ValueError("policy ucb_normal is for continuous rewards (reward=normal)")


def check_new(config: PolicyConfig) -> None:
    """Refuse settings a new experiment would run with but not learn from (``ValueError``).

    Apart from :class:`PolicyConfig`'s own checks because these came later: they are made
    when an experiment is created, not when a stored one is loaded (as the promotion
    settings' checks), so a server holding an experiment created before still starts.
    """
    if config.kind == PolicyKind.UCB1 and config.reward != RewardKind.BERNOULLI:
        # Its confidence bonus assumes rewards in [0, 1] (Auer et al. 2002); on another
        # scale it is mis-sized (all but greedy on large rewards).
        raise ValueError(
            "policy ucb1 needs rewards in [0, 1] (reward=bernoulli); "
            "for continuous rewards use ucb_normal or thompson"
        )
    if config.kind == PolicyKind.UCB_NORMAL and config.discount < 1.0:
        # Its forcing rule plays every arm with fewer than ceil(8 ln t) pulls. Discounting
        # keeps t below 1 / (1 - gamma), so the arms' n average under t / K: at 0.99 with
        # three arms (n ~ 33 < 37), or 0.9 with two, every arm stays forced, an equal
        # split; at 0.99 with two the worse arm is still forced back to n ~ 37 of ~100.
        raise ValueError(
            f"discount must be 1 for ucb_normal, got {config.discount!r}: discounted counts "
            "never meet its rule of playing each arm ceil(8 ln t) times"
        )


class Policy(Protocol):
    """What the engine needs from a policy."""

    config: PolicyConfig
    n_arms: int

    @property
    def deterministic(self) -> bool:
        """True when decisions follow from the statistics (a UCB), False when randomized."""

    def decide(self, rng: np.ndarray, stats: np.ndarray, out: np.ndarray) -> None:
        """Write ``out.shape[0]`` decisions (arm indices) into ``out``."""

    def allocation(self, rng: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """Probability that the next decision picks each arm, given ``stats``."""

    def posterior_samples(self, rng: np.ndarray, stats: np.ndarray, draws: int) -> np.ndarray:
        """``draws x K`` samples of each arm's mean reward from its posterior."""

    def credible_intervals(self, stats: np.ndarray, level: float = 0.95) -> list[Interval]:
        """Exact credible interval of each arm's mean reward."""


@dataclass(frozen=True)
class _Base:
    config: PolicyConfig
    n_arms: int

    def posterior_samples(self, rng: np.ndarray, stats: np.ndarray, draws: int) -> np.ndarray:
        """Posterior draws of each arm's mean (UCB policies report the same posterior)."""
        c = self.config
        if c.reward == RewardKind.BERNOULLI:
            params = np.empty((self.n_arms, 2))
            kernels.beta_params(stats, c.prior_alpha, c.prior_beta, params)
            return kernels.beta_posterior_draws(rng, params, draws)
        params = np.empty((self.n_arms, 4))
        kernels.normal_gamma_params(
            stats, c.prior_mean, c.prior_kappa, c.prior_shape, c.prior_rate, params
        )
        return kernels.normal_posterior_draws(rng, params, draws)

    def credible_intervals(self, stats: np.ndarray, level: float = 0.95) -> list[Interval]:
        """Exact equal-tailed credible interval of each arm's mean (Beta or Student t)."""
        c = self.config
        if c.reward == RewardKind.BERNOULLI:
            params = np.empty((self.n_arms, 2))
            kernels.beta_params(stats, c.prior_alpha, c.prior_beta, params)
            return [beta_interval(a, b, level) for a, b in params.tolist()]
        params = np.empty((self.n_arms, 4))
        kernels.normal_gamma_params(
            stats, c.prior_mean, c.prior_kappa, c.prior_shape, c.prior_rate, params
        )
        return [normal_gamma_interval(m, kap, a, b, level) for m, kap, a, b in params.tolist()]

    def prob_best(
        self, rng: np.ndarray, stats: np.ndarray, draws: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Monte Carlo P(best) and expected loss per arm, seeded by ``rng``."""
        c = self.config
        n = c.mc_draws if draws is None else draws
        p_best = np.empty(self.n_arms)
        loss = np.empty(self.n_arms)
        if c.reward == RewardKind.BERNOULLI:
            kernels.thompson_beta_pbest(rng, stats, c.prior_alpha, c.prior_beta, n, p_best, loss)
        else:
            kernels.thompson_normal_pbest(
                rng,
                stats,
                c.prior_mean,
                c.prior_kappa,
                c.prior_shape,
                c.prior_rate,
                n,
                p_best,
                loss,
            )
        return p_best, loss


@dataclass(frozen=True)
class Thompson(_Base):
    """Thompson sampling: Beta-Bernoulli or Normal-Gamma, exact posterior draws.

    Its propensity is P(best) under the current posterior, which has no closed form: the
    engine estimates it by Monte Carlo at each allocation refresh.
    """

    @property
    def deterministic(self) -> bool:
        """Thompson sampling is randomized."""
        return False

    def decide(self, rng: np.ndarray, stats: np.ndarray, out: np.ndarray) -> None:
        """One posterior draw per arm per decision; the largest wins."""
        c = self.config
        if c.reward == RewardKind.BERNOULLI:
            kernels.thompson_beta(rng, stats, c.prior_alpha, c.prior_beta, out)
        else:
            kernels.thompson_normal(
                rng, stats, c.prior_mean, c.prior_kappa, c.prior_shape, c.prior_rate, out
            )

    def allocation(self, rng: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """P(best) by Monte Carlo: a Thompson decision is a draw from exactly this."""
        return self.prob_best(rng, stats)[0]


@dataclass(frozen=True)
class IndexPolicy(_Base):
    """UCB1, KL-UCB, UCB1-Normal or epsilon-greedy: argmax of an index, random among ties."""

    kind_code: int = field(default=0)
    c: float = field(default=1.0)
    eps: float = field(default=0.0)

    @property
    def deterministic(self) -> bool:
        """Deterministic unless epsilon-greedy explores."""
        return self.eps == 0.0

    def decide(self, rng: np.ndarray, stats: np.ndarray, out: np.ndarray) -> None:
        """Decisions with the index fixed for the whole batch (no reward in between)."""
        kernels.index_decide(rng, stats, self.kind_code, self.c, self.eps, out)

    def decide_with_allocation(
        self, rng: np.ndarray, stats: np.ndarray, out: np.ndarray
    ) -> np.ndarray:
        """:meth:`decide` and :meth:`allocation` from one computation of the index."""
        alloc = np.empty(self.n_arms)
        kernels.index_decide_alloc(rng, stats, self.kind_code, self.c, self.eps, out, alloc)
        return alloc

    def allocation(self, rng: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """Exact: (1 - eps) split over the tied leaders plus eps / K everywhere."""
        out = np.empty(self.n_arms)
        kernels.index_propensities(stats, self.kind_code, self.c, self.eps, out)
        return out


@dataclass(frozen=True)
class FixedSplit(_Base):
    """Classic A/B(/n): fixed shares, e.g. 50/50 or a 90% control."""

    shares: np.ndarray = field(default_factory=lambda: np.ones(1))

    @property
    def deterministic(self) -> bool:
        """Randomized by the split."""
        return False

    def decide(self, rng: np.ndarray, stats: np.ndarray, out: np.ndarray) -> None:
        """Draw from the shares (the engine normally serves these from its alias table)."""
        prob = np.empty(self.n_arms)
        alias = np.empty(self.n_arms, dtype=np.int64)
        kernels.alias_build(self.shares, prob, alias)
        kernels.alias_batch(rng, prob, alias, out)

    def allocation(self, rng: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """The configured shares."""
        return self.shares.copy()


AnyPolicy = Thompson | IndexPolicy | FixedSplit


def make_policy(config: PolicyConfig, n_arms: int) -> AnyPolicy:
    """Build the policy object for ``config`` over ``n_arms`` arms."""
    if n_arms < 1:
        raise ValueError(f"a policy needs at least one arm, got {n_arms}")
    if config.kind == PolicyKind.THOMPSON:
        return Thompson(config, n_arms)
    if config.kind == PolicyKind.FIXED_SPLIT:
        weights = config.weights or (1.0,) * n_arms
        if len(weights) != n_arms:
            raise ValueError(f"fixed_split needs {n_arms} weights, got {len(weights)}")
        shares = np.asarray(weights, dtype=np.float64)
        return FixedSplit(config, n_arms, shares=shares / shares.sum())
    code = _INDEX_KIND[config.kind]
    c = config.klucb_c if config.kind == PolicyKind.KL_UCB else config.ucb_c
    eps = config.epsilon if config.kind == PolicyKind.EPSILON_GREEDY else 0.0
    return IndexPolicy(config, n_arms, kind_code=code, c=c, eps=eps)

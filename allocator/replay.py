"""Off-policy replay: what a different policy or promotion threshold would have done.

Uses only what the live system logged: every rewarded decision with its arm, its value and
its allocation epoch (whose shares are the logging propensities), plus the decision counts.
Two questions, both answered before anyone changes live traffic:

* **Value of a candidate policy** (inverse propensity scoring, Horvitz-Thompson): walking
  the log in time order, the candidate learns from the data seen so far (its posterior
  depends on data only, not on who chose the arms), its allocation q is recomputed every
  ``chunk`` rewards, and each logged reward is weighted by q(arm) / p(arm). The logging
  propensity p of a decision is its arm's share of the decisions of its allocation epoch
  (from the logged decision counts): the live shares are refreshed and drift a little
  within an epoch, their realised average is what makes the weighted sum unbiased while
  the reward rate is stable within the epoch. Decisions that
  got no reward count as 0 (conversions); the estimate divides by the number of decisions.
  The effective sample size (sum w)^2 / sum w^2 says how much to trust it.
* **A promotion threshold**: at every chunk boundary the P(best) rule is evaluated on the
  data so far; the first crossing is when (and what) the threshold would have promoted.

>>> # allocator replay --database-url sqlite:///allocator.sqlite ranker --policy ucb1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from allocator import kernels
from allocator.policies import PolicyConfig, make_policy
from allocator.store import Store


@dataclass(frozen=True)
class ReplayResult:
    """Outcome of a replay."""

    experiment: str
    decisions: int
    rewards: int
    logged_value: float
    candidate_value: float
    candidate_se: float
    effective_sample_size: float
    promoted_at: int | None
    promoted_variant: str | None
    final_p_best: tuple[float, ...]


def replay(
    store: Store,
    experiment: str,
    candidate: PolicyConfig,
    *,
    threshold: float = 0.95,
    chunk: int = 500,
    seed: int = 1,
) -> ReplayResult:
    """Replay the reward log of ``experiment`` under ``candidate`` and ``threshold``."""
    if not 0.5 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0.5, 1), got {threshold}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    row = store.get_experiment(experiment)
    if row is None:
        raise KeyError(experiment)
    from allocator.convert import spec_from_json, spec_to_config

    config = spec_to_config(spec_from_json(row.config_json))
    k = config.n_arms
    epochs = {
        e.epoch: np.asarray(e.shares, dtype=np.float64) for e in store.allocation_epochs(row.id)
    }
    counts: dict[int, np.ndarray] = {}
    for c in store.assignment_counts(row.id):
        counts.setdefault(c.epoch, np.zeros(k))[c.arm] += c.count
    decisions = int(sum(v.sum() for v in counts.values()))
    for e, v in counts.items():
        if v.sum() > 0:
            epochs[e] = v / v.sum()
    logged = []
    positions: dict[str, int] = {}
    while True:
        batch = store.rewards_since(positions, limit=50_000, experiment_id=row.id)
        if not batch:
            break
        logged.extend(batch)
        for r in batch:
            positions[r.replica_id] = max(positions.get(r.replica_id, 0), r.replica_seq)
    logged.sort(key=lambda r: (r.received_at, r.replica_id, r.replica_seq))
    policy = make_policy(candidate, k)
    judge = make_policy(config.policy, k)
    rng = kernels.seed_state(seed)
    stats = np.zeros((k, 3))
    weighted = np.empty(len(logged))
    weights = np.empty(len(logged))
    promoted_at: int | None = None
    promoted: str | None = None
    last_epoch = max(epochs) if epochs else None
    p_best = np.full(k, 1.0 / k)
    for start in range(0, len(logged), chunk):
        part = logged[start : start + chunk]
        q = policy.allocation(rng, stats)
        for j, r in enumerate(part):
            shares = epochs.get(r.epoch, epochs.get(last_epoch) if last_epoch is not None else None)
            p = float(shares[r.arm]) if shares is not None and r.arm < shares.shape[0] else 1.0 / k
            w = q[r.arm] / p if p > 0 else 0.0
            weights[start + j] = w
            weighted[start + j] = w * r.value
        arms = np.fromiter((r.arm for r in part), dtype=np.int64, count=len(part))
        values = np.fromiter((r.value for r in part), dtype=np.float64, count=len(part))
        kernels.update_batch(stats, arms, values, 1.0)
        p_best, _ = judge.prob_best(rng, stats)
        if promoted_at is None and p_best.max() >= threshold:
            promoted_at = start + len(part)
            promoted = config.variants[int(p_best.argmax())]
    n_dec = max(decisions, len(logged), 1)
    total = float(weighted.sum()) if logged else 0.0
    # HT estimate over all decisions: unrewarded decisions contribute 0.
    value = total / n_dec
    contrib = np.zeros(n_dec)
    contrib[: len(logged)] = weighted
    se = float(contrib.std(ddof=1) / np.sqrt(n_dec)) if n_dec > 1 else float("nan")
    ess = (
        float(weights.sum() ** 2 / (weights**2).sum()) if logged and (weights**2).sum() > 0 else 0.0
    )
    return ReplayResult(
        experiment=experiment,
        decisions=n_dec,
        rewards=len(logged),
        logged_value=float(sum(r.value for r in logged) / n_dec),
        candidate_value=value,
        candidate_se=se,
        effective_sample_size=ess,
        promoted_at=promoted_at,
        promoted_variant=promoted,
        final_p_best=tuple(float(x) for x in p_best),
    )

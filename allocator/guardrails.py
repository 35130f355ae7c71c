"""Running sufficient statistics of guardrail metrics (latency, errors, ...) per variant.

n, sum and sum of squares per metric and variant, from logged rewards that carried the
metric. They live in the engine beside the posterior and are fed where the posterior is:
by the writer after each commit, by rewards pulled from other replicas and by recovery's
replay of the log. They are part of the experiment's snapshot, so after a restart they equal
what they were before, like the posterior.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Longest metric name a reward may carry or a guardrail may name.
MAX_METRIC_NAME = 100


class GuardrailStats:
    """Per metric a ``float64[K, 3]`` array of (n, sum, sum of squares). Not thread-safe:
    the engine calls it under the experiment's lock."""

    def __init__(self, n_arms: int) -> None:
        self.n_arms = n_arms
        self._stats: dict[str, np.ndarray] = {}

    def add(self, arms: Sequence[int], metrics: Sequence[Mapping[str, float]]) -> None:
        """Add each item's metrics to its arm."""
        for arm, items in zip(arms, metrics, strict=True):
            for name, value in items.items():
                s = self._stats.get(name)
                if s is None:
                    s = self._stats[name] = np.zeros((self.n_arms, 3))
                s[arm, 0] += 1.0
                s[arm, 1] += value
                s[arm, 2] += value * value

    def add_arm(self) -> None:
        """A variant was added: a zero row for it in every metric."""
        self.n_arms += 1
        for name, s in self._stats.items():
            self._stats[name] = np.vstack([s, np.zeros((1, 3))])

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of every metric's statistics."""
        return {name: s.copy() for name, s in self._stats.items()}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The statistics as snapshot arrays: metric names, and a ``[M, K, 3]`` stack."""
        names = sorted(self._stats)
        stack = np.array([self._stats[n] for n in names]).reshape(len(names), self.n_arms, 3)
        return {"guardrail_names": np.array(names, dtype=np.str_), "guardrail_stats": stack}

    @classmethod
    def from_arrays(cls, n_arms: int, arrays: Mapping[str, np.ndarray]) -> GuardrailStats:
        """Inverse of :meth:`to_arrays`; empty for a snapshot taken before guardrails were."""
        out = cls(n_arms)
        if "guardrail_names" in arrays:
            stack = arrays["guardrail_stats"].astype(np.float64)
            for i, name in enumerate(arrays["guardrail_names"].tolist()):
                out._stats[str(name)] = stack[i].copy()
        return out

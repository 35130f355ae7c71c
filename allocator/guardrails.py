"""Running sufficient statistics of guardrail metrics (latency, errors, ...) per variant.

Kept in memory beside the posterior: n, sum and sum of squares per metric and variant, from
accepted rewards that carried the metric. They are not replayed from the log after a
restart, so a guardrail starts again from no data; promotion then waits for enough samples,
which errs on the safe side.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np


class GuardrailStats:
    """Per metric a ``float64[K, 3]`` array of (n, sum, sum of squares)."""

    def __init__(self, n_arms: int) -> None:
        self.n_arms = n_arms
        self._stats: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def add(self, arms: Sequence[int], metrics: Sequence[Mapping[str, float]]) -> None:
        """Add each item's metrics to its arm."""
        with self._lock:
            for arm, items in zip(arms, metrics, strict=True):
                for name, value in items.items():
                    s = self._stats.get(name)
                    if s is None:
                        s = self._stats[name] = np.zeros((max(self.n_arms, arm + 1), 3))
                    elif s.shape[0] <= arm:
                        # Variants added since: grow with zero rows.
                        grow = np.zeros((arm + 1 - s.shape[0], 3))
                        s = self._stats[name] = np.vstack([s, grow])
                    s[arm, 0] += 1.0
                    s[arm, 1] += value
                    s[arm, 2] += value * value

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of every metric's statistics."""
        with self._lock:
            return {name: s.copy() for name, s in self._stats.items()}

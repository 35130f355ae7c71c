"""Prediction-score windows per variant: the scores before promotion vs since.

Rewards may carry the model's prediction score. For each variant the last ``size`` scores
seen while the experiment was not promoted form the reference window; after a promotion
new scores go to the current window. KS and PSI of current against reference flag a
model whose inputs or outputs moved (prediction drift), independent of the rewards.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from allocator.monitor import KsDrift, Psi, ks_drift, psi

MIN_SCORES = 50


class ScoreWindows:
    """Bounded reference/current windows of prediction scores, per variant."""

    def __init__(self, size: int = 5000) -> None:
        self.size = size
        self._before: dict[int, deque[float]] = {}
        self._after: dict[int, deque[float]] = {}
        self._promoted = False
        self._lock = threading.Lock()

    def add(self, arms: list[int], scores: list[float]) -> None:
        """Record scores of accepted rewards."""
        with self._lock:
            target = self._after if self._promoted else self._before
            for arm, score in zip(arms, scores, strict=True):
                target.setdefault(arm, deque(maxlen=self.size)).append(score)

    def set_promoted(self, promoted: bool) -> None:
        """Start (or stop) filling the current window; the reference freezes meanwhile."""
        with self._lock:
            if promoted and not self._promoted:
                self._after = {}
            self._promoted = promoted

    def sizes(self) -> dict[int, tuple[int, int]]:
        """Per variant the number of scores in (reference, current) window."""
        with self._lock:
            arms = set(self._before) | set(self._after)
            return {
                a: (len(self._before.get(a, ())), len(self._after.get(a, ()))) for a in arms
            }

    def compare(self) -> dict[int, tuple[KsDrift, Psi]]:
        """KS and PSI per variant with enough scores in both windows."""
        with self._lock:
            pairs = {
                arm: (np.fromiter(self._before[arm], float), np.fromiter(cur, float))
                for arm, cur in self._after.items()
                if arm in self._before
            }
        out: dict[int, tuple[KsDrift, Psi]] = {}
        for arm, (ref, cur) in pairs.items():
            if ref.size >= MIN_SCORES and cur.size >= MIN_SCORES:
                out[arm] = (ks_drift(ref, cur), psi(ref, cur))
        return out

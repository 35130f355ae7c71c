"""Prediction-score windows per variant: the scores before promotion vs since.

Rewards may carry the model's prediction score. For each variant the last ``size`` scores
seen while the experiment was not promoted form the reference window; after a promotion
new scores go to the current window. KS and PSI of current against reference flag a
model whose inputs or outputs moved (prediction drift), independent of the rewards.

The windows live in memory and are rebuilt from the reward log at start-up
(:func:`score_spans` says which stretches of time feed each one), so a restart keeps the
reference of an experiment that stays promoted.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from allocator.lifecycle import AuditRecord, State
from allocator.monitor import KsDrift, Psi, ks_drift, psi

MIN_SCORES = 50

Span = tuple[float, float]  # [start, end) of reward receipt times; either may be infinite


def score_spans(audit: Sequence[AuditRecord]) -> tuple[list[Span], Span | None]:
    """The stretches of time whose scores fill each window, from the audit trail.

    Returns (reference spans: every stretch not spent PROMOTED; current span: the last
    stretch spent PROMOTED, or None if it never was), which is what :meth:`ScoreWindows.add`
    and :meth:`ScoreWindows.set_promoted` would have filled the windows with: the current
    window is emptied on each entry into PROMOTED and kept, frozen, after leaving it.
    """
    reference: list[Span] = []
    start = -math.inf
    entered: float | None = None
    current: Span | None = None
    for r in audit:
        if r.to_state == State.PROMOTED and r.from_state != State.PROMOTED:
            reference.append((start, r.at))
            entered = r.at
        elif entered is not None and r.to_state != State.PROMOTED:
            current = (entered, r.at)
            start = r.at
            entered = None
    if entered is not None:
        current = (entered, math.inf)
    else:
        reference.append((start, math.inf))
    return reference, current


def route(received_at: float, reference: Sequence[Span], current: Span | None) -> bool | None:
    """The window a score received at ``received_at`` belongs to (spans of
    :func:`score_spans`): True current, False reference, None neither (a promotion
    before the last one)."""
    if current is not None and current[0] <= received_at < current[1]:
        return True
    if any(a <= received_at < b for a, b in reference):
        return False
    return None


class ScoreWindows:
    """Bounded reference/current windows of prediction scores, per variant."""

    def __init__(self, size: int = 5000) -> None:
        self.size = size
        self._before: dict[int, deque[float]] = {}
        self._after: dict[int, deque[float]] = {}
        self._promoted = False
        self._lock = threading.Lock()

    def add(self, arms: list[int], scores: list[float]) -> None:
        """Record scores of accepted rewards (received now)."""
        with self._lock:
            target = self._after if self._promoted else self._before
            for arm, score in zip(arms, scores, strict=True):
                target.setdefault(arm, deque(maxlen=self.size)).append(score)

    def add_received(
        self, rows: Iterable[tuple[int, float, float]], audit: Sequence[AuditRecord]
    ) -> None:
        """Record ``(arm, score, received_at)`` of rewards received earlier (pulled from
        other replicas) into the window of when each was received, as a rebuild from the
        log would (:func:`score_spans` of the experiment's audit trail)."""
        reference, current = score_spans(audit)
        with self._lock:
            for arm, score, at in rows:
                side = route(at, reference, current)
                if side is not None:
                    target = self._after if side else self._before
                    target.setdefault(arm, deque(maxlen=self.size)).append(score)

    def restore(
        self,
        reference: Mapping[int, Iterable[float]],
        current: Mapping[int, Iterable[float]],
        promoted: bool,
    ) -> None:
        """Replace both windows (scores oldest first), as rebuilt from the log."""
        with self._lock:
            self._before = {a: deque(v, maxlen=self.size) for a, v in reference.items()}
            self._after = {a: deque(v, maxlen=self.size) for a, v in current.items()}
            self._promoted = promoted

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
            return {a: (len(self._before.get(a, ())), len(self._after.get(a, ()))) for a in arms}

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

"""Prediction-score windows: which stretches of time feed them, and their rebuild."""

from __future__ import annotations

import math

from allocator.drift import MIN_SCORES, ScoreWindows, route, score_spans
from allocator.lifecycle import Action, Lifecycle

INF = math.inf


def _lifecycle(*steps: tuple[Action, float]) -> Lifecycle:
    lc = Lifecycle("e", n_variants=3)
    for action, at in steps:
        variant = 1 if action == Action.PROMOTE else None
        lc.apply(action, actor="t", reason="", now=at, variant=variant)
    return lc


def test_never_promoted_everything_is_reference() -> None:
    assert score_spans(_lifecycle().audit) == ([(-INF, INF)], None)


def test_promoted_now_current_is_since_the_promotion() -> None:
    lc = _lifecycle((Action.PROMOTE, 10.0))
    assert score_spans(lc.audit) == ([(-INF, 10.0)], (10.0, INF))


def test_pause_and_resume_restart_the_current_window() -> None:
    """As live: scores while paused go to the reference, and resuming empties the current
    window (``set_promoted(True)`` after ``False``)."""
    lc = _lifecycle((Action.PROMOTE, 10.0), (Action.PAUSE, 20.0), (Action.RESUME, 30.0))
    assert score_spans(lc.audit) == ([(-INF, 10.0), (20.0, 30.0)], (30.0, INF))


def test_after_a_rollback_the_last_promoted_stretch_stays_current() -> None:
    lc = _lifecycle((Action.PROMOTE, 10.0), (Action.ROLLBACK, 20.0))
    assert score_spans(lc.audit) == ([(-INF, 10.0), (20.0, INF)], (10.0, 20.0))


def test_spans_replay_what_the_live_windows_hold() -> None:
    """Feed scores live through a lifecycle, then rebuild from (time, score) rows with the
    spans: both give the same windows."""
    steps = [(Action.PROMOTE, 10.0), (Action.PAUSE, 20.0), (Action.RESUME, 30.0)]
    live = ScoreWindows(size=1000)
    rows: list[tuple[float, int, float]] = []
    t = 0.0
    pending = list(steps)
    lc = Lifecycle("e", n_variants=3)
    while t < 40.0:
        while pending and pending[0][1] <= t:
            action, at = pending.pop(0)
            variant = 1 if action == Action.PROMOTE else None
            lc.apply(action, actor="t", reason="", now=at, variant=variant)
            live.set_promoted(lc.state.value == "PROMOTED")
        arm, score = int(t) % 2, t / 100
        live.add([arm], [score])
        rows.append((t, arm, score))
        t += 0.05
    reference, current = score_spans(lc.audit)

    def pick(spans: list[tuple[float, float]]) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for at, arm, score in rows:
            if any(a <= at < b for a, b in spans):
                out.setdefault(arm, []).append(score)
        return out

    rebuilt = ScoreWindows(size=1000)
    assert current is not None
    rebuilt.restore(pick(reference), pick([current]), promoted=True)
    assert rebuilt.sizes() == live.sizes()
    # Enough scores in every window that compare() has a row for each arm to check.
    assert min(n for pair in live.sizes().values() for n in pair) >= MIN_SCORES
    assert rebuilt.compare().keys() == live.compare().keys() == {0, 1}
    for arm, (ks, p) in live.compare().items():
        assert rebuilt.compare()[arm] == (ks, p)


def test_route_sends_a_score_to_the_window_of_its_receipt_time() -> None:
    lc = _lifecycle((Action.PROMOTE, 10.0), (Action.ROLLBACK, 20.0), (Action.REOPEN, 25.0))
    lc.apply(Action.PROMOTE, actor="t", reason="", now=30.0, variant=1)
    reference, current = score_spans(lc.audit)
    assert current == (30.0, INF)
    assert route(5.0, reference, current) is False  # before any promotion
    assert route(15.0, reference, current) is None  # the first promotion's: neither
    assert route(22.0, reference, current) is False  # rolled back: reference
    assert route(30.0, reference, current) is True
    windows = ScoreWindows()
    windows.set_promoted(True)
    # Received earlier (pulled): by receipt time; a score of 0.0 is a score.
    windows.add_received([(0, 0.1, 5.0), (0, 0.0, 15.0), (0, 0.0, 31.0)], lc.audit)
    windows.add([0], [0.2])  # live, while promoted: current
    assert windows.sizes() == {0: (1, 2)}

"""Tests for allocator.lifecycle: transition table, guards, audit, events, persistence."""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from allocator.lifecycle import (
    TRANSITIONS,
    Action,
    AuditRecord,
    Event,
    EventType,
    IllegalTransition,
    Lifecycle,
    State,
    legal_actions,
)

KW: dict[str, Any] = {"actor": "tester", "reason": "test", "now": 100.0}


def _lc(n: int = 3, control: int | None = 0) -> Lifecycle:
    return Lifecycle("exp", n_variants=n, control=control)


def _drive(lc: Lifecycle, *steps: tuple[Action, int | None]) -> None:
    for action, variant in steps:
        lc.apply(action, variant=variant, **KW)


def _to(state: State) -> Lifecycle:
    """A lifecycle brought to ``state`` by legal moves (champion 1, previous 0)."""
    lc = _lc()
    path: dict[State, list[tuple[Action, int | None]]] = {
        State.RUNNING: [],
        State.PROMOTED: [(Action.PROMOTE, 1)],
        State.REOPENED: [(Action.PROMOTE, 1), (Action.REOPEN, None)],
        State.ROLLED_BACK: [(Action.PROMOTE, 1), (Action.ROLLBACK, None)],
        State.PAUSED: [(Action.PAUSE, None)],
        State.ARCHIVED: [(Action.ARCHIVE, None)],
    }
    _drive(lc, *path[state])
    assert lc.state is state
    return lc


# ---- transition table ----------------------------------------------------------------


@pytest.mark.parametrize(("frm", "action"), sorted(TRANSITIONS, key=str))
def test_every_table_entry_is_applicable(frm: State, action: Action) -> None:
    lc = _to(frm)
    variant = 2 if action is Action.PROMOTE else None
    rec = lc.apply(action, variant=variant, **KW)
    assert (rec.from_state, rec.to_state, rec.action) == (frm, TRANSITIONS[frm, action], action)
    assert lc.state is TRANSITIONS[frm, action]


ILLEGAL = [(s, a) for s in State for a in Action if a not in legal_actions(s)]


@pytest.mark.parametrize(("frm", "action"), ILLEGAL)
def test_actions_outside_the_table_raise_and_change_nothing(frm: State, action: Action) -> None:
    lc = _to(frm)
    before = lc.to_dict()
    with pytest.raises(IllegalTransition) as info:
        lc.apply(action, variant=1, **KW)
    assert (info.value.from_state, info.value.action) == (frm, action)
    assert isinstance(info.value, ValueError)
    assert lc.to_dict() == before


def test_legal_actions_sets() -> None:
    assert legal_actions(State.ARCHIVED) == frozenset()
    assert legal_actions(State.PAUSED) == {Action.RESUME, Action.ARCHIVE}
    assert legal_actions(State.ROLLED_BACK) == {Action.REOPEN, Action.ADD_VARIANT, Action.ARCHIVE}
    for state in State:
        if state is not State.ARCHIVED:
            assert Action.ARCHIVE in legal_actions(state)


@pytest.mark.parametrize("frm", [State.RUNNING, State.PROMOTED, State.REOPENED])
def test_pause_resume_returns_to_the_paused_state(frm: State) -> None:
    lc = _to(frm)
    champion = lc.champion
    _drive(lc, (Action.PAUSE, None))
    assert (lc.state, lc.paused_from) == (State.PAUSED, frm)
    rec = lc.apply(Action.RESUME, **KW)
    assert (rec.from_state, rec.to_state) == (State.PAUSED, frm)
    assert (lc.state, lc.paused_from, lc.champion) == (frm, None, champion)


def test_archived_is_terminal() -> None:
    lc = _to(State.ARCHIVED)
    for action in Action:
        with pytest.raises(IllegalTransition, match="terminal"):
            lc.apply(action, variant=0, **KW)
    assert lc.allowed() == frozenset()


# ---- guards and champion bookkeeping -------------------------------------------------


def test_champion_bookkeeping_through_a_full_story() -> None:
    lc = _lc(n=3, control=0)
    assert (lc.champion, lc.previous_champion) == (None, None)
    _drive(lc, (Action.PROMOTE, 2))
    assert (lc.champion, lc.previous_champion) == (2, 0)  # first promotion: control is previous
    _drive(lc, (Action.ADD_VARIANT, None))
    assert (lc.state, lc.n_variants) == (State.REOPENED, 4)
    _drive(lc, (Action.PROMOTE, 3))
    assert (lc.champion, lc.previous_champion) == (3, 2)
    rb = lc.apply(Action.ROLLBACK, **KW)
    assert rb.variant == 2
    assert (lc.state, lc.champion, lc.previous_champion) == (State.ROLLED_BACK, 2, None)
    _drive(lc, (Action.REOPEN, None), (Action.PROMOTE, 2))
    # Re-promoting the champion keeps the rollback target unchanged (here: none left), so
    # a rollback returns to the control (RollbackRequest: "control if none").
    assert (lc.champion, lc.previous_champion) == (2, None)
    assert lc.apply(Action.ROLLBACK, **KW).variant == 0
    assert (lc.state, lc.champion) == (State.ROLLED_BACK, 0)


def test_a_rollback_with_the_control_as_champion_and_nothing_earlier_is_refused() -> None:
    lc = _lc(n=3, control=0)
    _drive(lc, (Action.PROMOTE, 1), (Action.ROLLBACK, None))  # champion: the control
    _drive(lc, (Action.REOPEN, None), (Action.PROMOTE, 0))
    assert (lc.champion, lc.previous_champion) == (0, None)
    with pytest.raises(IllegalTransition, match="no earlier champion"):
        lc.apply(Action.ROLLBACK, **KW)


def test_rollback_from_running_restores_the_control() -> None:
    lc = _lc(control=1)
    rec = lc.apply(Action.ROLLBACK, **KW)
    assert (rec.variant, lc.champion, lc.state) == (1, 1, State.ROLLED_BACK)


def test_rollback_to_a_named_variant() -> None:
    """control -> 1 -> 2: rolling back to 0 (not the previous champion 1) returns traffic
    there and leaves nothing to roll back to."""
    lc = _lc(n=3)
    _drive(lc, (Action.PROMOTE, 1), (Action.REOPEN, None), (Action.PROMOTE, 2))
    rb = lc.apply(Action.ROLLBACK, variant=0, **KW)
    assert (rb.variant, lc.state, lc.champion, lc.previous_champion) == (
        0,
        State.ROLLED_BACK,
        0,
        None,
    )


@pytest.mark.parametrize(("variant", "detail"), [(-1, "not in"), (3, "not in"), (1, "champion")])
def test_rollback_to_a_named_variant_needs_a_known_one_other_than_the_champion(
    variant: int, detail: str
) -> None:
    lc = _to(State.PROMOTED)  # champion 1
    before = lc.to_dict()
    with pytest.raises(IllegalTransition, match=detail):
        lc.apply(Action.ROLLBACK, variant=variant, **KW)
    assert lc.to_dict() == before


def test_rollback_from_running_to_a_named_variant() -> None:
    lc = _lc(n=3, control=None)  # no control: only a named variant can be restored
    rec = lc.apply(Action.ROLLBACK, variant=2, **KW)
    assert (rec.variant, lc.champion, lc.state) == (2, 2, State.ROLLED_BACK)


def test_rollback_without_control_is_refused() -> None:
    lc = _lc(control=None)
    with pytest.raises(IllegalTransition) as info:
        lc.apply(Action.ROLLBACK, **KW)
    assert info.value.detail
    assert lc.audit == ()


def test_promoting_the_control_leaves_nothing_to_roll_back_to() -> None:
    lc = _lc()
    _drive(lc, (Action.PROMOTE, 0))
    assert Action.ROLLBACK not in lc.allowed()
    with pytest.raises(IllegalTransition):
        lc.apply(Action.ROLLBACK, **KW)


@pytest.mark.parametrize("variant", [None, -1, 3])
def test_promote_needs_a_known_variant(variant: int | None) -> None:
    lc = _lc(n=3)
    with pytest.raises(IllegalTransition, match="variant"):
        lc.apply(Action.PROMOTE, variant=variant, **KW)
    assert lc.state is State.RUNNING and lc.audit == ()


def test_add_variant_index_must_be_next() -> None:
    lc = _lc(n=2)
    with pytest.raises(IllegalTransition, match="must be 2"):
        lc.apply(Action.ADD_VARIANT, variant=5, **KW)
    rec = lc.apply(Action.ADD_VARIANT, variant=2, **KW)
    assert (rec.variant, rec.from_state, rec.to_state, lc.n_variants) == (
        2,
        State.RUNNING,
        State.RUNNING,
        3,
    )


def test_allowed_reflects_guards() -> None:
    assert _lc().allowed() == {
        Action.PROMOTE,
        Action.ROLLBACK,
        Action.PAUSE,
        Action.ADD_VARIANT,
        Action.ARCHIVE,
    }
    assert Action.ROLLBACK not in _lc(control=None).allowed()


# ---- argument validation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"actor": ""}, ValueError),
        ({"reason": 3}, TypeError),
        ({"now": float("nan")}, ValueError),
        ({"now": "yesterday"}, TypeError),
        ({"variant": 1.0}, TypeError),
        ({"variant": True}, TypeError),
        ({"summary": {"p_best": float("inf")}}, ValueError),
        ({"summary": {"p_best": "high"}}, TypeError),
        ({"summary": {"p_best": [0.5, None]}}, TypeError),
        ({"summary": {1: 0.5}}, TypeError),
        ({"summary": [("p_best", 0.5)]}, TypeError),
    ],
)
def test_bad_arguments_raise_before_any_change(kwargs: dict[str, Any], exc: type) -> None:
    lc = _lc()
    args: dict[str, Any] = {**KW, "variant": 1, **kwargs}
    with pytest.raises(exc):
        lc.apply(Action.PROMOTE, **args)
    assert lc.state is State.RUNNING and lc.audit == ()


def test_action_must_be_an_action() -> None:
    with pytest.raises(TypeError):
        _lc().apply("PROMOTE", variant=1, **KW)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        (("", 2, 0), ValueError),
        (("e", 0, None), ValueError),
        (("e", 2.0, 0), TypeError),
        (("e", 2, 2), ValueError),
    ],
)
def test_constructor_validation(args: tuple[Any, Any, Any], exc: type) -> None:
    name, n, control = args
    with pytest.raises(exc):
        Lifecycle(name, n_variants=n, control=control)


# ---- audit and events ----------------------------------------------------------------


def test_audit_record_contents_and_summary_is_read_only() -> None:
    lc = _lc()
    summary = {"p_best": 0.97, "expected_loss": [0.001, 0.02, 0.0]}
    rec = lc.apply(
        Action.PROMOTE,
        actor="promoter",
        reason="P(best)=0.97",
        now=12.5,
        variant=1,
        summary=summary,
    )
    summary["p_best"] = 0.0  # the caller's dict must not leak into the audit row
    assert rec == lc.audit[0]
    assert (rec.seq, rec.experiment, rec.actor, rec.reason, rec.at) == (
        1,
        "exp",
        "promoter",
        "P(best)=0.97",
        12.5,
    )
    assert rec.posterior_summary == {"p_best": 0.97, "expected_loss": (0.001, 0.02, 0.0)}
    with pytest.raises(TypeError):
        rec.posterior_summary["p_best"] = 1.0  # type: ignore[index]


def test_events_follow_transitions() -> None:
    lc = _lc()
    seen: list[Event] = []
    unsubscribe = lc.subscribe(seen.append)
    _drive(lc, (Action.PROMOTE, 1), (Action.ADD_VARIANT, None), (Action.PAUSE, None))
    lc.apply(Action.RESUME, **KW)
    lc.apply(Action.ROLLBACK, **KW)
    assert [e.type for e in seen] == [
        EventType.PROMOTED,
        EventType.VARIANT_ADDED,
        EventType.REOPENED,  # ADD_VARIANT on PROMOTED starts a new round
        EventType.PAUSED,
        EventType.RESUMED,
        EventType.ROLLED_BACK,
    ]
    assert seen[0].variant == 1 and seen[0].at == 100.0 and seen[0].experiment == "exp"
    assert seen[-1].details["demoted"] == 1 and seen[-1].variant == 0
    unsubscribe()
    unsubscribe()  # idempotent
    lc.apply(Action.ARCHIVE, **KW)
    assert len(seen) == 6


def test_emit_event_for_other_modules() -> None:
    lc = _lc()
    seen: list[Event] = []
    lc.subscribe(seen.append)
    ev = lc.emit_event(
        EventType.SRM_DETECTED, now=5.0, reason="chi2 p=1e-9", details={"p_value": 1e-9}
    )
    assert seen == [ev]
    assert (ev.type, ev.experiment, ev.variant, ev.details["p_value"]) == (
        EventType.SRM_DETECTED,
        "exp",
        None,
        1e-9,
    )
    assert lc.audit == ()  # events from other modules are not transitions
    with pytest.raises(TypeError):
        lc.emit_event("SRM_DETECTED", now=5.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        lc.publish(Event(EventType.DRIFT_DETECTED, "other", 0, 1.0))
    with pytest.raises(TypeError):
        lc.subscribe("not callable")  # type: ignore[arg-type]


def test_failing_listener_is_logged_and_does_not_undo(caplog: pytest.LogCaptureFixture) -> None:
    lc = _lc()
    seen: list[Event] = []

    def boom(event: Event) -> None:
        raise RuntimeError("listener bug")

    lc.subscribe(boom)
    lc.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="allocator.lifecycle"):
        lc.apply(Action.PROMOTE, variant=1, **KW)
    assert lc.state is State.PROMOTED and len(seen) == 1
    assert "listener failed" in caplog.text


# ---- persistence ---------------------------------------------------------------------


def test_round_trip_through_json() -> None:
    lc = _lc()
    _drive(lc, (Action.PROMOTE, 2), (Action.ADD_VARIANT, None), (Action.PAUSE, None))
    lc.apply(Action.RESUME, summary={"p_best": [0.1, 0.2, 0.7, 0.0]}, **KW)
    data = json.loads(json.dumps(lc.to_dict()))
    back = Lifecycle.from_dict(data)
    assert back.to_dict() == lc.to_dict()
    assert back.audit == lc.audit
    nxt = back.apply(Action.PROMOTE, variant=3, **KW)
    assert nxt.seq == lc.audit[-1].seq + 1
    assert AuditRecord.from_dict(nxt.to_dict()) == nxt


@pytest.mark.parametrize(
    "patch",
    [
        {"state": "FLYING"},
        {"champion": 7},
        {"state": "PAUSED"},
        {"paused_from": "RUNNING"},
        {"state": "PROMOTED", "champion": None, "audit": []},
        {"next_seq": 1},
        {"champion": 1.5},
    ],
)
def test_from_dict_rejects_inconsistent_snapshots(patch: dict[str, Any]) -> None:
    lc = _lc()
    _drive(lc, (Action.PROMOTE, 1))
    data = {**lc.to_dict(), **patch}
    with pytest.raises((ValueError, TypeError)):
        Lifecycle.from_dict(data)


def test_from_dict_rejects_out_of_order_audit() -> None:
    lc = _lc()
    _drive(lc, (Action.PAUSE, None))
    lc.apply(Action.RESUME, **KW)
    data = lc.to_dict()
    data["audit"] = list(reversed(data["audit"]))
    with pytest.raises(ValueError):
        Lifecycle.from_dict(data)


# ---- stateful property test ----------------------------------------------------------

LEGAL_STATES = frozenset(State)


class LifecycleMachine(RuleBasedStateMachine):
    """Random actions: illegal ones change nothing; legal ones add exactly one audit row."""

    def __init__(self) -> None:
        super().__init__()
        self.lc = Lifecycle("stateful", n_variants=3, control=0)
        self.events: list[Event] = []
        self.lc.subscribe(self.events.append)
        self.now = 0.0
        self.archived = False

    @rule(
        action=st.sampled_from(list(Action)),
        variant=st.one_of(st.none(), st.integers(min_value=-1, max_value=6)),
        dt=st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    )
    def act(self, action: Action, variant: int | None, dt: float) -> None:
        self.now += dt
        before = self.lc.to_dict()
        n_audit, n_events = len(self.lc.audit), len(self.events)
        try:
            rec = self.lc.apply(action, actor="fuzz", reason="r", now=self.now, variant=variant)
        except IllegalTransition as exc:
            assert exc.action is action and exc.from_state.value == before["state"]
            assert self.lc.to_dict() == before
            assert len(self.events) == n_events
            if self.archived:
                assert exc.from_state is State.ARCHIVED
            return
        assert not self.archived, "ARCHIVED must be terminal"
        assert len(self.lc.audit) == n_audit + 1 and self.lc.audit[-1] == rec
        assert rec.from_state.value == before["state"] and rec.to_state is self.lc.state
        assert rec.action is action and rec.at == self.now
        assert 1 <= len(self.events) - n_events <= 2
        assert self.events[n_events].type.value in {e.value for e in EventType}
        if action is Action.RESUME:
            assert rec.to_state.value == before["paused_from"]
        elif action not in (Action.ARCHIVE,):
            assert TRANSITIONS[rec.from_state, action] is rec.to_state
        self.archived = self.lc.state is State.ARCHIVED

    @rule()
    def round_trip(self) -> None:
        assert Lifecycle.from_dict(json.loads(json.dumps(self.lc.to_dict()))).to_dict() == (
            self.lc.to_dict()
        )

    @invariant()
    def state_is_legal_and_audit_is_ordered(self) -> None:
        lc = self.lc
        assert lc.state in LEGAL_STATES
        seqs = [r.seq for r in lc.audit]
        assert all(b > a for a, b in itertools.pairwise(seqs))
        assert seqs == list(range(1, len(seqs) + 1))
        if lc.audit:
            assert lc.audit[-1].to_state is lc.state
        for rec, nxt in itertools.pairwise(lc.audit):
            assert nxt.from_state is rec.to_state
        if lc.champion is not None:
            assert 0 <= lc.champion < lc.n_variants
        if lc.state in (State.PROMOTED, State.ROLLED_BACK):
            assert lc.champion is not None
        assert (lc.state is State.PAUSED) == (lc.paused_from is not None)


LifecycleMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
TestLifecycleMachine = LifecycleMachine.TestCase

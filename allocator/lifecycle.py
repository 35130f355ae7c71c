"""Experiment lifecycle: a small state machine with an append-only audit trail and events.

States
------
``RUNNING``      adaptive traffic across the variants; no champion yet.
``PAUSED``       allocation frozen, no learning and no automatic transitions (promotion,
                 monitor reactions) until ``RESUME`` returns to the state it was paused in.
``PROMOTED``     100% of traffic to the champion; the post-promotion monitor watches it.
``REOPENED``     adaptive again (behaves like ``RUNNING``), with a champion still on record.
``ROLLED_BACK``  100% of traffic to the restored champion (the previous champion, or the
                 control when nothing was ever promoted); awaits a new variant or a reopen.
``ARCHIVED``     terminal: read-only history.

Transition table (anything absent raises :class:`IllegalTransition`)
--------------------------------------------------------------------

============  ============  =============================================================
from          action        to
============  ============  =============================================================
RUNNING       PROMOTE       PROMOTED     (``variant`` required)
RUNNING       ROLLBACK      ROLLED_BACK  (kill switch: champion := control, or ``variant``)
RUNNING       PAUSE         PAUSED
RUNNING       ADD_VARIANT   RUNNING      (a new arm joins the running round)
PROMOTED      ROLLBACK      ROLLED_BACK  (champion := previous champion, or ``variant``)
PROMOTED      REOPEN        REOPENED     (regression, or an operator wants a new round)
PROMOTED      ADD_VARIANT   REOPENED     (a challenger starts a new round)
PROMOTED      PAUSE         PAUSED       (e.g. silence the monitor during an incident)
REOPENED      PROMOTE       PROMOTED     (``variant`` required; may be the champion again)
REOPENED      ROLLBACK      ROLLED_BACK  (champion := previous champion, or ``variant``)
REOPENED      PAUSE         PAUSED
REOPENED      ADD_VARIANT   REOPENED
ROLLED_BACK   REOPEN        REOPENED
ROLLED_BACK   ADD_VARIANT   REOPENED
PAUSED        RESUME        the state it was paused in
any but ARCHIVED  ARCHIVE   ARCHIVED
============  ============  =============================================================

Deliberate omissions: no ``PROMOTE`` from ``PROMOTED`` or ``ROLLED_BACK`` (reopen first, so a
new winner is always chosen by a round with data); ``PAUSED`` accepts only ``RESUME`` and
``ARCHIVE`` (an operator resumes before acting, so a paused experiment cannot change shape
behind the pause); no ``REOPEN`` from ``RUNNING``/``REOPENED`` (already adaptive).

Guards, also raising :class:`IllegalTransition`: ``PROMOTE`` needs a known ``variant``;
``ROLLBACK`` needs a restore target (``variant`` if given, which must be known) different
from the current champion; ``ADD_VARIANT`` takes the next index (``variant`` may be omitted
or must equal ``n_variants``).

Champion bookkeeping: ``PROMOTE v`` sets ``previous_champion`` to the old champion (the
control on the first promotion; unchanged when ``v`` is already the champion) and
``champion := v``. ``ROLLBACK`` sets ``champion := previous_champion`` (the control when
there is none: from ``RUNNING``, or a champion promoted again after a rollback), or the
``variant`` an operator names (e.g. a champion from before the previous one), and clears
``previous_champion``.

Every legal :meth:`Lifecycle.apply` appends exactly one :class:`AuditRecord` and emits the
matching :class:`Event` (``ADD_VARIANT`` that moves into ``REOPENED`` emits
``VARIANT_ADDED`` then ``REOPENED``). Other modules emit ``DRIFT_DETECTED``,
``RETRAIN_REQUESTED``, ``SRM_DETECTED`` and ``FUTILITY_STOPPED`` through
:meth:`Lifecycle.emit_event` / :meth:`Lifecycle.publish`.

The object is pure bookkeeping: it never reads the clock (``now`` is passed in), does no
I/O and takes no locks; the engine serialises calls per experiment.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "TRANSITIONS",
    "Action",
    "AuditRecord",
    "Event",
    "EventType",
    "IllegalTransition",
    "Lifecycle",
    "Listener",
    "State",
    "legal_actions",
]

_log = logging.getLogger(__name__)


class State(enum.Enum):
    """Lifecycle state of an experiment."""

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    PROMOTED = "PROMOTED"
    REOPENED = "REOPENED"
    ROLLED_BACK = "ROLLED_BACK"
    ARCHIVED = "ARCHIVED"

    @property
    def adaptive(self) -> bool:
        """True when traffic is allocated by the bandit policy (RUNNING or REOPENED)."""
        return self in (State.RUNNING, State.REOPENED)


class Action(enum.Enum):
    """An operation requested on the lifecycle."""

    PROMOTE = "PROMOTE"
    ROLLBACK = "ROLLBACK"
    REOPEN = "REOPEN"
    PAUSE = "PAUSE"
    RESUME = "RESUME"
    ARCHIVE = "ARCHIVE"
    ADD_VARIANT = "ADD_VARIANT"


class EventType(enum.Enum):
    """Event kinds fanned out to WatchEvents subscribers and webhooks."""

    CREATED = "CREATED"
    PROMOTED = "PROMOTED"
    ROLLED_BACK = "ROLLED_BACK"
    REOPENED = "REOPENED"
    PAUSED = "PAUSED"
    RESUMED = "RESUMED"
    ARCHIVED = "ARCHIVED"
    VARIANT_ADDED = "VARIANT_ADDED"
    DRIFT_DETECTED = "DRIFT_DETECTED"
    RETRAIN_REQUESTED = "RETRAIN_REQUESTED"
    SRM_DETECTED = "SRM_DETECTED"
    FUTILITY_STOPPED = "FUTILITY_STOPPED"


_S, _A = State, Action
# RESUME and ARCHIVE are resolved in code (their target depends on the state), so the
# static table lists only fixed-target moves.
TRANSITIONS: Mapping[tuple[State, Action], State] = MappingProxyType(
    {
        (_S.RUNNING, _A.PROMOTE): _S.PROMOTED,
        (_S.RUNNING, _A.ROLLBACK): _S.ROLLED_BACK,
        (_S.RUNNING, _A.PAUSE): _S.PAUSED,
        (_S.RUNNING, _A.ADD_VARIANT): _S.RUNNING,
        (_S.PROMOTED, _A.ROLLBACK): _S.ROLLED_BACK,
        (_S.PROMOTED, _A.REOPEN): _S.REOPENED,
        (_S.PROMOTED, _A.ADD_VARIANT): _S.REOPENED,
        (_S.PROMOTED, _A.PAUSE): _S.PAUSED,
        (_S.REOPENED, _A.PROMOTE): _S.PROMOTED,
        (_S.REOPENED, _A.ROLLBACK): _S.ROLLED_BACK,
        (_S.REOPENED, _A.PAUSE): _S.PAUSED,
        (_S.REOPENED, _A.ADD_VARIANT): _S.REOPENED,
        (_S.ROLLED_BACK, _A.REOPEN): _S.REOPENED,
        (_S.ROLLED_BACK, _A.ADD_VARIANT): _S.REOPENED,
    }
)

_ACTION_EVENT: Mapping[Action, EventType] = MappingProxyType(
    {
        Action.PROMOTE: EventType.PROMOTED,
        Action.ROLLBACK: EventType.ROLLED_BACK,
        Action.REOPEN: EventType.REOPENED,
        Action.PAUSE: EventType.PAUSED,
        Action.RESUME: EventType.RESUMED,
        Action.ARCHIVE: EventType.ARCHIVED,
        Action.ADD_VARIANT: EventType.VARIANT_ADDED,
    }
)


def legal_actions(state: State) -> frozenset[Action]:
    """Actions the table allows from ``state`` (guards may still refuse some)."""
    acts = {a for (s, a) in TRANSITIONS if s is state}
    if state is State.PAUSED:
        acts.add(Action.RESUME)
    if state is not State.ARCHIVED:
        acts.add(Action.ARCHIVE)
    return frozenset(acts)


class IllegalTransition(ValueError):
    """An action not allowed from the current state (or refused by a guard); nothing changed.

    >>> IllegalTransition(State.ARCHIVED, Action.REOPEN).from_state
    <State.ARCHIVED: 'ARCHIVED'>
    """

    def __init__(self, from_state: State, action: Action, detail: str = "") -> None:
        self.from_state = from_state
        self.action = action
        self.detail = detail
        msg = f"cannot {action.value} from {from_state.value}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


def _freeze_summary(summary: Mapping[str, Any] | None) -> Mapping[str, float | tuple[float, ...]]:
    """Validate a posterior summary and return a read-only copy (lists become tuples)."""
    if summary is None:
        return MappingProxyType({})
    if not isinstance(summary, Mapping):
        raise TypeError("summary must be a mapping of str to float or list of float")
    out: dict[str, float | tuple[float, ...]] = {}
    for key, value in summary.items():
        if not isinstance(key, str):
            raise TypeError(f"summary key {key!r} is not a str")
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            out[key] = tuple(_finite_number(v, key) for v in value)
        else:
            out[key] = _finite_number(value, key)
    return MappingProxyType(out)


def _finite_number(value: object, key: str) -> float:
    """Convert a summary entry to a finite float (JSON and SQL must round-trip it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"summary[{key!r}] must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"summary[{key!r}] must be finite, got {value}")
    return float(value)


def _check_now(now: float) -> float:
    """Validate a caller-supplied timestamp (epoch seconds)."""
    if isinstance(now, bool) or not isinstance(now, int | float):
        raise TypeError("now must be a float (epoch seconds)")
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now}")
    return float(now)


@dataclass(frozen=True)
class AuditRecord:
    """One applied transition; the audit list is append-only with strictly increasing seq.

    >>> lc = Lifecycle("checkout", n_variants=2)
    >>> lc.apply(Action.PROMOTE, actor="promoter", reason="P(best)=0.97", now=1.0,
    ...          variant=1).to_state
    <State.PROMOTED: 'PROMOTED'>
    """

    seq: int
    experiment: str
    from_state: State
    to_state: State
    action: Action
    actor: str
    reason: str
    at: float
    posterior_summary: Mapping[str, float | tuple[float, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    variant: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (enums by name, summary tuples as lists)."""
        return {
            "seq": self.seq,
            "experiment": self.experiment,
            "from_state": self.from_state.value,
            "to_state": self.to_state.value,
            "action": self.action.value,
            "actor": self.actor,
            "reason": self.reason,
            "at": self.at,
            "posterior_summary": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.posterior_summary.items()
            },
            "variant": self.variant,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        """Inverse of :meth:`to_dict`; raises ValueError/KeyError/TypeError on bad input."""
        variant = data.get("variant")
        return cls(
            seq=int(data["seq"]),
            experiment=str(data["experiment"]),
            from_state=State(data["from_state"]),
            to_state=State(data["to_state"]),
            action=Action(data["action"]),
            actor=str(data["actor"]),
            reason=str(data["reason"]),
            at=_check_now(data["at"]),
            posterior_summary=_freeze_summary(data.get("posterior_summary")),
            variant=None if variant is None else int(variant),
        )


@dataclass(frozen=True)
class Event:
    """Something subscribers (WatchEvents, webhooks) should hear about.

    >>> Event(EventType.RETRAIN_REQUESTED, "checkout", 1, 1700000000.0, "CUSUM alarm").type
    <EventType.RETRAIN_REQUESTED: 'RETRAIN_REQUESTED'>
    """

    type: EventType
    experiment: str
    variant: int | None
    at: float
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


Listener = Callable[[Event], None]


class Lifecycle:
    """State, champions, audit trail and event fan-out of one experiment.

    >>> lc = Lifecycle("checkout", n_variants=3)
    >>> seen = []
    >>> _ = lc.subscribe(seen.append)
    >>> _ = lc.apply(Action.PROMOTE, actor="promoter", reason="P(best)=0.97", now=10.0,
    ...              variant=2)
    >>> lc.state, lc.champion, lc.previous_champion, seen[0].type.value
    (<State.PROMOTED: 'PROMOTED'>, 2, 0, 'PROMOTED')
    """

    def __init__(self, experiment: str, *, n_variants: int, control: int | None = 0) -> None:
        if not isinstance(experiment, str) or not experiment:
            raise ValueError("experiment must be a non-empty str")
        if isinstance(n_variants, bool) or not isinstance(n_variants, int):
            raise TypeError("n_variants must be an int")
        if n_variants < 1:
            raise ValueError(f"n_variants must be >= 1, got {n_variants}")
        if control is not None and not 0 <= control < n_variants:
            raise ValueError(f"control {control} out of range for {n_variants} variants")
        self._experiment = experiment
        self._n_variants = n_variants
        self._control = control
        self._state = State.RUNNING
        self._paused_from: State | None = None
        self._champion: int | None = None
        self._previous: int | None = None
        self._audit: list[AuditRecord] = []
        self._next_seq = 1
        self._listeners: list[Listener] = []

    # -- read-only views -------------------------------------------------------------
    @property
    def experiment(self) -> str:
        """Experiment name."""
        return self._experiment

    @property
    def state(self) -> State:
        """Current state."""
        return self._state

    @property
    def champion(self) -> int | None:
        """Variant index that gets 100% in PROMOTED / ROLLED_BACK (incumbent otherwise)."""
        return self._champion

    @property
    def previous_champion(self) -> int | None:
        """Rollback target: the champion before the latest promotion (or the control)."""
        return self._previous

    @property
    def control(self) -> int | None:
        """Control variant index (rollback target before any promotion)."""
        return self._control

    @property
    def n_variants(self) -> int:
        """Number of variants known to the lifecycle."""
        return self._n_variants

    @property
    def paused_from(self) -> State | None:
        """State that RESUME returns to (None unless PAUSED)."""
        return self._paused_from

    @property
    def audit(self) -> tuple[AuditRecord, ...]:
        """The audit trail, oldest first."""
        return tuple(self._audit)

    def allowed(self) -> frozenset[Action]:
        """Actions legal right now (table and guards), for UIs and tests."""
        out = set()
        for action in legal_actions(self._state):
            try:
                self._plan(action, self._default_variant(action))
            except IllegalTransition:
                continue
            out.add(action)
        return frozenset(out)

    def _default_variant(self, action: Action) -> int | None:
        """A variant that satisfies the guard of ``action`` when one is needed."""
        if action is Action.PROMOTE:
            return self._champion if self._champion is not None else 0
        return None

    # -- transitions -----------------------------------------------------------------
    def _plan(
        self, action: Action, variant: int | None
    ) -> tuple[State, int | None, int | None, State | None, int, int | None]:
        """Validate ``action``; return (to_state, champion, previous, paused_from, n, subject)."""
        frm = self._state
        if frm is State.ARCHIVED:
            raise IllegalTransition(frm, action, "ARCHIVED is terminal")
        if action is Action.ARCHIVE:
            return State.ARCHIVED, self._champion, self._previous, None, self._n_variants, None
        if action is Action.RESUME:
            if frm is not State.PAUSED or self._paused_from is None:
                raise IllegalTransition(frm, action)
            return self._paused_from, self._champion, self._previous, None, self._n_variants, None
        to = TRANSITIONS.get((frm, action))
        if to is None:
            raise IllegalTransition(frm, action)
        champion, previous, n = self._champion, self._previous, self._n_variants
        if action is Action.PAUSE:
            return to, champion, previous, frm, n, None
        if action is Action.PROMOTE:
            if variant is None or not 0 <= variant < n:
                raise IllegalTransition(frm, action, f"variant {variant} not in [0, {n})")
            if champion is None:
                previous = self._control
            elif variant != champion:
                previous = champion
            return to, variant, previous, None, n, variant
        if action is Action.ROLLBACK:
            if variant is not None:
                if not 0 <= variant < n:
                    raise IllegalTransition(frm, action, f"variant {variant} not in [0, {n})")
                if variant == champion:
                    raise IllegalTransition(frm, action, f"variant {variant} is the champion")
                return to, variant, None, None, n, variant
            # The previous champion, else the control (the proto's "control if none"; a
            # champion promoted again after a named rollback has no previous one).
            target = previous if previous is not None else self._control
            if target == champion:
                raise IllegalTransition(frm, action, "no earlier champion to restore")
            return to, target, None, None, n, target
        if action is Action.ADD_VARIANT:
            if variant is not None and variant != n:
                raise IllegalTransition(frm, action, f"new variant index must be {n}")
            return to, champion, previous, None, n + 1, n
        return to, champion, previous, None, n, None  # REOPEN

    def apply(
        self,
        action: Action,
        *,
        actor: str,
        reason: str,
        now: float,
        variant: int | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Apply ``action``; append and return its audit row, then notify listeners.

        Raises IllegalTransition (nothing changed) for a move the table or a guard forbids,
        TypeError/ValueError for malformed arguments (also before any change).
        """
        if not isinstance(action, Action):
            raise TypeError(f"action must be an Action, got {type(action).__name__}")
        if not isinstance(actor, str) or not actor:
            raise ValueError("actor must be a non-empty str")
        if not isinstance(reason, str):
            raise TypeError("reason must be a str")
        if variant is not None and (isinstance(variant, bool) or not isinstance(variant, int)):
            raise TypeError("variant must be an int or None")
        at = _check_now(now)
        frozen = _freeze_summary(summary)
        frm = self._state
        demoted = self._champion
        to, champion, previous, paused_from, n, subject = self._plan(action, variant)

        record = AuditRecord(
            seq=self._next_seq,
            experiment=self._experiment,
            from_state=frm,
            to_state=to,
            action=action,
            actor=actor,
            reason=reason,
            at=at,
            posterior_summary=frozen,
            variant=subject,
        )
        self._audit.append(record)
        self._next_seq += 1
        self._state, self._champion, self._previous = to, champion, previous
        self._paused_from, self._n_variants = paused_from, n

        details: dict[str, Any] = {"from_state": frm.value, "to_state": to.value, "actor": actor}
        if action is Action.ROLLBACK:
            details["demoted"] = demoted
        self.emit_event(
            _ACTION_EVENT[action], now=at, variant=subject, reason=reason, details=details
        )
        if action is Action.ADD_VARIANT and to is State.REOPENED and frm is not State.REOPENED:
            self.emit_event(
                EventType.REOPENED, now=at, variant=subject, reason=reason, details=details
            )
        return record

    # -- events ----------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Register ``listener`` for every event; returns a function that unsubscribes it."""
        if not callable(listener):
            raise TypeError("listener must be callable")
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, event: Event) -> None:
        """Deliver a ready-made event to every listener (a failing listener is logged)."""
        if event.experiment != self._experiment:
            raise ValueError(f"event for {event.experiment!r} published on {self._experiment!r}")
        # A listener that raises must not undo or hide a transition already applied.
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                _log.exception(
                    "event listener failed for %s %s", event.type.value, event.experiment
                )

    def emit_event(
        self,
        event_type: EventType,
        *,
        now: float,
        variant: int | None = None,
        reason: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> Event:
        """Build an event for this experiment, publish it and return it."""
        if not isinstance(event_type, EventType):
            raise TypeError("event_type must be an EventType")
        event = Event(
            type=event_type,
            experiment=self._experiment,
            variant=variant,
            at=_check_now(now),
            reason=reason,
            details=MappingProxyType(dict(details or {})),
        )
        self.publish(event)
        return event

    # -- persistence -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible snapshot (listeners are not persisted)."""
        return {
            "experiment": self._experiment,
            "n_variants": self._n_variants,
            "control": self._control,
            "state": self._state.value,
            "paused_from": None if self._paused_from is None else self._paused_from.value,
            "champion": self._champion,
            "previous_champion": self._previous,
            "next_seq": self._next_seq,
            "audit": [r.to_dict() for r in self._audit],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lifecycle:
        """Rebuild from :meth:`to_dict` output; raises ValueError if it is inconsistent."""
        lc = cls(
            str(data["experiment"]),
            n_variants=int(data["n_variants"]),
            control=_opt_int(data.get("control")),
        )
        lc._state = State(data["state"])
        paused_from = data.get("paused_from")
        lc._paused_from = None if paused_from is None else State(paused_from)
        lc._champion = _opt_int(data.get("champion"))
        lc._previous = _opt_int(data.get("previous_champion"))
        lc._audit = [AuditRecord.from_dict(r) for r in data.get("audit", [])]
        lc._next_seq = int(data.get("next_seq", len(lc._audit) + 1))
        lc._check_consistent()
        return lc

    def _check_consistent(self) -> None:
        """Reject snapshots that no sequence of legal transitions could have produced."""
        n = self._n_variants
        for name, v in (("champion", self._champion), ("previous_champion", self._previous)):
            if v is not None and not 0 <= v < n:
                raise ValueError(f"{name} {v} out of range for {n} variants")
        if (self._state is State.PAUSED) != (self._paused_from is not None):
            raise ValueError("paused_from must be set exactly when state is PAUSED")
        if self._paused_from in (State.PAUSED, State.ARCHIVED, State.ROLLED_BACK):
            raise ValueError(f"cannot have been paused from {self._paused_from}")
        if self._state in (State.PROMOTED, State.ROLLED_BACK) and self._champion is None:
            raise ValueError(f"{self._state.value} needs a champion")
        seqs = [r.seq for r in self._audit]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise ValueError("audit seq must be strictly increasing")
        if seqs and self._next_seq <= seqs[-1]:
            raise ValueError("next_seq must exceed the last audit seq")
        if any(r.experiment != self._experiment for r in self._audit):
            raise ValueError("audit rows belong to another experiment")
        if self._audit and self._audit[-1].to_state is not self._state:
            raise ValueError("state disagrees with the last audit row")


def _opt_int(value: object) -> int | None:
    """None or an int (rejecting bools and floats with a fraction)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected int or None, got {type(value).__name__}")
    return value

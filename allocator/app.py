"""The allocator application: engine + store + tokens + lifecycle + events, wired.

The servicer translates messages and calls this; this validates, decides and persists.
The engine (arrays, kernels) stays free of I/O; this layer owns the store, the group
commit writer, decision ids, the lifecycle of each experiment and the event fan-out.

>>> # see tests/test_service.py for a server built on it; in code:
>>> # app = Allocator.open(ServerConfig(database_url="sqlite:///x.sqlite")); app.start()
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from allocator_client.v1 import allocator_pb2 as pb

from allocator.config import ServerConfig
from allocator.convert import (
    check_monitoring,
    check_policy,
    check_promotion,
    spec_from_json,
    spec_to_config,
    spec_to_json,
)
from allocator.defaults import DefaultRewards, Pending
from allocator.drift import ScoreWindows, score_spans
from allocator.durable import Recovery, RewardWriter, replay_new_experiment
from allocator.engine import (
    MAX_ABS_REWARD,
    BatchDecision,
    Decision,
    Engine,
    ExperimentConfig,
    finite_rewards,
    weights_with,
)
from allocator.errors import (
    ExperimentExists,
    InvalidArgument,
    NotLoadedYet,
    Overloaded,
    UnknownExperiment,
    WrongState,
)
from allocator.guardrails import MAX_METRIC_NAME
from allocator.lifecycle import Action, Event, EventType, IllegalTransition, Lifecycle, State
from allocator.metrics import Metrics
from allocator.policies import PolicyKind, RewardKind
from allocator.report import (
    RANK_SAMPLE_PER_REPLICA,
    common_window,
    power_analysis,
    rank_tests,
)
from allocator.store import (
    AlreadyExists,
    AuditRecord,
    EventRecord,
    ExperimentRow,
    LoggedReward,
    PendingDefault,
    ReplicaConflict,
    RewardColumns,
    RewardRow,
    SqlStore,
    Store,
    StoreConfig,
    StoreUnavailable,
    VersionConflict,
)
from allocator.tokens import (
    Batch,
    ExpiredToken,
    IndexOutOfRange,
    InvalidToken,
    TokenSigner,
    event_key,
    load_or_create_secret,
)

log = logging.getLogger("allocator.app")

ACCEPTED, DUPLICATE, EXPIRED = "accepted", "duplicate", "expired"
# Per-item outcome codes of `Allocator.reward_indexed`: an index into this tuple.
STATUSES = (ACCEPTED, DUPLICATE, EXPIRED)
_LEADER_LOCK_KEY = 0x616C6C6F63  # "alloc": one promoter at a time across replicas
# How long start-up waits for this replica's lock: a previous incarnation's session may
# take the database a while to close (about 25 s for a vanished host, the lock sessions'
# keepalive). And how often the leader looks for replicas that are gone, whose pending
# defaults it takes over once they were gone on two looks.
_REPLICA_LOCK_WAIT_S = 30.0
_ADOPT_INTERVAL_S = 30.0
_EVENT_PAGE = 1000  # stored events read per query when handing them to the hub


def _check_extras(
    values: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray | None,
    guardrails: Sequence[dict[str, float]],
) -> np.ndarray:
    """Checks shared by every reward form, before any decision id is looked at (so an
    all-expired request is refused all the same): item count, finite values, scores and
    guardrails. What depends on the experiment (Bernoulli range) is checked later.
    Returns the values as float64."""
    n = len(values)
    if n == 0:
        raise InvalidArgument("values", "at least one reward is required")
    checked = finite_rewards(values)
    if scores is not None and len(scores):
        if len(scores) != n:
            raise InvalidArgument("prediction_scores", f"{len(scores)} scores for {n} values")
        s = np.asarray(scores, dtype=np.float64)
        # NaN means "no score for this item"; an infinity is a caller bug that would break
        # the drift statistics later, so it is refused here.
        bad = np.flatnonzero(np.isinf(s))
        if bad.size:
            raise InvalidArgument(
                f"prediction_scores[{int(bad[0])}]", "must be finite (NaN: no score)"
            )
    if guardrails and len(guardrails) != n:
        raise InvalidArgument("guardrails", f"{len(guardrails)} items for {n} values")
    for i, g in enumerate(guardrails):
        for metric, value in g.items():
            if not metric or len(metric) > MAX_METRIC_NAME:
                raise InvalidArgument(
                    f"guardrails[{i}]", f"metric names are 1-{MAX_METRIC_NAME} characters"
                )
            if not np.isfinite(value):
                raise InvalidArgument(f"guardrails[{i}].{metric}", "must be a finite number")
            if abs(value) > MAX_ABS_REWARD:  # summed with its square, as rewards are
                raise InvalidArgument(
                    f"guardrails[{i}].{metric}", f"must be within +-{MAX_ABS_REWARD:g}"
                )
    return checked


@dataclass
class Record:
    """One experiment as the application knows it (the engine holds its arrays)."""

    id: int
    spec: pb.ExperimentSpec
    config: ExperimentConfig
    lifecycle: Lifecycle
    created_at: float
    updated_at: float
    version: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    scores: ScoreWindows = field(default_factory=ScoreWindows)

    @property
    def name(self) -> str:
        """The experiment's name."""
        return self.config.name

    @property
    def window_s(self) -> float:
        """Attribution window of its decision ids."""
        spec = self.spec
        return (
            float(spec.attribution_window_seconds)
            if spec.HasField("attribution_window_seconds")
            else 86_400.0
        )


@dataclass(frozen=True)
class StoredEvent:
    """An event with its store sequence number."""

    seq: int
    event: Event


class Ended(StrEnum):
    """The last item of a WatchEvents subscription: why it ended."""

    SLOW = "slow"  # the subscriber fell a whole queue behind and was dropped
    SHUTDOWN = "shutdown"  # the server is stopping


WatchItem = StoredEvent | Ended


class EventHub:
    """Fans events out to WatchEvents subscribers; bounded queues drop slow watchers.

    Every subscription ends with an :class:`Ended` item, so its reader can tell the client
    why and where to resume; publishing never blocks, even on a full queue. A subscriber's
    ``notify`` is called after each item is queued for it (from the publishing thread).
    """

    QUEUE_SIZE = 10_000

    def __init__(self) -> None:
        self._subs: dict[queue.Queue[WatchItem], Callable[[], object]] = {}
        self._lock = threading.Lock()

    def publish(self, item: StoredEvent) -> None:
        """Deliver to every live subscriber."""
        with self._lock:
            subs = list(self._subs.items())
        for q, notify in subs:
            try:
                q.put_nowait(item)
            except queue.Full:
                log.warning("dropping a slow WatchEvents subscriber")
                self.unsubscribe(q)
                _end(q, Ended.SLOW)
            _call(notify)

    def subscribe(self, notify: Callable[[], object] = lambda: None) -> queue.Queue[WatchItem]:
        """A queue that receives every event from now on, then an ``Ended``."""
        q: queue.Queue[WatchItem] = queue.Queue(maxsize=self.QUEUE_SIZE)
        with self._lock:
            self._subs[q] = notify
        return q

    def unsubscribe(self, q: queue.Queue[WatchItem]) -> None:
        """Stop delivering to ``q``."""
        with self._lock:
            self._subs.pop(q, None)

    def close(self) -> None:
        """End every subscription (the server is stopping)."""
        with self._lock:
            subs, self._subs = self._subs, {}
        for q, notify in subs.items():
            _end(q, Ended.SHUTDOWN)
            _call(notify)


def _end(q: queue.Queue[WatchItem], why: Ended) -> None:
    """Put ``why`` even into a full queue, making room by dropping its oldest events: the
    subscription is over, and its reader resumes from the last event it delivered."""
    while True:
        try:
            q.put_nowait(why)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                q.get_nowait()


def _call(notify: Callable[[], object]) -> None:
    """A subscriber's wake-up; its failure (say, a loop already closed) is its own."""
    try:
        notify()
    except Exception:
        log.debug("WatchEvents wake-up failed", exc_info=True)


class Allocator:
    """Application service behind the gRPC servicer."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.engine = Engine(clock=clock)
        self.replica_id = config.effective_replica_id
        secret = (
            config.token_secret.encode() if config.token_secret else load_or_create_secret(store)
        )
        self.signer = TokenSigner(secret, ttl_seconds=float(config.attribution_window_s))
        self.records: dict[str, Record] = {}
        self.by_id: dict[int, Record] = {}
        self._records_lock = threading.Lock()
        self.events = EventHub()
        # The hub's cursor over the store: the last event it was given (see _deliver_events).
        self._hub_seq = 0
        self._hub_lock = threading.Lock()
        self.hooks: list[Callable[[Record, np.ndarray, np.ndarray], None]] = []
        self.tick_hooks: list[Callable[[], None]] = []
        self.last_decisions: dict[str, pb.PromotionStatus] = {}
        self.defaults = DefaultRewards()
        self.event_listeners: list[Callable[[Record, Event], None]] = []
        # Makes an experiment's monitor settings as the supervisor will (the server wiring
        # sets it), so create refuses settings the monitors could not run with.
        self.monitor_settings: Callable[[pb.ExperimentSpec], object] | None = None
        # The lock first: the log of our id is final once no one else can write it.
        self._hold_replica_lock()
        self._load()
        self._load_defaults()
        self._next_adoption = time.monotonic() + _ADOPT_INTERVAL_S
        self._gone_before: set[str] = set()  # replicas the last adoption pass found gone
        self._lock_lost = False
        self.tick_hooks.append(self._save_defaults)
        self.tick_hooks.append(self._adopt_defaults)
        self.writer = RewardWriter(
            store,
            self.engine,
            self.replica_id,
            metrics,
            ids=lambda: {name: r.id for name, r in self.records.items()},
            positions=self._positions,
            skip_until=self._skip_until,
            max_rows=config.flush_max_rows,
            max_delay_ms=config.flush_max_delay_ms,
            max_queue=config.max_queue,
            sync_interval_s=config.sync_interval_s,
            snapshot_interval_s=config.snapshot_interval_s,
            on_applied=self._on_applied,
            on_pulled=self._on_pulled,
            on_tick=self._tick,
        )
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, name="refresh", daemon=True)

    @classmethod
    def open(cls, config: ServerConfig, metrics: Metrics) -> Allocator:
        """Open (and migrate) the store, recover state."""
        store = SqlStore.open(StoreConfig(config.database_url))
        return cls(config, store, metrics)

    # -- start-up / shutdown ---------------------------------------------------------------
    def _load(self) -> None:
        rows = self.store.list_experiments()
        configs: dict[str, ExperimentConfig] = {}
        ids: dict[str, int] = {}
        for row in rows:
            rec = self._record_from_row(row)
            self.records[rec.name] = rec
            self.by_id[rec.id] = rec
            configs[rec.name] = rec.config
            ids[rec.name] = rec.id
        recovery = Recovery(self.store, self.engine)
        self._positions = recovery.load(ids, configs, own_replica=self.replica_id)
        self._skip_until = recovery.skip_until
        for rec in self.records.values():
            self._apply_state(rec)
            self._load_scores(rec)
        self._hub_seq = self._max_event_seq()

    def _load_scores(self, rec: Record) -> None:
        """Rebuild the prediction-score windows from the log applied so far (the rows
        after it reach them through the writer, like every other replica's)."""
        reference, current = score_spans(rec.lifecycle.audit)
        size, n, pos = rec.scores.size, rec.config.n_arms, self._positions
        rec.scores.restore(
            self.store.recent_scores(rec.id, n, reference, size, pos),
            self.store.recent_scores(rec.id, n, [current], size, pos) if current else {},
            promoted=rec.lifecycle.state == State.PROMOTED,
        )

    def _max_event_seq(self) -> int:
        seq = 0
        while True:
            batch = self.store.events_after(seq, limit=10_000)
            if not batch:
                return seq
            seq = max(e.seq or 0 for e in batch)

    def _record_from_row(self, row: ExperimentRow) -> Record:
        spec = spec_from_json(row.config_json)
        config = spec_to_config(spec)
        if row.lifecycle_json and row.lifecycle_json != "{}":
            lifecycle = Lifecycle.from_dict(json.loads(row.lifecycle_json))
        else:
            lifecycle = Lifecycle(spec.name, n_variants=len(spec.variants))
        return Record(
            id=row.id,
            spec=spec,
            config=config,
            lifecycle=lifecycle,
            created_at=row.created_at,
            updated_at=row.updated_at,
            version=row.version,
        )

    def start(self) -> None:
        """Start the writer and the allocation refresher."""
        self.writer.start()
        self._refresher.start()

    def stop(self) -> None:
        """Flush queued rewards, snapshot, close the store."""
        self._stop.set()
        self.writer.stop()
        self._refresher.join(timeout=2)
        self.events.close()
        self.store.close()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.engine.refresh_due()
            except Exception:
                log.exception("allocation refresh failed")

    @property
    def healthy(self) -> bool:
        """False while the store is unreachable."""
        return self.writer.healthy

    # -- experiments -----------------------------------------------------------------------
    def get(self, name: str) -> Record:
        """The record of ``name``; ``UnknownExperiment`` otherwise."""
        if not name:
            raise InvalidArgument("experiment", "is required")
        rec = self.records.get(name)
        if rec is None:
            raise UnknownExperiment(name)
        return rec

    def create(self, spec: pb.ExperimentSpec, actor: str = "api") -> Record:
        """Validate, persist and start serving a new experiment."""
        config = spec_to_config(spec)
        check_policy(config)
        check_promotion(spec)
        if spec.HasField("default_reward"):
            d = spec.default_reward
            bernoulli = config.policy.reward.value == "bernoulli"
            if not (np.isfinite(d) and abs(d) <= MAX_ABS_REWARD) or (
                bernoulli and not 0.0 <= d <= 1.0
            ):
                raise InvalidArgument(
                    "spec.default_reward",
                    f"must be finite, within +-{MAX_ABS_REWARD:g} (and in [0, 1] for bernoulli)",
                )
        if spec.HasField("attribution_window_seconds") and spec.attribution_window_seconds < 1:
            raise InvalidArgument("spec.attribution_window_seconds", "must be >= 1")
        check_monitoring(spec, self.monitor_settings)
        if spec.name in self.records:
            raise ExperimentExists(spec.name)
        if len(self.records) >= self.config.max_experiments:
            raise Overloaded(f"at most {self.config.max_experiments} experiments per server")
        stored_spec = pb.ExperimentSpec()
        stored_spec.CopyFrom(spec)
        lifecycle = Lifecycle(spec.name, n_variants=len(spec.variants))
        with self._records_lock:
            try:
                config = self.engine.create(config)
            except ExperimentExists:
                raise
            stored_spec.seed = config.seed
            now = self.clock()
            created = Event(EventType.CREATED, spec.name, None, now, "created")
            seqs: list[int] = []
            try:
                # The audit row and CREATED event in the same transaction: a failure after
                # the experiment was stored would answer UNAVAILABLE for a created one.
                row = self.store.create_experiment(
                    spec.name,
                    spec_to_json(stored_spec),
                    State.RUNNING.value,
                    now,
                    json.dumps(lifecycle.to_dict()),
                    audit=AuditRecord(
                        experiment_id=None,
                        action="CREATE",
                        actor=actor,
                        at=now,
                        to_state=State.RUNNING.value,
                        reason="created",
                    ),
                    events=[
                        EventRecord(
                            experiment_id=None, type=created.type.value, at=now, reason="created"
                        )
                    ],
                    event_seqs=seqs,
                )
            except AlreadyExists:
                self.engine.remove(spec.name)
                raise ExperimentExists(spec.name) from None
            except BaseException:
                self.engine.remove(spec.name)
                raise
            rec = Record(row.id, stored_spec, config, lifecycle, now, now, row.version)
            self.records[rec.name] = rec
            self.by_id[rec.id] = rec
        self._wire_lifecycle(rec)
        self._publish(rec, seqs[0], created)
        return rec

    def experiments(self, states: Sequence[State] = ()) -> list[Record]:
        """Experiments ordered by name, optionally filtered by state."""
        out = sorted(self.records.values(), key=lambda r: r.name)
        if states:
            out = [r for r in out if r.lifecycle.state in states]
        return out

    def transition(
        self,
        name: str,
        action: Action,
        *,
        actor: str,
        reason: str,
        variant: str = "",
        if_version: int | None = None,
        events: Sequence[Event] = (),
    ) -> Record:
        """Apply a lifecycle action, persist it, and change the allocation to match.

        ``if_version``: only if the experiment is still at that version (else
        :class:`VersionConflict`, nothing changed), for a caller that judged its state.
        ``events``: recorded before the transition's own, in its transaction (what led to
        it, e.g. FUTILITY_STOPPED): stored and published if and only if it is made.
        """
        rec = self.get(name)
        with rec.lock:
            if if_version is not None and rec.version != if_version:
                raise VersionConflict(name, if_version, rec.version)
            index: int | None = None
            if variant:
                if variant not in rec.config.variants:
                    raise InvalidArgument("variant", f"{variant!r} is not a variant of {name!r}")
                index = rec.config.variants.index(variant)
            p_best, loss, _ = self.engine.prob_best(name)
            summary = {
                "p_best": [float(x) for x in p_best],
                "expected_loss": [float(x) for x in loss],
            }
            # The action runs on a copy that replaces the live lifecycle only once the
            # commit succeeded: nobody reads a state that may still fail to persist.
            candidate = Lifecycle.from_dict(rec.lifecycle.to_dict())
            pending: list[Event] = list(events)
            unsubscribe = candidate.subscribe(pending.append)
            try:
                audit = candidate.apply(
                    action,
                    actor=actor,
                    reason=reason,
                    now=self.clock(),
                    variant=index,
                    summary=summary,
                )
            except IllegalTransition as err:
                raise WrongState(name, rec.lifecycle.state.value, action.value.lower()) from err
            finally:
                unsubscribe()
            try:
                seqs = self._persist_state(
                    rec,
                    candidate,
                    audit.from_state.value,
                    action,
                    actor,
                    reason,
                    summary,
                    pending,
                )
            except VersionConflict:
                # Another replica changed the experiment first (e.g. both were asked to
                # promote): theirs stands. Serve it from now on instead of waiting for the
                # next sync, so a retry here is judged against the state that won.
                row = self.store.get_experiment(name)
                if row is not None:
                    self._adopt_row(rec, row)
                raise
            rec.lifecycle = candidate
            self._wire_lifecycle(rec)
            self._apply_state(rec)
        for seq, event in zip(seqs, pending, strict=True):
            self._publish(rec, seq, event)
        return rec

    def add_variant(
        self, name: str, variant: str, *, actor: str, reason: str, weight: float | None = None
    ) -> Record:
        """Add a variant; a promoted experiment starts a new round (REOPENED).

        ``weight``: the new variant's relative weight, for POLICY_FIXED_SPLIT only (0, like
        None, is no weight for the other policies).
        """
        rec = self.get(name)
        if not variant:
            raise InvalidArgument("variant", "is required")
        if weight is not None:
            if not (math.isfinite(weight) and weight >= 0):
                raise InvalidArgument("weight", f"must be a finite number >= 0, got {weight!r}")
            if rec.config.policy.kind != PolicyKind.FIXED_SPLIT:
                if weight:
                    raise InvalidArgument(
                        "weight", "only POLICY_FIXED_SPLIT experiments take weights"
                    )
                weight = None
        with rec.lock:
            if rec.lifecycle.state in (State.ARCHIVED, State.PAUSED):
                raise WrongState(name, rec.lifecycle.state.value, "add a variant")
            if variant in rec.config.variants:
                raise InvalidArgument("variant", f"{variant!r} already exists in {name!r}")
            new_spec = pb.ExperimentSpec()
            new_spec.CopyFrom(rec.spec)
            new_spec.variants.append(variant)
            new_weights = weights_with(new_spec.weights, rec.config.n_arms, weight)
            del new_spec.weights[:]
            new_spec.weights.extend(new_weights)
            spec_to_config(new_spec)  # validates before anything changes
            candidate = Lifecycle.from_dict(rec.lifecycle.to_dict())
            pending: list[Event] = []
            unsubscribe = candidate.subscribe(pending.append)
            try:
                audit = candidate.apply(
                    Action.ADD_VARIANT,
                    actor=actor,
                    reason=reason or f"added {variant}",
                    now=self.clock(),
                )
            except IllegalTransition as err:
                raise WrongState(name, rec.lifecycle.state.value, "add a variant") from err
            finally:
                unsubscribe()
            # Persist first: if another replica changed the experiment meanwhile (or the
            # store is down) nothing here has changed, the engine included.
            try:
                seqs = self._persist_state(
                    rec,
                    candidate,
                    audit.from_state.value,
                    Action.ADD_VARIANT,
                    actor,
                    reason,
                    {},
                    pending,
                    spec=new_spec,
                )
            except VersionConflict:
                # As in transition(): another replica's change stands; serve it now.
                row = self.store.get_experiment(name)
                if row is not None:
                    self._adopt_row(rec, row)
                raise
            rec.spec = new_spec
            rec.lifecycle = candidate
            self._wire_lifecycle(rec)
            rec.config = self.engine.add_variant(name, variant, weight)
            self._apply_state(rec)
        for seq, event in zip(seqs, pending, strict=True):
            self._publish(rec, seq, event)
        return rec

    def _persist_state(
        self,
        rec: Record,
        lifecycle: Lifecycle,
        from_state: str,
        action: Action,
        actor: str,
        reason: str,
        summary: dict[str, list[float]],
        events: Sequence[Event] = (),
        spec: pb.ExperimentSpec | None = None,
    ) -> list[int]:
        """Persist ``lifecycle`` (and ``spec``) for ``rec`` with its audit row and events.

        Returns the events' sequence numbers. ``rec`` itself is only updated (version,
        time) once the commit succeeded; the caller then installs the new lifecycle.
        """
        spec = rec.spec if spec is None else spec
        now = self.clock()
        seqs: list[int] = []
        # State, spec, audit row and events commit in one transaction: every transition
        # is in the history with its event, or not at all.
        row = self.store.update_state(
            rec.name,
            state=lifecycle.state.value,
            champion=lifecycle.champion,
            lifecycle_json=json.dumps(lifecycle.to_dict()),
            expected_version=rec.version,
            now=now,
            config_json=spec_to_json(spec),
            audit=AuditRecord(
                experiment_id=rec.id,
                action=action.value,
                actor=actor,
                at=now,
                from_state=from_state,
                to_state=lifecycle.state.value,
                reason=reason,
                summary_json=json.dumps(summary),
            ),
            events=[self._event_row(rec, e) for e in events],
            event_seqs=seqs,
        )
        rec.version = row.version
        rec.updated_at = now
        return seqs

    def _apply_state(self, rec: Record) -> None:
        """Make the engine's allocation follow the lifecycle state."""
        lc = rec.lifecycle
        rec.scores.set_promoted(lc.state == State.PROMOTED)
        name = rec.name
        k = rec.config.n_arms
        state = lc.state
        if state == State.ARCHIVED:
            self.engine.archive(name)
            return
        if state in (State.PROMOTED, State.ROLLED_BACK) and lc.champion is not None:
            shares = np.zeros(k)
            holdout = rec.spec.monitoring.holdout_share if state == State.PROMOTED else 0.0
            if not 0.0 <= holdout < 1.0:
                # Stored before create refused it: serve the champion alone rather than fail
                # the promotion after its commit, or every start-up after.
                log.warning("experiment %s: ignoring holdout_share %r", name, holdout)
                holdout = 0.0
            prev = lc.previous_champion
            if holdout > 0 and prev is not None and prev != lc.champion:
                shares[prev] = holdout
                shares[lc.champion] = 1.0 - holdout
            else:
                shares[lc.champion] = 1.0
            self.engine.set_override(name, shares)
        elif state == State.PAUSED:
            self.engine.set_override(name, self.engine.view(name).alloc)
        else:
            if self.engine.view(name).override is not None:
                self.engine.set_override(name, None)

    def _wire_lifecycle(self, rec: Record) -> None:
        """Lifecycle events emitted outside ``transition`` (monitor, promotion) get stored."""

    @staticmethod
    def _event_row(rec: Record, event: Event) -> EventRecord:
        return EventRecord(
            experiment_id=rec.id,
            type=event.type.value,
            at=event.at,
            variant=event.variant,
            reason=event.reason,
            details_json=json.dumps(dict(event.details), default=str),
        )

    def _record_event(self, rec: Record, event: Event) -> None:
        """Store an event that is not a state change, then publish it."""
        self._publish(rec, self.store.append_event(self._event_row(rec, event)), event)

    def _publish(self, rec: Record, seq: int, event: Event) -> None:
        """Tell watchers, metrics and listeners (webhooks) about an event we stored."""
        self.metrics.events.labels(type=event.type.value).inc()
        # Watchers get it through the store, with whatever committed before it (another
        # thread's, another replica's): at once, not at the next sync.
        if seq > self._hub_seq:
            try:
                self._deliver_events()
            except StoreUnavailable:
                log.warning("store unavailable: event %d reaches watchers at the next sync", seq)
        for listener in self.event_listeners:
            try:
                listener(rec, event)
            except Exception:
                log.exception("event listener failed")

    def emit(
        self,
        rec: Record,
        type_: EventType,
        reason: str,
        variant: int | None = None,
        details: dict[str, object] | None = None,
    ) -> None:
        """Record and publish an event that is not a state change (drift, SRM, ...)."""
        self._record_event(
            rec, Event(type_, rec.name, variant, self.clock(), reason, details or {})
        )

    def has_stored_event(
        self,
        rec: Record,
        type_: EventType,
        details: Mapping[str, object] | None = None,
        *,
        legacy_since: float | None = None,
    ) -> bool:
        """Whether the store holds an event of ``type_`` for this experiment (any replica,
        any earlier run), with ``details`` among its details if given: for alerts that
        must be raised once, not once per process. ``legacy_since``: one stored by an
        earlier version, whose details lack the keys of ``details``, counts too if it is
        that recent."""
        seq = 0
        while batch := self.store.events_after(seq, experiment_id=rec.id, limit=1000):
            for e in batch:
                if e.type != type_.value:
                    continue
                if not details:
                    return True
                try:
                    stored = json.loads(e.details_json or "{}")
                except ValueError:
                    stored = None
                if not isinstance(stored, dict):
                    continue
                if all(stored.get(k) == v for k, v in details.items()):
                    return True
                legacy = not any(k in stored for k in details)
                if legacy and legacy_since is not None and e.at >= legacy_since:
                    return True
            seq = max(e.seq or 0 for e in batch)
        return False

    def stored_events(self, after: int) -> Iterator[StoredEvent]:
        """Events from the store after sequence ``after`` (for WatchEvents replay)."""
        seq = after
        while True:
            batch = self.store.events_after(seq, limit=1000)
            if not batch:
                return
            for e in batch:
                if e.experiment_id is not None and e.experiment_id not in self.by_id:
                    # Another replica's experiment not adopted yet: its events (and the
                    # rest) reach the watcher live, under its name, once it is (the hub
                    # waits for it the same way).
                    return
                stored = self._stored_event(e)
                if stored is not None:
                    yield stored
                seq = max(seq, e.seq or 0)

    # -- decisions -------------------------------------------------------------------------
    def assign(
        self, name: str, unit_id: str = "", *, wait: bool = True
    ) -> tuple[Record, Decision, str]:
        """One decision and its signed id (``wait=False``: see ``Engine.assign``)."""
        rec = self.get(name)
        start = time.perf_counter()
        d = self.engine.assign(name, unit_id or None, wait=wait)
        self.metrics.rpc.decision("Assign", time.perf_counter() - start)
        now = self.clock()
        token = self.signer.issue(rec.id, d.arm, d.epoch, now)
        if rec.spec.HasField("default_reward"):
            self.defaults.track(
                Pending(name, now, token, np.array([d.arm], dtype=np.int64), d.epoch, False)
            )
        return rec, d, token

    def assign_batch(
        self, name: str, count: int, unit_ids: Sequence[str] = ()
    ) -> tuple[Record, BatchDecision, str]:
        """Many decisions, one signature over all of them."""
        rec = self.get(name)
        if unit_ids and count and count != len(unit_ids):
            raise InvalidArgument("count", f"is {count} but {len(unit_ids)} unit_ids were given")
        if any(not u for u in unit_ids):
            raise InvalidArgument("unit_ids", "must not contain empty strings")
        start = time.perf_counter()
        b = self.engine.assign_batch(name, count, list(unit_ids) or None)
        self.metrics.rpc.decision("AssignBatch", time.perf_counter() - start)
        now = self.clock()
        token = self.signer.issue_batch(rec.id, b.arms, b.epoch, now)
        if rec.spec.HasField("default_reward"):
            self.defaults.track(Pending(name, now, token, b.arms, b.epoch, True))
        return rec, b, token

    def apply_defaults(self) -> int:
        """Log the default reward for tracked decisions whose window (+ grace) has passed.

        Each is written under the decision's own dedup key through the group-commit writer,
        so a real reward logged for it anywhere makes this a duplicate. Returns how many
        were submitted.
        """
        now = self.clock()

        def deadline(name: str) -> float:
            rec = self.records.get(name)
            if rec is None:
                return now
            window = min(rec.window_s, self.signer.ttl_seconds)
            # Grace: a real reward verified just inside the window may still be on its way
            # to a commit (up to the 30 s a reward request waits), on a replica whose clock
            # runs behind ours; a real reward must always win.
            return now - window - max(self.config.default_grace_s, min(60.0, 0.1 * window))

        submitted = 0
        for item in self.defaults.due(deadline):
            rec = self.records.get(item.experiment)
            if (
                rec is None
                or not rec.spec.HasField("default_reward")
                or rec.lifecycle.state == State.ARCHIVED
            ):
                self.defaults.done([item])
                continue
            value = float(rec.spec.default_reward)
            if abs(value) > MAX_ABS_REWARD:  # stored before the bound was checked
                log.error("experiment %s: default_reward %r is out of bounds", rec.name, value)
                self.defaults.done([item])
                continue
            rows = [
                RewardRow(
                    dedup_key=key,
                    experiment_id=rec.id,
                    arm=int(arm),
                    value=value,
                    epoch=item.epoch,
                    received_at=now,
                )
                for key, arm in zip(item.keys(), item.arms.tolist(), strict=True)
            ]
            try:
                fut = self.writer.submit(rec.name, rows)
            except (Overloaded, StoreUnavailable):
                self.defaults.retry(item)  # try again on the next pass
                continue
            except InvalidArgument as err:  # a batch larger than --max-queue: never fits
                log.error("experiment %s: default rewards not written: %s", rec.name, err)
                self.defaults.done([item])
                continue
            fut.add_done_callback(functools.partial(self._default_written, item))
            submitted += len(rows)
        return submitted

    def _default_written(self, item: Pending, fut: Future[list[bool]]) -> None:
        if fut.exception() is None:
            self.metrics.rewards.labels(status="default").inc(sum(fut.result()))
            self.defaults.done([item])
        else:
            self.defaults.retry(item)  # not known to be committed: again on the next pass

    def _save_defaults(self) -> None:
        """Writer-thread tick: save newly tracked pending defaults, delete finished ones."""
        unsaved, done = self.defaults.take_writes()
        if not unsaved and not done:
            return
        try:
            rows = [
                PendingDefault(
                    experiment_id=self.records[p.experiment].id,
                    key=p.key,
                    token=p.token,
                    issued_at=p.issued_at,
                    epoch=p.epoch,
                    batch=p.batch,
                    arms=tuple(p.arms.tolist()),
                )
                for p in unsaved
                if p.experiment in self.records
            ]
            self.store.save_pending_defaults(self.replica_id, rows)
            self.store.delete_pending_defaults(self.replica_id, done)
        except Exception:
            self.defaults.restore_writes(unsaved, done)
            raise

    def _hold_replica_lock(self) -> None:
        """Take the lock that tells other replicas this id is alive, before recovery and
        before its defaults are loaded (see ``Store.adopt_pending_defaults``): no other
        process can then still be writing under this id. Refuse to start without it."""
        deadline = time.monotonic() + _REPLICA_LOCK_WAIT_S
        while not self.store.hold_replica_lock(self.replica_id):
            if time.monotonic() > deadline:
                self.store.close()
                raise ReplicaConflict(self.replica_id)
            time.sleep(0.2)

    def _load_defaults(self) -> None:
        """Track again the decisions this replica issued before it stopped, and those of
        replicas that are gone (a restart without ``--replica-id`` is a new replica)."""
        if not self.store.shared:
            # SQLite: this process owns the file, every other id is gone for good. A
            # shared store leaves it to the leader, which waits for an id to look gone
            # twice (``_adopt_defaults``).
            self.store.adopt_pending_defaults(self.replica_id, list(self.by_id))
        for item in self._pending(self.store.pending_defaults(self.replica_id)):
            self.defaults.track(item, saved=True)

    def _pending(self, rows: Sequence[PendingDefault]) -> Iterator[Pending]:
        for row in rows:
            rec = self.by_id.get(row.experiment_id)
            if rec is not None:
                yield Pending(
                    rec.name,
                    row.issued_at,
                    row.token,
                    np.array(row.arms, dtype=np.int64),
                    row.epoch,
                    row.batch,
                )

    def _adopt_defaults(self) -> None:
        """Writer-thread tick (shared store): confirm this replica's lock, taking it again
        at once if its session dropped; every ``_ADOPT_INTERVAL_S`` on the leader, take
        over the pending defaults of replicas found gone on this pass and the one before
        (a replica whose session dropped with a database restart looks gone for a tick,
        never for a whole interval)."""
        if not self.store.shared:
            return
        held = self.store.hold_replica_lock(self.replica_id)
        if held == self._lock_lost:
            # Lost: taken meanwhile by an adopter for a moment, or by a second process
            # misconfigured with our id. Said once per change, not every tick.
            self._lock_lost = not held
            if held:
                log.info("replica lock of %r is ours again", self.replica_id)
            else:
                log.warning("replica lock of %r is held elsewhere", self.replica_id)
        if time.monotonic() < self._next_adoption:
            return
        try:
            self._adoption_pass()
        finally:  # from the pass's end, so a reader of it sees the whole pass done
            self._next_adoption = time.monotonic() + _ADOPT_INTERVAL_S

    def _adoption_pass(self) -> None:
        """Take over the pending defaults of replicas gone on this pass and the last."""
        if not self.leader():
            self._gone_before = set()
            return
        gone = self.store.gone_replicas(self.replica_id)
        confirmed, self._gone_before = gone & self._gone_before, gone
        if not confirmed:
            return
        adopted = self.store.adopt_pending_defaults(
            self.replica_id, list(self.by_id), only=confirmed
        )
        if adopted:
            log.info("took over %d pending default rewards of stopped replicas", len(adopted))
            self.defaults.adopt(self._pending(adopted))

    # -- rewards ---------------------------------------------------------------------------
    def _resolve_decisions(
        self, ids: Sequence[str], experiment: str, field: str
    ) -> tuple[Record | None, list[tuple[int, int, str] | None]]:
        """Verify decision ids: (arm, epoch, dedup key) per item, None when expired.

        The record is None only when every id expired and no experiment was named.
        """
        now = self.clock()
        out: list[tuple[int, int, str] | None] = []
        rec: Record | None = self.get(experiment) if experiment else None
        batches: dict[str, Batch | None] = {}
        # Items of one AssignBatch arrive as runs of `<token>.<i>` with a token of several
        # KB: once an item of a batch passed every check, the next items with the same
        # `<token>.` prefix reuse its verified batch and owner instead of splitting and
        # hashing the token again (a memcmp instead of ~5 us per item). Anything unusual
        # falls through to the full path below, which reports it.
        prefix = ""
        current: Batch | None = None
        arms: list[int] = []
        for i, token in enumerate(ids):
            if prefix and token.startswith(prefix):
                index = token[len(prefix) :]
                if index.isascii() and index.isdigit():
                    if current is None:  # that batch expired
                        out.append(None)
                        continue
                    j = int(index)
                    if j < len(arms):
                        out.append((arms[j], current.epoch, current.key(j)))
                        continue
            where = f"{field}[{i}]" if field.endswith("s") else field
            batch: Batch | None = None
            try:
                body, dot, index = token.rpartition(".")
                if dot and body:
                    if body not in batches:
                        try:
                            batches[body] = self.signer.verify_batch(body, now)
                        except ExpiredToken:
                            batches[body] = None
                    batch = batches[body]
                    if batch is None:
                        prefix, current = body + ".", None
                        out.append(None)
                        continue
                    if not (index.isascii() and index.isdigit()):
                        raise InvalidToken("batch item index must be a decimal number")
                    d = batch.decision(int(index))
                else:
                    d = self.signer.verify(token, now)
            except ExpiredToken:
                out.append(None)
                continue
            except InvalidToken as err:
                raise InvalidArgument(where, str(err)) from None
            # A batch's whole variant array: the fast path above reuses this check for
            # its other items.
            top = d.variant if batch is None else int(batch.variants.max(initial=0))
            owner = self._owner(where, d.experiment, top)
            if rec is None:
                rec = owner
            elif owner is not rec:
                raise InvalidArgument(
                    where, f"decision id belongs to {owner.name!r}, not {rec.name!r}"
                )
            if now - d.issued_at > min(owner.window_s, self.signer.ttl_seconds):
                # Past this experiment's own attribution window (shorter than the
                # server-wide token lifetime the signature check enforces).
                if batch is not None:
                    prefix, current = body + ".", None
                out.append(None)
                continue
            out.append((d.variant, d.epoch, d.key))
            if batch is not None and batch is not current:
                prefix, current, arms = body + ".", batch, batch.variants.tolist()
        return rec, out

    def _owner(self, where: str, experiment: int | str, variant: int) -> Record:
        """The experiment a verified decision id names (its signature is ours, so it
        exists: unknown here means another replica made it and we have not loaded it)."""
        if not isinstance(experiment, int):
            raise InvalidArgument(where, "decision id names an experiment by name, not id")
        owner = self.by_id.get(experiment)
        if owner is None:
            raise NotLoadedYet(
                f"decision id names experiment id {experiment!r}, which this replica has not "
                "loaded yet; retry"
            )
        if variant >= len(owner.config.variants):
            raise NotLoadedYet(
                f"decision id names variant {variant} of {owner.name!r}, which has "
                f"{len(owner.config.variants)} here (added on another replica); retry"
            )
        return owner

    def reward(
        self,
        *,
        experiment: str,
        values: Sequence[float],
        decision_ids: Sequence[str] = (),
        event_ids: Sequence[str] = (),
        variants: Sequence[str] = (),
        variant_indices: Sequence[int] = (),
        scores: Sequence[float] = (),
        guardrails: Sequence[dict[str, float]] = (),
        field: str = "decision_ids",
        timeout: float = 30.0,
    ) -> list[str]:
        """Record rewards durably; per item ACCEPTED / DUPLICATE / EXPIRED.

        Validated as a whole first: one malformed item rejects the batch and nothing is
        written. Returns only after the accepted rewards are committed.
        """
        n = len(values)
        all_vals = _check_extras(values, scores, guardrails)
        if decision_ids and event_ids:
            raise InvalidArgument(field, "send decision ids or event ids, not both")
        resolved: list[tuple[int, int, str] | None]
        if decision_ids:
            if len(decision_ids) != n:
                raise InvalidArgument("values", f"{n} values for {len(decision_ids)} decision ids")
            found, resolved = self._resolve_decisions(decision_ids, experiment, field)
            if found is None:
                self.metrics.rewards.labels(status=EXPIRED).inc(n)
                return [EXPIRED] * n
            rec = found
        elif event_ids:
            rec = self.get(experiment)
            if len(event_ids) != n:
                raise InvalidArgument("values", f"{n} values for {len(event_ids)} event ids")
            arms = self._event_arms(rec, variants, variant_indices, n)
            epoch = self.engine.view(rec.name).epoch
            resolved = []
            for i, eid in enumerate(event_ids):
                if not eid or len(eid) > 256:
                    raise InvalidArgument(f"event_ids[{i}]", "must be 1-256 characters")
                resolved.append((arms[i], epoch, event_key(rec.id, eid)))
        else:
            raise InvalidArgument(field, "decision ids or event ids are required")
        if rec.lifecycle.state == State.ARCHIVED:
            raise WrongState(rec.name, "ARCHIVED", "record rewards")
        # Every value is checked, at its position in the request (an expired item's too:
        # it is bad input all the same), so an error names the item the caller sent.
        all_arms = np.array([0 if r is None else r[0] for r in resolved], dtype=np.int64)
        self.engine.validate_rewards(rec.name, all_arms, all_vals)
        live = [i for i, r in enumerate(resolved) if r is not None]
        m = len(live)
        if m == n:  # nothing expired: the common case, no copies
            arms_arr, vals = all_arms, all_vals
        else:
            arms_arr, vals = all_arms[live], all_vals[live]
        score_arr = (
            np.array([scores[i] for i in live], dtype=np.float64) if scores else np.full(m, np.nan)
        )
        rows = RewardColumns(
            [resolved[i][2] for i in live],  # type: ignore[index]
            np.full(m, rec.id, dtype=np.int64),
            arms_arr,
            vals,
            np.array([resolved[i][1] for i in live], dtype=np.int64),  # type: ignore[index]
            np.full(m, self.clock(), dtype=np.float64),
            score_arr,
            [json.dumps(guardrails[i]) for i in live] if guardrails else None,
        )
        flags: list[bool] = []
        if m:
            fut = self.writer.submit(
                rec.name, rows, [guardrails[i] for i in live] if guardrails else None
            )
            try:
                flags = fut.result(timeout=timeout)
            except FutureTimeout:
                raise StoreUnavailable("commit", "group commit timed out; retry") from None
        statuses = [EXPIRED] * n
        for j, i in enumerate(live):
            statuses[i] = ACCEPTED if flags[j] else DUPLICATE
        new = np.array(flags, dtype=bool)
        scored = new & ~np.isnan(score_arr)
        if scored.any():
            rec.scores.add(arms_arr[scored].tolist(), score_arr[scored].tolist())
        for s in (ACCEPTED, DUPLICATE, EXPIRED):
            c = statuses.count(s)
            if c:
                self.metrics.rewards.labels(status=s).inc(c)
        return statuses

    def reward_indexed(
        self,
        *,
        experiment: str,
        batch_token: str,
        indices: npt.NDArray[np.integer],
        values: npt.NDArray[np.float64],
        scores: npt.NDArray[np.float64] | None = None,
        guardrails: Sequence[dict[str, float]] = (),
        timeout: float = 30.0,
    ) -> npt.NDArray[np.int8]:
        """`reward` of the items ``<batch_token>.<i>`` for i in `indices`, as columns.

        Same checks, outcomes and guarantees as `reward` with those decision ids, without a
        Python object per item: one signature check, indices checked and arms looked up
        with NumPy. Returns per item an index into STATUSES. `scores`: NaN for none.
        """
        n = int(values.shape[0])
        if indices.shape != (n,):
            raise InvalidArgument("values", f"{n} values for {indices.shape[0]} indices")
        if scores is not None and scores.shape != (n,):
            raise InvalidArgument("prediction_scores", f"{scores.shape[0]} scores for {n} values")
        _check_extras(values, scores, guardrails)
        expired = np.full(n, STATUSES.index(EXPIRED), dtype=np.int8)
        now = self.clock()
        rec: Record | None = self.get(experiment) if experiment else None
        try:
            batch = self.signer.verify_batch(batch_token, now)
        except ExpiredToken:
            batch = None
        except InvalidToken as err:
            raise InvalidArgument("batch_token", str(err)) from None
        if batch is not None:
            owner = self._owner("batch_token", batch.experiment, int(batch.variants.max(initial=0)))
            if rec is None:
                rec = owner
            elif owner is not rec:
                raise InvalidArgument(
                    "batch_token", f"decision id belongs to {owner.name!r}, not {rec.name!r}"
                )
            try:
                batch.check_indices(indices)
            except IndexOutOfRange as err:
                raise InvalidArgument(f"indices[{err.position}]", str(err)) from None
            if now - batch.issued_at > min(owner.window_s, self.signer.ttl_seconds):
                batch = None  # past this experiment's own attribution window
        if rec is None:
            self.metrics.rewards.labels(status=EXPIRED).inc(n)
            return expired
        if rec.lifecycle.state == State.ARCHIVED:
            raise WrongState(rec.name, "ARCHIVED", "record rewards")
        if batch is None:
            # Bad values are bad input all the same (as in `reward`): checked, arms aside.
            self.engine.validate_rewards(rec.name, np.zeros(n, dtype=np.int64), values)
            self.metrics.rewards.labels(status=EXPIRED).inc(n)
            return expired
        arms = batch.variants[indices].astype(np.int64)
        self.engine.validate_rewards(rec.name, arms, values)
        cols = RewardColumns(
            batch.keys(indices),
            np.full(n, rec.id, dtype=np.int64),
            arms,
            np.ascontiguousarray(values, dtype=np.float64),
            np.full(n, batch.epoch, dtype=np.int64),
            np.full(n, now, dtype=np.float64),
            np.full(n, np.nan) if scores is None else scores,
            [json.dumps(g) for g in guardrails] if guardrails else None,
        )
        fut = self.writer.submit(rec.name, cols, guardrails or None)
        try:
            new = np.array(fut.result(timeout=timeout), dtype=bool)
        except FutureTimeout:
            raise StoreUnavailable("commit", "group commit timed out; retry") from None
        if scores is not None:
            scored = new & ~np.isnan(scores)
            if scored.any():
                rec.scores.add(arms[scored].tolist(), scores[scored].tolist())
        accepted = int(new.sum())
        if accepted:
            self.metrics.rewards.labels(status=ACCEPTED).inc(accepted)
        if accepted < n:
            self.metrics.rewards.labels(status=DUPLICATE).inc(n - accepted)
        return (~new).astype(np.int8)

    def _event_arms(
        self, rec: Record, variants: Sequence[str], indices: Sequence[int], n: int
    ) -> list[int]:
        k = rec.config.n_arms
        if variants and indices:
            raise InvalidArgument("variants", "send variants or variant_indices, not both")
        if variants:
            if len(variants) != n:
                raise InvalidArgument("variants", f"{len(variants)} variants for {n} values")
            lookup = {v: i for i, v in enumerate(rec.config.variants)}
            out = []
            for i, v in enumerate(variants):
                if v not in lookup:
                    raise InvalidArgument(
                        f"variants[{i}]", f"{v!r} is not a variant of {rec.name!r}"
                    )
                out.append(lookup[v])
            return out
        if len(indices) != n:
            raise InvalidArgument("variant_indices", f"{len(indices)} indices for {n} values")
        for i, idx in enumerate(indices):
            if not 0 <= idx < k:
                raise InvalidArgument(f"variant_indices[{i}]", f"{idx} out of range [0, {k})")
        return list(indices)

    def _on_applied(self, name: str, arms: np.ndarray, values: np.ndarray) -> None:
        rec = self.records.get(name)
        if rec is None:
            return
        for hook in self.hooks:
            hook(rec, arms, values)

    def _on_pulled(self, rows: Sequence[LoggedReward]) -> None:
        """Other replicas' rewards reach the hooks (monitors) and the score windows too."""
        by_exp: dict[int, list[LoggedReward]] = {}
        for row in rows:
            # A row beyond the bound (logged before it existed) is skipped by apply_logged:
            # no reward the posterior saw, so no monitor may see it either. (Rows skipped
            # as already in a restored snapshot are rewards the monitors still need.)
            if abs(row.value) <= MAX_ABS_REWARD:
                by_exp.setdefault(row.experiment_id, []).append(row)
        for exp_id, items in by_exp.items():
            rec = self.by_id.get(exp_id)
            if rec is None:
                continue
            arms = np.fromiter((r.arm for r in items), dtype=np.int64, count=len(items))
            values = np.fromiter((r.value for r in items), dtype=np.float64, count=len(items))
            for hook in self.hooks:
                hook(rec, arms, values)
            scored = [
                (r.arm, x, r.received_at) for r in items if (x := r.prediction_score) is not None
            ]
            if scored:
                # By when each was received, not when it was pulled: a backlog pulled
                # after a promotion holds scores from before it.
                rec.scores.add_received(scored, rec.lifecycle.audit)

    def _tick(self) -> None:
        """Writer-thread housekeeping: pick up experiments and events other replicas
        stored (and our own events a failed delivery left behind)."""
        if self.store.shared:
            self._sync_experiments()
        self._deliver_events()
        for hook in self.tick_hooks:
            hook()

    def _sync_experiments(self) -> None:
        for row in self.store.list_experiments():
            rec = self.records.get(row.name)
            if rec is None:
                rec = self._record_from_row(row)
                with self._records_lock:
                    if row.name in self.records:
                        continue
                    self.engine.create(rec.config)
                    self.records[rec.name] = rec
                    self.by_id[rec.id] = rec
                    self._apply_state(rec)
                behind = replay_new_experiment(
                    self.store, self.engine, rec.id, rec.name, self.writer.positions
                )
                if behind:
                    log.info("experiment %s: applied %d earlier rewards", rec.name, len(behind))
                    self._on_pulled(behind)
            elif row.version > rec.version:
                with rec.lock:
                    self._adopt_row(rec, row)

    def _deliver_events(self) -> None:
        """Give the hub every stored event after the last one it was given, in order.

        The hub is fed from the store only, never straight from a commit: appends to the
        events table are serialized (``SqlStore._serialize_appends``), so sequence order
        is commit order and a read that sees event n sees every event before it. One
        cursor over the store thus hands over each event once and in sequence order,
        whichever thread or replica stored it, and WatchEvents may skip any sequence at
        or below the last it sent. (A cursor that local commits moved on would skip
        another replica's event stored just before ours but not pulled yet.)
        """
        # One reader at a time: two could otherwise hand over their batches interleaved.
        with self._hub_lock:
            while True:
                batch = self.store.events_after(self._hub_seq, limit=_EVENT_PAGE)
                for e in batch:
                    if e.experiment_id is not None and e.experiment_id not in self.by_id:
                        # Another replica's new experiment: the next sync adopts it first,
                        # or its events would reach no watcher of that experiment.
                        return
                    stored = self._stored_event(e)
                    if stored is not None:
                        self.events.publish(stored)
                    self._hub_seq = max(self._hub_seq, e.seq or 0)
                if len(batch) < _EVENT_PAGE:
                    return

    def _stored_event(self, e: EventRecord) -> StoredEvent | None:
        """A stored event row as the hub and WatchEvents carry it; None (logged) for one
        this version cannot read (a type a newer replica stored, broken details): one
        such row must not stall the stream of every later event."""
        rec = self.by_id.get(e.experiment_id or -1)
        try:
            details = json.loads(e.details_json or "{}")
            if not isinstance(details, dict):
                raise ValueError(f"details are not an object: {e.details_json!r}")
            event = Event(
                EventType(e.type), rec.name if rec else "", e.variant, e.at, e.reason, details
            )
        except ValueError as err:  # json.JSONDecodeError is one
            log.warning("stored event %s skipped: %s", e.seq, err)
            return None
        return StoredEvent(e.seq or 0, event)

    def _adopt_row(self, rec: Record, row: ExperimentRow) -> None:
        """Take over the stored state of ``rec`` if it is newer (caller holds rec.lock)."""
        if row.version <= rec.version:
            return
        fresh = self._record_from_row(row)
        weights = fresh.config.policy.weights
        for i in range(rec.config.n_arms, fresh.config.n_arms):
            self.engine.add_variant(
                rec.name, fresh.config.variants[i], weights[i] if weights else None
            )
        rec.spec, rec.config = fresh.spec, self.engine.config(rec.name)
        rec.lifecycle = fresh.lifecycle
        self._wire_lifecycle(rec)
        rec.version, rec.updated_at = row.version, row.updated_at
        self._apply_state(rec)

    def promotion_candidate(self, name: str) -> str:
        """The variant a Promote without one promotes: the highest posterior P(best)."""
        self.get(name)
        if not self.engine.view(name).reward_counts.any():
            raise InvalidArgument("variant", "no rewards yet, so no candidate: name the variant")
        p_best, _, _ = self.engine.prob_best(name)
        return self.engine.config(name).variants[int(np.argmax(p_best))]

    def promotion_status(self, rec: Record) -> pb.PromotionStatus | None:
        """Where the promotion rule stands for ``rec`` (None until evaluated)."""
        return self.last_decisions.get(rec.name)

    def power(self, rec: Record) -> pb.PowerAnalysis | None:
        """Power analysis for ``rec`` when a minimum effect is configured."""
        return power_analysis(self.engine, rec.name, rec.spec)

    def rank_tests(self, rec: Record) -> list[pb.TestResult]:
        """Mann-Whitney vs control for continuous rewards, on the logged rewards of the
        recent span every replica's last RANK_SAMPLE_PER_REPLICA cover (the report's other
        tests use sufficient statistics, which a rank test cannot); none for 0/1 rewards
        (the chi-square's)."""
        if rec.config.policy.reward == RewardKind.BERNOULLI:
            return []
        try:
            windows = self.store.recent_rewards(
                rec.id, self.writer.replicas(), RANK_SAMPLE_PER_REPLICA
            )
        except StoreUnavailable:
            # The rest of the report is served from memory: it stays available without it.
            log.warning("experiment %s: store unavailable, report without rank tests", rec.name)
            return []
        sample = common_window(windows, RANK_SAMPLE_PER_REPLICA)
        return rank_tests(rec.config.variants, sample)

    def leader(self) -> bool:
        """Whether this replica may run promotion now (PostgreSQL advisory lock)."""
        return self.store.try_leader_lock(_LEADER_LOCK_KEY)

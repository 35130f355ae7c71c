"""The leader's loop: promotion rule, futility, SRM alarms and post-promotion monitors.

Only one replica acts at a time (``Allocator.leader()``: a PostgreSQL advisory lock, always
true on SQLite). Every replica feeds its monitors with every reward it applies (its own
and the ones pulled from other replicas), so a new leader has the stream too.

Reactions run on this loop's thread, never on the reward writer's, so a rollback's
database writes never delay a group commit.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np
from allocator_client.v1 import allocator_pb2 as pb

from allocator import stats
from allocator.app import Allocator, Record
from allocator.convert import promotion_settings
from allocator.durable import advance
from allocator.engine import ExperimentView, mc_seed
from allocator.lifecycle import Action, Event, EventType, Lifecycle, State
from allocator.monitor import (
    CusumSettings,
    MonitorSettings,
    PageHinkleySettings,
    PromotionMonitor,
    Reaction,
    Regression,
    WebhookNotifier,
    cusum_threshold_for_arl,
)
from allocator.promotion import GuardrailCheck, evaluate
from allocator.store import StoreUnavailable, VersionConflict

# Store metadata key of an experiment's saved monitor state (by experiment id).
_MONITOR_META = "monitor:{}"

log = logging.getLogger("allocator.supervisor")

_REACTION = {
    pb.REGRESSION_ACTION_UNSPECIFIED: Reaction.NOTIFY_ONLY,
    pb.REGRESSION_ACTION_NOTIFY_ONLY: Reaction.NOTIFY_ONLY,
    pb.REGRESSION_ACTION_ROLLBACK: Reaction.ROLLBACK,
    pb.REGRESSION_ACTION_REOPEN: Reaction.REOPEN,
}


def monitor_settings(spec: pb.ExperimentSpec) -> MonitorSettings | None:
    """Detector settings from a spec's monitoring block (None: detection off).

    Thresholds are in standard deviations of batch means; the reference mean and sd are
    estimated after promotion, because the winner's pre-promotion mean is biased upwards by
    the selection itself. The burn-in is 200 batches and the default ARL0 1e6 batches: with
    20 batches and ARL0 1e4, 37% of 2,000-batch Bernoulli(0.11) streams with nothing wrong
    raised an alarm (the estimated sd is noisy and Bernoulli batch means are skewed); with
    these, 0.3%, and a drop from 0.11 to 0.08 is still caught in ~23 batches. Both
    detectors (CUSUM k and h, Page-Hinkley delta and lambda) read them in those units.

    The holdout test allows the promotion's indifference margin: the rule promoted a
    champion within it of the best, so one that much below the previous champion is no
    regression (with no margin the unbounded watch would roll it back sooner or later).
    """
    m = spec.monitoring
    if m.detector == pb.DRIFT_DETECTOR_NONE:
        return None
    k = m.detector_slack if m.HasField("detector_slack") else 0.5
    # Page-Hinkley on standardised batch means is a CUSUM centred on the running mean
    # instead of the burn-in's; at CUSUM's threshold it alarms no more often in control
    # (a check, not a committed test: 6 of 100 runs of 20,000 N(0, 1) batches, CUSUM 11),
    # where the old default of 50 sd caught the drop above in 9 of 40 runs.
    h = (
        m.detector_threshold
        if m.HasField("detector_threshold")
        else cusum_threshold_for_arl(1e6, k)
    )
    detector: CusumSettings | PageHinkleySettings
    if m.detector == pb.DRIFT_DETECTOR_PAGE_HINKLEY:
        detector = PageHinkleySettings(delta=k, lam=h, burn_in=200)
    else:
        detector = CusumSettings(k=k, h=h, burn_in=200)
    reaction = _REACTION.get(m.on_regression, Reaction.NOTIFY_ONLY)
    # Without a holdout the margin is read by nothing: 0.0, the value in the keys of
    # monitors saved before it was passed, so those are still restored.
    margin = _promotion_margin(spec) if m.holdout_share > 0 else 0.0
    return MonitorSettings(
        detector=detector, batch_size=100, reaction=reaction, holdout_margin=margin
    )


def _promotion_margin(spec: pb.ExperimentSpec) -> float | None:
    """The promotion rule's indifference margin, reward units (None: its default, 1% of the
    leader's mean). Unset, the margin is the expected-loss tolerance (see the proto)."""
    try:
        settings = promotion_settings(spec)
    except (TypeError, ValueError):
        return None  # a stored spec the rule cannot use (it was checked at creation)
    if settings.indifference_margin is not None:
        return settings.indifference_margin
    return settings.expected_loss_tolerance


def _guardrails(
    app: Allocator, name: str, spec: pb.ExperimentSpec, n_arms: int
) -> tuple[dict[str, GuardrailCheck], list[str]]:
    """Guardrail checks with data for every variant, and the metrics still without."""
    stats = app.engine.guardrail_stats(name)
    checks: dict[str, GuardrailCheck] = {}
    missing: list[str] = []
    k = n_arms
    for g in spec.promotion.guardrails:
        s = stats.get(g.metric)
        if s is None or s.shape[0] < k or (s[:k, 0] == 0).any():
            missing.append(g.metric)
            continue
        checks[g.metric] = GuardrailCheck(
            means=tuple(float(x) for x in s[:k, 1] / s[:k, 0]),
            max_degradation=g.tolerance,
            lower_is_better=not g.higher_is_better,
        )
    return checks, missing


def _round_start(lc: Lifecycle) -> float | None:
    """When the REOPENED round under way opened (the move into REOPENED from PROMOTED or
    ROLLED_BACK; a PAUSE and RESUME within it continue it); None outside one."""
    if lc.state != State.REOPENED:
        return None
    for a in reversed(lc.audit):
        if a.to_state == State.REOPENED and a.from_state in (State.PROMOTED, State.ROLLED_BACK):
            return a.at
    return None


def _round_stats(view: ExperimentView, start: float) -> tuple[np.ndarray, np.ndarray]:
    """(Posterior statistics, rewards per arm) of the rewards of decisions made since
    ``start``: the allocation epochs opened since (a reopen opens one, at its commit).

    A reopened round is judged on its own rewards: the pooled history is dominated by
    the champion's, from before the regression that reopened it, and would promote it
    again at once. Undiscounted, the epochs' sums are exactly that posterior; a discount
    already forgets the old rewards at the rate chosen, so its posterior is kept and only
    the counts (for min_samples) are the round's.
    """
    es = view.epoch_stats[view.epoch_started >= start].sum(axis=0)
    counts = es[:, 0].copy()
    if view.config.policy.discount < 1.0:
        return view.stats, counts
    return es, counts


def evaluate_promotion(app: Allocator, rec: Record) -> pb.PromotionStatus | None:
    """Apply the calibrated rule; promote or stop for futility when it says so.

    The Monte Carlo is seeded from the experiment's seed and its reward count, so the same
    reward stream gives the same decision (reproducible promotion). The transition it calls
    for is made only onto the version judged: an operator's action or a new variant since
    raises :class:`VersionConflict` and nothing changes (the caller judges again).
    """
    with rec.lock:  # lifecycle, spec, version and the arms' stats, as one
        lc, spec, config, version = rec.lifecycle, rec.spec, rec.config, rec.version
        updated_at = rec.updated_at
        view = app.engine.view(rec.name)
    if not lc.state.adaptive:
        return None  # promoted, paused, ... since the pass read the state
    total = int(view.reward_counts.sum())
    if total == 0:
        return None
    try:
        settings = promotion_settings(spec)
    except (TypeError, ValueError) as err:
        return pb.PromotionStatus(decision="invalid settings", reasons=[str(err)])
    checks, missing = _guardrails(app, rec.name, spec, config.n_arms)
    # The round's age: a PAUSE/RESUME or a new variant within it does not restart it.
    since = _round_start(lc) or (updated_at if lc.state == State.REOPENED else rec.created_at)
    age = max(0.0, app.clock() - since)
    seed = mc_seed(config.seed, total)
    start = _round_start(lc)
    posterior, counts = (
        (view.stats, view.reward_counts) if start is None else _round_stats(view, start)
    )
    decision = evaluate(
        settings,
        posterior,
        config.policy,
        age,
        seed,
        guardrails=checks,
        variants=config.variants,
        reward_counts=counts,
    )
    reasons = list(decision.reasons) + [
        f"guardrail {m}: no data for every variant yet" for m in missing
    ]
    action = decision.action
    if action == "promote" and missing:
        action = "continue"
    candidate = config.variants[decision.candidate] if decision.candidate is not None else ""
    status = pb.PromotionStatus(decision=action, candidate=candidate, reasons=reasons)
    auto = spec.promotion.auto_promote if spec.promotion.HasField("auto_promote") else True
    if not auto or decision.candidate is None:
        return status
    summary = "; ".join(r for r in decision.reasons[:3])
    if action == "promote":
        app.transition(
            rec.name,
            Action.PROMOTE,
            actor="promoter",
            variant=candidate,
            reason=f"promotion rule met: {summary}",
            if_version=version,
        )
    elif action == "futility_stop":
        # Keep the control: all traffic to it. A rollback (to it, not to the previous
        # champion, which after two promotions is not the control) unless it is the
        # champion on record already (REOPENED after the control itself was promoted):
        # then the round ends with it promoted again.
        keep = Action.PROMOTE if lc.champion == decision.candidate else Action.ROLLBACK
        stopped = Event(
            EventType.FUTILITY_STOPPED,
            rec.name,
            decision.candidate,
            app.clock(),
            "no variant can plausibly beat control by the minimum effect",
        )
        app.transition(
            rec.name,
            keep,
            actor="promoter",
            variant=candidate,
            reason="futility: keep the control",
            if_version=version,
            events=[stopped],  # with the transition, or (a failed one) not at all
        )
    return status


def _positions(raw: object) -> dict[str, int] | None:
    """Saved log positions, or None if absent or malformed (then no catch-up)."""
    if not isinstance(raw, dict):
        return None
    if not all(isinstance(k, str) and type(v) is int for k, v in raw.items()):
        return None
    return dict(raw)


@dataclass
class _Watch:
    """One promotion's monitor. Created by the supervisor thread, inactive; activated by
    the writer thread (``_activate``), which feeds it, so the rows it has seen are exactly
    those before its activation point (restored state plus catch-up) and those fed after."""

    champion: int
    monitor: PromotionMonitor
    key: dict[str, object]  # what a saved state must match to be restored into it
    restore: dict[str, Any] | None = None  # saved document to continue from
    since: dict[str, int] | None = None  # catch-up position while activating
    active: bool = False  # fed by ``feed`` (writer thread) once True
    pending: Regression | None = None
    saved: str = ""  # the state last written to the store


_ANY_PROMOTION = None  # an ended entry's key that matches any saved state


def _promotion_seq(lc: Lifecycle) -> int:
    """Audit seq of the PROMOTE that made the current champion (0: none)."""
    return max((a.seq for a in lc.audit if a.action == Action.PROMOTE), default=0)


def _promotion_at(lc: Lifecycle, seq: object) -> float | None:
    """When the PROMOTE of audit seq ``seq`` was made (None: not in this lifecycle)."""
    return next((a.at for a in lc.audit if a.seq == seq), None)


def _monitor_key(
    lc: Lifecycle, settings: MonitorSettings, holdout: int | None
) -> dict[str, object]:
    """The promotion a monitor watches: its champion, the audit seq of the PROMOTE that made
    it (a later promotion of the same variant is another one), holdout and settings."""
    return {
        "champion": lc.champion,
        "promotion": _promotion_seq(lc),
        "holdout": holdout,
        "settings": repr(settings),
    }


class Supervisor:
    """Runs promotion, SRM checks and monitor reactions every ``interval_s`` on the leader."""

    def __init__(
        self,
        app: Allocator,
        interval_s: float = 1.0,
        evaluate: Callable[[Allocator, Record], pb.PromotionStatus | None] | None = None,
        save_interval_s: float = 5.0,
    ) -> None:
        self.app = app
        self.interval_s = interval_s
        self.evaluate = evaluate
        self.save_interval_s = save_interval_s
        self._next_save = 0.0
        self._watches: dict[str, _Watch] = {}
        # Watches of promotions that are PAUSED: kept, silent, until RESUME or their end.
        self._paused: dict[str, _Watch] = {}
        # Watches that ended (experiment id, monitor key): their saved state is deleted by
        # the next save_monitors pass, on the writer thread that writes it.
        # Archived experiments' entries say _ANY_PROMOTION: no promotion of theirs will
        # resume, so whatever is saved goes, also one this process never watched (it was
        # restarted while the promotion was PAUSED).
        self._ended: list[tuple[int, dict[str, object] | None]] = []
        self._states: dict[str, State] = {}  # each experiment's state at the last pass
        self._webhooks: dict[str, WebhookNotifier] = {}
        # Events come from RPC, writer and supervisor threads: one notifier per URL, and
        # none made once closed (it would never be closed, its queue never flushed).
        self._webhooks_lock = threading.Lock()
        self._webhooks_closed = False
        self._srm_flagged: set[str] = set()
        self._evaluated: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        app.hooks.append(self.feed)
        app.tick_hooks.append(self.activate_monitors)
        app.tick_hooks.append(self.save_monitors)
        app.event_listeners.append(self._on_event)
        app.event_listeners.append(self._on_state_change)

    def start(self) -> None:
        """Start the loop."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop. The monitors are still fed (and report) until the app stops:
        :meth:`close` the webhooks after that."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def close(self, timeout: float = 2.0) -> None:
        """Flush and close the webhooks. Call it after ``app.stop()``: the final drain of
        the reward queue feeds the monitors, and a regression found there is sent too."""
        with self._webhooks_lock:
            self._webhooks_closed = True
            hooks = list(self._webhooks.values())
        for hook in hooks:
            hook.close(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("supervisor pass failed")

    # -- rewards (writer thread) -----------------------------------------------------------
    def feed(self, rec: Record, arms: np.ndarray, values: np.ndarray) -> None:
        """Route a promoted experiment's rewards to its monitor."""
        with self._lock:
            watch = self._watches.get(rec.name)
        if watch is None or not watch.active or watch.monitor.triggered:
            return
        self._observe(watch, arms, values)

    def _observe(self, watch: _Watch, arms: np.ndarray, values: np.ndarray) -> None:
        now = self.app.clock()
        champion = values[arms == watch.champion]
        reg = watch.monitor.observe_many(champion, now=now) if champion.size else None
        holdout = watch.monitor.holdout_variant
        if reg is None and holdout is not None:
            held = values[arms == holdout]
            if held.size:
                reg = watch.monitor.observe_many(held, now=now, holdout=True)
        if reg is not None:
            with self._lock:  # _react reads and clears it under the lock
                watch.pending = reg

    # -- the loop ----------------------------------------------------------------------------
    def tick(self) -> None:
        """One pass over every experiment."""
        # Every replica writes the default rewards of the decisions it issued.
        self.app.apply_defaults()
        leader = self.app.leader()
        for rec in list(self.app.records.values()):
            try:
                self._pass(rec, leader)
            except StoreUnavailable:
                raise  # every experiment needs the store: the whole pass is retried
            except Exception:
                # One experiment's failure (a bug, a conflicting write) must not stop the
                # promotions and reactions of the others; it is retried next pass.
                log.exception("supervisor pass failed for experiment %s", rec.name)

    def _pass(self, rec: Record, leader: bool) -> None:
        self._sync_watch(rec)
        if not leader:
            return
        state = rec.lifecycle.state
        if state.adaptive:
            self._check_srm(rec)
            if self.evaluate is not None and self._due(rec):
                try:
                    status = self.evaluate(self.app, rec)
                except VersionConflict as err:
                    # Judged on a state that is gone (an operator's promotion, a new
                    # variant): nothing changed; judged again, on the new one, next pass.
                    log.info("experiment %s: promotion decision dropped: %s", rec.name, err)
                    self._evaluated.pop(rec.name, None)
                    return
                except StoreUnavailable:
                    self._evaluated.pop(rec.name, None)  # its transition: next pass again
                    raise
                if status is not None:
                    self.app.last_decisions[rec.name] = status
        elif state == State.PROMOTED:
            self._react(rec)

    def _due(self, rec: Record) -> bool:
        """Evaluate when rewards arrived since the last look, else every 30 s (durations)."""
        total = int(self.app.engine.view(rec.name).reward_counts.sum())
        now = self.app.clock()
        last_total, last_at = self._evaluated.get(rec.name, (-1, 0.0))
        if total == last_total and now - last_at < 30.0:
            return False
        self._evaluated[rec.name] = (total, now)
        return True

    def _sync_watch(self, rec: Record) -> None:
        """Start watching a new champion; stop when it is no longer promoted (a PAUSE of
        the promotion only silences the watch: RESUME picks it up as it was)."""
        with self._lock:
            # Read under the lock: a Promote's listener (another thread) syncs after it
            # installed the new lifecycle, so whichever of the two syncs runs last sees it.
            lc = rec.lifecycle
            last = self._states.get(rec.name)
            self._states[rec.name] = lc.state
            if lc.state == State.ARCHIVED and last is not None and last != State.ARCHIVED:
                self._ended.append((rec.id, _ANY_PROMOTION))  # archived by another replica
            watch = self._watches.get(rec.name)
            if lc.state != State.PROMOTED or lc.champion is None:
                if watch is not None:
                    del self._watches[rec.name]
                    if lc.state == State.PAUSED and lc.paused_from == State.PROMOTED:
                        # Silenced, kept for RESUME and saved marked paused right away.
                        # One not yet activated has learnt nothing of its own: dropped,
                        # its saved state left as it is for the RESUME to restore.
                        if watch.active:
                            self._paused[rec.name] = watch
                            self._next_save = 0.0
                        return
                    self._ended.append((rec.id, watch.key))
                paused = self._paused.get(rec.name)
                if paused is not None and lc.state != State.PAUSED:  # e.g. PAUSED -> ARCHIVE
                    del self._paused[rec.name]
                    self._ended.append((rec.id, paused.key))
                return
            settings = monitor_settings(rec.spec)
            holdout = lc.previous_champion if rec.spec.monitoring.holdout_share > 0 else None
            if holdout == lc.champion:
                holdout = None
            key = None if settings is None else _monitor_key(lc, settings, holdout)
            # The same promotion still (not merely the same champion: a rollback and a new
            # promotion of the same variant between two passes is a new watch).
            if watch is not None and watch.key == key:
                return
            if watch is not None:
                self._ended.append((rec.id, watch.key))
                del self._watches[rec.name]
            if settings is None or key is None:
                return
            paused = self._paused.pop(rec.name, None)
            if paused is not None and paused.key == key:
                # RESUME: the rewards received while paused were not its to see.
                self._watches[rec.name] = paused
                self._next_save = 0.0  # no longer marked paused in the store
                return
            if paused is not None:
                self._ended.append((rec.id, paused.key))
            monitor = PromotionMonitor(
                rec.name,
                lc.champion,
                holdout_variant=holdout,
                settings=settings,
                emit=functools.partial(self._emit, rec, key["promotion"]),
            )
            saved = self._saved_monitor(rec)
            restore = saved if saved is not None and saved.get("key") == key else None
            # A new promotion's monitor starts now (at its commit on the replica that made
            # it, see _on_state_change); a saved one waits for the writer.
            self._watches[rec.name] = _Watch(
                lc.champion, monitor, key, restore, active=restore is None
            )

    # -- activation (writer thread, like feed) ----------------------------------------------
    def activate_monitors(self) -> None:
        """Writer-thread tick: start feeding the watches created since the last tick.

        A watch with a saved state continues from it (its reference and statistic, not a
        new burn-in over rewards that may already have regressed), then catches up on the
        logged rows of its experiment past the positions saved with the state, up to what
        this replica has applied: those a crash took from it, or another replica saw since
        it saved. Everything after reaches it through ``feed`` on this same thread, so no
        row is seen twice or missed. If this replica has not yet applied up to the saved
        positions (another replica saved ahead of it), activation waits for the pull.
        """
        with self._lock:
            waiting = [(n, w) for n, w in self._watches.items() if not w.active]
        if not waiting:
            return
        applied = self.app.writer.applied_positions()
        if applied is None:
            return  # a failed commit is in doubt
        for name, watch in waiting:
            rec = self.app.records.get(name)
            if rec is None:
                continue
            try:
                self._activate(rec, watch, applied)
            except StoreUnavailable:
                raise  # the tick is retried, and this watch with it
            except Exception:
                # Whatever a saved document can do to the load or the catch-up, it must not
                # stall the writer's ticks (pulls, counts) for good: watch afresh.
                log.exception("experiment %s: saved monitor state unusable, new burn-in", name)
                self._start_fresh(rec, watch)

    def _activate(self, rec: Record, watch: _Watch, applied: dict[str, int]) -> None:
        saved = watch.restore
        if saved is not None and watch.since is None:
            since = _positions(saved.get("positions"))
            ahead = since is not None and any(applied.get(r, 0) < q for r, q in since.items())
            if ahead and not saved.get("paused"):
                return  # saved past what this replica applied: the next tick
            watch.monitor.load_state(saved["state"])
            # A regression found before, still PROMOTED: its reaction (if any) did not
            # happen yet, so it is due now; its events, if lost, are recorded with it.
            with self._lock:
                watch.pending = watch.monitor.regression
            if not saved.get("paused") and not watch.monitor.triggered:
                watch.since = since  # caught up from here, page by page
        if watch.since is not None:
            self._catch_up(rec, watch, applied)
        watch.restore = None
        watch.since = None
        watch.active = True

    def _start_fresh(self, rec: Record, watch: _Watch) -> None:
        old = watch.monitor
        watch.monitor = PromotionMonitor(
            rec.name,
            watch.champion,
            holdout_variant=old.holdout_variant,
            settings=old.settings,
            emit=functools.partial(self._emit, rec, watch.key["promotion"]),
        )
        with self._lock:
            watch.pending = None
        watch.restore = None
        watch.since = None
        watch.active = True

    def _catch_up(self, rec: Record, watch: _Watch, upto: dict[str, int]) -> None:
        """Feed the monitor the rows of ``rec`` logged after ``watch.since``, up to
        ``upto``. ``since`` moves with each page fed: a store error part way through
        (raised to the writer's tick) resumes from there next tick, feeding nothing twice.
        A monitor that triggers stops reading (it ignores rewards from then on)."""
        assert watch.since is not None
        fed = 0
        while not watch.monitor.triggered:
            rows = self.app.store.rewards_since(
                watch.since, experiment_id=rec.id, upto=upto, limit=50_000
            )
            if rows:
                # Fed in the order received, not the log's (replica, seq) order: that would
                # feed each replica's stretch in turn, and a detector would see a
                # regression that began mid-way come and go once per replica. (Within a
                # page; a catch-up longer than one is ordered page by page.)
                ordered = sorted(rows, key=attrgetter("received_at"))
                n = len(ordered)
                arms = np.fromiter((r.arm for r in ordered), dtype=np.int64, count=n)
                values = np.fromiter((r.value for r in ordered), dtype=np.float64, count=n)
                self._observe(watch, arms, values)
                fed += len(rows)
                advance(watch.since, rows)
            if len(rows) < 50_000:
                break
        if fed:
            log.info("experiment %s: monitor caught up on %d logged rewards", rec.name, fed)

    def _saved_monitor(self, rec: Record) -> dict[str, Any] | None:
        raw = self.app.store.get_meta(_MONITOR_META.format(rec.id))
        saved = self._parse_saved(raw)
        if raw is not None and saved is None:
            log.warning("experiment %s: ignoring unreadable saved monitor state", rec.name)
        return saved

    @staticmethod
    def _parse_saved(raw: str | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            saved = json.loads(raw)
        except ValueError:
            return None
        return saved if isinstance(saved, dict) else None

    # -- monitor persistence (writer thread, like feed) -------------------------------------
    def save_monitors(self) -> None:
        """Every ``save_interval_s``, store the state of each monitor that changed.

        Runs on the writer thread, the one that feeds the monitors, so each state is
        consistent with the log positions saved beside it. After a crash the restarted
        monitor replays the logged rows past those positions (``_catch_up``), so it loses
        none of them; a regression found in that interval is found again, and reported a
        second time. Paused watches are saved marked so: the rows received while paused
        were not theirs, so a restore of one does not catch up.
        """
        now = time.monotonic()
        if now < self._next_save:
            return
        with self._lock:
            if not (self._watches or self._paused or self._ended):
                return
        positions = self.app.writer.applied_positions()
        if positions is None:
            return  # a failed commit is in doubt: save once the positions are exact
        self._next_save = now + self.save_interval_s
        with self._lock:
            watches = [(n, w, False) for n, w in self._watches.items() if w.active]
            watches += [(n, w, True) for n, w in self._paused.items()]
            ended = list(self._ended)
        for item in ended:
            self._forget_monitor(*item)
            with self._lock:  # only once deleted: a store error retries it next pass
                self._ended.remove(item)
        for name, watch, paused in watches:
            rec = self.app.records.get(name)
            if rec is None:
                continue
            state = watch.monitor.state()
            try:
                text = json.dumps({"state": state, "paused": paused})
            except (TypeError, ValueError):  # a bug here must not stop the writer's pulls
                log.exception("experiment %s: monitor state not saved", name)
                continue
            if text != watch.saved:
                # With the log positions the state includes (what a restart catches up
                # from). Unchanged state, stale positions: the rows in between fed nothing.
                doc: dict[str, object] = {
                    "key": watch.key,
                    "state": state,
                    "positions": positions,
                    "paused": paused,
                }
                self.app.store.set_meta(_MONITOR_META.format(rec.id), json.dumps(doc))
                watch.saved = text

    def _forget_monitor(self, exp_id: int, key: dict[str, object] | None) -> None:
        """Delete the saved state of a watch that ended, unless it is already another
        promotion's (a newer watch, or another replica's): a row per promotion ever made
        would otherwise stay forever. A pass of the ended watch that was saving while it
        ended wrote under its own key, so it is deleted here too. ``_ANY_PROMOTION``:
        whatever is saved (an archived experiment's)."""
        name = _MONITOR_META.format(exp_id)
        raw = self.app.store.get_meta(name)
        saved = self._parse_saved(raw)
        ours = key is _ANY_PROMOTION or (saved is not None and saved.get("key") == key)
        if raw is not None and ours:
            # Only the value read: one another replica writes meanwhile is kept.
            self.app.store.delete_meta(name, if_value=raw)

    def _emit(self, rec: Record, promotion: object, event: Event) -> None:
        """A monitor's events, at once, by the leader only (followers watch silently).
        Best effort: ``_react`` records them for sure (``_unrecorded``), so the details
        name the promotion, by which it tells them stored."""
        if self.app.leader():
            # Once per promotion: a regression found again after a restart (its reaction
            # never ran, its state was not saved since) is not reported twice.
            if self._stored(rec, event.type, promotion):
                return
            details = {**event.details, "promotion": promotion}
            self.app.emit(rec, event.type, event.reason, event.variant, details)

    def _unrecorded(self, rec: Record, watch: _Watch, reg: Regression) -> list[Event]:
        """The DRIFT_DETECTED and RETRAIN_REQUESTED of ``reg`` not in the store yet: the
        monitor's own emission can fail (the store away) or be skipped (it ran on a
        follower, which then became the leader)."""
        promotion = watch.key["promotion"]
        details = {**reg.details(), "promotion": promotion}
        return [
            Event(t, rec.name, reg.variant, reg.at, reg.reason, details)
            for t in (EventType.DRIFT_DETECTED, EventType.RETRAIN_REQUESTED)
            if not self._stored(rec, t, promotion)
        ]

    def _stored(self, rec: Record, type_: EventType, promotion: object) -> bool:
        """Whether this promotion's event of ``type_`` is in the store. One an earlier
        version stored (no promotion in its details) counts if it is newer than the
        promotion: a monitor reports once per promotion."""
        since = _promotion_at(rec.lifecycle, promotion)
        return self.app.has_stored_event(rec, type_, {"promotion": promotion}, legacy_since=since)

    def _react(self, rec: Record) -> None:
        """Apply a detected regression's action. It stays pending until the transition is
        made: one that fails (the store down, another replica's write in between) is tried
        again next pass, since the triggered monitor will not report it a second time.
        It is made only onto the promotion it was found in, as judged here: never over an
        operator's action since (one pending when its promotion is PAUSED is made at the
        RESUME) or onto a later promotion."""
        with self._lock:
            watch = self._watches.get(rec.name)
            reg = watch.pending if watch is not None else None
        if watch is None or reg is None:
            return
        with rec.lock:  # the lifecycle and its version, as one
            lc, version = rec.lifecycle, rec.version
        if lc.state != State.PROMOTED or _promotion_seq(lc) != watch.key["promotion"]:
            return  # not the promotion it watched any more: the next pass ends the watch
        events = self._unrecorded(rec, watch, reg)
        if reg.action is not None:
            action = reg.action
            if action == Action.ROLLBACK and (
                action not in lc.allowed() or lc.previous_champion is None
            ):
                # Nothing earlier to return to (the control is the champion, or it was
                # promoted again after a rollback): a new round, not a jump to the control
                # (which an operator's Rollback may still choose).
                action = Action.REOPEN
            reason = f"regression detected ({reg.kind}): {reg.reason}"
            try:
                # Only onto the state judged here: an operator's action or a new promotion
                # in between makes it a conflict, and the next pass judges again. The
                # events still missing go in its transaction.
                self.app.transition(
                    rec.name,
                    action,
                    actor="monitor",
                    reason=reason,
                    if_version=version,
                    events=events,
                )
            except VersionConflict as err:
                log.info("experiment %s: reaction deferred: %s", rec.name, err)
                return
        else:
            for event in events:  # one by one: a retry records only what is missing
                self.app.emit(rec, event.type, event.reason, event.variant, dict(event.details))
        with self._lock:
            if watch.pending is reg:
                watch.pending = None

    def _check_srm(self, rec: Record) -> None:
        # The sequential test: checked every tick for the experiment's whole life, its
        # false-alarm chance stays <= SRM_ALPHA (a fixed-level chi-square's would not).
        if rec.name in self._srm_flagged:
            return
        view = self.app.engine.view(rec.name)
        p = stats.sequential_p_value(float(view.srm_e[1]))
        if p < stats.SRM_ALPHA:
            self._srm_flagged.add(rec.name)
            # The e-process's running maximum is restored from snapshots, so after a
            # restart the test is still flagged: the alert was raised already if it is stored.
            if self.app.has_stored_event(rec, EventType.SRM_DETECTED):
                return
            self.app.emit(
                rec,
                EventType.SRM_DETECTED,
                f"sample ratio mismatch, sequential p = {p:.2e}",
                details={
                    "observed": view.srm_pulls.tolist(),
                    "expected": view.expected.tolist(),
                    "sequential_p_value": p,
                },
            )

    def _on_state_change(self, rec: Record, event: Event) -> None:
        """A promotion made here (by an admin RPC or this supervisor) is watched from its
        commit on, not from the next pass: the rewards in between are the new champion's
        first, and its monitor's burn-in should see them."""
        if event.type in (EventType.PROMOTED, EventType.RESUMED):
            self._sync_watch(rec)
        elif event.type == EventType.ARCHIVED:  # also before this process's first pass
            with self._lock:
                self._ended.append((rec.id, _ANY_PROMOTION))
                self._states[rec.name] = State.ARCHIVED  # the next pass need not again
                self._paused.pop(rec.name, None)  # its promotion is over: no RESUME to keep

    # -- webhooks ----------------------------------------------------------------------------
    def _on_event(self, rec: Record, event: Event) -> None:
        url = rec.spec.monitoring.webhook_url
        if not url:
            return
        with self._webhooks_lock:
            hook = self._webhooks.get(url)
            if hook is None:
                if self._webhooks_closed:
                    log.error(
                        "experiment %s: %s not sent, webhooks closed", rec.name, event.type.value
                    )
                    return
                try:
                    hook = WebhookNotifier(url, event_types=None)
                except ValueError:
                    log.warning("experiment %s: ignoring invalid webhook_url %r", rec.name, url)
                    return
                self._webhooks[url] = hook
        hook(event)  # a closed one drops it, with a log line

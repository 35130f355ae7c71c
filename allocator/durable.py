"""Durability: group commit of rewards, snapshots, recovery and replica sync.

One writer thread owns every write of rewards to the store and every application of
rewards to the engine, so the engine sees rewards in exactly the order of the log:

1. ``submit`` queues validated rows and returns a future.
2. The writer takes up to ``max_rows`` queued rows (or what arrived within
   ``max_delay_ms``), writes them in ONE transaction (``Store.append_rewards``), and only
   after the commit applies the new (non-duplicate) rows to the engine and resolves the
   futures. A reward is acknowledged only once it is durable; a store failure fails the
   futures (the client retries) and changes nothing in memory. Such a failed commit may in
   fact have happened (the connection died after COMMIT was sent), so the writer keeps
   those rows as "in doubt" and commits them again itself once the store is back; the
   store reports rows of ours that did land as new, so either way each is applied exactly
   once, and a client retry then answers DUPLICATE. Until then no snapshot is taken: its
   log positions would cover a row the posterior does not include.
3. Between commits the same thread pulls other replicas' rows (PostgreSQL), flushes
   assignment counts and allocation epochs, and snapshots the posteriors with the log
   positions they cover. Recovery = latest snapshot + replay of the log after it, in log
   order, which reproduces the posterior arrays exactly.

What a crash can lose: assignment counts and epoch records since the last flush (they are
written asynchronously so Assign never waits on the database), never a reward.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from allocator.engine import MAX_ABS_REWARD, Engine, ExperimentConfig, ExperimentSnapshot
from allocator.errors import InvalidArgument, Overloaded
from allocator.metrics import Metrics
from allocator.store import (
    AllocationEpoch,
    AssignmentCount,
    LoggedReward,
    LoggedValues,
    ReplicaConflict,
    RewardColumns,
    RewardRow,
    Store,
    StoreUnavailable,
)

log = logging.getLogger("allocator.durable")

# Mirrors the store's memory of failed commits (store._UNACKED_CAP): past it, a commit that
# landed could no longer be told apart from a duplicate anyway.
_DOUBT_CAP = 1_000_000


@dataclass
class _Job:
    name: str
    rows: RewardColumns
    future: Future[list[bool]]
    # The rows' guardrail metrics as the caller had them, so the writer need not parse
    # back the JSON it is writing (None: parse ``rows.guardrails_json``).
    guardrails: Sequence[Mapping[str, float]] | None = None


class Recovery:
    """Rebuilds engine state from the store: configs, snapshots, then the reward log."""

    def __init__(self, store: Store, engine: Engine) -> None:
        self.store = store
        self.engine = engine
        # Per experiment, the log positions its restored snapshot includes: rows at or
        # before them are in the posterior already. `load` may stop before passing them
        # (a row of an experiment not known yet), so whoever resumes the log after it
        # must skip them too (`RewardWriter(skip_until=...)`).
        self.skip_until: dict[str, dict[str, int]] = {}

    def load(
        self,
        ids: dict[str, int],
        configs: dict[str, ExperimentConfig],
        own_replica: str | None = None,
    ) -> dict[str, int]:
        """Restore every experiment; returns the log positions now applied, per replica.

        ``own_replica``: the id this process logs under. Its rows are replayed to the end
        even when the replay of the others stops early (below): nobody pulls them later.
        """
        positions_by_exp: dict[str, dict[str, int]] = {}
        for name, config in configs.items():
            snap = self.store.latest_snapshot(ids[name])
            if snap is None:
                if name not in self.engine:
                    self.engine.create(config)
                positions_by_exp[name] = {}
            else:
                restored = ExperimentSnapshot.from_bytes(snap.payload)
                self.engine.restore({name: restored})
                # Variants added after the snapshot was taken (the record has them, and the
                # log may hold their rewards): added again, in order, before the replay.
                weights = config.policy.weights
                for i in range(restored.config.n_arms, config.n_arms):
                    self.engine.add_variant(
                        name, config.variants[i], weights[i] if weights else None
                    )
                positions_by_exp[name] = dict(snap.positions)
        self.skip_until = {n: p for n, p in positions_by_exp.items() if p}
        # Replay from the smallest position any experiment needs, filtering per experiment.
        start: dict[str, int] = {}
        replicas = set(self.store.replica_positions())
        for replica in replicas:
            start[replica] = min((p.get(replica, 0) for p in positions_by_exp.values()), default=0)
        by_id = {v: k for k, v in ids.items()}
        arms = {name: config.n_arms for name, config in configs.items()}
        applied = dict(start)
        while True:
            rows = self.store.rewards_since(applied, exclude_replica=None, limit=50_000)
            known = known_prefix(rows, by_id, arms)
            if not known:
                break
            apply_logged(self.engine, known, by_id, positions_by_exp)
            advance(applied, known)
            if len(known) < len(rows):
                # An experiment created, or a variant added, (by another replica) after we
                # listed them: the writer's pull resumes here once it is loaded.
                break
        if own_replica is not None:
            self._replay_own(own_replica, applied, by_id, positions_by_exp)
        return applied

    def _replay_own(
        self,
        own: str,
        applied: dict[str, int],
        by_id: dict[int, str],
        skip: dict[str, dict[str, int]],
    ) -> None:
        """Apply the rest of our own stream. The pull skips our id (we log it), so rows of
        ours past where the replay stopped would be lost; they belong to experiments listed
        already (a previous run of ours wrote them, before we took the replica lock)."""
        while True:
            rows = self.store.rewards_since(applied, limit=50_000, replica=own)
            known = known_prefix(rows, by_id)
            apply_logged(self.engine, known, by_id, skip)
            advance(applied, known)
            if len(known) < len(rows):
                log.error("replica %r logged rewards of an experiment not listed yet", own)
                return
            if len(rows) < 50_000:
                return


def replay_new_experiment(
    store: Store, engine: Engine, experiment_id: int, name: str, upto: Mapping[str, int]
) -> list[LoggedReward]:
    """Apply the logged rows of an experiment just learned of that lie at or before
    ``upto`` (the pull's positions), returning them; the pull applies the rest.

    Usually there are none: the pull never moves past a row of an unknown experiment.
    But recovery starts its replay at the smallest snapshot position of the experiments
    it listed, so rows of one created meanwhile (by another replica) may lie before it.
    """
    done: list[LoggedReward] = []
    if not upto:
        return done
    positions: dict[str, int] = {}
    while True:
        rows = store.rewards_since(positions, limit=50_000, experiment_id=experiment_id, upto=upto)
        apply_logged(engine, rows, {experiment_id: name})
        advance(positions, rows)
        done.extend(rows)
        if len(rows) < 50_000:
            return done


def known_prefix(
    rows: Sequence[LoggedReward],
    names_by_id: dict[int, str],
    n_arms: Mapping[str, int] | None = None,
) -> Sequence[LoggedReward]:
    """The rows before the first one of an experiment (or, with ``n_arms``, a variant)
    this process does not know yet.

    Positions must never move past a row that was not applied, or it is skipped for good;
    rows come ordered by (replica, seq), so cutting the page keeps every stream contiguous.
    """
    for i, row in enumerate(rows):
        name = names_by_id.get(row.experiment_id)
        if name is None or (n_arms is not None and row.arm >= n_arms.get(name, 0)):
            return rows[:i]
    return rows


def advance(positions: dict[str, int], rows: Iterable[LoggedReward]) -> None:
    """Move per-replica positions to the last of ``rows``."""
    for row in rows:
        positions[row.replica_id] = max(positions.get(row.replica_id, 0), row.replica_seq)


def apply_logged(
    engine: Engine,
    rows: Sequence[LoggedReward],
    names_by_id: dict[int, str],
    skip_until: dict[str, dict[str, int]] | None = None,
) -> int:
    """Apply logged rewards in log order, grouped into runs per experiment; returns count."""
    applied = 0
    run_name: str | None = None
    arms: list[int] = []
    values: list[float] = []
    epochs: list[int] = []
    guards: list[str | None] = []

    def flush() -> None:
        nonlocal applied
        if run_name is not None and arms and run_name in engine:
            keep = [i for i, v in enumerate(values) if abs(v) <= MAX_ABS_REWARD]
            if len(keep) < len(values):
                # Logged by an earlier version (or another replica's) before the bound: one
                # such row must not keep the server from starting, nor the pull from moving.
                bad = [v for v in values if abs(v) > MAX_ABS_REWARD]
                log.error(
                    "experiment %s: logged rewards %r beyond the bound skipped", run_name, bad
                )
                arms[:] = [arms[i] for i in keep]
                values[:] = [values[i] for i in keep]
                epochs[:] = [epochs[i] for i in keep]
                guards[:] = [guards[i] for i in keep]
            if arms:
                engine.reward_batch(run_name, arms, values, epochs, guardrail_items(guards))
                applied += len(arms)
        arms.clear()
        values.clear()
        epochs.clear()
        guards.clear()

    for row in rows:
        name = names_by_id.get(row.experiment_id)
        if name is None:
            continue
        if skip_until is not None and row.replica_seq <= skip_until.get(name, {}).get(
            row.replica_id, 0
        ):
            continue
        if name != run_name:
            flush()
            run_name = name
        arms.append(row.arm)
        values.append(row.value)
        epochs.append(row.epoch)
        guards.append(row.guardrails_json)
    flush()
    return applied


def _new_guardrails(job: _Job, new: np.ndarray) -> list[Mapping[str, float]] | None:
    """The guardrail metrics of the rows of ``job`` that were ``new``."""
    if job.guardrails is not None:
        return [g for g, keep in zip(job.guardrails, new, strict=True) if keep]
    logged = job.rows.guardrails_json
    if logged is None:
        return None
    return guardrail_items([g for g, keep in zip(logged, new, strict=True) if keep])


def _as_logged(
    mask: np.ndarray,
    arms: np.ndarray,
    values: np.ndarray,
    epochs: np.ndarray,
    guardrails: list[Mapping[str, float]] | None,
    fixes: Mapping[int, LoggedValues],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Mapping[str, float]]]:
    """The new rows of a job with the logged values of ``fixes`` (job row index -> values).

    Those rows' earlier failed commits landed: the log replays what they stored, so the
    engine must apply that too, not the resubmission.
    """
    arms, values, epochs = arms.copy(), values.copy(), epochs.copy()
    items = list(guardrails) if guardrails is not None else [{} for _ in range(arms.size)]
    position = np.cumsum(mask) - 1  # job row index -> index among the new rows
    for row, v in fixes.items():
        at = int(position[row])
        arms[at], values[at], epochs[at] = v.arm, v.value, v.epoch
        items[at] = json.loads(v.guardrails_json) if v.guardrails_json else {}
    return arms, values, epochs, items


def guardrail_items(logged: Sequence[str | None] | None) -> list[Mapping[str, float]] | None:
    """Per item its guardrail metrics, from the log's JSON (None: no item has any)."""
    if logged is None or not any(logged):
        return None
    return [json.loads(g) if g else {} for g in logged]


class RewardWriter:
    """The group-commit thread. ``submit`` is safe from any thread."""

    def __init__(
        self,
        store: Store,
        engine: Engine,
        replica_id: str,
        metrics: Metrics,
        *,
        ids: Callable[[], dict[str, int]],
        positions: dict[str, int],
        max_rows: int = 20_000,
        max_delay_ms: float = 2.0,
        max_queue: int = 200_000,
        sync_interval_s: float = 0.5,
        snapshot_interval_s: float = 5.0,
        on_pulled: Callable[[Sequence[LoggedReward]], None] | None = None,
        on_applied: Callable[[str, np.ndarray, np.ndarray], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        skip_until: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.replica_id = replica_id
        self.metrics = metrics
        self.ids = ids
        self.positions = dict(positions)
        # Rows that recovery left behind but a restored snapshot includes (Recovery).
        self.skip_until = {n: dict(p) for n, p in (skip_until or {}).items()}
        self.max_rows = max_rows
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.sync_interval = sync_interval_s
        self.snapshot_interval = snapshot_interval_s
        self.housekeeping_passes = 0  # finished (sync, pull, tick hooks) passes, for waiters
        self.on_pulled = on_pulled
        self.on_applied = on_applied
        self.on_tick = on_tick
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._queued_rows = 0
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reward-writer", daemon=True)
        self._flushed_pulls: dict[str, np.ndarray] = {}
        self._flushed_epochs: dict[str, int] = {}
        # dedup_key -> (experiment, columns, position) of rows of commits that failed and
        # may have landed anyway.
        self._doubtful: dict[str, tuple[str, RewardColumns, int]] = {}
        self.unapplied = False  # a committed row failed to reach the engine (see _commit)
        self.healthy = True
        self.last_error = ""
        self.positions.pop(replica_id, None)

    # -- API -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def submit(
        self,
        name: str,
        rows: Sequence[RewardRow] | RewardColumns,
        guardrails: Sequence[Mapping[str, float]] | None = None,
    ) -> Future[list[bool]]:
        """Queue rows of one experiment; the future gives, per row, True=new False=dup.

        ``guardrails``: the rows' guardrail metrics, parsed (the same as their JSON).
        """
        fut: Future[list[bool]] = Future()
        if not len(rows):
            fut.set_result([])
            return fut
        if not isinstance(rows, RewardColumns):
            rows = RewardColumns.from_rows(rows)
        if len(rows) > self.max_queue:  # would never fit: not worth a retry
            raise InvalidArgument(
                "values", f"{len(rows)} rewards in one request; at most {self.max_queue}"
            )
        if self._stop.is_set():
            raise StoreUnavailable("submit", "server is shutting down")
        with self._count_lock:
            if self._queued_rows + len(rows) > self.max_queue:
                raise Overloaded(
                    f"{self._queued_rows} rewards already queued (max {self.max_queue}); retry"
                )
            self._queued_rows += len(rows)
        self.metrics.queue_depth.set(self._queued_rows)
        self._queue.put(_Job(name, rows, fut, guardrails))
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        """Drain what is queued, snapshot, and stop."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        next_sync = time.monotonic()
        next_snapshot = time.monotonic() + self.snapshot_interval
        while True:
            timeout = max(0.0, min(next_sync, next_snapshot) - time.monotonic())
            jobs = self._take(timeout)
            if jobs:
                self._commit(jobs)
                self._release(sum(len(job.rows) for job in jobs))
            now = time.monotonic()
            stopping = self._stop.is_set() and self._queue.empty()
            if now >= next_sync or stopping:
                self._housekeeping()
                next_sync = now + self.sync_interval
            if now >= next_snapshot or stopping:
                self._snapshot()
                next_snapshot = now + self.snapshot_interval
            if stopping:
                return

    def _take(self, timeout: float) -> list[_Job]:
        """Block up to ``timeout`` for a first job, then gather more for ``max_delay``."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        if first is None:
            return self._drain_nowait()
        jobs = [first]
        rows = len(first.rows)
        deadline = time.monotonic() + self.max_delay
        while rows < self.max_rows:
            remaining = deadline - time.monotonic()
            try:
                job = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if job is None:
                jobs.extend(self._drain_nowait())
                break
            jobs.append(job)
            rows += len(job.rows)
        return jobs

    def _drain_nowait(self) -> list[_Job]:
        jobs: list[_Job] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _commit(self, jobs: list[_Job]) -> bool:
        rows = RewardColumns.concat([job.rows for job in jobs])
        logged: dict[int, LoggedValues] = {}
        try:
            with self.metrics.flush_seconds.time():
                flags = self.store.append_rewards(self.replica_id, rows, logged)
        except StoreUnavailable as err:
            self._mark_down(err)
            self._doubt(jobs)
            for job in jobs:
                job.future.set_exception(err)
            return False
        except Exception as err:
            # Not the database being away: nothing was written (one transaction). One job's
            # rows must not fail the others', so each is committed alone to find it.
            if len(jobs) > 1:
                return all([self._commit([job]) for job in jobs])
            if isinstance(err, ReplicaConflict):  # this replica can't write: try another
                self._mark_down(err)
                jobs[0].future.set_exception(StoreUnavailable("commit", str(err)))
                return False
            # The message may quote SQL and other clients' values: it goes to the log only.
            log.error("commit of %d rewards of %r failed", len(rows), jobs[0].name, exc_info=err)
            jobs[0].future.set_exception(RuntimeError("reward commit failed"))
            return False
        self._mark_up()
        if self._doubtful:
            for key in rows.keys:
                self._doubtful.pop(key, None)
        is_new = np.array(flags, dtype=bool)
        self.metrics.flush_rows.inc(int(is_new.sum()))
        i = 0
        for job in jobs:
            n = len(job.rows)
            mine, mask = flags[i : i + n], is_new[i : i + n]
            i += n
            if mask.any() and job.name in self.engine:
                cols = job.rows
                every = bool(mask.all())
                arms = cols.arms if every else cols.arms[mask]
                values = cols.values if every else cols.values[mask]
                epochs = cols.epochs if every else cols.epochs[mask]
                guardrails = _new_guardrails(job, mask)
                fixes = {j - (i - n): v for j, v in logged.items() if i - n <= j < i}
                if fixes:
                    arms, values, epochs, guardrails = _as_logged(
                        mask, arms, values, epochs, guardrails, fixes
                    )
                try:
                    self.engine.reward_batch(job.name, arms, values, epochs, guardrails)
                except Exception:
                    # A bug, not bad input (that is refused before it is queued). The rows
                    # are durable and a restart replays them; this thread must live on, or
                    # every later reward would time out.
                    log.exception(
                        "committed rewards of %r could not be applied; no snapshot is taken"
                        " from now on, so a restart replays them",
                        job.name,
                    )
                    self.unapplied = True
                else:
                    self._applied_hook(job.name, arms, values)
            job.future.set_result(mine)
        return True

    def _applied_hook(self, name: str, arms: np.ndarray, values: np.ndarray) -> None:
        """``on_applied`` (the monitors): its failure is its own, the engine has the rows."""
        if self.on_applied is None:
            return
        try:
            self.on_applied(name, arms, values)
        except Exception:
            log.exception("experiment %s: a listener of applied rewards failed", name)

    def _doubt(self, jobs: list[_Job]) -> None:
        for job in jobs:
            for i, key in enumerate(job.rows.keys):
                self._doubtful[key] = (job.name, job.rows, i)
        while len(self._doubtful) > _DOUBT_CAP:
            key = next(iter(self._doubtful))
            log.warning("forgetting reward %r of a failed commit (too many in doubt)", key)
            del self._doubtful[key]

    def resolve_doubtful(self) -> None:
        """Commit again the rows of failed commits (writer thread only); see module doc."""
        while self._doubtful:
            batch = list(self._doubtful.values())[: self.max_rows]
            # Grouped per (experiment, submitted columns), each group in first-doubted order.
            groups: dict[int, tuple[str, RewardColumns, list[int]]] = {}
            for name, cols, i in batch:
                groups.setdefault(id(cols), (name, cols, []))[2].append(i)
            # Nobody waits on these futures: the clients were already answered UNAVAILABLE.
            jobs = [
                _Job(name, cols.take(np.array(pos, dtype=np.int64)), Future())
                for name, cols, pos in groups.values()
            ]
            if not self._commit(jobs):
                return

    def _release(self, n: int) -> None:
        with self._count_lock:
            self._queued_rows -= n
            depth = self._queued_rows
        self.metrics.queue_depth.set(depth)

    def _mark_down(self, err: BaseException) -> None:
        if self.healthy:
            log.error("store unavailable: %s", err)
        self.healthy = False
        self.last_error = str(err)
        self.metrics.store_up.set(0)

    def _mark_up(self) -> None:
        if not self.healthy:
            log.info("store reachable again")
        self.healthy = True
        self.last_error = ""
        self.metrics.store_up.set(1)

    def _housekeeping(self) -> None:
        try:
            self.resolve_doubtful()
            # Experiments first: other replicas' rows of an experiment created since the last
            # tick can then be applied in this same pass (pull waits for unknown ones).
            if self.on_tick is not None:
                self.on_tick()
            self.pull()
            self.flush_counts()
            self.store.ping()
            self._mark_up()
        except Exception as err:
            self._mark_down(err)
        finally:
            self.housekeeping_passes += 1  # after the pass: a reader sees it all done

    def pull(self) -> int:
        """Apply other replicas' rewards committed since we last looked."""
        if not self.store.shared:
            return 0
        ids = self.ids()
        names_by_id = {v: k for k, v in ids.items()}
        total = 0
        while True:
            rows = self.store.rewards_since(
                self.positions, exclude_replica=self.replica_id, limit=50_000
            )
            # A variant another replica added since our last sync: its rows wait for it.
            arms = {n: self.engine.config(n).n_arms for n in ids if n in self.engine}
            known = known_prefix(rows, names_by_id, arms)
            if not known:
                return total
            total += apply_logged(self.engine, known, names_by_id, self.skip_until or None)
            advance(self.positions, known)
            if self.skip_until:
                self._drop_passed_skips()
            if self.on_pulled is not None:
                try:
                    self.on_pulled(known)
                except Exception:  # the monitors' own failure: the rows are applied
                    log.exception("a listener of pulled rewards failed")
            if len(known) < len(rows):
                return total  # the rest after the next _sync_experiments

    def _drop_passed_skips(self) -> None:
        """Forget the skip positions the pull has passed (our own rows are never pulled)."""
        pos, me = self.positions, self.replica_id
        self.skip_until = {
            name: until
            for name, until in self.skip_until.items()
            if any(r != me and pos.get(r, 0) < seq for r, seq in until.items())
        }

    def flush_counts(self) -> None:
        """Write assignment-count deltas and newly opened epochs.

        The flushed marks move only after the writes succeed, so an outage delays counts
        but never drops them.
        """
        ids = self.ids()
        counts: list[AssignmentCount] = []
        epochs: list[AllocationEpoch] = []
        marks: list[tuple[str, np.ndarray, int]] = []
        for name in self.engine.names():
            if name not in ids:
                continue
            view = self.engine.view(name)
            pulls = view.epoch_pulls
            delta = pulls.copy()
            before = self._flushed_pulls.get(name)
            if before is not None:
                e, k = before.shape
                delta[:e, :k] -= before
            for e, k in zip(*np.nonzero(delta), strict=True):
                counts.append(
                    AssignmentCount(
                        experiment_id=ids[name], epoch=int(e), arm=int(k), count=int(delta[e, k])
                    )
                )
            for e in range(self._flushed_epochs.get(name, 0), view.epoch + 1):
                epochs.append(
                    AllocationEpoch(
                        experiment_id=ids[name],
                        epoch=e,
                        started_at=float(view.epoch_started[e]),
                        shares=tuple(float(x) for x in view.epoch_shares[e]),
                    )
                )
            marks.append((name, pulls, view.epoch + 1))
        if counts:
            self.store.add_assignment_counts(counts)
        # The count deltas are committed: move their marks now, so a failure recording an
        # epoch below cannot make the next flush add the same deltas a second time.
        for name, pulls, _ in marks:
            self._flushed_pulls[name] = pulls
        for ep in epochs:
            self.store.record_allocation_epoch(ep)
        for name, _, n_epochs in marks:
            self._flushed_epochs[name] = n_epochs

    def _snapshot(self) -> None:
        try:
            self.snapshot_now()
        except Exception as err:
            self._mark_down(err)

    def replicas(self) -> list[str]:
        """This replica and every other one whose rows it has pulled; from any thread
        (``list`` copies the keys in one step under the GIL)."""
        return [self.replica_id, *(r for r in list(self.positions) if r != self.replica_id)]

    def applied_positions(self) -> dict[str, int] | None:
        """The log positions, per replica, of every row applied so far (writer thread only):
        what a snapshot, or a monitor's saved state, includes. None while a failed commit is
        in doubt: our highest position may cover a landed-but-unapplied row; and for good
        once a committed row could not be applied (the posterior lacks it: a restart from an
        earlier snapshot replays it)."""
        if self._doubtful or self.unapplied:
            return None
        # Between commits on the only thread that writes our rows, every row of ours in the
        # log has been applied, except rows of a commit that reported failure but happened,
        # and there are none of those while nothing is in doubt (checked above).
        own = self.store.replica_position(self.replica_id)
        return {**self.positions, self.replica_id: own}

    def snapshot_now(self, names: Iterable[str] | None = None) -> None:
        """Snapshot posteriors with the log positions they include (writer thread only)."""
        positions = self.applied_positions()
        if positions is None:
            return  # wait until nothing is in doubt
        ids = self.ids()
        for name, snap in self.engine.snapshot(names).items():
            if name in ids:
                # The engine holds the rows up to its skip marks already (the snapshot it
                # was restored from did), even where the pull is still behind them.
                until = self.skip_until.get(name, {})
                covered = {
                    r: max(positions.get(r, 0), until.get(r, 0)) for r in {*positions, *until}
                }
                self.store.save_snapshot(ids[name], covered, snap.to_bytes(), time.time())

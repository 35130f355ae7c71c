"""Several replicas on one PostgreSQL database: convergence, one promotion, losing a replica.

Each replica logs its own rewards under its replica id and pulls the others' rows; with
Bernoulli 0/1 rewards the posterior statistics are exact integer sums, so replicas that
have seen the same rewards must hold bit-identical arrays whatever the order.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from allocator_client import AllocatorClient
from allocator_client.v1 import allocator_pb2 as pb
from allocator_client.v1 import allocator_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from allocator import app as app_module
from allocator.app import _LEADER_LOCK_KEY
from allocator.durable import Recovery, RewardWriter, replay_new_experiment
from allocator.engine import Engine, ExperimentConfig
from allocator.errors import WrongState
from allocator.lifecycle import Action, EventType, State
from allocator.metrics import Metrics
from allocator.server import Running, create_server
from allocator.store import (
    PendingDefault,
    ReplicaConflict,
    RewardRow,
    SqlStore,
    StoreUnavailable,
)
from tests.conftest import ADMIN_TOKEN, server_config, wait_until
from tests.test_durability import (
    EXPERIMENT,
    LostCommitAnswer,
    RewardSender,
    ServerProcess,
    assert_exact,
    assert_report_exact,
    check_ledger,
    create_experiment,
    expected_stats,
    merged,
    recovered_state,
    report,
    reported_counts,
    server_processes,
    start_all,
)

pytestmark = pytest.mark.postgres


def _replica(url: str, replica_id: str, **overrides: object) -> Running:
    return create_server(server_config(url, replica_id=replica_id, http_port=-1, **overrides))


@pytest.fixture
def replicas(pg_url: str) -> Iterator[tuple[Running, Running]]:
    """Two in-process replicas on one fresh PostgreSQL database."""
    r1 = _replica(pg_url, "r1")
    r2 = _replica(pg_url, "r2")
    try:
        yield r1, r2
    finally:
        r2.stop(grace=1.0)
        r1.stop(grace=1.0)


def _target(r: Running) -> str:
    return f"127.0.0.1:{r.port}"


def _stats(r: Running, name: str) -> np.ndarray | None:
    return r.app.engine.view(name).stats if name in r.app.engine else None


def _same(got: np.ndarray | None, want: np.ndarray) -> bool:
    return got is not None and np.array_equal(got, want)


def _leaders(url: str) -> int:
    """Sessions holding the promotion leader lock in this database.

    A bigint advisory key shows in pg_locks as classid (high 32 bits), objid (low 32 bits)
    and objsubid 1; every replica also holds a replica lock of its own, not counted here.
    """
    parsed = sa.make_url(url)
    engine = sa.create_engine(parsed, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                        "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = :db "
                        "AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"
                    ),
                    {
                        "db": parsed.database,
                        "hi": _LEADER_LOCK_KEY >> 32,
                        "lo": _LEADER_LOCK_KEY & 0xFFFFFFFF,
                    },
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_rewards_split_between_replicas_converge_exactly(
    replicas: tuple[Running, Running],
) -> None:
    """Rewards sent half to each replica end up, bit-identical, in both posteriors.

    A second experiment is created on r2 in the middle of the load and fed at once through
    r2, so r1 meets r2's rows for it before r1 has heard of the experiment: they must be
    applied once r1 learns about it, not skipped.
    """
    r1, r2 = replicas
    create_experiment(_target(r1))
    wait_until(lambda: EXPERIMENT in r2.app.records, 5, "r2 to learn the experiment")
    senders = [
        RewardSender(_target(r1), "one", seed=11),
        RewardSender(_target(r2), "two", seed=12, stream=True),
    ]
    for s in senders:
        s.start()
    time.sleep(0.5)
    create_experiment(_target(r2), name="late")
    late = RewardSender(_target(r2), "late", seed=13, experiment="late")
    late.start()
    time.sleep(1.0)
    for s in [*senders, late]:
        s.drain(timeout=30)
    ledger = merged(senders)
    late_ledger = late.snapshot()
    check_ledger(ledger)
    check_ledger(late_ledger)
    assert ledger.items and late_ledger.items
    for name, led in ((EXPERIMENT, ledger), ("late", late_ledger)):
        want = expected_stats(led.items)
        for r in (r1, r2):
            wait_until(
                lambda r=r, name=name, want=want: _same(_stats(r, name), want),  # type: ignore[misc]
                10,
                f"{r.app.replica_id} to converge on {name}",
            )
        np.testing.assert_array_equal(_stats(r1, name), _stats(r2, name))


def test_guardrail_metrics_and_scores_reach_the_other_replica(
    replicas: tuple[Running, Running],
) -> None:
    """Guardrail metrics logged through r1 are in r2's statistics too (r2 may be the
    replica that runs promotion and checks them), applied with the rewards they came with;
    so are prediction scores, in r2's drift windows."""
    r1, r2 = replicas
    create_experiment(_target(r1))
    wait_until(lambda: EXPERIMENT in r2.app.records, 5, "r2 to learn the experiment")
    latency = [12.5, 40.0, 7.25, 19.0]
    r1.app.reward(
        experiment=EXPERIMENT,
        values=[1.0, 0.0, 1.0, 0.0],
        event_ids=[f"gr-{i}" for i in range(4)],
        variant_indices=[0, 1, 0, 1],
        guardrails=[{"latency_ms": x} for x in latency],
        scores=[0.5, 0.25, float("nan"), 0.75],
    )
    want = np.array([[2.0, 19.75, 12.5**2 + 7.25**2], [2.0, 59.0, 40.0**2 + 19.0**2]])

    def r2_latency() -> np.ndarray | None:
        return r2.app.engine.guardrail_stats(EXPERIMENT).get("latency_ms")

    wait_until(
        lambda: (lat := r2_latency()) is not None and lat[:2].tolist() == want.tolist(),
        10,
        "r2 to apply r1's guardrail metrics",
    )
    np.testing.assert_array_equal(
        r1.app.engine.guardrail_stats(EXPERIMENT)["latency_ms"], r2_latency()
    )
    # Three scores (the NaN is "no score"): arm 0 one, arm 1 two, all in the reference.
    # A pull applies the rows, guardrails included, before it hands their scores on.
    scores = {0: (1, 0), 1: (2, 0)}
    wait_until(lambda: r2.app.records[EXPERIMENT].scores.sizes() == scores, 10, "r2's scores")
    assert r1.app.records[EXPERIMENT].scores.sizes() == scores


def test_commit_that_landed_but_failed_is_counted_by_both_replicas(
    replicas: tuple[Running, Running],
) -> None:
    """r1's commit lands but r1 is told it failed, and the client never retries.

    The rows are in the log, so r2 pulls and counts them; r1 must count them too (it
    commits its in-doubt rows again and learns they are its own), or the replicas diverge.
    """
    r1, r2 = replicas
    create_experiment(_target(r1))
    wait_until(lambda: EXPERIMENT in r2.app.records, 5, "r2 to learn the experiment")
    lost = LostCommitAnswer(r1.app.store)  # type: ignore[arg-type]
    lost.armed.set()
    with pytest.raises(StoreUnavailable):
        r1.app.reward(
            experiment=EXPERIMENT,
            values=[1.0, 0.0, 1.0],
            event_ids=["x1", "x2", "x3"],
            variant_indices=[2, 2, 0],
        )
    assert lost.fired.is_set()
    want = np.array([[1.0, 1, 1], [0, 0, 0], [2, 1, 1]])
    for r in (r1, r2):
        wait_until(
            lambda r=r: _same(_stats(r, EXPERIMENT), want),  # type: ignore[misc]
            5,
            f"{r.app.replica_id} to count the landed rewards once",
        )
    time.sleep(0.3)  # several housekeeping passes later: still once
    np.testing.assert_array_equal(_stats(r1, EXPERIMENT), want)
    np.testing.assert_array_equal(_stats(r2, EXPERIMENT), want)


def test_concurrent_promotions_on_two_replicas_happen_once(
    replicas: tuple[Running, Running], pg_url: str
) -> None:
    """Promote sent to both replicas at the same instant: one wins, the other is refused.

    Optimistic versioning of the experiment row decides; the loser answers ABORTED (it
    lost the race) or FAILED_PRECONDITION (it had already seen the promotion). Exactly one
    PROMOTE audit row and one PROMOTED event exist, and both replicas serve the winner.
    """
    r1, r2 = replicas
    names = [f"promo{i}" for i in range(6)]
    for name in names:
        create_experiment(_target(r1), name=name)
    wait_until(lambda: all(n in r2.app.records for n in names), 5, "r2 to learn them")
    # The supervisors try the leader lock every promotion_interval_s (1 s).
    wait_until(lambda: _leaders(pg_url) == 1, 5, "one replica to hold the leader lock")
    time.sleep(1.2)
    assert _leaders(pg_url) == 1, "exactly one replica holds the promotion leader lock"
    for name in names:
        results = _race_promote(name, [(r1, "b"), (r2, "c")])
        assert sorted(results.values(), key=str).count(grpc.StatusCode.OK) == 1, results
        loser = next(c for c in results.values() if c != grpc.StatusCode.OK)
        assert loser in (grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION)
        winner = next(v for v, c in results.items() if c == grpc.StatusCode.OK)
        audit = r1.app.store.list_audit(r1.app.get(name).id)
        assert [a.action for a in audit].count("PROMOTE") == 1
        for r in (r1, r2):
            wait_until(
                lambda r=r, name=name: r.app.get(name).lifecycle.state == State.PROMOTED,  # type: ignore[misc]
                5,
                f"{r.app.replica_id} to see {name} promoted",
            )
            rec = r.app.get(name)
            assert rec.config.variants[rec.lifecycle.champion or 0] == winner
    promoted = [e for e in r1.app.store.events_after(0, limit=10_000) if e.type == "PROMOTED"]
    assert len(promoted) == len(names), [(e.experiment_id, e.type) for e in promoted]


@contextlib.contextmanager
def _watching(r: Running, n: int, experiment: str = "") -> Iterator[list[pb.Event]]:
    """Collect up to ``n`` events of a live WatchEvents call on ``r`` while the body runs,
    then up to 10 s more for the rest; cancelled after that (a lost event shows as one
    too few)."""
    got: list[pb.Event] = []
    with grpc.insecure_channel(_target(r)) as ch:
        call = pb_grpc.AllocatorStub(ch).WatchEvents(pb.WatchEventsRequest(experiment=experiment))

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):  # the cancel below
                for resp in call:
                    got.append(resp.event)
                    if len(got) == n:
                        return

        reader = threading.Thread(target=read)
        reader.start()
        try:
            wait_until(lambda: bool(r.app.events._subs), 10, "the watcher's subscription")
            yield got
            reader.join(10)
        finally:
            call.cancel()
            reader.join(10)


def test_another_replicas_event_between_two_of_ours_reaches_our_watcher(pg_url: str) -> None:
    """r2 commits an event, then r1 commits and publishes its own, all before r1's next
    pull of the store: r1's watcher still gets r2's event, and every event once, in
    sequence order. (r1 pulls only at start, so nothing but its own publish can bring it.)"""
    r1 = _replica(pg_url, "r1", sync_interval_s=3600.0)
    r2 = _replica(pg_url, "r2")
    try:
        create_experiment(_target(r1))
        wait_until(lambda: EXPERIMENT in r2.app.records, 5, "r2 to learn the experiment")
        ours, theirs = r1.app.get(EXPERIMENT), r2.app.get(EXPERIMENT)
        with _watching(r1, 3, EXPERIMENT) as got:
            r1.app.emit(ours, EventType.DRIFT_DETECTED, "r1 first")
            r2.app.emit(theirs, EventType.DRIFT_DETECTED, "r2 between")
            r1.app.emit(ours, EventType.DRIFT_DETECTED, "r1 last")
        assert [e.reason for e in got] == ["r1 first", "r2 between", "r1 last"]
        assert [e.sequence for e in got] == sorted({e.sequence for e in got})
    finally:
        r2.stop(grace=1.0)
        r1.stop(grace=1.0)


def test_events_of_an_experiment_not_yet_adopted_wait_for_it(pg_url: str) -> None:
    """r2 creates an experiment and stores an event of it, then r1 stores one of its own
    before it has heard of the new experiment: both wait for r1's sync, so r1's watchers
    get r2's event under its experiment's name, and in sequence order."""
    r1 = _replica(pg_url, "r1", sync_interval_s=3600.0)
    r2 = _replica(pg_url, "r2")
    try:
        create_experiment(_target(r1))
        with _watching(r1, 2) as got:
            create_experiment(_target(r2), name="late")
            r2.app.emit(r2.app.get("late"), EventType.DRIFT_DETECTED, "r2 late")
            r1.app.emit(r1.app.get(EXPERIMENT), EventType.DRIFT_DETECTED, "r1 after")
            time.sleep(0.3)
            assert not got, "an event went out before the experiment it names was known"
            r1.app._tick()  # the sync r1's interval would make
        assert [(e.experiment, e.reason) for e in got] == [
            ("late", "r2 late"),
            (EXPERIMENT, "r1 after"),
        ]
    finally:
        r2.stop(grace=1.0)
        r1.stop(grace=1.0)


def _race_promote(name: str, who: list[tuple[Running, str]]) -> dict[str, grpc.StatusCode]:
    """Send Promote(variant) to each replica at the same instant; status code per variant."""
    results: dict[str, grpc.StatusCode] = {}
    barrier = threading.Barrier(len(who))

    def promote(r: Running, variant: str) -> None:
        with grpc.insecure_channel(_target(r)) as ch:
            stub = pb_grpc.AllocatorStub(ch)
            stub.GetExperiment(pb.GetExperimentRequest(experiment=name), timeout=5)  # connect
            barrier.wait()
            try:
                stub.Promote(
                    pb.PromoteRequest(experiment=name, variant=variant, reason="race"),
                    metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
                    timeout=10,
                )
                results[variant] = grpc.StatusCode.OK
            except grpc.RpcError as err:
                results[variant] = err.code()

    threads = [threading.Thread(target=promote, args=rv) for rv in who]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_leader_takes_over_the_pending_defaults_of_a_replica_that_is_gone(pg_url: str) -> None:
    """r1 issues decisions that await a default reward and stops for good (its id, like
    the default host:pid, never comes back). Its saved decisions are not orphaned: once
    its replica lock is free the leader, r2, takes them over and writes their defaults,
    each once."""
    r1, r2 = _replica(pg_url, "r1"), _replica(pg_url, "r2")
    try:
        with AllocatorClient(_target(r1), timeout=10) as c:
            c.create_experiment(
                pb.ExperimentSpec(
                    name="dr", variants=["a", "b"], default_reward=0.0, attribution_window_seconds=2
                )
            )
            c.assign_batch("dr", 4)
            c.assign("dr")
        wait_until(lambda: "dr" in r2.app.records, 5, "r2 to learn the experiment")
        wait_until(
            lambda: len(r1.app.store.pending_defaults("r1")) == 2, 5, "r1 to save its decisions"
        )
        r1.stop(grace=1.0)
        # r1's database sessions end a moment after it stops: until then it still holds
        # the leader lock (r1 started first) and its replica lock, and a pass of r2's,
        # not yet leader, would look at nothing.
        wait_until(
            lambda: r2.app.leader() and "r1" in r2.app.store.gone_replicas("r2"),
            10,
            "r1's locks to be released",
        )
        _adoption_pass(r2)  # r1 looks gone once: not yet taken
        assert r2.app._gone_before == {"r1"}
        assert len(r2.app.store.pending_defaults("r1")) == 2
        _adoption_pass(r2)  # and twice: taken
        wait_until(
            lambda: sum(r2.app.engine.view("dr").reward_counts) == 5, 20, "the defaults via r2"
        )
        wait_until(lambda: r2.app.store.pending_defaults("r2") == [], 5, "the written ones deleted")
        assert r2.app.store.pending_defaults("r1") == []
        time.sleep(0.5)  # more passes: still once
        assert sum(r2.app.engine.view("dr").reward_counts) == 5
    finally:
        r2.stop(grace=1.0)
        r1.stop(grace=1.0)


def _first_sync_done(r: Running) -> None:
    """Wait for the writer's start-up sync of experiments and rewards to have finished
    (with an hour's sync interval, the replica is stale from then on)."""
    wait_until(lambda: r.app.writer.housekeeping_passes >= 1, 10, "the start-up sync")


def _adoption_pass(r: Running) -> None:
    """Run the leader's adoption pass on the next writer tick, not in 30 s; wait for it to
    end (the next one is scheduled once a pass has finished)."""
    r.app._next_adoption = 0.0
    wait_until(lambda: r.app._next_adoption > 0.0, 5, "an adoption pass")


def test_a_replica_that_looks_gone_for_one_pass_keeps_its_pending_defaults(
    pg_url: str,
) -> None:
    """A replica's lock session can drop for a moment (a database restart) and be taken
    again on its next tick: a leader that saw it gone once must not take its rows. Gone
    on two passes in a row, they are taken."""
    r2 = _replica(pg_url, "r2")
    x = SqlStore.open(pg_url)  # plays replica "x": its rows, its lock
    try:
        with AllocatorClient(_target(r2), timeout=10) as c:
            c.create_experiment(pb.ExperimentSpec(name="dr", variants=["a", "b"]))
        exp = r2.app.get("dr").id
        rows = [
            PendingDefault(
                experiment_id=exp,
                key=f"k{i}",
                token=f"t{i}",
                issued_at=1.0 + i,
                epoch=0,
                batch=False,
                arms=(1,),
            )
            for i in range(3)
        ]
        x.save_pending_defaults("x", rows)
        _adoption_pass(r2)
        assert r2.app._gone_before == {"x"}  # no lock held: looks gone
        assert x.hold_replica_lock("x")  # back before the next pass
        _adoption_pass(r2)
        assert r2.app._gone_before == set()
        assert [p.key for p in x.pending_defaults("x")] == ["k0", "k1", "k2"]
        x.release_leader_lock()  # gone for good now
        _adoption_pass(r2)
        assert len(x.pending_defaults("x")) == 3
        _adoption_pass(r2)
        assert x.pending_defaults("x") == []
        assert [p.key for p in r2.app.store.pending_defaults("r2")] == ["k0", "k1", "k2"]
    finally:
        x.close()
        r2.stop(grace=1.0)


def test_lock_sessions_notice_a_vanished_peer_in_seconds(pg_url: str) -> None:
    """The server keeps a lock until it closes the holder's session; over TCP the lock
    sessions ask for keepalive probes after 10 s idle (not the kernel's two hours), so a
    replica whose host died frees its replica and leader locks in about 25 s."""
    store = SqlStore.open(pg_url)
    try:
        assert store.hold_replica_lock("k")
        conn = next(iter(store._leader_conns.values()))
        shown = {
            name: conn.execute(sa.text(f"SHOW {name}")).scalar()
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
        }
        assert shown == {
            "tcp_keepalives_idle": "10",
            "tcp_keepalives_interval": "5",
            "tcp_keepalives_count": "3",
        }
    finally:
        store.close()


def test_second_live_server_with_the_same_replica_id_is_refused(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica ids must be unique among running servers (the reward log is sequenced per
    id): a second one fails to start, naming the id, once the wait for the first one's
    lock runs out; after the first stops, the id is free again."""
    monkeypatch.setattr(app_module, "_REPLICA_LOCK_WAIT_S", 0.5)
    first = _replica(pg_url, "dup")
    try:
        with pytest.raises(ReplicaConflict, match="'dup'"):
            _replica(pg_url, "dup")
        assert first.app.store.hold_replica_lock("dup")  # still the first one's
    finally:
        first.stop(grace=1.0)
    _replica(pg_url, "dup").stop(grace=1.0)


def test_scores_pulled_after_a_promotion_go_to_the_window_of_their_receipt(
    pg_url: str,
) -> None:
    """r2 learns of the experiment only after r1 received its scored rewards and promoted
    it (r2 syncs once an hour; the test runs its sync and pull by hand). The scores were
    received before the promotion: they belong to the reference window, as a restart's
    rebuild from the log would put them, not to the current one r2 is filling now."""
    r2 = _replica(pg_url, "r2", sync_interval_s=3600.0)
    _first_sync_done(r2)
    r1 = _replica(pg_url, "r1")
    try:
        rng = np.random.default_rng(11)
        with AllocatorClient(_target(r1), admin_token=ADMIN_TOKEN, timeout=10) as c:
            c.create_experiment(pb.ExperimentSpec(name="d", variants=["a", "b"]))
            c.reward_batch(
                "d",
                [1.0] * 300,
                event_ids=[f"e{i}" for i in range(300)],
                variants=["b"] * 300,
                prediction_scores=rng.normal(0.5, 0.1, size=300).tolist(),
            )
            c.promote("d", "b", reason="test")
        assert "d" not in r2.app.records
        r2.app._sync_experiments()  # learns "d", already PROMOTED
        r2.app.writer.pull()  # then the backlog of its rewards
        assert r2.app.records["d"].scores.sizes() == {1: (300, 0)}
        assert r2.app.records["d"].scores.sizes() == r1.app.records["d"].scores.sizes()
    finally:
        r1.stop(grace=1.0)
        r2.stop(grace=1.0)


def test_monitor_restored_from_another_replicas_save_sees_each_reward_once(
    pg_url: str,
) -> None:
    """r1 promotes and its monitor saves a state covering 3,000 rewards; 2,000 more follow
    that it does not save. r2 (syncing by hand) learns of the promotion and restores that
    state before it has pulled any of those rewards: it must wait until its pull has
    passed the saved positions, then catch up on the rest. Fed the pulled rows on top of
    the restored state, it would count the first 3,000 twice."""
    r2 = _replica(pg_url, "r2", sync_interval_s=3600.0)
    _first_sync_done(r2)
    r1 = _replica(pg_url, "r1", promotion_interval_s=0.1)
    spec = pb.ExperimentSpec(
        name="m",
        variants=["a", "b"],
        monitoring=pb.MonitoringSettings(
            detector=pb.DRIFT_DETECTOR_CUSUM, on_regression=pb.REGRESSION_ACTION_NOTIFY_ONLY
        ),
    )
    try:
        with AllocatorClient(_target(r1), admin_token=ADMIN_TOKEN, timeout=10) as c:
            c.create_experiment(spec)
            c.promote("m", "b", reason="test")
            wait_until(lambda: "m" in r1.supervisor._watches, 5, "r1's monitor")

            def send(tag: str, n: int) -> None:
                c.reward_batch(
                    "m",
                    [1.0, 0.0] * (n // 2),
                    event_ids=[f"{tag}{i}" for i in range(n)],
                    variants=["b"] * n,
                )

            def r1_saved() -> float:
                raw = r1.app.store.get_meta(f"monitor:{r1.app.get('m').id}")
                return json.loads(raw)["state"]["promoted"]["stats"][0] if raw else 0.0

            send("x", 3000)
            wait_until(lambda: r1_saved() == 3000, 10, "r1 to save its monitor")
            r1.app.tick_hooks.remove(r1.supervisor.save_monitors)
            send("y", 2000)
        r2.app._sync_experiments()  # learns "m", PROMOTED
        rec = r2.app.records["m"]
        r2.supervisor._sync_watch(rec)
        r2.supervisor.activate_monitors()
        watch = r2.supervisor._watches["m"]
        assert not watch.active  # its pull is behind the saved positions
        r2.app.writer.pull()  # the 5,000 rewards: not fed to the inactive monitor
        r2.supervisor.activate_monitors()
        assert watch.active
        assert watch.monitor.state()["promoted"]["stats"][0] == 5000
    finally:
        r1.stop(grace=1.0)
        r2.stop(grace=1.0)


def test_stale_replica_promotion_is_aborted_and_refreshed(pg_url: str) -> None:
    """A replica that has not yet seen another's promotion cannot promote over it.

    r2 syncs only once an hour, so it is certainly stale; its Promote hits the version
    check, answers ABORTED, and r2 adopts the stored state at once (serving the winner).
    """
    r1 = _replica(pg_url, "r1")
    try:
        create_experiment(_target(r1))
        r2 = _replica(pg_url, "r2", sync_interval_s=3600.0)
        try:
            _first_sync_done(r2)  # else it may still learn of r1's promotion below
            assert r2.app.get(EXPERIMENT).lifecycle.state == State.RUNNING
            r1.app.transition(EXPERIMENT, Action.PROMOTE, actor="t", reason="r1 first", variant="b")
            with grpc.insecure_channel(_target(r2)) as ch:
                stub = pb_grpc.AllocatorStub(ch)
                with pytest.raises(grpc.RpcError) as err:
                    stub.Promote(
                        pb.PromoteRequest(experiment=EXPERIMENT, variant="c", reason="r2 late"),
                        metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
                        timeout=10,
                    )
                assert err.value.code() == grpc.StatusCode.ABORTED
                rec = r2.app.get(EXPERIMENT)
                assert rec.lifecycle.state == State.PROMOTED
                assert rec.config.variants[rec.lifecycle.champion or 0] == "b"
                got = {
                    stub.Assign(pb.AssignRequest(experiment=EXPERIMENT), timeout=5).variant
                    for _ in range(30)
                }
                assert got == {"b"}
            # A retry on r2 is now judged against the promoted state.
            with pytest.raises(WrongState, match="PROMOTED"):
                r2.app.transition(
                    EXPERIMENT, Action.PROMOTE, actor="t", reason="again", variant="c"
                )
            audit = r1.app.store.list_audit(r1.app.get(EXPERIMENT).id)
            assert [a.action for a in audit].count("PROMOTE") == 1
        finally:
            r2.stop(grace=1.0)
    finally:
        r1.stop(grace=1.0)


def test_killing_a_replica_loses_nothing(pg_url: str, tmp_path: Path) -> None:
    """kill -9 one of two replicas under load: its clients fail over, nothing is lost.

    Rewards r2 acknowledged before dying are in the log and reach r1 by replication;
    r2's unacknowledged batches are retried on r1. r2 then restarts under the same replica
    id, recovers and catches up: both serve identical counts, equal to what was sent, and
    the promotion leader lock is held by exactly one live replica throughout.
    """
    r1 = ServerProcess(pg_url, "r1", tmp_path)
    r2 = ServerProcess(pg_url, "r2", tmp_path)
    with server_processes(r1, r2):
        start_all(r1, r2)
        create_experiment(r1.target)
        wait_until(lambda: _has_experiment(r2.target), 10, "r2 to learn the experiment")
        senders = [
            RewardSender(r1.target, "k1", seed=21),
            RewardSender(r2.target, "k2", seed=22, stream=True),
        ]
        for s in senders:
            s.start()
        time.sleep(1.5)
        r2.kill()
        acked_by_r2 = {e: senders[1].snapshot().items[e] for e in senders[1].snapshot().status}
        assert acked_by_r2, "r2 acknowledged nothing before it died"
        senders[1].target = r1.target  # fail over
        wait_until(lambda: _leaders(pg_url) == 1, 10, "one leader after the kill")
        time.sleep(1.0)
        for s in senders:
            s.drain(timeout=60)
        ledger = merged(senders)
        check_ledger(ledger)
        assert_report_exact(r1.target, ledger)
        r2.start()
        want = expected_stats(ledger.items)
        wait_until(
            lambda: (
                reported_counts(report(r2.target))
                == ([int(x) for x in want[:, 0]], [int(x) for x in want[:, 1]])
            ),
            15,
            "restarted r2 to catch up",
        )
        assert reported_counts(report(r1.target)) == reported_counts(report(r2.target))
        assert _leaders(pg_url) == 1
        for r in (r1, r2):
            assert r.proc is not None
            r.proc.send_signal(signal.SIGTERM)
        assert (r1.terminate(), r2.terminate()) == (0, 0), "clean shutdown exits 0"
    assert_exact(ledger, recovered_state(pg_url))


def _has_experiment(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        try:
            pb_grpc.AllocatorStub(ch).GetExperiment(
                pb.GetExperimentRequest(experiment=EXPERIMENT), timeout=2
            )
        except grpc.RpcError:
            return False
    return True


def _experiments(store: SqlStore, names: str) -> tuple[dict[str, ExperimentConfig], dict[str, int]]:
    """One two-variant experiment per letter of ``names``: configs and store ids."""
    cfgs = {n: ExperimentConfig(name=n, variants=("x", "y"), seed=1) for n in names}
    ids = {n: store.create_experiment(n, "{}", "RUNNING", now=1.0).id for n in names}
    return cfgs, ids


def _recovered_writer(
    store: SqlStore,
    engine: Engine,
    known: dict[str, int],
    positions: dict[str, int],
    recovery: Recovery,
) -> RewardWriter:
    """Replica r2's writer, started where ``recovery`` left it (``known``: live ids)."""
    return RewardWriter(
        store,
        engine,
        "r2",
        Metrics(CollectorRegistry()),
        ids=lambda: known,
        positions=positions,
        skip_until=recovery.skip_until,
    )


def _log_rows(store: SqlStore, replica: str, ids: dict[str, int], names: str) -> None:
    """One reward (variant 1, value 1) per letter of ``names``, in that order."""
    store.append_rewards(
        replica,
        [
            RewardRow(
                dedup_key=f"{replica}-{i}-{time.monotonic_ns()}",
                experiment_id=ids[n],
                arm=1,
                value=1.0,
                epoch=0,
                received_at=2.0,
            )
            for i, n in enumerate(names)
        ],
    )


def _snapshot_of(cfg: ExperimentConfig, n: int) -> bytes:
    """The snapshot of ``cfg`` after ``n`` such rewards."""
    engine = Engine()
    engine.create(cfg)
    if n:
        engine.reward_batch(cfg.name, [1] * n, [1.0] * n, [0] * n)
    return engine.snapshot([cfg.name])[cfg.name].to_bytes()


def test_rows_recovery_left_to_the_writer_are_not_applied_twice(pg_url: str) -> None:
    """Recovery stops at the first row of an experiment it does not know yet (created by
    another replica after the listing), so positions of the log it has not passed stay at
    the smallest snapshot position. The writer resumes there: rows already inside a
    snapshot must still be skipped, or they count twice.

    Log of replica r1: A, A, A, Z (unknown at recovery), A, A, B. A's snapshot includes
    all five A rows (positions {r1: 6}); B has none, so replay starts at r1 = 0.
    (PostgreSQL only: on SQLite one process owns the log and nothing is pulled.)
    """
    store = SqlStore.open(pg_url)
    try:
        cfgs, ids = _experiments(store, "ABZ")
        _log_rows(store, "r1", ids, "AAAZAAB")
        store.save_snapshot(ids["A"], {"r1": 6}, _snapshot_of(cfgs["A"], 5), now=3.0)

        engine = Engine()
        known = {"A": ids["A"], "B": ids["B"]}
        recovery = Recovery(store, engine)
        positions = recovery.load(known, {"A": cfgs["A"], "B": cfgs["B"]})
        assert positions == {"r1": 3}  # stopped before Z's row
        engine.create(cfgs["Z"])  # what _sync_experiments does on the next tick
        known["Z"] = ids["Z"]
        writer = _recovered_writer(store, engine, known, positions, recovery)
        writer.pull()
        counts = {n: int(engine.view(n).stats[:, 0].sum()) for n in "ABZ"}
        assert counts == {"A": 5, "B": 1, "Z": 1}
        assert writer.skip_until == {}  # passed: later pulls skip nothing
    finally:
        store.close()


def test_recovery_replays_its_own_rows_even_when_it_stops_early(pg_url: str) -> None:
    """The replay stops at another replica's row of an experiment not listed yet; our
    own rows after it (ids sort after) must still be applied: the pull never reads our
    own id, so they would be lost for good (and the next snapshot would claim them)."""
    store = SqlStore.open(pg_url)
    try:
        cfgs, ids = _experiments(store, "AZ")
        _log_rows(store, "r1", ids, "Z")
        _log_rows(store, "r2", ids, "AAA")
        store.save_snapshot(ids["A"], {"r2": 1}, _snapshot_of(cfgs["A"], 1), now=3.0)
        engine = Engine()
        positions = Recovery(store, engine).load(
            {"A": ids["A"]}, {"A": cfgs["A"]}, own_replica="r2"
        )
        assert int(engine.view("A").stats[:, 0].sum()) == 3
        assert positions["r2"] == 3 and positions["r1"] == 0  # r1: the pull's, later
    finally:
        store.close()


def test_rows_of_an_experiment_created_during_recovery_are_not_lost(pg_url: str) -> None:
    """Recovery starts at the smallest snapshot position of the experiments it listed, so
    rows of one created meanwhile may lie before it; learning of the experiment applies
    those (up to the pull's positions), the pull the rest: each once."""
    store = SqlStore.open(pg_url)
    try:
        cfgs, ids = _experiments(store, "AE")
        _log_rows(store, "r1", ids, "EEA")
        store.save_snapshot(ids["A"], {"r1": 3}, _snapshot_of(cfgs["A"], 1), now=3.0)
        engine = Engine()
        recovery = Recovery(store, engine)
        positions = recovery.load({"A": ids["A"]}, {"A": cfgs["A"]}, own_replica="r2")
        assert positions == {"r1": 3}
        _log_rows(store, "r1", ids, "E")  # logged after: the pull's
        known = {"A": ids["A"]}
        writer = _recovered_writer(store, engine, known, positions, recovery)
        engine.create(cfgs["E"])  # _sync_experiments learns of E
        known["E"] = ids["E"]
        behind = replay_new_experiment(store, engine, ids["E"], "E", writer.positions)
        assert [r.replica_seq for r in behind] == [1, 2]
        writer.pull()
        counts = {n: int(engine.view(n).stats[:, 0].sum()) for n in "AE"}
        assert counts == {"A": 1, "E": 3}
    finally:
        store.close()


def test_replica_recovering_while_another_creates_an_experiment_skips_nothing(
    pg_url: str,
) -> None:
    """Rows of an experiment created after a recovering replica listed the experiments.

    The recovering replica must stop its log positions before the first row it cannot
    apply yet; once it has loaded the new experiment, pulling resumes there and every
    row of both experiments is counted once.
    """
    r1 = _replica(pg_url, "r1")
    try:
        create_experiment(_target(r1))
        listed = {row.name: row for row in r1.app.store.list_experiments()}
        create_experiment(_target(r1), name="late")
        for name, keys, arm in ((EXPERIMENT, "abc", 0), ("late", "de", 1), (EXPERIMENT, "fghi", 2)):
            r1.app.reward(
                experiment=name,
                values=[1.0] * len(keys),
                event_ids=list(keys),
                variant_indices=[arm] * len(keys),
            )
        store = SqlStore.open(pg_url)
        try:
            engine = Engine()
            rec = r1.app.get(EXPERIMENT)
            ids = {EXPERIMENT: listed[EXPERIMENT].id}
            positions = Recovery(store, engine).load(ids, {EXPERIMENT: rec.config})
            # Only the rows before the unknown experiment's first row are applied so far.
            np.testing.assert_array_equal(engine.view(EXPERIMENT).stats[:, 0], [3, 0, 0])
            late = r1.app.get("late")
            engine.create(late.config)  # what _sync_experiments does on the next tick
            ids["late"] = late.id
            writer = RewardWriter(
                store,
                engine,
                "r2",
                Metrics(CollectorRegistry()),
                ids=lambda: ids,
                positions=positions,
            )
            assert writer.pull() == 6
            np.testing.assert_array_equal(engine.view(EXPERIMENT).stats[:, 0], [3, 0, 4])
            np.testing.assert_array_equal(engine.view("late").stats[:, 0], [0, 2, 0])
        finally:
            store.close()
    finally:
        r1.stop(grace=1.0)

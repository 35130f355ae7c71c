"""Default rewards for decisions that got none within their attribution window."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from allocator_client import AllocatorClient
from allocator_client.v1 import allocator_pb2 as pb
from prometheus_client import CollectorRegistry

from allocator.defaults import _DUE_CHUNK, DefaultRewards, Pending
from allocator.server import create_server
from tests.conftest import server_config, wait_until
from tests.test_durability import ServerProcess, server_processes


def _counts(report: pb.GetReportResponse) -> list[tuple[int, float]]:
    return [
        (v.rewards, round(v.mean * v.rewards, 6) if v.rewards else 0.0) for v in report.variants
    ]


def test_unrewarded_decisions_get_the_default_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.sqlite'}"
    config = server_config(url, promotion_interval_s=0.1)
    running = create_server(config, registry=CollectorRegistry())
    try:
        with AllocatorClient(f"127.0.0.1:{running.port}", timeout=10) as c:
            c.create_experiment(
                pb.ExperimentSpec(
                    name="dr",
                    variants=["a", "b"],
                    seed=3,
                    default_reward=0.0,
                    attribution_window_seconds=2,
                )
            )
            c.create_experiment(pb.ExperimentSpec(name="off", variants=["a", "b"]))
            c.assign_batch("off", 10)
            # Rewarded at once: within the 2 s window even on a starved machine.
            b = c.assign_batch("dr", 10)
            answered = c.reward_batch("dr", [1.0] * 3, batch_token=b.batch_token, indices=[0, 1, 2])
            assert answered.accepted == 3
            single = c.assign("dr")
            # Window 2 s + grace 0.1 s + a supervisor pass.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if sum(v.rewards for v in c.get_report("dr").variants) == 11:
                    break
                time.sleep(0.1)
            rep = c.get_report("dr")
            assert sum(v.rewards for v in rep.variants) == 11
            # Only the three real conversions are ones: the 8 others got the default 0.
            assert sum(v.mean * v.rewards for v in rep.variants) == 3.0
            arms = np.bincount(np.array([*b.variant_indices, single.variant_index]), minlength=2)
            assert [v.rewards for v in rep.variants] == arms.tolist()
            # A real reward after the window is expired, not counted over the default.
            assert c.reward(single.decision_id, 1.0) == pb.REWARD_STATUS_EXPIRED
            assert sum(v.rewards for v in c.get_report("off").variants) == 0
            before = _counts(rep)
    finally:
        running.stop(1.0)
    again = create_server(config, registry=CollectorRegistry())
    try:
        with AllocatorClient(f"127.0.0.1:{again.port}", timeout=10) as c:
            assert _counts(c.get_report("dr")) == before
    finally:
        again.stop(1.0)


@pytest.mark.parametrize("new_id", [False, True], ids=["same-replica-id", "new-replica-id"])
def test_pending_defaults_survive_kill_9(tmp_path: Path, new_id: bool) -> None:
    """Decisions issued before a SIGKILL still get their default after the restart: the
    tracker's entries are in the store (a batch and three single decisions), reloaded at
    start-up, and deleted once their defaults are committed. Real rewards stay counted once.
    A restart under another replica id (the default id is host:pid) takes them over."""
    db = tmp_path / "k.sqlite"
    server = ServerProcess(f"sqlite:///{db}", "dflt", tmp_path)

    def saved() -> int:
        # Read beside the running server (WAL); SqlStore would need its lock.
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return int(conn.execute("SELECT count(*) FROM pending_defaults").fetchone()[0])

    def rewards(c: AllocatorClient) -> tuple[int, float]:
        variants = c.get_report("dr").variants
        return sum(v.rewards for v in variants), sum(v.mean * v.rewards for v in variants)

    with server_processes(server):
        server.start()
        with AllocatorClient(server.target, timeout=10) as c:
            c.create_experiment(
                pb.ExperimentSpec(
                    name="dr", variants=["a", "b"], default_reward=0.0, attribution_window_seconds=2
                )
            )
            b = c.assign_batch("dr", 10)
            for _ in range(3):
                c.assign("dr")
            c.reward_batch("dr", [1.0, 1.0], batch_token=b.batch_token, indices=[0, 1])
        wait_until(lambda: saved() == 4, 10, "the pending decisions to be saved")
        server.kill()
        if new_id:
            server.replica_id = "dflt-restarted"
        server.start()
        with AllocatorClient(server.target, timeout=10) as c:
            wait_until(lambda: rewards(c)[0] == 13, 20, "the defaults after the restart")
            assert rewards(c) == (13, 2.0)  # 11 defaults of 0, the two real ones of 1
        wait_until(lambda: saved() == 0, 10, "the written entries to be deleted")


def test_default_reward_is_validated(tmp_path: Path) -> None:
    import grpc
    import pytest

    running = create_server(
        server_config(f"sqlite:///{tmp_path / 'v.sqlite'}"), registry=CollectorRegistry()
    )
    try:
        with AllocatorClient(f"127.0.0.1:{running.port}", timeout=5) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.create_experiment(
                    pb.ExperimentSpec(name="x", variants=["a", "b"], default_reward=2.0)
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "spec.default_reward" in err.value.details()
    finally:
        running.stop(1.0)


def test_tracker_is_bounded_and_pops_in_order() -> None:
    tracker = DefaultRewards(max_entries=5)
    arms = np.zeros(3, dtype=np.int64)
    tracker.track(Pending("e", 1.0, "t1", arms, 0, True))
    tracker.track(Pending("e", 2.0, "t2", arms, 0, True))
    assert tracker.size == 3 and tracker.dropped == 3
    assert [p.token for p in tracker.due(lambda _: 1.5)] == ["t1"]
    assert tracker.size == 0 and tracker.due(lambda _: 10.0) == []


def test_tracker_reports_what_the_store_must_save_and_delete() -> None:
    """New entries are to be saved (reloaded ones are not), finished ones deleted by key, a
    forgotten experiment's too; what failed to be written is given again, first."""
    tracker = DefaultRewards()
    one = np.zeros(1, dtype=np.int64)
    a, b, c = (Pending("e", float(i), f"t{i}", one, 0, False) for i in range(3))
    tracker.track(a)
    tracker.track(b, saved=True)
    assert tracker.take_writes() == ([a], [])
    assert tracker.take_writes() == ([], [])
    tracker.track(c)
    assert tracker.due(lambda _: 0.5) == [a]  # its window passed; its default committed:
    tracker.done([a])
    unsaved, done = tracker.take_writes()
    assert (unsaved, done) == ([c], [a.key])
    tracker.restore_writes(unsaved, done)  # the store was down
    tracker.forget("e")
    assert tracker.take_writes() == ([c], [a.key, b.key, c.key])  # b, c still queued
    assert len({a.key, b.key, c.key}) == 3 and len(a.key) == 32


def test_adopted_entries_are_merged_in_issue_order_past_the_bound() -> None:
    """Entries taken over from a stopped replica are older than what is queued: merged by
    issue time they are due first, not stuck behind newer ones; they are saved already
    (nothing to write) and tracked even beyond the bound."""
    one = np.zeros(1, dtype=np.int64)

    def entry(name: str, t: float) -> Pending:
        return Pending(name, t, f"{name}{t}", one, 0, False)

    d = DefaultRewards(max_entries=2)
    for t in (10.0, 30.0):
        d.track(entry("e", t))
    d.take_writes()
    d.adopt([entry("e", 20.0), entry("e", 5.0), entry("f", 1.0)])
    assert d.size == 5
    assert d.take_writes() == ([], [])
    assert [p.issued_at for p in d.due(lambda name: 25.0)] == [5.0, 10.0, 20.0, 1.0]
    assert d.size == 1


def test_retried_entry_is_due_again_at_once_even_when_full() -> None:
    """An entry whose default failed to be written goes back to the front: it is due on the
    next pass, not after the newer entries behind it, and the bound does not drop it."""
    tracker = DefaultRewards(max_entries=2)
    one = np.zeros(1, dtype=np.int64)
    old, new, newer = (Pending("e", t, f"t{t}", one, 0, False) for t in (1.0, 5.0, 6.0))
    tracker.track(old)
    tracker.track(new)
    assert tracker.due(lambda _: 2.0) == [old]
    tracker.track(newer)  # fills the tracker again
    tracker.retry(old)
    assert tracker.size == 3 and tracker.dropped == 0
    assert tracker.due(lambda _: 2.0) == [old]


def test_due_pops_across_lock_chunks_in_order() -> None:
    # More entries than one lock hold pops (_DUE_CHUNK), over two experiments, with the
    # cutoff inside the run: everything before it comes out once, in order; the rest stays.
    n = 2 * _DUE_CHUNK + 7
    tracker = DefaultRewards()
    one = np.zeros(1, dtype=np.int64)
    for i in range(n):
        tracker.track(Pending("a", float(i), f"a{i}", one, 0, False))
        tracker.track(Pending("b", float(i), f"b{i}", one, 0, False))
    cutoff = {"a": float(n - 3), "b": float(_DUE_CHUNK)}
    out = tracker.due(lambda name: cutoff[name])
    assert [p.token for p in out if p.experiment == "a"] == [f"a{i}" for i in range(n - 3)]
    assert [p.token for p in out if p.experiment == "b"] == [f"b{i}" for i in range(_DUE_CHUNK)]
    assert tracker.size == 3 + (n - _DUE_CHUNK)


def test_a_default_waits_out_the_grace_a_late_real_reward_may_need(tmp_path: Path) -> None:
    """With a short window the grace is --default-grace-s (35 s by default), not 10% of
    the window: a real reward checked just inside it has that long to commit first."""
    config = server_config(
        f"sqlite:///{tmp_path / 'g.sqlite'}", default_grace_s=35.0, promotion_interval_s=3600.0
    )
    running = create_server(config, registry=CollectorRegistry())
    try:
        app = running.app
        app.create(
            pb.ExperimentSpec(
                name="dr", variants=["a", "b"], default_reward=0.0, attribution_window_seconds=2
            )
        )
        start = app.clock()
        app.assign("dr")
        for later, due in ((2 + 34.0, 0), (2 + 36.0, 1)):
            app.clock = lambda later=later: start + later  # type: ignore[misc]
            assert app.apply_defaults() == due
    finally:
        running.stop(1.0)

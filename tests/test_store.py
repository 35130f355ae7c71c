"""Tests for allocator.store on SQLite and on a real PostgreSQL (fresh database per test).

Needs the fixtures of tests/conftest_pg.py (registered as a plugin by tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy import exc as sa_exc

from allocator.store import (
    MIGRATIONS_DIR,
    AllocationEpoch,
    AlreadyExists,
    AssignmentCount,
    AuditRecord,
    EventRecord,
    NotFound,
    PendingDefault,
    ReplicaConflict,
    RewardColumns,
    RewardRow,
    SchemaTooNew,
    SqlStore,
    Store,
    StoreConfig,
    StoreLocked,
    StoreUnavailable,
    VersionConflict,
    metadata,
    normalize_url,
)

HEAD = "0003"


@pytest.fixture
def store(any_store_url: str) -> Iterator[SqlStore]:
    s = SqlStore.open(any_store_url)
    yield s
    s.close()


def _reward(key: str, experiment_id: int, arm: int = 0, value: float = 1.0) -> RewardRow:
    return RewardRow(
        dedup_key=key, experiment_id=experiment_id, arm=arm, value=value, epoch=0, received_at=5.0
    )


def _new_experiment(store: SqlStore, name: str = "exp") -> int:
    return store.create_experiment(name, '{"arms": 2}', "RUNNING", now=1.0).id


# ---------------------------------------------------------------- schema and opening


def test_fresh_database_is_migrated_to_head(any_store_url: str) -> None:
    with SqlStore.open(any_store_url):
        pass
    engine = sa.create_engine(normalize_url(any_store_url))
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == HEAD
            tables = set(sa.inspect(conn).get_table_names())
            # The hand-written migration and the query-side Table objects must agree.
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert tables >= {"experiments", "rewards", "assignment_counts", "snapshots", "meta"}
    assert diffs == []


def test_database_of_an_older_revision_is_upgraded_keeping_its_rows(any_store_url: str) -> None:
    """A database left at 0002 (before the scored-rewards index) gains the index on open."""
    with SqlStore.open(any_store_url) as s:
        exp = _new_experiment(s)
        s.append_rewards("r", [_reward("k1", exp)])
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = sa.create_engine(normalize_url(any_store_url))

    def indexes() -> set[str]:
        with engine.connect() as conn:
            return {str(i["name"]) for i in sa.inspect(conn).get_indexes("rewards")}

    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
        assert "ix_rewards_scored" not in indexes()
        with SqlStore.open(any_store_url) as s:
            assert len(s.rewards_since({})) == 1
        assert "ix_rewards_scored" in indexes()
    finally:
        engine.dispose()


def test_reopening_keeps_data(any_store_url: str) -> None:
    with SqlStore.open(any_store_url) as s:
        _new_experiment(s)
    with SqlStore.open(any_store_url) as s:
        assert [e.name for e in s.list_experiments()] == ["exp"]


def test_unknown_newer_revision_is_refused(any_store_url: str) -> None:
    with SqlStore.open(any_store_url):
        pass
    engine = sa.create_engine(normalize_url(any_store_url))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_from_future'"))
    engine.dispose()
    with pytest.raises(SchemaTooNew) as info:
        SqlStore.open(any_store_url)
    assert info.value.db_revision == "0099_from_future"
    assert info.value.code_head == HEAD
    assert "0099_from_future" in str(info.value)
    assert repr(HEAD) in str(info.value)


def test_sqlite_pragmas_make_commits_durable(tmp_path: Path) -> None:
    # Private access on purpose: the pragmas are per connection, so ask the store's own.
    with (
        SqlStore.open(f"sqlite:///{tmp_path / 'a.sqlite'}") as s,
        s._engine.connect() as conn,
    ):
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_sqlite_second_opener_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.sqlite'}"
    first = SqlStore.open(url)
    with pytest.raises(StoreLocked) as info:
        SqlStore.open(url)
    assert info.value.path == str(tmp_path / "a.sqlite")
    assert f"pid {os.getpid()}" in str(info.value)
    assert "PostgreSQL" in str(info.value)
    first.close()
    SqlStore.open(url).close()  # released on close


def test_sqlite_lock_is_freed_when_holder_is_killed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.sqlite'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", _CHILD_HOLD.format(url=url)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"open"
        with pytest.raises(StoreLocked):
            SqlStore.open(url)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    SqlStore.open(url).close()


_CHILD_HOLD = textwrap.dedent(
    """
    import sys, time
    from allocator.store import SqlStore
    store = SqlStore.open("{url}")
    print("open", flush=True)
    time.sleep(60)
    """
)


def test_acknowledged_rewards_survive_kill_9(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.sqlite'}"
    with SqlStore.open(url) as s:
        exp = _new_experiment(s)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_APPEND.format(url=url, exp=exp)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert child.stdout is not None
        acked = int(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)  # right after the acknowledgement, mid-run
        child.wait(timeout=30)
    with SqlStore.open(url) as s:
        logged = s.rewards_since({}, limit=100_000)
    assert len(logged) >= acked == 500


_CHILD_APPEND = textwrap.dedent(
    """
    from allocator.store import RewardRow, SqlStore
    store = SqlStore.open("{url}")
    n = 0
    while True:
        rows = [RewardRow(dedup_key=f"k{{n + i}}", experiment_id={exp}, arm=0, value=1.0,
                          epoch=0, received_at=0.0) for i in range(100)]
        n += sum(store.append_rewards("r1", rows))
        if n == 500:
            print(n, flush=True)
    """
)


def test_postgres_unreachable_raises_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable) as info:
        SqlStore.open("postgresql+psycopg://postgres@127.0.0.1:1/none")
    assert info.value.operation == "open"
    assert "127.0.0.1" in str(info.value)
    assert isinstance(info.value, ConnectionError)


@pytest.mark.postgres
def test_postgres_going_away_raises_store_unavailable(pg_url: str) -> None:
    s = SqlStore.open(pg_url)
    s._engine.dispose()
    # Repoint the pool at a closed port: every new connection attempt is refused.
    s._engine = sa.create_engine(
        normalize_url(pg_url).set(port=1), pool_pre_ping=True, connect_args={"connect_timeout": 1}
    )
    with pytest.raises(StoreUnavailable):
        s.get_experiment("x")
    with pytest.raises(StoreUnavailable):
        s.ping()
    with pytest.raises(StoreUnavailable):
        s.append_rewards("r1", [_reward("k", 1)])
    with pytest.raises(StoreUnavailable):
        s.try_leader_lock(1)
    s.close()


def test_sqlite_missing_directory_raises_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="lock file"):
        SqlStore.open(f"sqlite:///{tmp_path / 'missing' / 'a.sqlite'}")


def test_in_memory_sqlite_works() -> None:
    with SqlStore.open("sqlite://") as s:
        exp = _new_experiment(s)
        assert s.append_rewards("r", [_reward("a", exp)]) == [True]


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("sqlite:///x.db", "sqlite"),
    ],
)
def test_normalize_url(url: str, driver: str) -> None:
    assert normalize_url(url).drivername == driver


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "mysql://u@h/db"},
        {"url": "sqlite://", "busy_timeout_seconds": -1},
        {"url": "sqlite://", "connect_timeout_seconds": 0},
        {"url": "sqlite://", "pool_size": 0},
        {"url": "sqlite://", "snapshots_kept": 0},
    ],
)
def test_store_config_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        StoreConfig(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- experiments


def test_experiment_crud(store: SqlStore) -> None:
    created = store.create_experiment("a", '{"k": 1}', "RUNNING", now=10.0)
    assert (created.version, created.champion, created.created_at) == (1, None, 10.0)
    assert type(created.created_at) is float
    store.create_experiment("b", "{}", "PAUSED", now=11.0)
    with pytest.raises(AlreadyExists) as info:
        store.create_experiment("a", "{}", "RUNNING", now=12.0)
    assert info.value.name == "a"
    assert "already exists" in str(info.value)
    assert store.get_experiment("a") == created
    assert store.get_experiment_by_id(created.id) == created
    assert store.get_experiment("zzz") is None
    assert store.get_experiment_by_id(999) is None
    assert [e.name for e in store.list_experiments()] == ["a", "b"]
    assert [e.name for e in store.list_experiments(states={"PAUSED"})] == ["b"]


def test_update_state_is_compare_and_set(store: SqlStore) -> None:
    exp = store.create_experiment("a", "{}", "RUNNING", now=1.0)
    audit = AuditRecord(
        experiment_id=None,
        action="promote",
        actor="ops",
        at=2.0,
        from_state="RUNNING",
        to_state="PROMOTED",
        reason="P(best)=0.97",
    )
    event = EventRecord(experiment_id=None, type="PROMOTED", at=2.0, variant=1)
    updated = store.update_state(
        "a",
        state="PROMOTED",
        champion=1,
        lifecycle_json='{"x": 1}',
        expected_version=1,
        now=2.0,
        audit=audit,
        events=[event],
    )
    assert (updated.state, updated.champion, updated.version) == ("PROMOTED", 1, 2)
    assert updated.updated_at == 2.0 and updated.created_at == 1.0
    assert [a.reason for a in store.list_audit(exp.id)] == ["P(best)=0.97"]
    assert [(e.type, e.experiment_id) for e in store.events_after(0)] == [("PROMOTED", exp.id)]

    with pytest.raises(VersionConflict) as info:
        store.update_state(
            "a",
            state="RUNNING",
            champion=None,
            lifecycle_json="{}",
            expected_version=1,
            now=3.0,
            audit=audit,
            events=[event],
        )
    assert (info.value.expected, info.value.actual) == (1, 2)
    # Nothing of the refused transition was written.
    assert store.get_experiment("a") == updated
    assert len(store.list_audit()) == 1
    assert len(store.events_after(0)) == 1

    with pytest.raises(NotFound):
        store.update_state(
            "nope",
            state="RUNNING",
            champion=None,
            lifecycle_json="{}",
            expected_version=1,
            now=3.0,
        )


def test_update_state_can_replace_config(store: SqlStore) -> None:
    store.create_experiment("a", '{"v": 1}', "RUNNING", now=1.0)
    updated = store.update_state(
        "a",
        state="RUNNING",
        champion=None,
        lifecycle_json="{}",
        expected_version=1,
        now=2.0,
        config_json='{"v": 2}',
    )
    assert updated.config_json == '{"v": 2}'


# ---------------------------------------------------------------- reward log


def test_duplicates_within_and_across_batches_count_once(store: SqlStore) -> None:
    exp = _new_experiment(store)
    first = store.append_rewards("r1", [_reward(k, exp) for k in ["a", "b", "a", "c", "b"]])
    assert first == [True, True, False, True, False]
    second = store.append_rewards("r1", [_reward(k, exp) for k in ["c", "d", "a", "d"]])
    assert second == [False, True, False, False]
    assert store.append_rewards("r2", [_reward("d", exp)]) == [False]  # other replica too
    logged = store.rewards_since({})
    assert sorted(r.dedup_key for r in logged) == ["a", "b", "c", "d"]
    seqs = [r.replica_seq for r in logged]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4


def test_large_batch_with_interleaved_duplicates(store: SqlStore) -> None:
    # > 1000 rows crosses SQLAlchemy's insertmanyvalues page size: RETURNING must still
    # report every page.
    exp = _new_experiment(store)
    store.append_rewards("r1", [_reward(f"k{i}", exp) for i in range(0, 5000, 2)])
    rows = [_reward(f"k{i}", exp) for i in range(5000)]
    assert store.append_rewards("r1", rows) == [i % 2 == 1 for i in range(5000)]
    assert len(store.rewards_since({}, limit=10_000)) == 5000


def test_dedup_survives_reopen(any_store_url: str) -> None:
    with SqlStore.open(any_store_url) as s:
        exp = _new_experiment(s)
        assert s.append_rewards("r1", [_reward("a", exp), _reward("b", exp)]) == [True, True]
    with SqlStore.open(any_store_url) as s:
        assert s.append_rewards("r1", [_reward("b", exp), _reward("c", exp)]) == [False, True]
        logged = s.rewards_since({})
    # The sequence resumes after the stored maximum (a skipped duplicate may leave a gap).
    assert [r.dedup_key for r in logged] == ["a", "b", "c"]
    assert logged[2].replica_seq > logged[1].replica_seq == 2


def test_logged_reward_round_trips_all_fields(store: SqlStore) -> None:
    exp = _new_experiment(store)
    row = RewardRow(
        dedup_key="k",
        experiment_id=exp,
        arm=3,
        value=0.25,
        epoch=7,
        received_at=123.5,
        prediction_score=0.9,
        guardrails_json='{"latency_ms": 12}',
    )
    store.append_rewards("r1", [row])
    [logged] = store.rewards_since({})
    assert (logged.replica_id, logged.replica_seq) == ("r1", 1)
    assert RewardRow(**{f: getattr(logged, f) for f in RewardRow.__dataclass_fields__}) == row


def _columns(
    keys: list[str], experiment_id: int, guardrails_json: list[str | None] | None = None
) -> RewardColumns:
    n = len(keys)
    arms = [i % 2 for i in range(n)]
    return RewardColumns.of(
        experiment_id,
        keys,
        arms,
        [0.5] * n,
        [0] * n,
        received_at=5.0,
        guardrails_json=guardrails_json,
    )


def test_columns_count_duplicates_like_rows(store: SqlStore) -> None:
    exp = _new_experiment(store)
    first = store.append_rewards("r1", _columns(["a", "b", "a", "c", "b"], exp))
    assert first == [True, True, False, True, False]
    second = store.append_rewards("r1", [_reward(k, exp) for k in ["c", "d", "a", "d"]])
    assert second == [False, True, False, False]
    assert store.append_rewards("r2", _columns(["d", "e"], exp)) == [False, True]
    logged = store.rewards_since({})
    assert [r.dedup_key for r in logged] == ["a", "b", "c", "d", "e"]
    assert [r.arm for r in logged[:3]] == [0, 1, 1]  # first occurrences' columns


def test_columns_round_trip_scores_and_guardrails(store: SqlStore) -> None:
    exp = _new_experiment(store)
    cols = RewardColumns(
        ["k0", "k1"],
        np.array([exp, exp]),
        np.array([3, 1]),
        np.array([0.25, 1e-300]),
        np.array([7, 8]),
        np.array([123.5, 124.5]),
        np.array([0.9, np.nan]),  # NaN: no score, stored as NULL
        ['{"latency_ms": 12}', None],
    )
    assert store.append_rewards("r1", cols) == [True, True]
    logged = store.rewards_since({})
    as_rows = [
        RewardRow(**{f: getattr(r, f) for f in RewardRow.__dataclass_fields__}) for r in logged
    ]
    assert as_rows == [
        RewardRow(
            dedup_key="k0",
            experiment_id=exp,
            arm=3,
            value=0.25,
            epoch=7,
            received_at=123.5,
            prediction_score=0.9,
            guardrails_json='{"latency_ms": 12}',
        ),
        RewardRow(
            dedup_key="k1", experiment_id=exp, arm=1, value=1e-300, epoch=8, received_at=124.5
        ),
    ]


def test_columns_take_concat_and_from_rows_agree() -> None:
    rows = [_reward(f"k{i}", 1, arm=i % 3, value=i / 10) for i in range(6)]
    cols = RewardColumns.from_rows(rows)
    assert cols.guardrails_json is None and np.isnan(cols.scores).all()
    parts = [cols.take(np.array([0, 1])), cols.take(np.array([2, 3, 4, 5]))]
    joined = RewardColumns.concat(parts)
    assert joined.keys == cols.keys
    np.testing.assert_array_equal(joined.arms, cols.arms)
    np.testing.assert_array_equal(joined.values, cols.values)
    picked = cols.take(np.array([4, 1]))
    assert picked.keys == ["k4", "k1"] and picked.arms.tolist() == [1, 1]
    guarded = RewardColumns.concat([parts[0], _columns(["g"], 1, guardrails_json=["{}"])])
    assert guarded.guardrails_json == [None, None, "{}"]


def test_columns_of_unequal_length_are_rejected() -> None:
    with pytest.raises(ValueError, match="arms must have shape"):
        RewardColumns.of(1, ["a", "b"], [0], [1.0, 1.0], [0, 0], received_at=0.0)
    with pytest.raises(ValueError, match="guardrails_json must have 2 items"):
        _columns(["a", "b"], 1, guardrails_json=["{}"])


def test_columns_with_bad_keys_are_rejected(store: SqlStore) -> None:
    exp = _new_experiment(store)
    with pytest.raises(ValueError, match="dedup_key"):
        store.append_rewards("r1", _columns(["ok", ""], exp))
    with pytest.raises(ValueError, match="dedup_key"):
        store.append_rewards("r1", _columns(["x" * 129], exp))
    assert store.rewards_since({}) == []


def test_rewards_since_with_two_replicas(store: SqlStore) -> None:
    exp = _new_experiment(store)
    other = _new_experiment(store, "other")
    store.append_rewards("r1", [_reward(f"a{i}", exp) for i in range(3)])
    store.append_rewards("r2", [_reward(f"b{i}", exp) for i in range(2)])
    store.append_rewards("r1", [_reward("a3", other)])

    def keys(**kw: object) -> list[tuple[str, int]]:
        return [(r.replica_id, r.replica_seq) for r in store.rewards_since(**kw)]  # type: ignore[arg-type]

    everything = [("r1", 1), ("r1", 2), ("r1", 3), ("r1", 4), ("r2", 1), ("r2", 2)]
    assert keys(positions={}) == everything
    assert keys(positions={"r1": 2}) == [("r1", 3), ("r1", 4), ("r2", 1), ("r2", 2)]
    assert keys(positions={"r1": 4, "r2": 1}) == [("r2", 2)]
    assert keys(positions={}, exclude_replica="r1") == [("r2", 1), ("r2", 2)]
    assert keys(positions={"r2": 0}, exclude_replica="r2") == everything[:4]
    assert keys(positions={}, experiment_id=other) == [("r1", 4)]
    assert keys(positions={}, limit=2) == everything[:2]
    assert store.replica_positions() == {"r1": 4, "r2": 2}
    with pytest.raises(ValueError):
        store.rewards_since({}, limit=0)


def test_recent_scores_by_variant_span_and_log_position(store: SqlStore) -> None:
    exp = _new_experiment(store)
    other = _new_experiment(store, "other")

    def scored(key: str, arm: int, at: float, score: float | None, e: int = exp) -> RewardRow:
        return RewardRow(
            dedup_key=key,
            experiment_id=e,
            arm=arm,
            value=1.0,
            epoch=0,
            received_at=at,
            prediction_score=score,
        )

    # Arm 0: scores 0.0 .. 0.9 at t = 0 .. 9; arm 1: one score at t = 5 and one unscored.
    store.append_rewards("r1", [scored(f"a{t}", 0, float(t), t / 10) for t in range(10)])
    store.append_rewards("r2", [scored("b5", 1, 5.0, 0.55), scored("b6", 1, 6.0, None)])
    store.append_rewards("r1", [scored("o", 0, 3.0, 9.9, e=other)])
    everything = store.replica_positions()
    inf = float("inf")

    def scores(spans: list[tuple[float, float]], per_arm: int = 100, **pos: int) -> object:
        return store.recent_scores(exp, 2, spans, per_arm, pos or everything)

    assert scores([(-inf, inf)]) == {0: [t / 10 for t in range(10)], 1: [0.55]}
    # [start, end): 3 is in, 7 is out; two spans merge in time order.
    assert scores([(7.0, inf), (3.0, 5.0)]) == {0: [0.3, 0.4, 0.7, 0.8, 0.9]}
    # The most recent per_arm of all the spans together.
    assert scores([(0.0, 2.0), (8.0, inf)], per_arm=3) == {0: [0.1, 0.8, 0.9]}
    # Only rows at or before the positions: r2 not applied yet, r1 up to seq 4 (t = 3).
    assert scores([(-inf, inf)], r1=4) == {0: [0.0, 0.1, 0.2, 0.3]}
    assert store.recent_scores(exp, 2, [(-inf, inf)], 100, {}) == {}


def test_recent_rewards_are_each_replicas_latest_of_the_experiment(store: SqlStore) -> None:
    exp = _new_experiment(store)
    other = _new_experiment(store, "other")
    store.append_rewards("r1", [_reward(f"a{i}", exp, arm=i % 2, value=float(i)) for i in range(6)])
    store.append_rewards("r2", [_reward(f"b{i}", exp, value=100.0 + i) for i in range(3)])
    store.append_rewards("r1", [_reward("o", other, value=-1.0)])  # another experiment's
    got = store.recent_rewards(exp, ["r1", "r2", "r3"], per_replica=4)
    # r1's last four of this experiment (newest first), r2's three; r3 has none.
    at = 5.0  # _reward's received_at
    assert got == {
        "r1": [(1, 5.0, at), (0, 4.0, at), (1, 3.0, at), (0, 2.0, at)],
        "r2": [(0, 102.0, at), (0, 101.0, at), (0, 100.0, at)],
    }
    assert store.recent_rewards(exp, [], per_replica=4) == {}
    with pytest.raises(ValueError, match="per_replica"):
        store.recent_rewards(exp, ["r1"], per_replica=0)


def test_paging_with_positions_reads_every_row_once(store: SqlStore) -> None:
    exp = _new_experiment(store)
    for replica in ("r1", "r2", "r3"):
        store.append_rewards(replica, [_reward(f"{replica}-{i}", exp) for i in range(7)])
    positions: dict[str, int] = {}
    seen: list[str] = []
    while page := store.rewards_since(positions, limit=4):
        seen += [r.dedup_key for r in page]
        for r in page:
            positions[r.replica_id] = r.replica_seq
    assert sorted(seen) == sorted(f"r{j}-{i}" for j in (1, 2, 3) for i in range(7))


def test_bad_reward_arguments(store: SqlStore) -> None:
    exp = _new_experiment(store)
    with pytest.raises(ValueError):
        store.append_rewards("", [_reward("a", exp)])
    with pytest.raises(ValueError):
        store.append_rewards("r1", [_reward("", exp)])
    with pytest.raises(ValueError):
        store.append_rewards("r1", [_reward("x" * 129, exp)])
    assert store.append_rewards("r1", []) == []


class _CommitThenFail(SqlStore):
    """Commits, then reports a lost connection: the caller can't know the batch landed."""

    fail_next_write = False

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[sa.Connection]:
        with super()._tx(write=write) as conn:
            yield conn
        if write and self.fail_next_write:
            self.fail_next_write = False
            raise sa_exc.OperationalError("COMMIT", {}, Exception("connection lost"))


def test_retry_after_ambiguous_commit_is_not_a_duplicate(any_store_url: str) -> None:
    with _CommitThenFail.open(any_store_url) as s:
        assert isinstance(s, _CommitThenFail)
        exp = _new_experiment(s)
        s.fail_next_write = True
        with pytest.raises(StoreUnavailable):
            s.append_rewards("r1", [_reward("a", exp), _reward("b", exp)])
        assert len(s.rewards_since({})) == 2  # it did land
        # Nobody was told "a"/"b" were accepted, so the retry must report them new, once.
        assert s.append_rewards("r1", [_reward("a", exp), _reward("c", exp)]) == [True, True]
        assert s.append_rewards("r1", [_reward("a", exp), _reward("b", exp)]) == [False, True]
        assert s.append_rewards("r1", [_reward("b", exp)]) == [False]
        seqs = [r.replica_seq for r in s.rewards_since({})]
        assert len(seqs) == 3 and seqs == sorted(seqs)


@pytest.mark.postgres
def test_ambiguous_commit_row_taken_by_other_replica_stays_duplicate(pg_url: str) -> None:
    with _CommitThenFail.open(pg_url) as a, SqlStore.open(pg_url) as b:
        assert isinstance(a, _CommitThenFail)
        exp = _new_experiment(a)
        b.append_rewards("r2", [_reward("x", exp)])
        a.fail_next_write = True
        with pytest.raises(StoreUnavailable):
            a.append_rewards("r1", [_reward("x", exp)])
        assert a.append_rewards("r1", [_reward("x", exp)]) == [False]  # r2 counted it


@pytest.mark.postgres
def test_two_processes_with_one_replica_id_conflict(pg_url: str) -> None:
    with SqlStore.open(pg_url) as a, SqlStore.open(pg_url) as b:
        exp = _new_experiment(a)
        a.append_rewards("r1", [_reward("a", exp)])
        b.append_rewards("r1", [_reward("b", exp)])
        with pytest.raises(ReplicaConflict, match="r1"):
            a.append_rewards("r1", [_reward("c", exp)])


def test_unknown_experiment_id_is_an_integrity_error(store: SqlStore) -> None:
    with pytest.raises(sa_exc.IntegrityError):
        store.append_rewards("r1", [_reward("a", 12345)])


# ---------------------------------------------------------------- counts, epochs, snapshots


def test_assignment_counts_add_up(store: SqlStore) -> None:
    exp = _new_experiment(store)

    def delta(epoch: int, arm: int, n: int) -> AssignmentCount:
        return AssignmentCount(experiment_id=exp, epoch=epoch, arm=arm, count=n)

    store.add_assignment_counts([delta(0, 0, 5), delta(0, 1, 3), delta(0, 0, 2)])
    store.add_assignment_counts([delta(0, 1, 10), delta(1, 0, 1)])
    store.add_assignment_counts([])
    got = [(c.epoch, c.arm, c.count) for c in store.assignment_counts(exp)]
    assert got == [(0, 0, 7), (0, 1, 13), (1, 0, 1)]


def test_allocation_epochs(store: SqlStore) -> None:
    exp = _new_experiment(store)
    e0 = AllocationEpoch(experiment_id=exp, epoch=0, started_at=1.0, shares=(0.5, 0.5))
    e1 = AllocationEpoch(experiment_id=exp, epoch=1, started_at=2.0, shares=(0.25, 0.75))
    assert store.record_allocation_epoch(e1)
    assert store.record_allocation_epoch(e0)
    assert not store.record_allocation_epoch(e0)
    assert store.allocation_epochs(exp) == [e0, e1]


def test_snapshots_keep_the_newest(tmp_path: Path) -> None:
    config = StoreConfig(f"sqlite:///{tmp_path / 'a.sqlite'}", snapshots_kept=2)
    with SqlStore.open(config) as s:
        exp = _new_experiment(s)
        other = _new_experiment(s, "other")
        assert s.latest_snapshot(exp) is None
        s.save_snapshot(other, {"r1": 1}, b"other", now=1.0)
        ids = [s.save_snapshot(exp, {"r1": i, "r2": 2 * i}, bytes([i]), now=i) for i in range(4)]
        latest = s.latest_snapshot(exp)
        assert latest is not None
        assert (latest.id, latest.positions, latest.payload) == (
            ids[3],
            {"r1": 3, "r2": 6},
            b"\x03",
        )
        with s._engine.connect() as conn:
            kept = conn.execute(sa.text("SELECT id FROM snapshots ORDER BY id")).scalars().all()
        other_snapshot = s.latest_snapshot(other)
        assert other_snapshot is not None
        assert kept == [other_snapshot.id, ids[2], ids[3]]


def test_snapshot_payload_round_trips(store: SqlStore) -> None:
    exp = _new_experiment(store)
    payload = bytes(range(256)) * 1000
    store.save_snapshot(exp, {}, payload, now=1.0)
    latest = store.latest_snapshot(exp)
    assert latest is not None and latest.payload == payload and latest.positions == {}


# ---------------------------------------------------------------- audit, events, meta


def test_audit_and_events(store: SqlStore) -> None:
    exp = _new_experiment(store)
    other = _new_experiment(store, "other")
    seqs = [
        store.append_event(EventRecord(experiment_id=e, type=t, at=float(i), details_json="{}"))
        for i, (e, t) in enumerate([(exp, "PROMOTED"), (other, "SRM_DETECTED"), (exp, "DRIFT")])
    ]
    assert seqs == sorted(seqs)
    assert [e.type for e in store.events_after(0)] == ["PROMOTED", "SRM_DETECTED", "DRIFT"]
    assert [e.type for e in store.events_after(seqs[0])] == ["SRM_DETECTED", "DRIFT"]
    assert [e.type for e in store.events_after(0, experiment_id=exp)] == ["PROMOTED", "DRIFT"]
    assert [e.seq for e in store.events_after(0, limit=1)] == [seqs[0]]
    assert store.events_after(seqs[-1]) == []

    for i in range(3):
        store.append_audit(AuditRecord(experiment_id=exp, action=f"a{i}", actor="cli", at=i))
    store.append_audit(AuditRecord(experiment_id=None, action="global", actor="cli", at=9.0))
    assert [a.action for a in store.list_audit()] == ["a0", "a1", "a2", "global"]
    assert [a.action for a in store.list_audit(exp, limit=2)] == ["a1", "a2"]


def test_events_commit_in_sequence_order(store: SqlStore) -> None:
    """An append waits for one still open, so sequence order is commit order: a reader
    that sees an event has seen every event before it (what WatchEvents relies on)."""
    exp = _new_experiment(store)
    record = EventRecord(experiment_id=exp, type="PROMOTED", at=0.0, details_json="{}")
    later: list[int] = []
    with store._tx(write=True) as conn:
        first = store._insert_event(conn, record)
        appender = threading.Thread(target=lambda: later.append(store.append_event(record)))
        appender.start()
        appender.join(0.5)
        assert appender.is_alive() and store.events_after(0) == []
    appender.join(10)
    assert later and later[0] > first
    assert [e.seq for e in store.events_after(0)] == [first, later[0]]


def test_sql_store_implements_the_protocol(store: SqlStore) -> None:
    as_protocol: Store = store  # mypy checks the structural match here
    as_protocol.ping()
    assert as_protocol.shared == (store.dialect == "postgresql")


def test_pending_defaults_round_trip_per_replica(store: SqlStore) -> None:
    """Saved twice is kept once; each replica sees its own rows, oldest first; deleting is
    by key and leaves the rest; a batch's arms survive as int64."""
    exp = _new_experiment(store)
    arms = (*range(1500), 2**40)
    rows = [
        PendingDefault(
            experiment_id=exp, key="k2", token="tok2", issued_at=2.0, epoch=1, batch=True, arms=arms
        ),
        PendingDefault(
            experiment_id=exp,
            key="k1",
            token="tok1",
            issued_at=1.0,
            epoch=0,
            batch=False,
            arms=(3,),
        ),
    ]
    store.save_pending_defaults("r1", rows)
    store.save_pending_defaults("r1", rows[:1])  # a retry after a failed flush
    store.save_pending_defaults("r2", rows[1:])
    assert store.pending_defaults("r1") == rows[::-1]
    assert store.pending_defaults("r2") == rows[1:]
    store.delete_pending_defaults("r1", ["k1", "absent"])
    assert store.pending_defaults("r1") == rows[:1]
    assert store.pending_defaults("r2") == rows[1:]


def _pending(exp: int, key: str, issued_at: float) -> PendingDefault:
    return PendingDefault(
        experiment_id=exp,
        key=key,
        token=f"t{key}",
        issued_at=issued_at,
        epoch=0,
        batch=False,
        arms=(1,),
    )


def test_sqlite_adopts_every_other_replicas_pending_defaults(tmp_path: Path) -> None:
    """One process owns a SQLite file, so the rows of any other replica id are a previous
    run's (ids default to host:pid): all move, oldest first, except those of experiments
    the caller does not know, which stay where they are."""
    store = SqlStore.open(f"sqlite:///{tmp_path / 'a.sqlite'}")
    try:
        exp, other = _new_experiment(store), _new_experiment(store, "other")
        store.save_pending_defaults("old:1", [_pending(exp, "k2", 2.0), _pending(other, "k9", 0.5)])
        store.save_pending_defaults("old:2", [_pending(exp, "k1", 1.0)])
        store.save_pending_defaults("me", [_pending(exp, "k0", 0.0)])
        assert store.hold_replica_lock("me")
        moved = store.adopt_pending_defaults("me", [exp])
        assert [r.key for r in moved] == ["k1", "k2"]
        assert [r.key for r in store.pending_defaults("me")] == ["k0", "k1", "k2"]
        assert store.pending_defaults("old:2") == []
        assert [r.key for r in store.pending_defaults("old:1")] == ["k9"]
        assert store.adopt_pending_defaults("me", [exp]) == []
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_adopts_pending_defaults_only_of_replicas_that_are_gone(pg_url: str) -> None:
    """A live replica holds its lock, so its rows stay; once its session ends (close, or the
    server noticing a dead process) another replica takes them, and while a replica's
    lock is held nobody else can take it (a second process with the same id)."""
    alive, adopter = SqlStore.open(pg_url), SqlStore.open(pg_url)
    try:
        exp = _new_experiment(alive)
        assert alive.hold_replica_lock("r-alive")
        assert alive.hold_replica_lock("r-alive")  # confirming, not a second lock
        assert adopter.hold_replica_lock("r-adopter")
        assert not adopter.hold_replica_lock("r-alive")
        alive.save_pending_defaults("r-alive", [_pending(exp, "k1", 1.0)])
        adopter.save_pending_defaults("r-dead", [_pending(exp, "k0", 0.0)])
        adopter.save_pending_defaults("r-other", [_pending(exp, "k2", 2.0)])
        assert adopter.gone_replicas("r-adopter") == {"r-dead", "r-other"}
        # ``only``: the ids the caller has seen gone long enough.
        moved = adopter.adopt_pending_defaults("r-adopter", [exp], only={"r-dead"})
        assert [r.key for r in moved] == ["k0"]
        assert [r.key for r in adopter.adopt_pending_defaults("r-adopter", [exp])] == ["k2"]
        assert [r.key for r in alive.pending_defaults("r-alive")] == ["k1"]
        alive.close()
        assert [r.key for r in adopter.adopt_pending_defaults("r-adopter", [exp])] == ["k1"]
        assert [r.key for r in adopter.pending_defaults("r-adopter")] == ["k0", "k1", "k2"]
        assert adopter.pending_defaults("r-alive") == []
        assert adopter.gone_replicas("r-adopter") == set()
    finally:
        alive.close()
        adopter.close()


def test_meta(store: SqlStore) -> None:
    assert store.get_meta("k") is None
    assert store.set_meta_if_absent("k", "first") == "first"
    assert store.set_meta_if_absent("k", "second") == "first"
    store.set_meta("k", "third")
    assert store.get_meta("k") == "third"
    store.delete_meta("k", if_value="second")  # not the value in force: kept
    assert store.get_meta("k") == "third"
    store.delete_meta("k", if_value="third")
    assert store.get_meta("k") is None
    store.set_meta("k", "fourth")
    store.delete_meta("k")
    store.delete_meta("k")
    assert store.get_meta("k") is None


@pytest.mark.postgres
def test_set_meta_if_absent_race_has_one_winner(pg_url: str) -> None:
    stores = [SqlStore.open(pg_url) for _ in range(4)]
    results: list[str] = []
    barrier = threading.Barrier(len(stores))

    def race(s: SqlStore, value: str) -> None:
        barrier.wait()
        results.append(s.set_meta_if_absent("secret", value))

    threads = [threading.Thread(target=race, args=(s, f"v{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert len(results) == 4 and len(set(results)) == 1


# ---------------------------------------------------------------- leadership


def test_sqlite_is_always_leader(tmp_path: Path) -> None:
    with SqlStore.open(f"sqlite:///{tmp_path / 'a.sqlite'}") as s:
        assert s.try_leader_lock(42)
        assert not s.shared
        s.release_leader_lock(42)


@pytest.mark.postgres
def test_advisory_lock_is_exclusive(pg_url: str) -> None:
    a, b = SqlStore.open(pg_url), SqlStore.open(pg_url)
    try:
        assert a.shared
        assert a.try_leader_lock(42)
        assert a.try_leader_lock(42)  # confirming keeps it
        assert not b.try_leader_lock(42)
        assert b.try_leader_lock(43)  # other keys are independent
        a.release_leader_lock(42)
        assert b.try_leader_lock(42)
        assert not a.try_leader_lock(42)
        b.close()  # closing frees every lock it held
        assert a.try_leader_lock(42)
    finally:
        a.close()
        b.close()


@pytest.mark.postgres
def test_leader_whose_session_died_notices(pg_url: str) -> None:
    a, b = SqlStore.open(pg_url), SqlStore.open(pg_url)
    try:
        assert a.try_leader_lock(7)
        with b._engine.connect() as conn:
            # Kill a's lock session, as a network partition or server restart would.
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND objid = 7"
                )
            )
        assert b.try_leader_lock(7)
        assert not a.try_leader_lock(7)
    finally:
        a.close()
        b.close()

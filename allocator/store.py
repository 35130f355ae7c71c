"""Persistence: SQLAlchemy 2 Core over SQLite (default, one replica) or PostgreSQL (replicas).

The engine depends only on the `Store` protocol; `SqlStore` is the implementation. Every
public method is one transaction, and database connectivity failures surface as
`StoreUnavailable` so the service can answer UNAVAILABLE.

Reward log and replication. Each replica writes its rewards under its own `replica_id`
with a `replica_seq` that it increments itself, from one writer, one commit after another.
So for any replica, rows become visible in `replica_seq` order, and a reader that has
applied everything up to `positions[replica]` resumes with `replica_seq > positions[...]`
and never skips a row. A single global BIGSERIAL would not give that in PostgreSQL: ids are
drawn at insert time but become visible at commit time, so id 101 can commit after a reader
already moved past 102, and that reader would never see 101.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, Literal, NamedTuple, ParamSpec, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

__all__ = [
    "AllocationEpoch",
    "AlreadyExists",
    "AssignmentCount",
    "AuditRecord",
    "EventRecord",
    "ExperimentRow",
    "LoggedReward",
    "NotFound",
    "ReplicaConflict",
    "RewardColumns",
    "RewardRow",
    "SchemaTooNew",
    "SnapshotRow",
    "SqlStore",
    "Store",
    "StoreConfig",
    "StoreLocked",
    "StoreUnavailable",
    "VersionConflict",
    "metadata",
    "normalize_url",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
MAX_DEDUP_KEY_CHARS = 128
MAX_REPLICA_ID_CHARS = 64
# Arbitrary fixed key ("ALLOCMIG") so replicas starting together migrate one at a time.
_MIGRATION_LOCK_KEY = 0x414C4C4F434D4947
_UNACKED_CAP = 1_000_000

_REWARD_COLUMNS = (
    "replica_id, replica_seq, dedup_key, experiment_id, arm, value, prediction_score, "
    "guardrails_json, epoch, received_at"
)
_SQLITE_INSERT_REWARDS = (
    f"INSERT INTO rewards ({_REWARD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (dedup_key) DO NOTHING"
)
# %b: binary parameters (psycopg), which skips quoting every string of the arrays.
_PG_INSERT_REWARDS = (
    f"INSERT INTO rewards ({_REWARD_COLUMNS}) SELECT %b, u.* FROM unnest("
    "%b::bigint[], %b::varchar[], %b::integer[], %b::integer[], %b::float8[], %b::float8[], "
    "%b::text[], %b::integer[], %b::float8[]) AS u "
    "ON CONFLICT (dedup_key) DO NOTHING"
)
_NEW_REWARD_KEYS = {
    dialect: "SELECT dedup_key FROM rewards"
    f" WHERE replica_id = {p} AND replica_seq >= {p} AND replica_seq < {p}"
    for dialect, p in (("sqlite", "?"), ("postgresql", "%s"))
}

P = ParamSpec("P")
R = TypeVar("R")


# ---------------------------------------------------------------- errors


class StoreUnavailable(ConnectionError):
    """The database can't be reached or refused the operation for transient reasons."""

    def __init__(self, operation: str, detail: str) -> None:
        super().__init__(f"store unavailable during {operation}: {detail}")
        self.operation = operation
        self.detail = detail


class StoreLocked(RuntimeError):
    """Another process holds the SQLite database (SQLite serves a single replica)."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(
            f"SQLite database {path} is already in use by another allocator process "
            f"({holder}); SQLite supports one server replica, use PostgreSQL for several"
        )
        self.path = path
        self.holder = holder


class SchemaTooNew(RuntimeError):
    """The database carries a schema revision this code does not know."""

    def __init__(self, db_revision: str, code_head: str | None) -> None:
        super().__init__(
            f"database schema revision {db_revision!r} is unknown to this allocator "
            f"(newest known revision: {code_head!r}); it was probably written by a newer "
            "version, so upgrade this server instead of running it against that database"
        )
        self.db_revision = db_revision
        self.code_head = code_head


class AlreadyExists(KeyError):
    """An experiment with this name exists."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"experiment {self.name!r} already exists"


class NotFound(KeyError):
    """No experiment with this name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"experiment {self.name!r} not found"


class VersionConflict(RuntimeError):
    """Optimistic concurrency: the experiment changed since it was read."""

    def __init__(self, name: str, expected: int, actual: int) -> None:
        super().__init__(f"experiment {name!r} is at version {actual}, not the expected {expected}")
        self.name = name
        self.expected = expected
        self.actual = actual


class ReplicaConflict(RuntimeError):
    """Two live processes write rewards under the same replica id."""

    def __init__(self, replica_id: str) -> None:
        super().__init__(
            f"another process is writing rewards as replica {replica_id!r}; "
            "replica ids must be unique per running server"
        )
        self.replica_id = replica_id


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True, kw_only=True)
class RewardRow:
    """One reward to log; `dedup_key` is unique across the whole log."""

    dedup_key: str
    experiment_id: int
    arm: int
    value: float
    epoch: int
    received_at: float
    prediction_score: float | None = None
    guardrails_json: str | None = None


class LoggedValues(NamedTuple):
    """What the log holds for one reward, where it may differ from a resubmission."""

    arm: int
    value: float
    epoch: int
    guardrails_json: str | None


@dataclass(frozen=True, slots=True, eq=False)
class RewardColumns:
    """Rewards to log as columns: a batch without a Python object per reward.

    ``scores`` NaN means no score; ``guardrails_json`` None means none for any item.

    >>> cols = RewardColumns.of(7, ["a", "b"], [0, 1], [1.0, 0.0], [0, 0], received_at=5.0)
    >>> len(cols), cols.take(np.array([1])).keys
    (2, ['b'])
    """

    keys: list[str]
    experiment_ids: npt.NDArray[np.int64]
    arms: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    epochs: npt.NDArray[np.int64]
    received_at: npt.NDArray[np.float64]
    scores: npt.NDArray[np.float64]
    guardrails_json: list[str | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.keys)
        for name in ("experiment_ids", "arms", "values", "epochs", "received_at", "scores"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {getattr(self, name).shape}")
        if self.guardrails_json is not None and len(self.guardrails_json) != n:
            raise ValueError(f"guardrails_json must have {n} items")

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def of(
        cls,
        experiment_id: int,
        keys: list[str],
        arms: Sequence[int] | npt.NDArray[np.integer],
        values: Sequence[float] | npt.NDArray[np.floating],
        epochs: Sequence[int] | npt.NDArray[np.integer],
        *,
        received_at: float,
        scores: Sequence[float] | npt.NDArray[np.floating] | None = None,
        guardrails_json: list[str | None] | None = None,
    ) -> RewardColumns:
        """Rewards of one experiment received at one time."""
        n = len(keys)
        return cls(
            keys,
            np.full(n, experiment_id, dtype=np.int64),
            np.asarray(arms, dtype=np.int64),
            np.asarray(values, dtype=np.float64),
            np.asarray(epochs, dtype=np.int64),
            np.full(n, received_at, dtype=np.float64),
            np.full(n, np.nan) if scores is None else np.asarray(scores, dtype=np.float64),
            guardrails_json,
        )

    @classmethod
    def from_rows(cls, rows: Sequence[RewardRow]) -> RewardColumns:
        """The columns of `rows` (None scores become NaN)."""
        n = len(rows)
        guards = [r.guardrails_json for r in rows]
        return cls(
            [r.dedup_key for r in rows],
            np.fromiter((r.experiment_id for r in rows), np.int64, n),
            np.fromiter((r.arm for r in rows), np.int64, n),
            np.fromiter((r.value for r in rows), np.float64, n),
            np.fromiter((r.epoch for r in rows), np.int64, n),
            np.fromiter((r.received_at for r in rows), np.float64, n),
            np.fromiter(
                (np.nan if r.prediction_score is None else r.prediction_score for r in rows),
                np.float64,
                n,
            ),
            guards if any(g is not None for g in guards) else None,
        )

    @classmethod
    def concat(cls, parts: Sequence[RewardColumns]) -> RewardColumns:
        """One batch of `parts` in order."""
        if len(parts) == 1:
            return parts[0]
        guards: list[str | None] | None = None
        if any(p.guardrails_json is not None for p in parts):
            guards = []
            for p in parts:
                guards += p.guardrails_json if p.guardrails_json is not None else [None] * len(p)
        return cls(
            [k for p in parts for k in p.keys],
            np.concatenate([p.experiment_ids for p in parts]),
            np.concatenate([p.arms for p in parts]),
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.epochs for p in parts]),
            np.concatenate([p.received_at for p in parts]),
            np.concatenate([p.scores for p in parts]),
            guards,
        )

    def take(self, positions: npt.NDArray[np.integer]) -> RewardColumns:
        """The items at `positions`, in that order."""
        pos = positions.tolist()
        guards = self.guardrails_json
        return RewardColumns(
            [self.keys[i] for i in pos],
            self.experiment_ids[positions],
            self.arms[positions],
            self.values[positions],
            self.epochs[positions],
            self.received_at[positions],
            self.scores[positions],
            None if guards is None else [guards[i] for i in pos],
        )

    def score_list(self) -> list[float | None]:
        """Scores with None for missing (what the database stores as NULL)."""
        if np.isnan(self.scores).all():
            return [None] * len(self)
        return [None if s != s else s for s in self.scores.tolist()]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggedReward(RewardRow):
    """A reward read back from the log, with its position in its replica's stream."""

    replica_id: str
    replica_seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentRow:
    """An experiment as stored; `version` increases by one on every update."""

    id: int
    name: str
    config_json: str
    state: str
    champion: int | None
    version: int
    created_at: float
    updated_at: float
    lifecycle_json: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AssignmentCount:
    """Assignments of one arm in one allocation epoch (a delta when written)."""

    experiment_id: int
    epoch: int
    arm: int
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AllocationEpoch:
    """The traffic shares in force from `started_at` (sample-ratio checks compare to these)."""

    experiment_id: int
    epoch: int
    started_at: float
    shares: tuple[float, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingDefault:
    """Decisions a replica issued that get the default reward if none arrives in time.

    One row per Assign (one arm) or AssignBatch (its arms); ``key`` is a digest of the
    decision id or batch token, which itself is too long for an index.
    """

    experiment_id: int
    key: str
    token: str
    issued_at: float
    epoch: int
    batch: bool
    arms: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotRow:
    """Engine state covering the reward log up to `positions` ({replica_id: replica_seq})."""

    id: int
    experiment_id: int
    created_at: float
    positions: dict[str, int]
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """Who changed an experiment's state, when and why; `seq` is set when read back."""

    experiment_id: int | None
    action: str
    actor: str
    at: float
    from_state: str | None = None
    to_state: str | None = None
    reason: str = ""
    summary_json: str = "{}"
    seq: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRecord:
    """A lifecycle event for watchers (PROMOTED, ROLLED_BACK, ...); `seq` set when read."""

    experiment_id: int | None
    type: str
    at: float
    variant: int | None = None
    reason: str = ""
    details_json: str = "{}"
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """How to reach the database.

    >>> StoreConfig("sqlite:///allocator.sqlite").dialect
    'sqlite'
    """

    url: str
    busy_timeout_seconds: float = 30.0
    connect_timeout_seconds: float = 5.0
    pool_size: int = 5
    snapshots_kept: int = 3

    def __post_init__(self) -> None:
        normalize_url(self.url)
        if not (math.isfinite(self.busy_timeout_seconds) and self.busy_timeout_seconds >= 0):
            raise ValueError(f"busy_timeout_seconds must be >= 0, got {self.busy_timeout_seconds}")
        if not (math.isfinite(self.connect_timeout_seconds) and self.connect_timeout_seconds > 0):
            raise ValueError(f"connect_timeout_seconds must be > 0: {self.connect_timeout_seconds}")
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {self.pool_size}")
        if self.snapshots_kept < 1:
            raise ValueError(f"snapshots_kept must be >= 1, got {self.snapshots_kept}")

    @property
    def dialect(self) -> Literal["sqlite", "postgresql"]:
        """Which database family the URL names."""
        return "sqlite" if normalize_url(self.url).get_backend_name() == "sqlite" else "postgresql"


# ---------------------------------------------------------------- protocol


class Store(Protocol):
    """What the engine needs from persistence (implemented by `SqlStore`)."""

    @property
    def shared(self) -> bool:
        """True when several replicas may use this database (PostgreSQL)."""
        ...

    def close(self) -> None:
        """Release connections and locks."""
        ...

    def ping(self) -> None:
        """Round-trip to the database; StoreUnavailable if it is down."""
        ...

    def create_experiment(
        self,
        name: str,
        config_json: str,
        state: str,
        now: float,
        lifecycle_json: str = "{}",
        *,
        audit: AuditRecord | None = None,
        events: Sequence[EventRecord] = (),
        event_seqs: list[int] | None = None,
    ) -> ExperimentRow:
        """Insert a new experiment at version 1, with its audit row and events, atomically;
        AlreadyExists if the name is taken."""
        ...

    def get_experiment(self, name: str) -> ExperimentRow | None:
        """The experiment called `name`, if any."""
        ...

    def get_experiment_by_id(self, experiment_id: int) -> ExperimentRow | None:
        """The experiment with this id, if any."""
        ...

    def list_experiments(self, states: Collection[str] | None = None) -> list[ExperimentRow]:
        """Experiments ordered by id, optionally only those in `states`."""
        ...

    def update_state(
        self,
        name: str,
        *,
        state: str,
        champion: int | None,
        lifecycle_json: str,
        expected_version: int,
        now: float,
        config_json: str | None = None,
        audit: AuditRecord | None = None,
        events: Sequence[EventRecord] = (),
        event_seqs: list[int] | None = None,
    ) -> ExperimentRow:
        """Compare-and-set the experiment, with its audit row and events, atomically."""
        ...

    def append_rewards(
        self,
        replica_id: str,
        rows: Sequence[RewardRow] | RewardColumns,
        logged: dict[int, LoggedValues] | None = None,
    ) -> list[bool]:
        """Durably log new rewards in one commit; per row True if new, False if duplicate.

        ``logged``: the stored values of new rows whose earlier failed commit landed with
        other values (see SqlStore.append_rewards)."""
        ...

    def rewards_since(
        self,
        positions: Mapping[str, int],
        exclude_replica: str | None = None,
        limit: int = 10_000,
        experiment_id: int | None = None,
        replica: str | None = None,
        upto: Mapping[str, int] | None = None,
    ) -> list[LoggedReward]:
        """Rows past `positions` (replicas missing from it: from the start)."""
        ...

    def replica_positions(self) -> dict[str, int]:
        """Highest logged replica_seq per replica."""
        ...

    def replica_position(self, replica_id: str) -> int:
        """Highest logged replica_seq of one replica (0 if none)."""
        ...

    def recent_scores(
        self,
        experiment_id: int,
        n_arms: int,
        spans: Sequence[tuple[float, float]],
        per_arm: int,
        positions: Mapping[str, int],
    ) -> dict[int, list[float]]:
        """Per variant the last `per_arm` prediction scores received in `spans`."""
        ...

    def recent_rewards(
        self, experiment_id: int, replicas: Sequence[str], per_replica: int
    ) -> dict[str, list[tuple[int, float, float]]]:
        """Per replica (arm, value, received_at) of the last `per_replica` rewards it logged."""
        ...

    def add_assignment_counts(self, rows: Sequence[AssignmentCount]) -> None:
        """Add the deltas to the stored counts."""
        ...

    def assignment_counts(self, experiment_id: int) -> list[AssignmentCount]:
        """Stored counts ordered by (epoch, arm)."""
        ...

    def record_allocation_epoch(self, epoch: AllocationEpoch) -> bool:
        """Store an epoch's shares; False if that epoch was already recorded."""
        ...

    def save_pending_defaults(self, replica_id: str, rows: Sequence[PendingDefault]) -> None:
        """Remember decisions awaiting a default reward (a row already saved is kept)."""
        ...

    def delete_pending_defaults(self, replica_id: str, keys: Sequence[str]) -> None:
        """Forget decisions whose default was written or is no longer wanted."""
        ...

    def pending_defaults(self, replica_id: str) -> list[PendingDefault]:
        """Every decision of ``replica_id`` still awaiting its default, oldest first."""
        ...

    def hold_replica_lock(self, replica_id: str) -> bool:
        """Take or confirm the lock that says ``replica_id`` is alive; False if held."""
        ...

    def gone_replicas(self, replica_id: str) -> set[str]:
        """Replicas other than ``replica_id`` with pending defaults and no live holder."""
        ...

    def adopt_pending_defaults(
        self,
        replica_id: str,
        experiment_ids: Collection[int],
        only: Collection[str] | None = None,
    ) -> list[PendingDefault]:
        """Move the pending defaults of replicas that are gone to ``replica_id``."""
        ...

    def allocation_epochs(self, experiment_id: int) -> list[AllocationEpoch]:
        """All epochs of an experiment, oldest first."""
        ...

    def save_snapshot(
        self, experiment_id: int, positions: Mapping[str, int], payload: bytes, now: float
    ) -> int:
        """Store a snapshot and prune old ones; returns its id."""
        ...

    def latest_snapshot(self, experiment_id: int) -> SnapshotRow | None:
        """The newest snapshot of an experiment, if any."""
        ...

    def append_audit(self, record: AuditRecord) -> int:
        """Append an audit row; returns its seq."""
        ...

    def list_audit(self, experiment_id: int | None = None, limit: int = 1000) -> list[AuditRecord]:
        """The newest `limit` audit rows, oldest first."""
        ...

    def append_event(self, record: EventRecord) -> int:
        """Append an event; returns its seq."""
        ...

    def events_after(
        self, seq: int, experiment_id: int | None = None, limit: int = 1000
    ) -> list[EventRecord]:
        """Events with seq > `seq`, oldest first."""
        ...

    def get_meta(self, key: str) -> str | None:
        """A metadata value."""
        ...

    def set_meta(self, key: str, value: str) -> None:
        """Insert or overwrite a metadata value."""
        ...

    def set_meta_if_absent(self, key: str, value: str) -> str:
        """Store `value` unless `key` exists; return the value in force (race-safe)."""
        ...

    def delete_meta(self, key: str, if_value: str | None = None) -> None:
        """Forget a metadata value (a no-op if absent, or if it is not ``if_value``)."""
        ...

    def try_leader_lock(self, key: int) -> bool:
        """Take or confirm the cluster-wide lock `key`; False if another replica holds it."""
        ...

    def release_leader_lock(self, key: int | None = None) -> None:
        """Give up one leader lock (or all)."""
        ...


# ---------------------------------------------------------------- schema

# Kept identical to the Alembic revisions (a test compares them); migrations are the truth
# for the database, these Table objects are what the queries are written against.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("config_json", sa.Text, nullable=False),
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("champion", sa.Integer, nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("lifecycle_json", sa.Text, nullable=False),
)

rewards = sa.Table(
    "rewards",
    metadata,
    sa.Column("replica_id", sa.String(MAX_REPLICA_ID_CHARS), primary_key=True),
    sa.Column("replica_seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("dedup_key", sa.String(MAX_DEDUP_KEY_CHARS), nullable=False, unique=True),
    sa.Column("experiment_id", sa.Integer, sa.ForeignKey("experiments.id"), nullable=False),
    sa.Column("arm", sa.Integer, nullable=False),
    sa.Column("value", sa.Double, nullable=False),
    sa.Column("prediction_score", sa.Double, nullable=True),
    sa.Column("guardrails_json", sa.Text, nullable=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Index(None, "experiment_id", "replica_id", "replica_seq"),
    # Rebuilding the prediction-score windows at start-up (`recent_scores`).
    sa.Index(
        "ix_rewards_scored",
        "experiment_id",
        "arm",
        "received_at",
        sqlite_where=sa.text("prediction_score IS NOT NULL"),
        postgresql_where=sa.text("prediction_score IS NOT NULL"),
    ),
)

assignment_counts = sa.Table(
    "assignment_counts",
    metadata,
    sa.Column(
        "experiment_id",
        sa.Integer,
        sa.ForeignKey("experiments.id"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("epoch", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("arm", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("count", sa.BigInteger, nullable=False),
)

allocation_epochs = sa.Table(
    "allocation_epochs",
    metadata,
    sa.Column(
        "experiment_id",
        sa.Integer,
        sa.ForeignKey("experiments.id"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("epoch", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("shares_json", sa.Text, nullable=False),
)

snapshots = sa.Table(
    "snapshots",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("experiment_id", sa.Integer, sa.ForeignKey("experiments.id"), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("positions_json", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Index(None, "experiment_id", "id"),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("experiment_id", sa.Integer, sa.ForeignKey("experiments.id"), nullable=True),
    sa.Column("from_state", sa.String(32), nullable=True),
    sa.Column("to_state", sa.String(32), nullable=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("summary_json", sa.Text, nullable=False),
    sa.Index(None, "experiment_id", "seq"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("experiment_id", sa.Integer, sa.ForeignKey("experiments.id"), nullable=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("variant", sa.Integer, nullable=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("details_json", sa.Text, nullable=False),
    sa.Index(None, "experiment_id", "seq"),
)

pending_defaults = sa.Table(
    "pending_defaults",
    metadata,
    sa.Column("replica_id", sa.String(MAX_REPLICA_ID_CHARS), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("experiment_id", sa.Integer, sa.ForeignKey("experiments.id"), nullable=False),
    sa.Column("token", sa.Text, nullable=False),
    sa.Column("issued_at", sa.Double, nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("batch", sa.Boolean, nullable=False),
    sa.Column("arms", sa.LargeBinary, nullable=False),  # int64 little-endian
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


# ---------------------------------------------------------------- helpers


def normalize_url(url: str) -> sa.URL:
    """Parse a store URL; bare postgresql:// URLs get the psycopg 3 driver."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed
    if backend == "sqlite":
        return parsed
    raise ValueError(f"unsupported store URL scheme {parsed.drivername!r} (sqlite or postgresql)")


def _guard(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn connectivity failures into StoreUnavailable, naming the operation."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
            raise StoreUnavailable(fn.__name__, _detail(e)) from e
        except sa_exc.DBAPIError as e:
            if e.connection_invalidated:
                raise StoreUnavailable(fn.__name__, _detail(e)) from e
            raise
        except (sa_exc.DisconnectionError, sa_exc.TimeoutError) as e:
            raise StoreUnavailable(fn.__name__, str(e)) from e

    return wrapper


def _detail(e: sa_exc.DBAPIError) -> str:
    # The driver's message only: SQLAlchemy's str() appends the SQL and its parameters.
    return " ".join(str(e.orig).split()) or type(e.orig).__name__


def _first_occurrences(keys: Sequence[str]) -> npt.NDArray[np.int64] | None:
    """Positions of each key's first occurrence, in order; None when all are distinct."""
    if len(set(keys)) == len(keys):
        return None
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    return np.fromiter(first.values(), dtype=np.int64, count=len(first))


def _new_keys(
    conn: Connection, dialect: str, replica_id: str, start: int, keys: Sequence[str]
) -> npt.NDArray[np.bool_]:
    """Per key of an insert (seqs from ``start``): True if that insert wrote it."""
    # Some keys were duplicates. The rows that did go in are exactly ours in this
    # statement's seq range: the range is fresh for this replica (a second writer of the
    # same replica id would have hit the primary key instead).
    written = set(
        conn.exec_driver_sql(
            _NEW_REWARD_KEYS[dialect], (replica_id, start, start + len(keys))
        ).scalars()
    )
    return np.fromiter((k in written for k in keys), dtype=bool, count=len(keys))


def _experiment(row: sa.Row[Any]) -> ExperimentRow:
    return ExperimentRow(
        id=row.id,
        name=row.name,
        config_json=row.config_json,
        state=row.state,
        champion=row.champion,
        version=row.version,
        # float(): SQLite's RETURNING hands back integral REALs as ints.
        created_at=float(row.created_at),
        updated_at=float(row.updated_at),
        lifecycle_json=row.lifecycle_json,
    )


def _audit_values(record: AuditRecord) -> dict[str, Any]:
    values = dataclasses.asdict(record)
    del values["seq"]
    return values


def _event_values(record: EventRecord) -> dict[str, Any]:
    values = dataclasses.asdict(record)
    del values["seq"]
    return values


class _FileLock:
    """An exclusive flock held for the process lifetime; the kernel drops it on kill -9."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreUnavailable("open", f"cannot open lock file {path}: {e}") from e
        try:
            # flock, not lockf: POSIX record locks are per process, so a second opener in
            # the same process would silently share the lock.
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise StoreLocked(path.removesuffix(".lock"), holder) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()}".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------- store


class SqlStore:
    """The SQL implementation of `Store`.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.sqlite")
    >>> with SqlStore.open(f"sqlite:///{path}") as store:
    ...     store.create_experiment("checkout", "{}", "RUNNING", now=0.0).version
    1
    """

    def __init__(self, engine: Engine, config: StoreConfig, lock: _FileLock | None) -> None:
        self._engine = engine
        self._config = config
        self._file_lock = lock
        self._sqlite = engine.dialect.name == "sqlite"
        self._insert = sqlite_dialect.insert if self._sqlite else pg_dialect.insert
        self._next_seq: dict[str, int] = {}
        # Keys of a batch whose commit raised, with the seq each was to be stored at: it may
        # have committed anyway. If the same key comes back and the stored row is ours AT
        # one of those seqs, nobody has acknowledged it yet, so it is new. (A row of ours
        # at another seq was committed and acknowledged before: a retry of it that was
        # caught in a failed commit is a duplicate like any other.)
        self._unacked: dict[str, OrderedDict[str, set[int]]] = {}
        self._writer_locks: dict[str, threading.Lock] = {}
        self._state_lock = threading.Lock()
        self._leader_conns: dict[int, Connection] = {}
        # Lock sessions are used from the writer and the supervisor threads.
        self._leader_conns_lock = threading.RLock()
        self._closed = False

    @classmethod
    @_guard
    def open(cls, config: StoreConfig | str) -> SqlStore:
        """Connect, lock (SQLite), and migrate to the newest schema revision."""
        if isinstance(config, str):
            config = StoreConfig(config)
        url = normalize_url(config.url)
        lock = None
        if url.get_backend_name() == "sqlite":
            database = url.database or ""
            if database not in ("", ":memory:") and not database.startswith("file:"):
                lock = _FileLock(f"{database}.lock")
        try:
            engine = _create_engine(url, config)
            store = cls(engine, config, lock)
            store._migrate()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return store

    @property
    def shared(self) -> bool:
        """True when several replicas may use this database (PostgreSQL)."""
        return not self._sqlite

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self._engine.dialect.name

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release leader locks, connections and the SQLite file lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(StoreUnavailable):
            self.release_leader_lock()
        self._engine.dispose()
        if self._file_lock is not None:
            self._file_lock.release()

    # ------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            if write:
                conn.execution_options(allocator_write=True)
            with conn.begin():
                yield conn

    def _migrate(self) -> None:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        script = ScriptDirectory.from_config(cfg)
        head = script.get_current_head()
        with self._tx(write=True) as conn:
            if not self._sqlite:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
            current = MigrationContext.configure(conn).get_current_revision()
            if current is not None:
                try:
                    script.get_revision(current)
                except (CommandError, RevisionError) as e:
                    raise SchemaTooNew(current, head) from e
            if current != head:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")

    @_guard
    def ping(self) -> None:
        """Round-trip to the database; StoreUnavailable if it is down."""
        with self._engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # ------------------------------------------------------------ experiments

    @_guard
    def create_experiment(
        self,
        name: str,
        config_json: str,
        state: str,
        now: float,
        lifecycle_json: str = "{}",
        *,
        audit: AuditRecord | None = None,
        events: Sequence[EventRecord] = (),
        event_seqs: list[int] | None = None,
    ) -> ExperimentRow:
        """Insert a new experiment at version 1, with its audit row and events (their
        ``experiment_id`` set to it), atomically; AlreadyExists if the name is taken. The
        events' sequence numbers are appended to ``event_seqs`` when given."""
        stmt = (
            self._insert(experiments)
            .values(
                name=name,
                config_json=config_json,
                state=state,
                champion=None,
                version=1,
                created_at=now,
                updated_at=now,
                lifecycle_json=lifecycle_json,
            )
            .on_conflict_do_nothing(index_elements=["name"])
            .returning(*experiments.c)
        )
        seqs: list[int] = []
        with self._tx(write=True) as conn:
            row = conn.execute(stmt).first()
            if row is None:
                raise AlreadyExists(name)
            if audit is not None:
                self._insert_audit(conn, dataclasses.replace(audit, experiment_id=row.id))
            seqs = [
                self._insert_event(conn, dataclasses.replace(event, experiment_id=row.id))
                for event in events
            ]
        if event_seqs is not None:
            event_seqs.extend(seqs)
        return _experiment(row)

    @_guard
    def get_experiment(self, name: str) -> ExperimentRow | None:
        """The experiment called `name`, if any."""
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(experiments).where(experiments.c.name == name)).first()
        return None if row is None else _experiment(row)

    @_guard
    def get_experiment_by_id(self, experiment_id: int) -> ExperimentRow | None:
        """The experiment with this id, if any."""
        with self._tx(write=False) as conn:
            row = conn.execute(
                sa.select(experiments).where(experiments.c.id == experiment_id)
            ).first()
        return None if row is None else _experiment(row)

    @_guard
    def list_experiments(self, states: Collection[str] | None = None) -> list[ExperimentRow]:
        """Experiments ordered by id, optionally only those in `states`."""
        query = sa.select(experiments).order_by(experiments.c.id)
        if states is not None:
            query = query.where(experiments.c.state.in_(list(states)))
        with self._tx(write=False) as conn:
            return [_experiment(row) for row in conn.execute(query)]

    @_guard
    def update_state(
        self,
        name: str,
        *,
        state: str,
        champion: int | None,
        lifecycle_json: str,
        expected_version: int,
        now: float,
        config_json: str | None = None,
        audit: AuditRecord | None = None,
        events: Sequence[EventRecord] = (),
        event_seqs: list[int] | None = None,
    ) -> ExperimentRow:
        """Compare-and-set the experiment, with its audit row and events, atomically.

        NotFound if no such experiment, VersionConflict if its version is not
        `expected_version`; either way nothing is written. The sequence numbers of the
        events written are appended to `event_seqs` when it is given.
        """
        values: dict[str, Any] = {
            "state": state,
            "champion": champion,
            "lifecycle_json": lifecycle_json,
            "version": experiments.c.version + 1,
            "updated_at": now,
        }
        if config_json is not None:
            values["config_json"] = config_json
        stmt = (
            sa.update(experiments)
            .where(experiments.c.name == name, experiments.c.version == expected_version)
            .values(values)
            .returning(*experiments.c)
        )
        with self._tx(write=True) as conn:
            row = conn.execute(stmt).first()
            if row is None:
                actual = conn.execute(
                    sa.select(experiments.c.version).where(experiments.c.name == name)
                ).scalar()
                if actual is None:
                    raise NotFound(name)
                raise VersionConflict(name, expected_version, actual)
            updated = _experiment(row)
            if audit is not None:
                record = dataclasses.replace(audit, experiment_id=updated.id)
                self._insert_audit(conn, record)
            seqs = [
                self._insert_event(conn, dataclasses.replace(event, experiment_id=updated.id))
                for event in events
            ]
        if event_seqs is not None:
            event_seqs.extend(seqs)
        return updated

    # ------------------------------------------------------------ reward log

    def _writer_lock(self, replica_id: str) -> threading.Lock:
        with self._state_lock:
            return self._writer_locks.setdefault(replica_id, threading.Lock())

    @_guard
    def append_rewards(
        self,
        replica_id: str,
        rows: Sequence[RewardRow] | RewardColumns,
        logged: dict[int, LoggedValues] | None = None,
    ) -> list[bool]:
        """Durably log new rewards in one commit; per row True if new, False if duplicate.

        A key repeated inside `rows` counts at its first occurrence only. When this returns
        the commit is durable (SQLite WAL with synchronous=FULL; PostgreSQL with its
        default synchronous_commit=on).

        A row of an earlier commit that raised but landed is reported new (nobody was told
        it was stored); the log then holds that earlier attempt's values, which may differ
        from these (a default reward racing an in-doubt real one, a client retrying with
        another value). ``logged`` receives, by row index, the logged values of such rows:
        they, not the ones passed, are what the log replays.
        """
        if not 0 < len(replica_id) <= MAX_REPLICA_ID_CHARS:
            raise ValueError(f"replica_id must be 1..{MAX_REPLICA_ID_CHARS} characters")
        cols = rows if isinstance(rows, RewardColumns) else RewardColumns.from_rows(rows)
        n = len(cols)
        if n == 0:
            return []
        if min(map(len, cols.keys)) < 1 or max(map(len, cols.keys)) > MAX_DEDUP_KEY_CHARS:
            raise ValueError(f"dedup_key must be 1..{MAX_DEDUP_KEY_CHARS} characters")
        first = _first_occurrences(cols.keys)
        picked = cols if first is None else cols.take(first)
        # One writer per replica id keeps its commits in replica_seq order (see module doc).
        found: dict[int, LoggedValues] = {}
        with self._writer_lock(replica_id):
            new = self._append_locked(replica_id, picked, found)
        if logged is not None:
            logged.update(found if first is None else {int(first[i]): v for i, v in found.items()})
        if first is None:
            return new.tolist()
        result = np.zeros(n, dtype=bool)
        result[first] = new
        return result.tolist()

    def _append_locked(
        self, replica_id: str, cols: RewardColumns, logged: dict[int, LoggedValues]
    ) -> npt.NDArray[np.bool_]:
        """Insert `cols` (distinct keys); per item True if it is new to the log."""
        keys = cols.keys
        start = self._next_seq.get(replica_id)
        try:
            with self._tx(write=True) as conn:
                if start is None:
                    start = self._max_seq(conn, replica_id) + 1
                insert = self._insert_rewards_sqlite if self._sqlite else self._insert_rewards_pg
                inserted = insert(conn, replica_id, start, cols)
                if inserted == len(keys):
                    new = np.ones(len(keys), dtype=bool)
                else:
                    new = _new_keys(conn, self.dialect, replica_id, start, keys)
                unacked = self._unacked.get(replica_id)
                if unacked:
                    self._reclaim(conn, replica_id, cols, new, unacked, logged)
        except sa_exc.IntegrityError:
            self._next_seq.pop(replica_id, None)
            with self._tx(write=False) as conn:
                stored_max = self._max_seq(conn, replica_id)
            if start is not None and stored_max >= start:
                raise ReplicaConflict(replica_id) from None
            raise
        except BaseException:
            # The commit may or may not have happened: re-read the sequence next time and
            # remember the keys so a retry of this batch is not mistaken for duplicates.
            self._next_seq.pop(replica_id, None)
            if start is not None:  # else nothing was inserted
                unacked = self._unacked.setdefault(replica_id, OrderedDict())
                for seq, key in enumerate(keys, start):
                    unacked.setdefault(key, set()).add(seq)
                    unacked.move_to_end(key)
                while len(unacked) > _UNACKED_CAP:
                    unacked.popitem(last=False)
            raise
        self._next_seq[replica_id] = start + len(keys)
        unacked = self._unacked.get(replica_id)
        if unacked:
            for key in keys:
                unacked.pop(key, None)
        return new

    # The reward log is the hot write path (every group commit), so it bypasses SQLAlchemy's
    # per-row parameter processing, which cost several times the database's own work per
    # row: SQLite gets one executemany of plain tuples, PostgreSQL one INSERT ... SELECT
    # FROM unnest(arrays) (one statement however many rows, instead of psycopg parsing a
    # multi-row VALUES text with ten placeholders per row). Both are built from columns
    # (tolist() of NumPy arrays), never from one Python object per reward.
    @staticmethod
    def _insert_rewards_sqlite(
        conn: Connection, replica_id: str, start: int, cols: RewardColumns
    ) -> int:
        n = len(cols)
        params = list(
            zip(
                repeat(replica_id, n),
                range(start, start + n),
                cols.keys,
                cols.experiment_ids.tolist(),
                cols.arms.tolist(),
                cols.values.tolist(),
                cols.score_list(),
                repeat(None, n) if cols.guardrails_json is None else cols.guardrails_json,
                cols.epochs.tolist(),
                cols.received_at.tolist(),
                strict=True,
            )
        )
        return int(conn.exec_driver_sql(_SQLITE_INSERT_REWARDS, params).rowcount)

    @staticmethod
    def _insert_rewards_pg(
        conn: Connection, replica_id: str, start: int, cols: RewardColumns
    ) -> int:
        n = len(cols)
        params = (
            replica_id,
            list(range(start, start + n)),
            cols.keys,
            cols.experiment_ids.tolist(),
            cols.arms.tolist(),
            cols.values.tolist(),
            cols.score_list(),
            [None] * n if cols.guardrails_json is None else cols.guardrails_json,
            cols.epochs.tolist(),
            cols.received_at.tolist(),
        )
        return int(conn.exec_driver_sql(_PG_INSERT_REWARDS, params).rowcount)

    @staticmethod
    def _reclaim(
        conn: Connection,
        replica_id: str,
        cols: RewardColumns,
        new: npt.NDArray[np.bool_],
        unacked: Mapping[str, set[int]],
        logged: dict[int, LoggedValues],
    ) -> None:
        """Mark as new (in place) the duplicates that are rows of our failed commits.

        ``logged`` gets the stored values of those whose values differ from ``cols``.
        """
        keys = cols.keys
        doubtful = [i for i in np.flatnonzero(~new).tolist() if keys[i] in unacked]
        if not doubtful:
            return
        r = rewards.c
        stored = {
            row.dedup_key: row
            for row in conn.execute(
                sa.select(
                    r.dedup_key, r.replica_seq, r.arm, r.value, r.epoch, r.guardrails_json
                ).where(r.dedup_key.in_([keys[i] for i in doubtful]), r.replica_id == replica_id)
            )
        }
        for i in doubtful:
            row = stored.get(keys[i])
            if row is None or row.replica_seq not in unacked[keys[i]]:
                continue
            new[i] = True
            values = LoggedValues(
                int(row.arm), float(row.value), int(row.epoch), row.guardrails_json
            )
            submitted = LoggedValues(
                int(cols.arms[i]),
                float(cols.values[i]),
                int(cols.epochs[i]),
                None if cols.guardrails_json is None else cols.guardrails_json[i],
            )
            if values != submitted:
                logged[i] = values

    @staticmethod
    def _max_seq(conn: Connection, replica_id: str) -> int:
        value = conn.execute(
            sa.select(sa.func.max(rewards.c.replica_seq)).where(rewards.c.replica_id == replica_id)
        ).scalar()
        return 0 if value is None else int(value)

    @_guard
    def rewards_since(
        self,
        positions: Mapping[str, int],
        exclude_replica: str | None = None,
        limit: int = 10_000,
        experiment_id: int | None = None,
        replica: str | None = None,
        upto: Mapping[str, int] | None = None,
    ) -> list[LoggedReward]:
        """Rows past `positions` (replicas missing from it: from the start); only of
        `replica` if given, and only at or before `upto` if given (replicas missing from
        it: none).

        Ordered by (replica_id, replica_seq); page by advancing `positions` to the last row
        seen per replica and calling again until the result is shorter than `limit`.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        c = rewards.c
        query = sa.select(rewards).order_by(c.replica_id, c.replica_seq).limit(limit)
        if positions:
            query = query.where(
                sa.or_(
                    *(
                        sa.and_(c.replica_id == rid, c.replica_seq > seq)
                        for rid, seq in positions.items()
                    ),
                    c.replica_id.not_in(list(positions)),
                )
            )
        if exclude_replica is not None:
            query = query.where(c.replica_id != exclude_replica)
        if experiment_id is not None:
            query = query.where(c.experiment_id == experiment_id)
        if replica is not None:
            query = query.where(c.replica_id == replica)
        if upto is not None:
            query = query.where(
                sa.or_(
                    sa.false(),
                    *(
                        sa.and_(c.replica_id == rid, c.replica_seq <= seq)
                        for rid, seq in upto.items()
                    ),
                )
            )
        with self._tx(write=False) as conn:
            return [
                LoggedReward(
                    replica_id=r.replica_id,
                    replica_seq=r.replica_seq,
                    dedup_key=r.dedup_key,
                    experiment_id=r.experiment_id,
                    arm=r.arm,
                    value=float(r.value),
                    prediction_score=(
                        None if r.prediction_score is None else float(r.prediction_score)
                    ),
                    guardrails_json=r.guardrails_json,
                    epoch=r.epoch,
                    received_at=float(r.received_at),
                )
                for r in conn.execute(query)
            ]

    @_guard
    def recent_rewards(
        self, experiment_id: int, replicas: Sequence[str], per_replica: int
    ) -> dict[str, list[tuple[int, float, float]]]:
        """Per replica, (arm, value, received_at) of the last `per_replica` rewards of
        `experiment_id` it logged, newest first (replicas with none are left out): one
        backward range scan of the (experiment, replica, seq) index per replica, each
        reading at most `per_replica` rows."""
        if per_replica < 1:
            raise ValueError(f"per_replica must be >= 1, got {per_replica}")
        c = rewards.c
        out: dict[str, list[tuple[int, float, float]]] = {}
        with self._tx(write=False) as conn:
            for replica in replicas:
                query = (
                    sa.select(c.arm, c.value, c.received_at)
                    .where(c.experiment_id == experiment_id, c.replica_id == replica)
                    .order_by(c.replica_seq.desc())
                    .limit(per_replica)
                )
                rows = [(int(a), float(v), float(t)) for a, v, t in conn.execute(query)]
                if rows:
                    out[replica] = rows
        return out

    @_guard
    def recent_scores(
        self,
        experiment_id: int,
        n_arms: int,
        spans: Sequence[tuple[float, float]],
        per_arm: int,
        positions: Mapping[str, int],
    ) -> dict[int, list[float]]:
        """Per variant the last `per_arm` prediction scores of rewards received in any of
        `spans` (``[start, end)`` of `received_at`, either end may be infinite), oldest
        first; only rows at or before `positions` (the log applied so far), so a row the
        caller will still be fed from the log is not counted twice. One index range scan
        (``ix_rewards_scored``) per variant and span, each reading at most `per_arm` rows;
        rows past `positions` (logged since the caller read them: a handful) are dropped
        after the read, so a window may come out that many short.
        """
        c = rewards.c
        found: dict[int, list[tuple[float, float]]] = {}
        with self._tx(write=False) as conn:
            for arm in range(n_arms):
                rows: list[tuple[float, float]] = []
                for start, end in spans:
                    query = (
                        sa.select(c.received_at, c.prediction_score, c.replica_id, c.replica_seq)
                        .where(
                            c.experiment_id == experiment_id,
                            c.arm == arm,
                            c.prediction_score.is_not(None),
                        )
                        .order_by(c.received_at.desc())
                        .limit(per_arm)
                    )
                    if math.isfinite(start):
                        query = query.where(c.received_at >= start)
                    if math.isfinite(end):
                        query = query.where(c.received_at < end)
                    rows.extend(
                        (float(t), float(x))
                        for t, x, rid, seq in conn.execute(query)
                        if seq <= positions.get(rid, 0)
                    )
                if rows:
                    rows.sort(key=lambda r: r[0])
                    found[arm] = rows[-per_arm:]
        return {arm: [x for _, x in rows] for arm, rows in found.items()}

    @_guard
    def replica_position(self, replica_id: str) -> int:
        """Highest logged replica_seq of one replica (0 if none): one primary-key probe,
        where `replica_positions` reads an index entry per row of the log."""
        c = rewards.c
        query = sa.select(sa.func.max(c.replica_seq)).where(c.replica_id == replica_id)
        with self._tx(write=False) as conn:
            return int(conn.execute(query).scalar() or 0)

    @_guard
    def replica_positions(self) -> dict[str, int]:
        """Highest logged replica_seq per replica."""
        query = sa.select(rewards.c.replica_id, sa.func.max(rewards.c.replica_seq)).group_by(
            rewards.c.replica_id
        )
        with self._tx(write=False) as conn:
            return {rid: int(seq) for rid, seq in conn.execute(query)}

    # ------------------------------------------------------------ counts and epochs

    @_guard
    def add_assignment_counts(self, rows: Sequence[AssignmentCount]) -> None:
        """Add the deltas to the stored counts (rows for the same cell are summed first)."""
        totals: dict[tuple[int, int, int], int] = {}
        for r in rows:
            cell = (r.experiment_id, r.epoch, r.arm)
            totals[cell] = totals.get(cell, 0) + r.count
        if not totals:
            return
        # Sorted so concurrent replicas lock rows in one order and cannot deadlock; and one
        # row per cell, since PostgreSQL refuses to upsert the same row twice in a statement.
        params = [
            {"experiment_id": e, "epoch": ep, "arm": a, "count": n}
            for (e, ep, a), n in sorted(totals.items())
        ]
        stmt = self._insert(assignment_counts)
        stmt = stmt.on_conflict_do_update(
            index_elements=["experiment_id", "epoch", "arm"],
            set_={"count": assignment_counts.c.count + stmt.excluded.count},
        )
        with self._tx(write=True) as conn:
            conn.execute(stmt, params)

    @_guard
    def assignment_counts(self, experiment_id: int) -> list[AssignmentCount]:
        """Stored counts ordered by (epoch, arm)."""
        c = assignment_counts.c
        # Unpacked by position: a Row is a tuple, and `row.count` is tuple.count.
        query = (
            sa.select(c.epoch, c.arm, c.count)
            .where(c.experiment_id == experiment_id)
            .order_by(c.epoch, c.arm)
        )
        with self._tx(write=False) as conn:
            return [
                AssignmentCount(experiment_id=experiment_id, epoch=epoch, arm=arm, count=int(n))
                for epoch, arm, n in conn.execute(query)
            ]

    @_guard
    def save_pending_defaults(self, replica_id: str, rows: Sequence[PendingDefault]) -> None:
        """Remember decisions awaiting a default reward (a row already saved is kept)."""
        if not rows:
            return
        values = [
            {
                "replica_id": replica_id,
                "key": r.key,
                "experiment_id": r.experiment_id,
                "token": r.token,
                "issued_at": r.issued_at,
                "epoch": r.epoch,
                "batch": r.batch,
                "arms": np.asarray(r.arms, dtype="<i8").tobytes(),
            }
            for r in rows
        ]
        stmt = self._insert(pending_defaults).on_conflict_do_nothing(
            index_elements=["replica_id", "key"]
        )
        with self._tx(write=True) as conn:
            conn.execute(stmt, values)

    @_guard
    def delete_pending_defaults(self, replica_id: str, keys: Sequence[str]) -> None:
        """Forget decisions whose default was written or is no longer wanted."""
        t = pending_defaults.c
        with self._tx(write=True) as conn:
            for start in range(0, len(keys), 1000):
                conn.execute(
                    sa.delete(pending_defaults).where(
                        t.replica_id == replica_id, t.key.in_(keys[start : start + 1000])
                    )
                )

    @_guard
    def pending_defaults(self, replica_id: str) -> list[PendingDefault]:
        """Every decision of ``replica_id`` still awaiting its default, oldest first."""
        t = pending_defaults.c
        query = (
            sa.select(pending_defaults)
            .where(t.replica_id == replica_id)
            .order_by(t.issued_at, t.key)
        )
        with self._tx(write=False) as conn:
            return [_pending_default(r) for r in conn.execute(query)]

    def hold_replica_lock(self, replica_id: str) -> bool:
        """Take or confirm the lock that says ``replica_id`` is alive; False if held.

        PostgreSQL: a session advisory lock like the leader lock's, freed by the server
        when the process dies, so another replica can tell that this one is gone (see
        `adopt_pending_defaults`). SQLite: always True (one process owns the file).
        """
        return self.try_leader_lock(replica_lock_key(replica_id))

    @_guard
    def gone_replicas(self, replica_id: str) -> set[str]:
        """Replicas other than ``replica_id`` that have pending defaults and whose replica
        lock nobody holds right now (SQLite: every other one, one process owns the file).

        A moment's answer: a replica whose lock session just dropped (a database restart)
        looks gone until it takes its lock again, so callers adopt only ids found gone on
        two passes some time apart (``Allocator._adopt_defaults``).
        """
        with self._tx(write=True) as conn:
            return set(self._gone(conn, replica_id))

    def _gone(self, conn: Connection, replica_id: str) -> Iterator[str]:
        t = pending_defaults.c
        others = list(
            conn.execute(
                sa.select(t.replica_id).where(t.replica_id != replica_id).distinct()
            ).scalars()
        )
        for other in others:
            if not self._sqlite:
                # Held until this transaction ends: the replica cannot take its lock (and
                # then load its rows) while the caller looks at, or moves, them.
                lock = sa.func.pg_try_advisory_xact_lock(replica_lock_key(other))
                if not conn.execute(sa.select(lock)).scalar():
                    continue  # alive: it holds its lock
            yield str(other)

    @_guard
    def adopt_pending_defaults(
        self,
        replica_id: str,
        experiment_ids: Collection[int],
        only: Collection[str] | None = None,
    ) -> list[PendingDefault]:
        """Move the pending defaults of replicas that are gone to ``replica_id``; returns
        the moved rows, oldest first. Only rows of ``experiment_ids`` (the experiments the
        caller knows) move: the others wait for a pass that knows them; with ``only``, only
        rows of those replica ids.

        Replica ids default to host:pid, so a restarted server comes back under a new id
        and its saved decisions would otherwise wait forever. An id is gone when nobody
        holds its replica lock (`hold_replica_lock`, `gone_replicas`); the check takes that
        lock for the transaction that moves the rows, so the replica cannot come back (it
        takes its lock before it loads its rows) half way through. Rows move between
        replicas, never get copied: each decision is tracked by one replica, and its
        default's dedup key would make a second write a duplicate anyway.
        """
        t = pending_defaults.c
        ids = sorted(experiment_ids)
        if not ids:
            return []
        moved: list[PendingDefault] = []
        with self._tx(write=True) as conn:
            for other in list(self._gone(conn, replica_id)):
                if only is not None and other not in only:
                    continue
                stmt = (
                    sa.update(pending_defaults)
                    .where(t.replica_id == other, t.experiment_id.in_(ids))
                    .values(replica_id=replica_id)
                    .returning(*pending_defaults.c)
                )
                moved.extend(_pending_default(r) for r in conn.execute(stmt))
        moved.sort(key=lambda r: (r.issued_at, r.key))
        return moved

    @_guard
    def record_allocation_epoch(self, epoch: AllocationEpoch) -> bool:
        """Store an epoch's shares; False if that epoch was already recorded."""
        stmt = (
            self._insert(allocation_epochs)
            .values(
                experiment_id=epoch.experiment_id,
                epoch=epoch.epoch,
                started_at=epoch.started_at,
                shares_json=json.dumps(list(epoch.shares)),
            )
            .on_conflict_do_nothing(index_elements=["experiment_id", "epoch"])
            .returning(allocation_epochs.c.epoch)
        )
        with self._tx(write=True) as conn:
            return conn.execute(stmt).first() is not None

    @_guard
    def allocation_epochs(self, experiment_id: int) -> list[AllocationEpoch]:
        """All epochs of an experiment, oldest first."""
        c = allocation_epochs.c
        query = (
            sa.select(allocation_epochs).where(c.experiment_id == experiment_id).order_by(c.epoch)
        )
        with self._tx(write=False) as conn:
            return [
                AllocationEpoch(
                    experiment_id=r.experiment_id,
                    epoch=r.epoch,
                    started_at=r.started_at,
                    shares=tuple(float(x) for x in json.loads(r.shares_json)),
                )
                for r in conn.execute(query)
            ]

    # ------------------------------------------------------------ snapshots

    @_guard
    def save_snapshot(
        self, experiment_id: int, positions: Mapping[str, int], payload: bytes, now: float
    ) -> int:
        """Store a snapshot and keep only the newest `snapshots_kept`; returns its id."""
        c = snapshots.c
        with self._tx(write=True) as conn:
            snapshot_id = conn.execute(
                sa.insert(snapshots)
                .values(
                    experiment_id=experiment_id,
                    created_at=now,
                    positions_json=json.dumps(dict(positions), sort_keys=True),
                    payload=payload,
                )
                .returning(c.id)
            ).scalar_one()
            kept = (
                sa.select(c.id)
                .where(c.experiment_id == experiment_id)
                .order_by(c.id.desc())
                .limit(self._config.snapshots_kept)
            )
            conn.execute(
                sa.delete(snapshots).where(
                    c.experiment_id == experiment_id, c.id.not_in(kept.scalar_subquery())
                )
            )
        return int(snapshot_id)

    @_guard
    def latest_snapshot(self, experiment_id: int) -> SnapshotRow | None:
        """The newest snapshot of an experiment, if any."""
        c = snapshots.c
        query = (
            sa.select(snapshots)
            .where(c.experiment_id == experiment_id)
            .order_by(c.id.desc())
            .limit(1)
        )
        with self._tx(write=False) as conn:
            r = conn.execute(query).first()
        if r is None:
            return None
        return SnapshotRow(
            id=r.id,
            experiment_id=r.experiment_id,
            created_at=r.created_at,
            positions={str(k): int(v) for k, v in json.loads(r.positions_json).items()},
            payload=bytes(r.payload),
        )

    # ------------------------------------------------------------ audit and events

    def _serialize_appends(self, conn: Connection, table: sa.Table) -> None:
        # seq comes from a sequence: without this lock a writer holding seq 7 could commit
        # after another committed seq 8, and a watcher polling events_after(7) would skip 7.
        # Appends are rare (state changes), so serializing them costs nothing.
        if not self._sqlite:
            conn.execute(sa.text(f"LOCK TABLE {table.name} IN SHARE ROW EXCLUSIVE MODE"))

    def _insert_audit(self, conn: Connection, record: AuditRecord) -> int:
        self._serialize_appends(conn, audit)
        stmt = sa.insert(audit).values(_audit_values(record)).returning(audit.c.seq)
        return int(conn.execute(stmt).scalar_one())

    def _insert_event(self, conn: Connection, record: EventRecord) -> int:
        self._serialize_appends(conn, events)
        stmt = sa.insert(events).values(_event_values(record)).returning(events.c.seq)
        return int(conn.execute(stmt).scalar_one())

    @_guard
    def append_audit(self, record: AuditRecord) -> int:
        """Append an audit row; returns its seq."""
        with self._tx(write=True) as conn:
            return self._insert_audit(conn, record)

    @_guard
    def list_audit(self, experiment_id: int | None = None, limit: int = 1000) -> list[AuditRecord]:
        """The newest `limit` audit rows (of one experiment, or all), oldest first."""
        query = sa.select(audit).order_by(audit.c.seq.desc()).limit(limit)
        if experiment_id is not None:
            query = query.where(audit.c.experiment_id == experiment_id)
        with self._tx(write=False) as conn:
            rows = list(conn.execute(query))
        return [
            AuditRecord(
                seq=r.seq,
                experiment_id=r.experiment_id,
                action=r.action,
                actor=r.actor,
                at=r.at,
                from_state=r.from_state,
                to_state=r.to_state,
                reason=r.reason,
                summary_json=r.summary_json,
            )
            for r in reversed(rows)
        ]

    @_guard
    def append_event(self, record: EventRecord) -> int:
        """Append an event; returns its seq."""
        with self._tx(write=True) as conn:
            return self._insert_event(conn, record)

    @_guard
    def events_after(
        self, seq: int, experiment_id: int | None = None, limit: int = 1000
    ) -> list[EventRecord]:
        """Events with seq > `seq` (of one experiment, or all), oldest first."""
        query = sa.select(events).where(events.c.seq > seq).order_by(events.c.seq).limit(limit)
        if experiment_id is not None:
            query = query.where(events.c.experiment_id == experiment_id)
        with self._tx(write=False) as conn:
            return [
                EventRecord(
                    seq=r.seq,
                    experiment_id=r.experiment_id,
                    type=r.type,
                    at=r.at,
                    variant=r.variant,
                    reason=r.reason,
                    details_json=r.details_json,
                )
                for r in conn.execute(query)
            ]

    # ------------------------------------------------------------ meta

    @_guard
    def get_meta(self, key: str) -> str | None:
        """A metadata value."""
        with self._tx(write=False) as conn:
            value = conn.execute(sa.select(meta.c.value).where(meta.c.key == key)).scalar()
        return None if value is None else str(value)

    @_guard
    def set_meta(self, key: str, value: str) -> None:
        """Insert or overwrite a metadata value."""
        stmt = self._insert(meta).values(key=key, value=value)
        stmt = stmt.on_conflict_do_update(index_elements=["key"], set_={"value": value})
        with self._tx(write=True) as conn:
            conn.execute(stmt)

    @_guard
    def set_meta_if_absent(self, key: str, value: str) -> str:
        """Store `value` unless `key` exists; return the value in force (race-safe)."""
        stmt = self._insert(meta).values(key=key, value=value)
        stmt = stmt.on_conflict_do_nothing(index_elements=["key"])
        with self._tx(write=True) as conn:
            conn.execute(stmt)
            # READ COMMITTED: this new statement sees the winner's row even if it was a
            # concurrent transaction that the insert above waited for.
            stored = conn.execute(sa.select(meta.c.value).where(meta.c.key == key)).scalar_one()
        return str(stored)

    @_guard
    def delete_meta(self, key: str, if_value: str | None = None) -> None:
        """Forget a metadata value (a no-op if absent, or if it is not ``if_value``: a
        compare-and-delete, so a value written since it was read survives)."""
        stmt = sa.delete(meta).where(meta.c.key == key)
        if if_value is not None:
            stmt = stmt.where(meta.c.value == if_value)
        with self._tx(write=True) as conn:
            conn.execute(stmt)

    # ------------------------------------------------------------ leadership

    def try_leader_lock(self, key: int) -> bool:
        """Take or confirm the cluster-wide lock `key`; False if another replica holds it.

        PostgreSQL: a session advisory lock on a dedicated autocommit connection, so the
        lock lives exactly as long as that session (a crashed leader's lock is freed by the
        server). Confirming runs a query on that session, which fails if it died. Raises
        StoreUnavailable when the database is unreachable: treat that as "not leader".
        SQLite: always True (one replica by construction).
        """
        if self._sqlite:
            return True
        return self._try_pg_lock(key)

    @_guard
    def _try_pg_lock(self, key: int) -> bool:
        with self._leader_conns_lock:
            held = self._leader_conns.get(key)
            if held is not None:
                try:
                    held.execute(sa.text("SELECT 1"))
                    return True
                except sa_exc.DBAPIError:
                    self._drop_leader_conn(key)
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                # The server must notice a holder that vanished (power loss, partition)
                # in seconds, not after the kernel's two-hour keepalive default: until it
                # closes the session the lock stays taken (a restart with the same
                # --replica-id is refused, no new leader is elected).
                for setting, value in _LOCK_SESSION_KEEPALIVE:
                    conn.execute(sa.text(f"SET {setting} = {value}"))
                got = bool(conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar())
            except BaseException:
                conn.invalidate()
                conn.close()
                raise
            if not got:
                conn.close()
                return False
            self._leader_conns[key] = conn
            return True

    def release_leader_lock(self, key: int | None = None) -> None:
        """Give up one leader lock (or all); a no-op for locks not held."""
        with self._leader_conns_lock:
            for k in [key] if key is not None else list(self._leader_conns):
                conn = self._leader_conns.get(k)
                if conn is None:
                    continue
                with contextlib.suppress(sa_exc.DBAPIError):
                    conn.execute(sa.select(sa.func.pg_advisory_unlock(k)))
                self._drop_leader_conn(k)

    def _drop_leader_conn(self, key: int) -> None:
        conn = self._leader_conns.pop(key)
        with contextlib.suppress(sa_exc.DBAPIError):
            # Closing the session is what guarantees the server frees the lock.
            conn.invalidate()
        conn.close()


# Server-side TCP keepalive of the lock sessions: a dead peer is found after about
# idle + interval * count = 25 s (ignored on Unix-socket connections, which fail at once).
_LOCK_SESSION_KEEPALIVE = (
    ("tcp_keepalives_idle", 10),
    ("tcp_keepalives_interval", 5),
    ("tcp_keepalives_count", 3),
)


def replica_lock_key(replica_id: str) -> int:
    """The advisory lock key (signed 64 bits) that a live ``replica_id`` holds."""
    digest = hashlib.blake2b(f"replica:{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _pending_default(r: Any) -> PendingDefault:
    return PendingDefault(
        experiment_id=int(r.experiment_id),
        key=str(r.key),
        token=str(r.token),
        issued_at=float(r.issued_at),
        epoch=int(r.epoch),
        batch=bool(r.batch),
        arms=tuple(np.frombuffer(r.arms, dtype="<i8").tolist()),
    )


def _create_engine(url: sa.URL, config: StoreConfig) -> Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=config.pool_size,
            max_overflow=config.pool_size,
            connect_args={
                "connect_timeout": max(1, round(config.connect_timeout_seconds)),
                "application_name": "allocator",
            },
        )
    memory = url.database in (None, "", ":memory:")
    engine = sa.create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": config.busy_timeout_seconds},
        poolclass=StaticPool if memory else None,
    )
    busy_ms = round(config.busy_timeout_seconds * 1000)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We emit BEGIN ourselves (pysqlite's implicit transactions are not SERIALIZABLE
        # reads); WAL lets readers run beside the writer, synchronous=FULL fsyncs the WAL on
        # every commit so an acknowledged reward survives kill -9 and power loss.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that reads first and
        # then writes fails with SQLITE_BUSY at once instead of waiting out busy_timeout.
        immediate = conn.get_execution_options().get("allocator_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine

"""Crash safety: kill -9 under load, database outages, exact recovery, SQLite's single replica.

The servers under test are real ``allocator serve`` subprocesses (``python -m allocator.cli``)
killed with SIGKILL at random moments while clients stream rewards with known event ids and
retry whatever was not acknowledged. Rewards are Bernoulli 0/1, so the posterior statistics
(n, sum, sum of squares) are exact integer sums and must equal, bit for bit, what the set
of acknowledged rewards implies. ``-m stress`` runs 20+ kill rounds per database.

The harness (``ServerProcess``, ``RewardSender``, ``recovered_state``) is shared with
tests/test_replicas.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from allocator_client import AllocatorClient
from allocator_client.v1 import allocator_pb2 as pb
from allocator_client.v1 import allocator_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from allocator.app import Allocator
from allocator.config import ServerConfig
from allocator.durable import RewardWriter, _Job, apply_logged
from allocator.engine import Engine, ExperimentConfig
from allocator.lifecycle import Action
from allocator.metrics import Metrics
from allocator.server import STORE_HEALTH, Running, create_server
from allocator.store import RewardColumns, RewardRow, SqlStore, StoreLocked, StoreUnavailable
from allocator.tokens import event_key
from tests.conftest import ADMIN_TOKEN, server_config, wait_until

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "crash"
VARIANTS = ("a", "b", "c")
# Success probabilities per arm: distinct, so a reward credited to the wrong arm shows.
P_SUCCESS = (0.2, 0.5, 0.7)
CHANNEL_OPTIONS = [
    # A killed server comes back within seconds: reconnect quickly instead of backing off
    # towards gRPC's default two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
ACKED = (pb.REWARD_STATUS_ACCEPTED, pb.REWARD_STATUS_DUPLICATE)


# ---------------------------------------------------------------- server subprocesses


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_status(target: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The gRPC health status of ``service`` (None if the server does not answer)."""
    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(resp.status)


class ServerProcess:
    """One ``allocator serve`` subprocess; restartable on the same database and port."""

    def __init__(
        self,
        database_url: str,
        replica_id: str,
        log_dir: Path,
        *,
        extra: Sequence[str] = (),
    ) -> None:
        self.database_url = database_url
        self.replica_id = replica_id
        self.log_path = log_dir / f"server-{replica_id}.log"
        self.extra = list(extra)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def target(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """The command line of one incarnation."""
        return [
            sys.executable,
            "-m",
            "allocator.cli",
            "serve",
            "--listen",
            self.target,
            "--http-port",
            "-1",
            "--database-url",
            self.database_url,
            "--replica-id",
            self.replica_id,
            "--log-json",
            "false",
            "--admin-token",
            ADMIN_TOKEN,
            "--sync-interval-s",
            "0.1",
            "--snapshot-interval-s",
            "0.5",
            "--default-grace-s",
            "0.1",
            *self.extra,
        ]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCATOR_")}
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            self.proc = subprocess.Popen(
                self.argv(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        return self.proc

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the health check answers SERVING; fail if the process exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server {self.replica_id} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if health_status(self.target, timeout=0.5) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.05)
        raise TimeoutError(f"server {self.replica_id} not ready in {timeout} s:\n{self.tail()}")

    def start(self, timeout: float = 120.0) -> None:
        """Spawn and wait until serving (on a new port if the old one was taken meanwhile)."""
        for _ in range(3):
            self.spawn()
            try:
                self.wait_ready(timeout)
                return
            except RuntimeError:
                if "could not bind" not in self.tail():
                    raise
                self.port = free_port()
        raise RuntimeError(f"no free port for {self.replica_id}")

    def kill(self) -> None:
        """SIGKILL: no drain, no final snapshot, no goodbye to the database."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM: drain, flush, snapshot; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def tail(self, chars: int = 4000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def server_processes(*servers: ServerProcess) -> Iterator[None]:
    """Make sure no subprocess outlives the test, whatever happens."""
    try:
        yield
    finally:
        for s in servers:
            s.kill()


def start_all(*servers: ServerProcess) -> None:
    """Start several servers concurrently (each pays the import time once, in parallel)."""
    for s in servers:
        s.spawn()
    for s in servers:
        s.wait_ready()


def create_experiment(target: str, name: str = EXPERIMENT) -> pb.Experiment:
    """Create the Bernoulli Thompson experiment the senders feed."""
    with grpc.insecure_channel(target) as ch:
        resp = pb_grpc.AllocatorStub(ch).CreateExperiment(
            pb.CreateExperimentRequest(
                spec=pb.ExperimentSpec(name=name, variants=list(VARIANTS), seed=7)
            ),
            timeout=30,
        )
    return resp.experiment


def report(target: str, name: str = EXPERIMENT) -> pb.GetReportResponse:
    """GetReport from one server."""
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.AllocatorStub(ch).GetReport(pb.GetReportRequest(experiment=name), timeout=30)


def reported_counts(resp: pb.GetReportResponse) -> tuple[list[int], list[int]]:
    """(n, sum) per arm from a report. The sums are integers: round(mean * n) recovers
    them exactly while n * 2^-52 < 0.5, i.e. for any n below 10^15."""
    n = [int(v.rewards) for v in resp.variants]
    s = [round(v.mean * v.rewards) if v.rewards else 0 for v in resp.variants]
    return n, s


# ---------------------------------------------------------------- reward senders


@dataclass
class Ledger:
    """What a sender sent and what the server acknowledged, per event id."""

    items: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (arm, value)
    status: dict[str, int] = field(default_factory=dict)  # id -> last ack status
    accepted: collections.Counter[str] = field(default_factory=collections.Counter)
    failed: set[str] = field(default_factory=set)  # ids with at least one failed attempt
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def merge(self, other: Ledger) -> None:
        """Add another sender's (disjoint) ids."""
        self.items.update(other.items)
        self.status.update(other.status)
        self.accepted.update(other.accepted)
        self.failed |= other.failed
        self.errors.update(other.errors)


class RewardSender(threading.Thread):
    """Streams RewardBatch requests of fresh event ids; retries unacknowledged batches.

    ``stream=True`` uses the bidirectional RewardStream RPC with several requests in
    flight; otherwise unary RewardBatch calls. A batch is acknowledged only by a response
    carrying its statuses; any RPC error leaves it pending, and pending batches are resent
    (same ids, arms and values) before anything new.
    """

    def __init__(
        self,
        target: str,
        prefix: str,
        seed: int,
        *,
        stream: bool = False,
        window: int = 4,
        experiment: str = EXPERIMENT,
        max_batch: int = 64,
        pause_s: float = 0.002,
    ) -> None:
        super().__init__(name=f"sender-{prefix}", daemon=True)
        self.target = target
        self.prefix = prefix
        self.rng = np.random.default_rng(seed)
        self.stream = stream
        self.window = window
        self.experiment = experiment
        self.max_batch = max_batch
        self.pause_s = pause_s
        self.ledger = Ledger()
        self.pending: collections.deque[list[str]] = collections.deque()
        self.lock = threading.Lock()
        self.next_id = 0
        self.new_allowed = threading.Event()
        self.new_allowed.set()
        self.halt = threading.Event()
        self.crash: BaseException | None = None

    # -- ledger (any thread) ---------------------------------------------------------------
    def snapshot(self) -> Ledger:
        """A copy of the ledger."""
        with self.lock:
            copy = Ledger()
            copy.merge(self.ledger)
            return copy

    def unacked(self) -> int:
        """Ids sent at least once and not acknowledged yet."""
        with self.lock:
            return len(self.ledger.items) - len(self.ledger.status)

    def drain(self, timeout: float) -> None:
        """Stop making new ids, wait until every id is acknowledged, stop the thread."""
        self.new_allowed.clear()
        deadline = time.monotonic() + timeout
        while self.unacked() and time.monotonic() < deadline:
            if self.crash is not None:
                raise self.crash
            time.sleep(0.05)
        self.halt.set()
        self.join(30)
        if self.crash is not None:
            raise self.crash
        left = self.unacked()
        assert left == 0, f"{self.prefix}: {left} rewards still unacknowledged after {timeout} s"

    # -- the thread ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.halt.is_set():
                target = self.target
                with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
                    stub = pb_grpc.AllocatorStub(ch)
                    while not self.halt.is_set() and self.target == target:
                        sent = self._stream_session(stub) if self.stream else self._unary(stub)
                        if not sent:
                            time.sleep(0.02)
        except BaseException as err:  # surfaced by drain()
            self.crash = err

    def _next_batch(self) -> list[str] | None:
        with self.lock:
            if self.pending:
                return self.pending.popleft()
            if not self.new_allowed.is_set():
                return None
            size = int(self.rng.integers(1, self.max_batch + 1))
            batch = []
            for _ in range(size):
                eid = f"{self.prefix}-{self.next_id}"
                self.next_id += 1
                arm = int(self.rng.integers(len(VARIANTS)))
                value = int(self.rng.random() < P_SUCCESS[arm])
                self.ledger.items[eid] = (arm, value)
                batch.append(eid)
            return batch

    def _request(self, batch: list[str]) -> pb.RewardBatchRequest:
        items = self.ledger.items
        return pb.RewardBatchRequest(
            experiment=self.experiment,
            event_ids=batch,
            variant_indices=[items[e][0] for e in batch],
            values=[float(items[e][1]) for e in batch],
        )

    def _acked(self, batch: list[str], statuses: Sequence[int]) -> None:
        assert len(statuses) == len(batch), "one status per item"
        with self.lock:
            for eid, st in zip(batch, statuses, strict=True):
                assert st in ACKED, f"{eid}: unexpected status {pb.RewardStatus.Name(st)}"
                self.ledger.status[eid] = st
                if st == pb.REWARD_STATUS_ACCEPTED:
                    self.ledger.accepted[eid] += 1

    def _failed(self, batch: list[str], code: grpc.StatusCode | None) -> None:
        with self.lock:
            self.ledger.failed.update(batch)
            self.ledger.errors[code.name if code is not None else "STREAM_ENDED"] += 1
            self.pending.appendleft(batch)

    def _unary(self, stub: pb_grpc.AllocatorStub) -> bool:
        batch = self._next_batch()
        if batch is None:
            return False
        with self.lock:
            request = self._request(batch)
        try:
            resp = stub.RewardBatch(request, timeout=15)
        except grpc.RpcError as err:
            self._failed(batch, err.code())
            time.sleep(0.05)
            return True
        self._acked(batch, resp.statuses)
        time.sleep(self.pause_s)
        return True

    def _stream_session(self, stub: pb_grpc.AllocatorStub) -> bool:
        """One RewardStream call with up to ``window`` requests in flight."""
        requests: collections.deque[pb.RewardStreamRequest] = collections.deque()
        wake = threading.Condition()
        closed = False
        outstanding: dict[int, list[str]] = {}
        counter = [0]

        def gen() -> Iterator[pb.RewardStreamRequest]:
            while True:
                with wake:
                    while not requests and not closed:
                        wake.wait(0.1)
                    if requests:
                        item = requests.popleft()
                    else:
                        return
                yield item

        def submit() -> bool:
            batch = None if self.halt.is_set() else self._next_batch()
            if batch is None:
                return False
            counter[0] += 1
            outstanding[counter[0]] = batch
            with self.lock:
                req = pb.RewardStreamRequest(request_id=counter[0], batch=self._request(batch))
            with wake:
                requests.append(req)
                wake.notify()
            return True

        def close() -> None:
            nonlocal closed
            with wake:
                closed = True
                wake.notify()

        for _ in range(self.window):
            if not submit():
                break
        if not outstanding:
            return False
        call = stub.RewardStream(gen(), timeout=60)
        try:
            for resp in call:
                batch = outstanding.pop(resp.request_id)
                self._acked(batch, resp.batch.statuses)
                time.sleep(self.pause_s)
                if not submit() and not outstanding:
                    close()
        except grpc.RpcError as err:
            for rid in sorted(outstanding, reverse=True):
                self._failed(outstanding.pop(rid), err.code())
            time.sleep(0.05)
        finally:
            close()
            call.cancel()
        for rid in sorted(outstanding, reverse=True):
            self._failed(outstanding.pop(rid), None)
        return True


def merged(senders: Sequence[RewardSender]) -> Ledger:
    """Union of the senders' ledgers."""
    out = Ledger()
    for s in senders:
        out.merge(s.snapshot())
    return out


def expected_stats(items: dict[str, tuple[int, int]], k: int = len(VARIANTS)) -> np.ndarray:
    """(n, sum, sum of squares) per arm implied by a set of 0/1 rewards, exactly."""
    out = np.zeros((k, 3))
    for arm, value in items.values():
        out[arm] += (1.0, value, value * value)
    return out


def check_ledger(ledger: Ledger) -> None:
    """Client-side invariants: everything acked, never ACCEPTED twice, no phantom duplicate."""
    missing = set(ledger.items) - set(ledger.status)
    assert not missing, f"{len(missing)} rewards never acknowledged"
    twice = [e for e, c in ledger.accepted.items() if c > 1]
    assert not twice, f"ACCEPTED more than once (counted twice): {twice[:5]}"
    # DUPLICATE is right only for an id whose earlier attempt failed after its commit;
    # an id sent once and answered DUPLICATE was never counted.
    phantom = [
        e
        for e, st in ledger.status.items()
        if st == pb.REWARD_STATUS_DUPLICATE and e not in ledger.failed
    ]
    assert not phantom, f"DUPLICATE on a first attempt: {phantom[:5]}"


@dataclass
class Recovered:
    """State rebuilt from the database by a fresh, never-started Allocator."""

    stats: np.ndarray
    log_keys: list[str]
    experiment_id: int
    state: str


def recovered_state(url: str, name: str = EXPERIMENT) -> Recovered:
    """Recover like a restarted server would (snapshot + log replay), and read the log."""
    store = SqlStore.open(url)
    try:
        app = Allocator(
            ServerConfig(database_url=url, replica_id="checker", log_json=False),
            store,
            Metrics(CollectorRegistry()),
        )
        rec = app.get(name)
        keys: list[str] = []
        positions: dict[str, int] = {}
        while True:
            rows = store.rewards_since(positions, limit=50_000)
            if not rows:
                break
            for r in rows:
                keys.append(r.dedup_key)
                positions[r.replica_id] = max(positions.get(r.replica_id, 0), r.replica_seq)
        return Recovered(app.engine.view(name).stats, keys, rec.id, rec.lifecycle.state.value)
    finally:
        store.close()


def assert_exact(ledger: Ledger, recovered: Recovered) -> None:
    """Log holds each sent reward once; the posterior equals the acknowledged set's sums."""
    want_keys = sorted(event_key(recovered.experiment_id, e) for e in ledger.items)
    assert len(recovered.log_keys) == len(set(recovered.log_keys)), "a key logged twice"
    assert sorted(recovered.log_keys) == want_keys
    want = expected_stats(ledger.items)
    np.testing.assert_array_equal(recovered.stats, want)


def assert_report_exact(target: str, ledger: Ledger) -> None:
    """The live server's counts and sums per arm equal the acknowledged set's."""
    want = expected_stats(ledger.items)
    n, s = reported_counts(report(target))
    assert n == [int(x) for x in want[:, 0]]
    assert s == [int(x) for x in want[:, 1]]


# ---------------------------------------------------------------- kill -9 under load


@pytest.mark.parametrize(
    "rounds",
    [pytest.param(2, id="quick"), pytest.param(20, id="stress", marks=pytest.mark.stress)],
)
def test_sigkill_under_load_loses_and_duplicates_nothing(
    any_store_url: str, tmp_path: Path, rounds: int
) -> None:
    """kill -9 at random moments while two clients stream; every ack counted exactly once.

    After each restart the served counts lie between what was acknowledged before the
    kill and that plus what was in flight (committed-but-unacknowledged rewards may or may
    not have made it). At the end every reward is acknowledged, and the live server, and a
    fresh recovery after a final kill -9, hold exactly the sums of the sent rewards.
    """
    rng = np.random.default_rng(20240611 + rounds)
    server = ServerProcess(any_store_url, "crash-1", tmp_path)
    senders = [
        RewardSender(server.target, "u", seed=1),
        RewardSender(server.target, "s", seed=2, stream=True),
    ]
    with server_processes(server):
        server.start()
        create_experiment(server.target)
        for s in senders:
            s.start()
        for _ in range(rounds):
            time.sleep(float(rng.uniform(0.2, 1.5)))
            server.kill()
            before = merged(senders)
            server.start()
            # The senders keep going (and retrying) while we look: bounds, not equalities.
            counts, sums = (np.array(x) for x in reported_counts(report(server.target)))
            after = merged(senders)
            low = expected_stats({e: before.items[e] for e in before.status})
            high = expected_stats(after.items)
            assert all(low[:, 0] <= counts) and all(counts <= high[:, 0]), (counts, low, high)
            assert all(low[:, 1] <= sums) and all(sums <= high[:, 1]), (sums, low, high)
        for s in senders:
            s.drain(timeout=60)
        ledger = merged(senders)
        check_ledger(ledger)
        assert sum(ledger.errors.values()) > 0, "no request ever failed: the kills missed"
        landed = sum(st == pb.REWARD_STATUS_DUPLICATE for st in ledger.status.values())
        print(
            f"{rounds} kills: {len(ledger.items)} rewards, {len(ledger.failed)} retried, "
            f"{landed} had landed before their failed attempt; errors {dict(ledger.errors)}"
        )
        assert_report_exact(server.target, ledger)
        server.kill()
    assert_exact(ledger, recovered_state(any_store_url))


# ---------------------------------------------------------------- clean stop / restart


def _normal_spec(name: str) -> pb.ExperimentSpec:
    return pb.ExperimentSpec(
        name=name, variants=["a", "b"], reward_type=pb.REWARD_TYPE_NORMAL, seed=3
    )


def test_recovery_after_clean_stop_is_bit_exact(any_store_url: str) -> None:
    """Posterior and guardrail arrays after a restart equal those before the stop, bit for bit.

    Gaussian rewards with irrational-looking values make floating-point sums depend on
    the order of addition, so this also shows the log is replayed in commit order: a
    from-scratch replay of the whole log (ignoring snapshots) gives the same bits. Every
    fifth reward carries no guardrail metric.
    """
    config = server_config(any_store_url, http_port=-1, snapshot_interval_s=0.3)
    running = create_server(config)
    try:
        app = running.app
        app.create(_normal_spec("gauss"))
        rng = np.random.default_rng(5)
        for i in range(40):
            n = 25
            latency = rng.lognormal(3.0, 0.5, n)
            app.reward(
                experiment="gauss",
                values=list(rng.normal(0.3, 1.7, n)),
                event_ids=[f"g{i}-{j}" for j in range(n)],
                variant_indices=[int(x) for x in rng.integers(0, 2, n)],
                guardrails=[
                    {"latency_ms": float(x)} if j % 5 else {} for j, x in enumerate(latency)
                ],
            )
            if i == 20:
                time.sleep(0.4)  # let a periodic snapshot land mid-stream
        before = app.engine.view("gauss")
        guards_before = app.engine.guardrail_stats("gauss")["latency_ms"]
    finally:
        running.stop(grace=1.0)
    assert before.stats[:, 0].sum() == 40 * 25
    assert guards_before[:, 0].sum() == 40 * 20
    after = create_server(config)
    try:
        view = after.app.engine.view("gauss")
        np.testing.assert_array_equal(view.stats, before.stats)
        np.testing.assert_array_equal(view.epoch_stats, before.epoch_stats)
        guards_after = after.app.engine.guardrail_stats("gauss")["latency_ms"]
        np.testing.assert_array_equal(guards_after, guards_before)
        # Replay the raw log into a blank engine: same bits as snapshot + tail replay.
        rec = after.app.get("gauss")
        fresh = Engine()
        fresh.create(rec.config)
        positions: dict[str, int] = {}
        while True:
            rows = after.app.store.rewards_since(positions, limit=50_000)
            if not rows:
                break
            rows = sorted(rows, key=lambda r: (r.replica_id, r.replica_seq))
            # Recovery's own replay: rewards and their guardrail metrics, in log order.
            apply_logged(fresh, rows, {rec.id: "gauss"})
            for r in rows:
                positions[r.replica_id] = max(positions.get(r.replica_id, 0), r.replica_seq)
        np.testing.assert_array_equal(fresh.view("gauss").stats, before.stats)
        np.testing.assert_array_equal(fresh.guardrail_stats("gauss")["latency_ms"], guards_before)
    finally:
        after.stop(grace=1.0)


# ---------------------------------------------------------------- SQLite is single-replica


def test_sqlite_second_server_on_same_file_fails_clearly(tmp_path: Path) -> None:
    """A second `allocator serve` on a SQLite file in use exits non-zero and says why."""
    url = f"sqlite:///{tmp_path / 'one.sqlite'}"
    first = ServerProcess(url, "first", tmp_path)
    second = ServerProcess(url, "second", tmp_path)
    with server_processes(first, second):
        first.start()
        proc = second.spawn()
        code = proc.wait(120)
        assert code != 0
        out = second.tail()
        assert "already in use by another allocator process" in out
        assert "use PostgreSQL for several" in out
        # The first server is unaffected and still serves.
        assert health_status(first.target) == health_pb2.HealthCheckResponse.SERVING
        # In-process opens are refused the same way, naming the holder's pid.
        with pytest.raises(StoreLocked, match=f"pid {first.proc.pid}"):  # type: ignore[union-attr]
            SqlStore.open(url)
        first.kill()
        # kill -9 releases the lock with the process: the file can be reopened at once.
        SqlStore.open(url).close()


# ---------------------------------------------------------------- a commit whose answer is lost


class LostCommitAnswer:
    """Makes the next reward commit of ``store`` land and then report a dropped connection.

    That is what a client sees when the database dies between COMMIT and its reply: the
    rows are durable but the writer was told the commit failed. Injected at the
    transaction of ``SqlStore._append_locked`` so the store's own bookkeeping of failed
    commits runs exactly as for a real failure.
    """

    def __init__(self, store: SqlStore) -> None:
        self.armed = threading.Event()
        self.fired = threading.Event()
        original = store._tx

        @contextlib.contextmanager
        def lossy(*, write: bool) -> Iterator[sa.Connection]:
            with original(write=write) as conn:
                yield conn
            self.armed.clear()
            self.fired.set()
            raise sa.exc.OperationalError(
                "COMMIT", None, Exception("server closed the connection unexpectedly")
            )

        def tx(*, write: bool) -> contextlib.AbstractContextManager[sa.Connection]:
            caller = sys._getframe(1).f_code.co_name
            if write and self.armed.is_set() and caller == "_append_locked":
                return lossy(write=write)
            return original(write=write)

        store._tx = tx  # type: ignore[method-assign,assignment]


def _reward_events(app: Allocator, ids: Sequence[str], arm: int) -> list[str]:
    """Rewards of 1 for ``arm``, each with guardrail metric ``lat`` = 2."""
    return app.reward(
        experiment=EXPERIMENT,
        values=[1.0] * len(ids),
        event_ids=list(ids),
        variant_indices=[arm] * len(ids),
        guardrails=[{"lat": 2.0}] * len(ids),
    )


def test_commit_that_landed_but_failed_counts_once_across_restart(tmp_path: Path) -> None:
    """A reward whose commit landed but was reported failed is counted exactly once.

    The client was answered UNAVAILABLE; the writer commits the batch again once the store
    answers (the store recognises its own landed rows as new), so the posterior includes it
    before any snapshot claims its log position. After a restart the client's retry is a
    DUPLICATE and the reward is still counted once: not lost, not doubled. So are its
    guardrail metrics (the writer reads them back from the rows it commits again).
    """
    url = f"sqlite:///{tmp_path / 'lost.sqlite'}"
    counted = [[4, 8, 16], [5, 10, 20], [0, 0, 0]]  # (n, sum, sum of squares) of lat = 2
    config = server_config(url, http_port=-1, snapshot_interval_s=0.2)
    running = create_server(config)
    try:
        app = running.app
        app.create(pb.ExperimentSpec(name=EXPERIMENT, variants=list(VARIANTS), seed=1))
        assert _reward_events(app, [f"ok{i}" for i in range(4)], 0) == ["accepted"] * 4
        lost = LostCommitAnswer(app.store)  # type: ignore[arg-type]
        lost.armed.set()
        with pytest.raises(StoreUnavailable):
            _reward_events(app, [f"lost{i}" for i in range(5)], 1)
        assert lost.fired.is_set()
        wait_until(
            lambda: app.engine.view(EXPERIMENT).stats[1, 0] == 5, 5, "the landed rows applied"
        )
        time.sleep(0.5)  # snapshots are taken meanwhile
        np.testing.assert_array_equal(app.engine.view(EXPERIMENT).stats[:, 0], [4.0, 5.0, 0.0])
        np.testing.assert_array_equal(app.engine.guardrail_stats(EXPERIMENT)["lat"], counted)
    finally:
        running.stop(grace=1.0)
    again = create_server(config)
    try:
        # The client retries what was not acknowledged: already counted, so DUPLICATE.
        assert _reward_events(again.app, [f"lost{i}" for i in range(5)], 1) == ["duplicate"] * 5
        np.testing.assert_array_equal(
            again.app.engine.view(EXPERIMENT).stats, [[4, 4, 4], [5, 5, 5], [0, 0, 0]]
        )
        np.testing.assert_array_equal(again.app.engine.guardrail_stats(EXPERIMENT)["lat"], counted)
    finally:
        again.stop(grace=1.0)


def test_acknowledged_reward_caught_in_a_failed_commit_is_not_counted_again(
    tmp_path: Path,
) -> None:
    """A retry of an acknowledged reward, in a commit that landed but was reported failed,
    stays a duplicate: only the rows that commit wrote are the store's own in-doubt rows.

    The failed commit's rows are all resubmitted by the writer; the retried one is stored
    from its first, acknowledged commit (at another seq), so counting it as reclaimed would
    count it twice, in the posterior and in every snapshot after.
    """
    url = f"sqlite:///{tmp_path / 'retry.sqlite'}"
    config = server_config(url, http_port=-1, snapshot_interval_s=0.2)
    running = create_server(config)
    try:
        app = running.app
        app.create(pb.ExperimentSpec(name=EXPERIMENT, variants=list(VARIANTS), seed=1))
        assert _reward_events(app, [f"ok{i}" for i in range(4)], 0) == ["accepted"] * 4
        lost = LostCommitAnswer(app.store)  # type: ignore[arg-type]
        lost.armed.set()
        with pytest.raises(StoreUnavailable):
            app.reward(
                experiment=EXPERIMENT,
                values=[1.0, 1.0],
                event_ids=["ok0", "new0"],
                variant_indices=[0, 1],
            )
        assert lost.fired.is_set()
        wait_until(lambda: app.engine.view(EXPERIMENT).stats[1, 0] == 1, 5, "new0 applied")
        time.sleep(0.5)  # the doubt is resolved and snapshots are taken meanwhile
        np.testing.assert_array_equal(app.engine.view(EXPERIMENT).stats[:, 0], [4.0, 1.0, 0.0])
    finally:
        running.stop(grace=1.0)
    again = create_server(config)
    try:
        np.testing.assert_array_equal(again.app.engine.view(EXPERIMENT).stats[:, 0], [4, 1, 0])
    finally:
        again.stop(grace=1.0)


def test_resubmission_of_a_landed_reward_applies_the_logged_values(tmp_path: Path) -> None:
    """A reward whose failed commit landed, sent again with another value before the writer
    resolved its doubt, is applied with the value the log holds (the first one), so the
    posterior is what a replay of the log rebuilds.

    (A default reward racing an in-doubt real one is such a resubmission.) The writer's
    own resolution is held back by a long sync interval, so the resubmission is what finds
    the landed row.
    """
    url = f"sqlite:///{tmp_path / 'resubmit.sqlite'}"
    config = server_config(url, http_port=-1, snapshot_interval_s=0.2, sync_interval_s=3600.0)
    running = create_server(config)
    try:
        app = running.app
        app.create(pb.ExperimentSpec(name=EXPERIMENT, variants=list(VARIANTS), seed=1))
        lost = LostCommitAnswer(app.store)  # type: ignore[arg-type]
        lost.armed.set()
        with pytest.raises(StoreUnavailable):
            _reward_events(app, ["e0"], 1)  # value 1, lat 2
        assert lost.fired.is_set()
        status = app.reward(
            experiment=EXPERIMENT, values=[0.0], event_ids=["e0"], variant_indices=[1]
        )
        assert status == ["accepted"]  # nobody had been told e0 was stored
        np.testing.assert_array_equal(app.engine.view(EXPERIMENT).stats[1], [1.0, 1.0, 1.0])
        np.testing.assert_array_equal(app.engine.guardrail_stats(EXPERIMENT)["lat"][1], [1, 2, 4])
    finally:
        running.stop(grace=1.0)
    again = create_server(config)
    try:
        np.testing.assert_array_equal(again.app.engine.view(EXPERIMENT).stats[1], [1, 1, 1])
        np.testing.assert_array_equal(
            again.app.engine.guardrail_stats(EXPERIMENT)["lat"][1], [1, 2, 4]
        )
    finally:
        again.stop(grace=1.0)


def test_restart_from_a_snapshot_older_than_an_added_variant(tmp_path: Path) -> None:
    """A crash after AddVariant and before the next snapshot: the restart restores the
    snapshot (without the variant), adds the variant the record has, and replays its
    logged rewards, instead of failing on them (or forgetting the variant for good)."""
    url = f"sqlite:///{tmp_path / 'added.sqlite'}"
    config = server_config(url, http_port=-1, snapshot_interval_s=3600.0)
    first = create_server(config)
    try:
        first.app.create(pb.ExperimentSpec(name=EXPERIMENT, variants=list(VARIANTS), seed=1))
        assert _reward_events(first.app, ["a0", "a1"], 0) == ["accepted"] * 2
    finally:
        first.stop(grace=1.0)  # its last snapshot has the three variants
    taken_before = time.time()
    second = create_server(config)
    try:
        second.app.add_variant(EXPERIMENT, "retrained", actor="test", reason="retrained")
        assert _reward_events(second.app, ["n0", "n1", "n2"], 3) == ["accepted"] * 3
    finally:
        second.stop(grace=1.0)
    # The crash: the snapshot the clean stop took after the AddVariant never happened.
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM snapshots WHERE created_at > :t"), {"t": taken_before})
    engine.dispose()
    third = create_server(config)
    try:
        view = third.app.engine.view(EXPERIMENT)
        assert view.config.variants == (*VARIANTS, "retrained")
        np.testing.assert_array_equal(view.stats[:, 0], [2, 0, 0, 3])
        # Served again and rewardable: the variant is not lost.
        arms = third.app.assign_batch(EXPERIMENT, 2_000)[1].arms
        assert (arms == 3).any()
        assert _reward_events(third.app, ["n3"], 3) == ["accepted"]
    finally:
        third.stop(grace=1.0)


def test_writer_survives_a_failure_to_apply_committed_rewards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error applying committed rows (a bug) is logged; the rows stay acknowledged (they
    are durable) and the writer goes on committing later rewards."""
    url = f"sqlite:///{tmp_path / 'apply.sqlite'}"
    running = create_server(server_config(url, http_port=-1))
    try:
        app = running.app
        app.create(pb.ExperimentSpec(name=EXPERIMENT, variants=list(VARIANTS), seed=1))
        original = app.engine.reward_batch
        calls = {"n": 0}

        def broken_once(*args: object, **kwargs: object) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected")
            original(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(app.engine, "reward_batch", broken_once)
        assert _reward_events(app, ["x0"], 0) == ["accepted"]
        assert _reward_events(app, ["x1"], 1) == ["accepted"]
        np.testing.assert_array_equal(app.engine.view(EXPERIMENT).stats[:, 0], [0, 1, 0])
    finally:
        running.stop(grace=1.0)
    again = create_server(server_config(url, http_port=-1))
    try:  # the log has both: the replay restores the one the engine missed
        np.testing.assert_array_equal(again.app.engine.view(EXPERIMENT).stats[:, 0], [1, 1, 0])
    finally:
        again.stop(grace=1.0)


def test_restart_of_a_promoted_experiment_keeps_its_epoch_and_sticky_units(
    tmp_path: Path,
) -> None:
    """Applying the same promoted split again at start-up opens no new epoch, so a unit
    keeps its arm across restarts (holdout: units split between champion and holdout)."""
    url = f"sqlite:///{tmp_path / 'sticky.sqlite'}"
    config = server_config(url, http_port=-1)
    units = [f"user-{i}" for i in range(200)]
    spec = pb.ExperimentSpec(
        name=EXPERIMENT,
        variants=list(VARIANTS),
        seed=1,
        monitoring=pb.MonitoringSettings(holdout_share=0.2),
    )
    seen: list[tuple[int, list[int]]] = []
    for run in range(3):
        running = create_server(config)
        try:
            app = running.app
            if run == 0:
                app.create(spec)
                # Champion VARIANTS[2], its predecessor VARIANTS[1] kept as the holdout.
                for action, variant in (
                    (Action.PROMOTE, VARIANTS[1]),
                    (Action.REOPEN, ""),
                    (Action.PROMOTE, VARIANTS[2]),
                ):
                    app.transition(EXPERIMENT, action, actor="t", reason="t", variant=variant)
            arms = [app.assign(EXPERIMENT, u)[1].arm for u in units]
            seen.append((app.engine.view(EXPERIMENT).epoch, arms))
        finally:
            running.stop(grace=1.0)
    assert set(seen[0][1]) == {1, 2}
    assert seen[1] == seen[0] and seen[2] == seen[0]


def test_a_commit_error_fails_only_its_own_job_and_keeps_sql_out_of_the_answer(
    tmp_path: Path,
) -> None:
    """A group commit that fails for another reason than the database being away (here a
    row naming no experiment) is retried job by job: the good job is committed and
    applied; the bad one gets an error whose message quotes no SQL or values."""
    store = SqlStore.open(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    try:
        engine = Engine()
        engine.create(ExperimentConfig(name=EXPERIMENT, variants=VARIANTS))
        exp_id = store.create_experiment(EXPERIMENT, "{}", "RUNNING", now=1.0).id
        writer = RewardWriter(
            store, engine, "r1", Metrics(CollectorRegistry()), ids=lambda: {}, positions={}
        )

        def job(experiment_id: int, key: str) -> _Job:
            rows = RewardColumns.of(experiment_id, [key], [1], [1.0], [0], received_at=1.0)
            return _Job(EXPERIMENT, rows, Future())

        good, bad = job(exp_id, "good"), job(exp_id + 1, "secret-key")
        assert writer._commit([good, bad]) is False
        assert good.future.result(0) == [True]
        with pytest.raises(RuntimeError) as err:
            bad.future.result(0)
        assert "secret-key" not in str(err.value) and "INSERT" not in str(err.value)
        np.testing.assert_array_equal(engine.view(EXPERIMENT).stats[:, 0], [0, 1, 0])
    finally:
        store.close()


def _rows(
    experiment_id: int, arms: Sequence[int], values: Sequence[float] | None = None
) -> list[RewardRow]:
    """Logged rewards (keys k0, k1, ...), value 1 unless ``values`` are given."""
    return [
        RewardRow(
            dedup_key=f"k{i}",
            experiment_id=experiment_id,
            arm=arm,
            value=v,
            epoch=0,
            received_at=1.0,
        )
        for i, (arm, v) in enumerate(zip(arms, values or [1.0] * len(arms), strict=True))
    ]


def _log_rows(
    url: str,
    replica: str,
    experiment_id: int,
    arms: Sequence[int],
    values: Sequence[float] | None = None,
) -> None:
    """Write rows straight into the log of the (stopped) server at ``url``, as ``replica``:
    what another replica, or an earlier version, logged."""
    store = SqlStore.open(url)
    try:
        store.append_rewards(replica, _rows(experiment_id, arms, values))
    finally:
        store.close()


def test_a_logged_reward_refused_today_does_not_stop_recovery(tmp_path: Path) -> None:
    """A value an earlier version accepted and logged (here 1e60, beyond today's 1e50) is
    skipped, with an error in the log, when the log is replayed: the server starts and the
    other rows are applied."""
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    config = server_config(url, http_port=-1)
    first = create_server(config)
    try:
        first.app.create(_normal_spec(EXPERIMENT))
        exp_id = first.app.records[EXPERIMENT].id
    finally:
        first.stop(grace=1.0)
    _log_rows(url, "old-version", exp_id, arms=[1, 1, 1], values=[2.0, 1e60, 3.0])
    again = create_server(config)
    try:
        np.testing.assert_array_equal(again.app.engine.view(EXPERIMENT).stats[1], [2, 5, 13])
    finally:
        again.stop(grace=1.0)


def test_a_pulled_reward_beyond_the_bound_reaches_no_monitor(pg_url: str) -> None:
    """Another replica's (older version's) row beyond +-1e50 is skipped by the pull, and
    the listeners of pulled rewards (the post-promotion monitors) never see it either."""
    running = create_server(server_config(pg_url, http_port=-1, sync_interval_s=0.05))
    try:
        running.app.create(_normal_spec(EXPERIMENT))
        exp_id = running.app.records[EXPERIMENT].id
        seen: list[float] = []
        running.app.hooks.append(lambda rec, arms, values: seen.extend(values.tolist()))
        _log_rows(pg_url, "old-version", exp_id, arms=[1, 1, 1], values=[2.0, 1e60, 3.0])
        wait_until(lambda: len(seen) >= 2, 10, "the pull")
        time.sleep(0.3)  # a few more pulls: nothing else arrives
        assert seen == [2.0, 3.0]
        np.testing.assert_array_equal(running.app.engine.view(EXPERIMENT).stats[1], [2, 5, 13])
    finally:
        running.stop(grace=1.0)


def test_a_snapshot_covers_the_rows_its_restored_state_held(tmp_path: Path) -> None:
    """After a recovery that stopped early, the engine holds rows up to the skip marks of
    the snapshot it was restored from while the pull is still behind them: a snapshot
    taken then says so, or a second restart would replay those rows once more."""
    store = SqlStore.open(f"sqlite:///{tmp_path / 'skip.sqlite'}")
    try:
        engine = Engine()
        engine.create(ExperimentConfig(name=EXPERIMENT, variants=VARIANTS))
        exp_id = store.create_experiment(EXPERIMENT, "{}", "RUNNING", now=1.0).id
        writer = RewardWriter(
            store,
            engine,
            "r1",
            Metrics(CollectorRegistry()),
            ids=lambda: {EXPERIMENT: exp_id},
            positions={"r2": 3},
            skip_until={EXPERIMENT: {"r2": 7, "r3": 2}},
        )
        writer.snapshot_now()
        snap = store.latest_snapshot(exp_id)
        assert snap is not None
        assert dict(snap.positions) == {"r1": 0, "r2": 7, "r3": 2}
    finally:
        store.close()


def test_the_pull_waits_for_a_variant_it_does_not_know_yet(pg_url: str) -> None:
    """Another replica's rows for a variant added there since this one's last sync are
    not applied (nor skipped): the pull stops before them and takes them once the variant
    is known here."""
    store = SqlStore.open(pg_url)  # the pull reads a shared store's other replicas
    try:
        engine = Engine()
        engine.create(ExperimentConfig(name=EXPERIMENT, variants=("a", "b")))
        exp_id = store.create_experiment(EXPERIMENT, "{}", "RUNNING", now=1.0).id
        writer = RewardWriter(
            store,
            engine,
            "r1",
            Metrics(CollectorRegistry()),
            ids=lambda: {EXPERIMENT: exp_id},
            positions={},
        )
        store.append_rewards("r2", _rows(exp_id, arms=[0, 2, 1]))
        assert writer.pull() == 1
        assert writer.positions == {"r2": 1}
        engine.add_variant(EXPERIMENT, "c")
        assert writer.pull() == 2
        np.testing.assert_array_equal(engine.view(EXPERIMENT).stats[:, 0], [1, 1, 1])
    finally:
        store.close()


def test_a_failing_listener_of_applied_rewards_leaves_snapshots_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine has the rows when a listener (the monitors) fails after them: that is
    logged, and snapshots go on (only a failure to apply the rows stops them)."""
    url = f"sqlite:///{tmp_path / 'hook.sqlite'}"
    running = create_server(server_config(url, http_port=-1))
    try:
        app = running.app
        app.create(pb.ExperimentSpec(name=EXPERIMENT, variants=list(VARIANTS), seed=1))

        def broken(*args: object) -> None:
            raise RuntimeError("injected")

        monkeypatch.setattr(app.writer, "on_applied", broken)
        assert _reward_events(app, ["h0"], 0) == ["accepted"]
        np.testing.assert_array_equal(app.engine.view(EXPERIMENT).stats[:, 0], [1, 0, 0])
        assert not app.writer.unapplied and app.writer.applied_positions() is not None
    finally:
        running.stop(grace=1.0)


def test_recovery_stops_before_rows_of_a_variant_not_listed(tmp_path: Path) -> None:
    """Rows of a variant another replica added after this one listed the experiments (here:
    logged for a variant the record does not have) end the replay there, for the pull to
    take once the variant is loaded, instead of failing the start."""
    url = f"sqlite:///{tmp_path / 'unlisted.sqlite'}"
    config = server_config(url, http_port=-1)
    first = create_server(config)
    try:
        first.app.create(pb.ExperimentSpec(name=EXPERIMENT, variants=list(VARIANTS), seed=1))
        exp_id = first.app.records[EXPERIMENT].id
    finally:
        first.stop(grace=1.0)
    _log_rows(url, "other", exp_id, arms=[0, 3, 1])
    again = create_server(config)
    try:
        np.testing.assert_array_equal(again.app.engine.view(EXPERIMENT).stats[:, 0], [1, 0, 0])
    finally:
        again.stop(grace=1.0)


# ---------------------------------------------------------------- database outage (PostgreSQL)


def _pg_admin(url: str) -> tuple[sa.Engine, str]:
    """An autocommit engine on the server's maintenance database, and our database's name."""
    parsed = sa.make_url(url)
    admin = sa.create_engine(
        parsed.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    return admin, str(parsed.database)


def _terminate_backends(admin: sa.Engine, db: str) -> int:
    with admin.connect() as conn:
        return len(
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": db},
            ).all()
        )


def _allow_connections(admin: sa.Engine, db: str, allow: bool) -> None:
    with admin.connect() as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS {str(allow).lower()}')


def _healthz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.postgres
def test_database_outage_under_load(pg_url: str) -> None:
    """PostgreSQL stopped (connections refused, backends killed), then flapping, under load.

    While it is down: Reward answers UNAVAILABLE (so clients retry), Assign still serves
    from memory, the store health service is NOT_SERVING and /healthz answers 503. When it
    is back the server recovers by itself, and no acknowledged reward is lost.
    """
    admin, db = _pg_admin(pg_url)
    probe = Ledger(items={"outage-probe": (0, 1)}, failed={"outage-probe"})
    probe_request = pb.RewardBatchRequest(
        experiment=EXPERIMENT, event_ids=["outage-probe"], variant_indices=[0], values=[1.0]
    )
    running: Running = create_server(server_config(pg_url, http_port=0))
    target = f"127.0.0.1:{running.port}"
    try:
        create_experiment(target)
        senders = [RewardSender(target, "o", seed=3), RewardSender(target, "p", seed=4)]
        for s in senders:
            s.start()
        time.sleep(0.5)
        assert _healthz(running.http_port)[0] == 200
        # -- hard outage: the database refuses every connection for a while
        _allow_connections(admin, db, False)
        try:
            _terminate_backends(admin, db)
            wait_until(
                lambda: (
                    health_status(target, STORE_HEALTH)
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                10,
                "store health NOT_SERVING",
            )
            status, body = _healthz(running.http_port)
            assert status == 503 and body["store"] == "down" and body["error"]
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.AllocatorStub(ch)
                with pytest.raises(grpc.RpcError) as err:
                    stub.RewardBatch(probe_request, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                for _ in range(20):
                    resp = stub.Assign(pb.AssignRequest(experiment=EXPERIMENT), timeout=5)
                    assert resp.variant in VARIANTS and resp.decision_id
            # The overall health stays SERVING: Assign works, only the store is degraded.
            assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
            # The senders' calls fail as ours did, but a starved sender thread may not
            # have recorded its UNAVAILABLE yet: wait for it, while the outage lasts.
            wait_until(
                lambda: merged(senders).errors.get("UNAVAILABLE", 0) > 0,
                15,
                "a sender to see the outage",
            )
            errors_during = merged(senders).errors
            time.sleep(0.5)
        finally:
            _allow_connections(admin, db, True)
        wait_until(
            lambda: health_status(target, STORE_HEALTH) == health_pb2.HealthCheckResponse.SERVING,
            15,
            "store health SERVING again",
        )
        assert _healthz(running.http_port)[0] == 200
        assert errors_during.get("UNAVAILABLE", 0) > 0, errors_during
        # The probe was not acknowledged: like any client, send it again.
        with grpc.insecure_channel(target) as ch:
            resp = pb_grpc.AllocatorStub(ch).RewardBatch(probe_request, timeout=10)
        probe.status["outage-probe"] = resp.statuses[0]
        if resp.statuses[0] == pb.REWARD_STATUS_ACCEPTED:
            probe.accepted["outage-probe"] += 1
        # -- flapping: backends killed repeatedly while the senders keep going
        for _ in range(10):
            _terminate_backends(admin, db)
            time.sleep(0.2)
        acked_before = sum(len(s.snapshot().status) for s in senders)
        time.sleep(0.5)
        for s in senders:
            s.drain(timeout=60)
        ledger = merged(senders)
        assert len(ledger.status) > acked_before, "no progress after the outage"
        ledger.merge(probe)
        check_ledger(ledger)
        assert_report_exact(target, ledger)
        before = running.app.engine.view(EXPERIMENT).stats
    finally:
        running.stop(grace=1.0)
        admin.dispose()
    np.testing.assert_array_equal(before, expected_stats(ledger.items))
    assert_exact(ledger, recovered_state(pg_url))


def test_sigterm_drains_flushes_and_exits_zero(tmp_path: Path) -> None:
    """SIGTERM: in-flight work finishes, acknowledged rewards are kept, exit code 0."""
    server = ServerProcess(f"sqlite:///{tmp_path / 'term.sqlite'}", "term", tmp_path)
    with server_processes(server):
        server.start()
        with AllocatorClient(server.target, timeout=10) as c:
            c.create_experiment(pb.ExperimentSpec(name="t", variants=["a", "b"]))
            b = c.assign_batch("t", 100)
            c.reward_batch("t", [1.0] * 100, batch_token=b.batch_token, indices=list(range(100)))
        assert server.terminate() == 0
        assert "stopped cleanly" in server.tail()
        server.start()
        with AllocatorClient(server.target, timeout=10) as c:
            assert sum(v.rewards for v in c.get_report("t").variants) == 100
        assert server.terminate() == 0


def test_repeated_sigterm_still_exits_zero(tmp_path: Path) -> None:
    """Supervisors often signal twice: the second SIGTERM must not turn exit 0 into -15."""
    server = ServerProcess(f"sqlite:///{tmp_path / 'twice.sqlite'}", "twice", tmp_path)
    with server_processes(server):
        server.start()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while server.proc.poll() is None and time.monotonic() < deadline:
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        assert server.proc.wait(30) == 0

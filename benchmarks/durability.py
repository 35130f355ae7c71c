"""Durability: durable rewards/s with group commit, Assign under reward load, server memory.

One run measures:

1. ``group_commit``: rewards acknowledged per second by the real server (``create_server``)
   through ``RewardBatch``, where an acknowledged reward is a committed one (the writer
   thread commits a group of queued batches in one transaction, then answers). The client
   is a separate (spawned) process with ``streams`` threads, each sending ``batch`` rewards
   per call, addressed by ``batch_token`` + ``indices`` of AssignBatch responses drawn
   before the clock starts (each used once, so every reward is new). After the server stops,
   the rows in the store are counted and compared with the acknowledged rewards.
   ``per_reward``: what a naive service would do, one transaction per reward, measured
   directly against the same store (``SqlStore.append_rewards`` with one row per call, one
   thread, no gRPC), so it is an upper bound for that design. Both on SQLite (a file in a
   temporary directory) and on PostgreSQL (a freshly created database; skipped with a note
   when none is reachable). ``store_batch`` (in ``profile``): ``append_rewards`` with
   ``batch``-row calls straight on the store, the ceiling of the database side.
2. Assign under reward load: AssignBatch decisions/s alone, then while a paced and while a
   saturating reward load runs (from a second client process), then alone again; the two
   alone runs bound the noise.
3. Memory: VmRSS of a server in its own process, idle with no experiments, with one
   experiment of ``variants`` variants used, and with ``experiments`` experiments used
   (a few assigns and rewards each); then the time of ``/metrics`` scrapes with all loaded.

``python -m benchmarks.durability [--quick] [--json PATH] [--png PATH]``
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from allocator_client.v1 import allocator_pb2 as pb
from allocator_client.v1 import allocator_pb2_grpc as pb_grpc

from benchmarks.common import (
    ClientProcess,
    SummaryRow,
    base_parser,
    format_value,
    machine_info,
    print_targets,
    save_figure,
    target_entry,
    target_rows,
    update_summary,
    write_json,
)

NAME = "durability"
EXPERIMENT = "bench"
ADMIN_TOKEN = "bench-admin-token"
STORES = ("sqlite", "postgresql")

TARGET_REWARDS_PER_S = {"sqlite": 100_000.0, "postgresql": 50_000.0}
TARGET_ASSIGN_UNDER_LOAD_RATIO = 0.9  # "unchanged within noise": loaded / alone >= 0.9
TARGET_RSS_DELTA_MB = 50.0
TARGET_SCRAPE_S = 1.0

CLIENT_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class DurabilitySettings:
    """Sizes of one run; validates itself.

    >>> DurabilitySettings(duration_s=1.0).streams
    4
    """

    duration_s: float = 5.0  # measured seconds of each group-commit run
    warmup_s: float = 1.0  # seconds of load before measuring
    streams: int = 4  # concurrent RewardBatch calls (client threads)
    batch: int = 5_000  # rewards per RewardBatch call
    token_budget_per_s: float = 250_000.0  # rewards drawn up front per second of a run
    per_reward_s: float = 3.0  # seconds of one-transaction-per-reward
    n_arms: int = 10
    assign_batch: int = 10_000  # decisions per AssignBatch call in part 2
    assign_threads: int = 2  # AssignBatch calls in flight in part 2
    assign_s: float = 3.0  # measured seconds of each part-2 phase
    paced_rewards_per_s: float = 20_000.0  # the paced reward load of part 2
    experiments: int = 1_000  # part 3
    variants: int = 10  # part 3, per experiment
    traffic: int = 20  # part 3: decisions and rewards per experiment
    scrapes: int = 5
    settle_s: float = 1.0  # part 3: pause before reading RSS
    snapshot_wait_s: float = 6.0  # part 3: > one snapshot interval (5 s) before the last RSS
    stores: tuple[str, ...] = STORES

    def __post_init__(self) -> None:
        for name in ("duration_s", "per_reward_s", "assign_s", "paced_rewards_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        for name in ("warmup_s", "settle_s", "snapshot_wait_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.token_budget_per_s) and self.token_budget_per_s > 0):
            raise ValueError("token_budget_per_s must be finite and > 0")
        if not 1 <= self.batch <= 100_000 or not 1 <= self.assign_batch <= 100_000:
            raise ValueError("batch and assign_batch must be in [1, 100000]")
        if min(self.streams, self.assign_threads, self.scrapes, self.traffic) < 1:
            raise ValueError("streams, assign_threads, scrapes and traffic must be >= 1")
        if self.n_arms < 2 or self.variants < 2:
            raise ValueError("n_arms and variants must be >= 2")
        if self.experiments < 1:
            raise ValueError(f"experiments must be >= 1, got {self.experiments}")
        unknown = set(self.stores) - set(STORES)
        if unknown or not self.stores:
            raise ValueError(f"stores must be a non-empty subset of {STORES}, got {self.stores}")


QUICK = DurabilitySettings(
    duration_s=1.5,
    warmup_s=0.5,
    per_reward_s=1.0,
    assign_s=1.0,
    experiments=1_000,
    traffic=10,
    scrapes=3,
    snapshot_wait_s=5.5,
)


# ----------------------------------------------------------------------------------------
# Client side (spawned processes): reward streams and AssignBatch loops
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Items completed per call, with completion times; counted inside a fixed window."""

    ends_ns: np.ndarray
    items: np.ndarray
    latencies_ns: np.ndarray
    measure_from_ns: int
    stop_at_ns: int
    errors: tuple[str, ...] = ()

    def stats(self) -> dict[str, Any]:
        """Items/s over calls that completed inside [measure_from, stop_at]."""
        keep = (self.ends_ns >= self.measure_from_ns) & (self.ends_ns <= self.stop_at_ns)
        window = (self.stop_at_ns - self.measure_from_ns) / 1e9
        lat = self.latencies_ns[keep]
        calls = int(keep.sum())
        return {
            "calls": calls,
            "window_s": round(window, 4),
            "items": int(self.items[keep].sum()),
            "items_per_s": float(self.items[keep].sum()) / window if window > 0 else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) / 1e6 if calls else None,
            "p99_ms": float(np.percentile(lat, 99)) / 1e6 if calls else None,
            "total_calls": int(self.ends_ns.size),
            "total_items": int(self.items.sum()),
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
        }


def run_threads(
    call: Callable[[int], int],
    threads: int,
    warmup_s: float,
    duration_s: float,
    schedule_ns: Callable[[int], int | None] = lambda k: 0,
) -> Window:
    """``threads`` closed loops of ``call(k)`` (k: a global call number; returns items done).

    A thread stops launching once the time is up, when ``schedule_ns(k)`` is None, or on
    an error. ``schedule_ns(k)`` > 0 delays call k until that many ns after the start
    (pacing).
    """
    lock = threading.Lock()
    ends: list[int] = []
    items: list[int] = []
    lats: list[int] = []
    errors: list[str] = []
    counter = [0]
    start = time.perf_counter_ns()
    measure_from = start + int(warmup_s * 1e9)
    stop_at = measure_from + int(duration_s * 1e9)

    def loop() -> None:
        while True:
            with lock:
                k = counter[0]
                counter[0] += 1
            due = schedule_ns(k)
            if due is None:
                return
            wait = (start + due - time.perf_counter_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)
            t0 = time.perf_counter_ns()
            if t0 >= stop_at:
                return
            try:
                done = call(k)
            except Exception as err:  # reported in the results; this thread stops
                with lock:
                    errors.append(repr(err)[:300])
                return
            now = time.perf_counter_ns()
            with lock:
                ends.append(now)
                items.append(done)
                lats.append(now - t0)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return Window(
        np.asarray(ends, dtype=np.int64),
        np.asarray(items, dtype=np.int64),
        np.asarray(lats, dtype=np.int64),
        measure_from,
        stop_at,
        tuple(errors),
    )


def draw_reward_requests(
    stub: Any, experiment: str, batch: int, n_batches: int, seed: int = 7
) -> list[pb.RewardBatchRequest]:
    """AssignBatch ``n_batches`` times; one RewardBatch request redeeming each batch once."""
    rng = np.random.default_rng(seed)
    indices = list(range(batch))
    req = pb.AssignBatchRequest(experiment=experiment, count=batch)
    out = []
    for _ in range(n_batches):
        resp = stub.AssignBatch(req, timeout=60)
        # Bernoulli rewards whose mean depends on the arm, so the posteriors move.
        arms = np.asarray(resp.variant_indices, dtype=np.int64)
        values = (rng.random(batch) < 0.05 + 0.01 * arms).astype(np.float64)
        out.append(
            pb.RewardBatchRequest(
                experiment=experiment,
                batch_token=resp.batch_token,
                indices=indices,
                values=values.tolist(),
            )
        )
    return out


def reward_load(target: str, params: Mapping[str, Any], mark: Callable[[], None]) -> dict[str, Any]:
    """Draw tokens (untimed), then send them with ``streams`` threads; optionally paced."""
    s = DurabilitySettings(**params["settings"])
    duration = float(params["duration_s"])
    rate = params.get("rate")  # rewards/s, None: as fast as the server acknowledges
    budget = rate if rate is not None else s.token_budget_per_s
    n_batches = max(s.streams, math.ceil(budget * (s.warmup_s + duration) / s.batch))
    with grpc.insecure_channel(target, options=list(CLIENT_OPTIONS)) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.AllocatorStub(channel)
        t0 = time.perf_counter()
        requests = draw_reward_requests(stub, EXPERIMENT, s.batch, n_batches)
        draw_s = time.perf_counter() - t0

        def call(k: int) -> int:
            resp = stub.RewardBatch(requests[k], timeout=120)
            if resp.accepted != s.batch:
                raise RuntimeError(
                    f"{resp.accepted} accepted, {resp.duplicates} duplicates, "
                    f"{resp.expired} expired of {s.batch}"
                )
            return int(resp.accepted)

        def schedule(k: int) -> int | None:
            if k >= len(requests):
                return None
            return 0 if rate is None else int(k * s.batch / rate * 1e9)

        mark()
        cpu0 = time.process_time()
        window = run_threads(call, s.streams, s.warmup_s, duration, schedule)
        cpu = time.process_time() - cpu0
    out = window.stats()
    out["client_cpu_us_per_reward"] = cpu / out["total_items"] * 1e6 if out["total_items"] else None
    out["tokens_drawn"] = len(requests)
    out["token_draw_s"] = round(draw_s, 3)
    out["token_pool_exhausted"] = window.ends_ns.size >= len(requests)
    return out


def assign_load(target: str, params: Mapping[str, Any], mark: Callable[[], None]) -> dict[str, Any]:
    """AssignBatch from ``assign_threads`` threads for ``assign_s`` seconds."""
    s = DurabilitySettings(**params["settings"])
    with grpc.insecure_channel(target, options=list(CLIENT_OPTIONS)) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.AllocatorStub(channel)
        req = pb.AssignBatchRequest(experiment=EXPERIMENT, count=s.assign_batch)
        stub.AssignBatch(req, timeout=60)

        def call(k: int) -> int:
            return len(stub.AssignBatch(req, timeout=60).variant_indices)

        mark()
        window = run_threads(call, s.assign_threads, float(params["warmup_s"]), s.assign_s)
    return window.stats()


_CLIENT_TASKS: dict[str, Callable[[str, Mapping[str, Any], Callable[[], None]], dict[str, Any]]]
_CLIENT_TASKS = {"rewards": reward_load, "assign": assign_load}


def client_task(
    task: str, target: str, params: Mapping[str, Any], mark: Callable[[], None]
) -> dict[str, Any]:
    """Entry point of the spawned client (see :class:`benchmarks.common.ClientProcess`)."""
    return _CLIENT_TASKS[task](target, params, mark)


# ----------------------------------------------------------------------------------------
# Server side (this process)
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def store_url(kind: str, tmp: Path) -> Iterator[str]:
    """A fresh database: a SQLite file under ``tmp`` or a new PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / f'bench-{time.monotonic_ns()}.sqlite'}"
        return
    from tests.conftest_pg import make_pg_database

    with make_pg_database() as url:
        yield url


def postgres_unavailable() -> str | None:
    """Why PostgreSQL can't be used, or None when a fresh database can be created."""
    try:
        from tests.conftest_pg import base_pg_url, make_pg_database

        if base_pg_url() is None:
            return "no PostgreSQL reachable (set ALLOCATOR_TEST_PG_URL or run one on :5432)"
        with make_pg_database():
            return None
    except Exception as err:
        return f"PostgreSQL unusable: {' '.join(str(err).split())[:300]}"


def server_config(url: str, **overrides: Any) -> Any:
    """The benchmark server's configuration (defaults of `allocator serve` otherwise)."""
    from allocator.config import ServerConfig

    base = ServerConfig(
        listen="127.0.0.1:0",
        http_port=0,
        database_url=url,
        admin_token=ADMIN_TOKEN,
        replica_id="bench",
        log_level="WARNING",
        log_json=False,
    )
    return replace(base, **overrides)


def _spec(name: str, n_arms: int) -> pb.ExperimentSpec:
    # auto_promote off: a promotion mid-run would switch Assign to the (faster) fixed
    # table and make the "Assign alone" baselines incomparable.
    return pb.ExperimentSpec(
        name=name,
        variants=[f"v{i}" for i in range(n_arms)],
        policy=pb.POLICY_THOMPSON,
        seed=1,
        promotion=pb.PromotionSettings(auto_promote=False),
    )


def count_rewards(url: str) -> int:
    """Rows in the reward log (read with a plain connection after the server stopped)."""
    import sqlalchemy as sa

    from allocator.store import normalize_url

    engine = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM rewards")).scalar_one())
    finally:
        engine.dispose()


def group_commit(
    kind: str, s: DurabilitySettings, tmp: Path, proc: ClientProcess
) -> dict[str, Any]:
    """Durable rewards/s through the real server's RewardBatch; rows checked afterwards."""
    from allocator_client import AllocatorClient
    from prometheus_client import CollectorRegistry

    from allocator.server import create_server

    with store_url(kind, tmp) as url:
        config = server_config(url)
        registry = CollectorRegistry()
        running = create_server(config, registry=registry)
        try:
            target = f"127.0.0.1:{running.port}"
            with AllocatorClient(target, admin_token=ADMIN_TOKEN, timeout=30) as client:
                client.create_experiment(_spec(EXPERIMENT, s.n_arms))
            proc.start("rewards", target, {"settings": asdict(s), "duration_s": s.duration_s})
            proc.wait_mark()
            flush0 = _flush_totals(registry)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            stats = proc.result()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            flush1 = _flush_totals(registry)
        finally:
            running.stop(grace=5.0)
        stored = count_rewards(url)
    acknowledged = stats["total_items"]
    commits = flush1[0] - flush0[0]
    commit_s = flush1[1] - flush0[1]
    flushed = flush1[2] - flush0[2]
    return {
        "store": kind,
        "mode": "group_commit",
        "rewards_per_s": stats["items_per_s"],
        "path": "gRPC RewardBatch -> RewardWriter group commit (real server)",
        "streams": s.streams,
        "batch": s.batch,
        "flush_max_rows": config.flush_max_rows,
        "flush_max_delay_ms": config.flush_max_delay_ms,
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "window_s": stats["window_s"],
        "acknowledged": acknowledged,
        "rows_in_store": stored,
        "acknowledged_all_stored": stored == acknowledged,
        "server_cpu_cores": cpu / wall if wall > 0 else None,
        "server_cpu_us_per_reward": cpu / acknowledged * 1e6 if acknowledged else None,
        "client_cpu_us_per_reward": stats["client_cpu_us_per_reward"],
        "commits": int(commits),
        "rows_per_commit": flushed / commits if commits else None,
        "commit_ms_mean": commit_s / commits * 1e3 if commits else None,
        # Share of the wall time the writer thread spent inside append_rewards.
        "writer_busy_share": commit_s / wall if wall > 0 else None,
        "tokens_drawn": stats["tokens_drawn"],
        "token_draw_s": stats["token_draw_s"],
        "token_pool_exhausted": stats["token_pool_exhausted"],
        "errors": stats["errors"],
        "first_error": stats["first_error"],
    }


def _flush_totals(registry: Any) -> tuple[float, float, float]:
    """(commits, seconds spent committing, rewards flushed) so far, from the server metrics."""

    def value(name: str) -> float:
        return float(registry.get_sample_value(name) or 0.0)

    return (
        value("allocator_store_flush_duration_seconds_count"),
        value("allocator_store_flush_duration_seconds_sum"),
        value("allocator_store_flushed_rewards_total"),
    )


def _rows(experiment_id: int, n: int, start: int, prefix: str) -> list[Any]:
    from allocator.store import RewardRow

    now = time.time()
    return [
        RewardRow(
            dedup_key=f"{prefix}{start + i}",
            experiment_id=experiment_id,
            arm=(start + i) % 10,
            value=float((start + i) % 3 == 0),
            epoch=0,
            received_at=now,
        )
        for i in range(n)
    ]


def store_direct(kind: str, s: DurabilitySettings, tmp: Path) -> tuple[dict[str, Any], float]:
    """``per_reward`` (one commit per reward) and the ``store_batch`` ceiling, on one store."""
    from allocator.store import SqlStore

    with store_url(kind, tmp) as url, SqlStore.open(url) as store:
        exp = store.create_experiment(EXPERIMENT, "{}", "RUNNING", now=time.time())
        # per_reward: rows are built ahead in chunks so the loop times the commits.
        done, start = 0, time.perf_counter()
        deadline = start + s.per_reward_s
        while time.perf_counter() < deadline:
            for row in _rows(exp.id, 100, done, "p"):
                store.append_rewards("bench", [row])
            done += 100
        per_reward = done / (time.perf_counter() - start)
        # store_batch: a few batch-sized commits, rows built outside the clock.
        n_batches = max(3, min(20, math.ceil(100_000 / s.batch)))
        batches = [_rows(exp.id, s.batch, done + j * s.batch, "b") for j in range(n_batches)]
        store.append_rewards("bench", batches[0])
        t0 = time.perf_counter()
        for b in batches[1:]:
            store.append_rewards("bench", b)
        store_batch = (n_batches - 1) * s.batch / (time.perf_counter() - t0)
    row = {
        "store": kind,
        "mode": "per_reward",
        "rewards_per_s": per_reward,
        "path": "SqlStore.append_rewards with one row per call (one transaction per reward), "
        "called directly in one thread: no gRPC, no token checks",
        "rewards": done,
    }
    return row, store_batch


# ----------------------------------------------------------------------------------------
# Part 2: Assign under reward load
# ----------------------------------------------------------------------------------------


def assign_under_load(
    s: DurabilitySettings, tmp: Path, assigner: ClientProcess, rewarder: ClientProcess
) -> dict[str, Any]:
    """AssignBatch decisions/s: alone, under a paced and a saturating reward load, alone."""
    from allocator_client import AllocatorClient
    from prometheus_client import CollectorRegistry

    from allocator.server import create_server

    # The reward load runs this long before and after the assign phase, so the whole
    # phase sees it; the assign loop's own warm-up is as long.
    lead_s = min(0.5, s.assign_s / 3)
    load_s = lead_s + lead_s + s.assign_s + lead_s
    with store_url("sqlite", tmp) as url:
        running = create_server(server_config(url), registry=CollectorRegistry())
        try:
            target = f"127.0.0.1:{running.port}"
            with AllocatorClient(target, admin_token=ADMIN_TOKEN, timeout=30) as client:
                client.create_experiment(_spec(EXPERIMENT, s.n_arms))
            params = {"settings": asdict(s), "warmup_s": lead_s}
            phases: dict[str, dict[str, Any]] = {}
            assigner.run(
                "assign", target, {**params, "settings": asdict(replace(s, assign_s=lead_s))}
            )
            phases["alone_1"] = assigner.run("assign", target, params)
            for name, rate in (("paced", s.paced_rewards_per_s), ("saturating", None)):
                rewarder.start(
                    "rewards",
                    target,
                    {
                        "settings": asdict(replace(s, warmup_s=0.0)),
                        "duration_s": load_s,
                        "rate": rate,
                    },
                )
                rewarder.wait_mark()
                time.sleep(lead_s)
                phases[name] = assigner.run("assign", target, params)
                phases[name]["reward_load"] = rewarder.result()
            phases["alone_2"] = assigner.run("assign", target, params)
        finally:
            running.stop(grace=5.0)
    alone = [phases["alone_1"]["items_per_s"], phases["alone_2"]["items_per_s"]]
    mean_alone = statistics.fmean(alone)
    out: dict[str, Any] = {
        "assign_batch": s.assign_batch,
        "assign_threads": s.assign_threads,
        "decisions_per_s_alone": mean_alone,
        "decisions_per_s_alone_runs": alone,
        # Two alone runs bracket the loaded ones: their spread is the noise floor here.
        "alone_spread": abs(alone[0] - alone[1]) / mean_alone if mean_alone else None,
    }
    for name in ("paced", "saturating"):
        load = phases[name]["reward_load"]
        out[name] = {
            "decisions_per_s": phases[name]["items_per_s"],
            "decisions_total": phases[name]["total_items"],
            "ratio_to_alone": phases[name]["items_per_s"] / mean_alone if mean_alone else None,
            "reward_load_target_per_s": s.paced_rewards_per_s if name == "paced" else None,
            "reward_load_rewards_per_s": load["total_items"] / load_s,
            "assign_p99_ms": phases[name]["p99_ms"],
            "errors": phases[name]["errors"] + load["errors"],
            "first_error": phases[name]["first_error"] or load["first_error"],
        }
    out["assign_p99_ms_alone"] = phases["alone_1"]["p99_ms"]
    return out


# ----------------------------------------------------------------------------------------
# Part 3: memory and /metrics
# ----------------------------------------------------------------------------------------


def _server_main(conn: Connection, url: str) -> None:
    """Spawned server: report (pid, grpc port, http port), serve until told to stop."""
    from prometheus_client import CollectorRegistry

    from allocator.server import create_server

    running = create_server(server_config(url), registry=CollectorRegistry())
    conn.send((os.getpid(), running.port, running.http_port))
    conn.recv()
    running.stop(grace=2.0)
    conn.send("stopped")


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB, from /proc/<pid>/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _settled_rss(pid: int, wait_s: float) -> float:
    time.sleep(wait_s)
    return rss_mb(pid)


def _traffic(stub: Any, name: str, n: int, rng: np.random.Generator) -> None:
    """Two unary Assigns and an AssignBatch of ``n``, all rewarded in one RewardBatch."""
    ids = [stub.Assign(pb.AssignRequest(experiment=name), timeout=60).decision_id for _ in "ab"]
    batch = stub.AssignBatch(pb.AssignBatchRequest(experiment=name, count=n), timeout=60)
    ids += [f"{batch.batch_token}.{i}" for i in range(n)]
    values = (rng.random(len(ids)) < 0.1).astype(np.float64).tolist()
    resp = stub.RewardBatch(
        pb.RewardBatchRequest(experiment=name, decision_ids=ids, values=values), timeout=60
    )
    if resp.accepted != len(ids):
        raise RuntimeError(f"{name}: {resp.accepted} of {len(ids)} rewards accepted")


def memory_and_metrics(s: DurabilitySettings, tmp: Path) -> dict[str, Any]:
    """RSS idle / one experiment / all experiments, then timed /metrics scrapes."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    url = f"sqlite:///{tmp / 'memory.sqlite'}"
    proc = ctx.Process(target=_server_main, args=(child, url), daemon=True)
    proc.start()
    child.close()
    try:
        if not conn.poll(120):
            raise RuntimeError("server process did not start within 120 s")
        pid, port, http_port = conn.recv()
        metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=list(CLIENT_OPTIONS)) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            stub = pb_grpc.AllocatorStub(ch)
            rss_idle = _settled_rss(pid, s.settle_s)
            t0 = time.perf_counter()

            def load(i: int) -> None:
                name = f"exp-{i}"
                stub.CreateExperiment(
                    pb.CreateExperimentRequest(spec=_spec(name, s.variants)),
                    timeout=60,
                    metadata=metadata,
                )
                _traffic(stub, name, s.traffic, np.random.default_rng(i))

            load(0)
            rss_one = _settled_rss(pid, s.settle_s)
            # Several at a time: each create is two commits; in sequence they dominate.
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(load, range(1, s.experiments)))
            load_s = time.perf_counter() - t0
            # One snapshot interval (5 s by default) later every experiment has been
            # snapshotted once, so the peak of that cycle is in the number too.
            rss_all = _settled_rss(pid, s.snapshot_wait_s)
            listed = len(
                stub.ListExperiments(
                    pb.ListExperimentsRequest(page_size=1000), timeout=30
                ).experiments
            )
        scrape_times, body = [], b""
        for _ in range(s.scrapes):
            t = time.perf_counter()
            with urllib.request.urlopen(
                f"http://127.0.0.1:{http_port}/metrics", timeout=30
            ) as resp:
                body = resp.read()
            scrape_times.append(time.perf_counter() - t)
        rss_after_scrapes = rss_mb(pid)
        conn.send("stop")
        conn.poll(30)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    lines = [ln for ln in body.decode().splitlines() if ln and not ln.startswith("#")]
    return {
        "experiments": s.experiments,
        "variants": s.variants,
        "experiments_listed": listed,
        "traffic_per_experiment": f"2 Assign + AssignBatch of {s.traffic}, all rewarded "
        "(one RewardBatch by decision ids)",
        "load_s": round(load_s, 2),
        "rss_mb_idle": rss_idle,
        "rss_mb_one_experiment": rss_one,
        "rss_mb_loaded": rss_all,
        "rss_mb_after_scrapes": rss_after_scrapes,
        "rss_delta_mb": rss_all - rss_idle,
        "rss_delta_mb_after_first": rss_all - rss_one,
        "metrics_scrape_s": statistics.median(scrape_times),
        "metrics_scrape_s_max": max(scrape_times),
        "metrics_scrape_s_all": scrape_times,
        "metrics_bytes": len(body),
        "metrics_samples": len(lines),
        "metrics_max_experiments": 100,
    }


# ----------------------------------------------------------------------------------------
# The run, targets, plot, summary
# ----------------------------------------------------------------------------------------


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def evaluate_targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Measured against target; ``met`` is None for what was not measured."""
    rates = {(r["store"], r["mode"]): r["rewards_per_s"] for r in doc["results"]}
    out = [
        target_entry(
            f"{kind}_durable_rewards_per_s",
            f"RewardBatch rewards acknowledged (= committed) per second, group commit, {kind}",
            rates.get((kind, "group_commit")),
            ">=",
            TARGET_REWARDS_PER_S[kind],
            "rewards/s",
        )
        for kind in STORES
    ]
    load = doc.get("assign_under_load") or {}
    out.append(
        target_entry(
            "assign_under_paced_reward_load_ratio",
            "AssignBatch decisions/s while a paced reward load runs / alone",
            (load.get("paced") or {}).get("ratio_to_alone"),
            ">=",
            TARGET_ASSIGN_UNDER_LOAD_RATIO,
            "x",
        )
    )
    memory = doc.get("memory") or {}
    full = memory.get("experiments") == 1_000 and memory.get("variants") == 10
    out.append(
        target_entry(
            "rss_delta_mb_1000x10",
            "server RSS with 1,000 experiments x 10 variants used, minus idle",
            memory.get("rss_delta_mb") if full else None,
            "<=",
            TARGET_RSS_DELTA_MB,
            "MiB",
        )
    )
    out.append(
        target_entry(
            "metrics_scrape_s",
            "median /metrics scrape time with all experiments loaded",
            memory.get("metrics_scrape_s"),
            "<",
            TARGET_SCRAPE_S,
            "s",
        )
    )
    for t in out:
        if t["comparison"] == "<" and t["measured"] is not None:
            t["met"] = t["measured"] < t["target"]
    return out


def run(settings: DurabilitySettings) -> dict[str, Any]:
    """All three parts; the JSON document."""
    t_start = time.perf_counter()
    load_before = _loadavg()
    results: list[dict[str, Any]] = []
    profile: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    part_s: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-durability-")))
        # Spawned once, used by parts 1 and 2 (each spawn re-imports grpc and numpy).
        with ClientProcess(client_task) as first, ClientProcess(client_task) as second:
            for kind in settings.stores:
                if kind == "postgresql":
                    why = postgres_unavailable()
                    if why is not None:
                        skipped[kind] = why
                        print(f"{kind}: skipped: {why}", flush=True)
                        continue
                t0 = time.perf_counter()
                gc = group_commit(kind, settings, tmp, first)
                per, ceiling = store_direct(kind, settings, tmp)
                part_s[f"durable_{kind}"] = round(time.perf_counter() - t0, 1)
                results += [gc, per]
                profile[kind] = {
                    "store_batch_rows_per_s": ceiling,
                    "store_batch_rows": settings.batch,
                    "group_commit_vs_store_batch": gc["rewards_per_s"] / ceiling,
                    "group_commit_vs_per_reward": gc["rewards_per_s"] / per["rewards_per_s"],
                }
                print(
                    f"{kind}: group commit {format_value(gc['rewards_per_s'])} rewards/s "
                    f"(stored {gc['rows_in_store']} of {gc['acknowledged']} acknowledged), "
                    f"per reward {format_value(per['rewards_per_s'])}/s, "
                    f"store batch ceiling {format_value(ceiling)}/s",
                    flush=True,
                )
            t0 = time.perf_counter()
            under_load = assign_under_load(settings, tmp, first, second)
            part_s["assign_under_load"] = round(time.perf_counter() - t0, 1)
        print(
            f"assign alone {format_value(under_load['decisions_per_s_alone'])}/s, "
            f"paced x{under_load['paced']['ratio_to_alone']:.2f}, "
            f"saturating x{under_load['saturating']['ratio_to_alone']:.2f}",
            flush=True,
        )
        t0 = time.perf_counter()
        memory = memory_and_metrics(settings, tmp)
        part_s["memory"] = round(time.perf_counter() - t0, 1)
        print(
            f"rss idle {memory['rss_mb_idle']:.1f} MiB, one {memory['rss_mb_one_experiment']:.1f}, "
            f"{settings.experiments}x{settings.variants} {memory['rss_mb_loaded']:.1f}; "
            f"/metrics {memory['metrics_scrape_s'] * 1000:.1f} ms",
            flush=True,
        )
    full = settings.experiments == 1_000 and settings.variants == 10
    doc: dict[str, Any] = {
        "benchmark": NAME,
        "description": (__doc__ or NAME).split("\n\n")[0],
        "settings": {**asdict(settings), "stores": list(settings.stores)},
        "setup": {
            "group_commit": "server via create_server in this process (default flush_max_rows, "
            "flush_max_delay_ms); client in a spawned process, "
            f"{settings.streams} threads x RewardBatch of {settings.batch} rewards "
            "addressed by batch_token + indices; tokens drawn with AssignBatch before the "
            "clock starts; rewards/s counts calls completed inside the measured window",
            "per_reward": "SqlStore.append_rewards(replica, [row]) in a loop, one thread, "
            "directly on the store (no gRPC, no token checks): an upper bound for a service "
            "that commits each reward on its own",
            "durability": "SQLite WAL with synchronous=FULL; PostgreSQL synchronous_commit on "
            "(its default)",
            "shared_machine": f"server and clients share {os.cpu_count()} logical CPUs",
            "memory": "server alone in a spawned process (SQLite); VmRSS from /proc",
        },
        "machine": machine_info(("numpy", "numba", "grpcio", "sqlalchemy", "psycopg")),
        "load_average_before": load_before,
        "results": results,
        "skipped": skipped,
        "profile": profile,
        "assign_under_load": under_load,
        "memory": memory,
        "rss_mb_idle": memory["rss_mb_idle"],
        "rss_mb_1000x10": memory["rss_mb_loaded"] if full else None,
        "metrics_scrape_s": memory["metrics_scrape_s"],
    }
    doc["targets"] = evaluate_targets(doc)
    doc["load_average_after"] = _loadavg()
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    doc["part_seconds"] = part_s
    return doc


def make_plot(doc: Mapping[str, Any], path: Path) -> None:
    """Three panels: durable rewards/s, Assign under load, RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    ax = axes[0]
    labels = [f"{r['store']}\n{r['mode']}" for r in doc["results"]]
    values = [r["rewards_per_s"] for r in doc["results"]]
    for kind, ceiling in doc["profile"].items():
        labels.append(f"{kind}\nstore batch\n(no gRPC)")
        values.append(ceiling["store_batch_rows_per_s"])
    colors = [
        "tab:blue" if "group" in lb else "tab:grey" if "store" in lb else "tab:orange"
        for lb in labels
    ]
    bars = ax.bar(range(len(values)), values, color=colors)
    ax.bar_label(bars, labels=[format_value(v) for v in values], fontsize=7)
    for kind, target in TARGET_REWARDS_PER_S.items():
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            f"target {kind}",
            (0.01, target),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            color="grey",
            va="bottom",
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_title("durable rewards per second", fontsize=10)

    ax = axes[1]
    load = doc["assign_under_load"]
    names = ["alone (run 1)", "paced rewards", "saturating rewards", "alone (run 2)"]
    vals = [
        load["decisions_per_s_alone_runs"][0],
        load["paced"]["decisions_per_s"],
        load["saturating"]["decisions_per_s"],
        load["decisions_per_s_alone_runs"][1],
    ]
    bars = ax.bar(range(4), vals, color=["tab:green", "tab:olive", "tab:red", "tab:green"])
    ax.bar_label(bars, labels=[format_value(v) for v in vals], fontsize=7)
    ax.set_xticks(range(4), names, fontsize=7)
    ax.set_title(f"AssignBatch({load['assign_batch']}) decisions/s under reward load", fontsize=10)

    ax = axes[2]
    mem = doc["memory"]
    names = ["idle", "1 experiment", f"{mem['experiments']} x {mem['variants']}"]
    vals = [mem["rss_mb_idle"], mem["rss_mb_one_experiment"], mem["rss_mb_loaded"]]
    bars = ax.bar(range(3), vals, color="tab:purple")
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=7)
    ax.axhline(mem["rss_mb_idle"] + TARGET_RSS_DELTA_MB, color="grey", linestyle=":")
    ax.annotate(
        "idle + 50 MiB target",
        (0.01, mem["rss_mb_idle"] + TARGET_RSS_DELTA_MB),
        xycoords=("axes fraction", "data"),
        fontsize=7,
        color="grey",
        va="bottom",
    )
    ax.set_xticks(range(3), names, fontsize=8)
    ax.set_title(
        f"server RSS (MiB); /metrics scrape {mem['metrics_scrape_s'] * 1000:.0f} ms", fontsize=10
    )
    for a in axes:
        a.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(
        "durability: group commit, Assign under reward load, memory "
        f"(server and clients share {os.cpu_count()} CPUs)",
        fontsize=11,
    )
    save_figure(fig, path)


def summary_rows(doc: Mapping[str, Any]) -> list[SummaryRow]:
    """The durability rows of results/summary.md: the targets and each measured rate."""
    rows = target_rows(NAME, doc["targets"])
    for r in doc["results"]:
        if r["mode"] == "per_reward":
            rows.append(
                SummaryRow(
                    NAME,
                    f"{r['store']}_per_reward_rewards_per_s",
                    format_value(r["rewards_per_s"]),
                    "rewards/s",
                    notes="one transaction per reward, store called directly",
                )
            )
    for kind, why in doc["skipped"].items():
        rows.append(SummaryRow(NAME, f"{kind}_durable_rewards_per_s", "skipped", notes=why))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = base_parser(NAME, "Durable rewards/s, Assign under reward load, server memory")
    parser.add_argument("--duration", type=float, help="measured seconds per group-commit run")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per group-commit run")
    parser.add_argument("--streams", type=int, help="concurrent RewardBatch calls")
    parser.add_argument("--batch", type=int, help="rewards per RewardBatch call")
    parser.add_argument("--per-reward-seconds", type=float, help="seconds of per_reward mode")
    parser.add_argument("--assign-seconds", type=float, help="seconds per part-2 phase")
    parser.add_argument("--assign-batch", type=int, help="decisions per AssignBatch in part 2")
    parser.add_argument("--paced-rate", type=float, help="paced reward load (rewards/s)")
    parser.add_argument("--experiments", type=int, help="experiments loaded in part 3")
    parser.add_argument("--variants", type=int, help="variants per experiment in part 3")
    parser.add_argument("--traffic", type=int, help="decisions and rewards per experiment")
    parser.add_argument("--scrapes", type=int, help="/metrics scrapes timed")
    parser.add_argument("--settle", type=float, help="seconds to wait before reading RSS")
    parser.add_argument(
        "--snapshot-wait", type=float, help="seconds to wait before the loaded RSS reading"
    )
    parser.add_argument(
        "--stores",
        type=lambda v: tuple(v.split(",")),
        help=f"comma-separated subset of {','.join(STORES)}",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else DurabilitySettings()
    overrides = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "streams": args.streams,
        "batch": args.batch,
        "per_reward_s": args.per_reward_seconds,
        "assign_s": args.assign_seconds,
        "assign_batch": args.assign_batch,
        "paced_rewards_per_s": args.paced_rate,
        "experiments": args.experiments,
        "variants": args.variants,
        "traffic": args.traffic,
        "scrapes": args.scrapes,
        "settle_s": args.settle,
        "snapshot_wait_s": args.snapshot_wait,
        "stores": args.stores,
    }
    try:
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as err:
        parser.error(str(err))
    doc = run(settings)
    write_json(args.json, doc)
    make_plot(doc, args.png)
    if not args.no_summary:
        update_summary(summary_rows(doc), args.summary, replace_benchmarks=True)
    print_targets(doc["targets"])
    print(f"wrote {args.json} and {args.png} in {doc['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

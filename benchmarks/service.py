"""End-to-end service speed over real gRPC: Assign, AssignBatch, AssignStream, RewardBatch.

One run measures, against the same client:

* ``echo_unary``: a gRPC server of the real server's kind (``grpc.aio``, handler on the
  event loop, same channel options) whose one generic unary handler answers every request
  with a canned AssignResponse (the bytes of a real one), without parsing the request: the
  ceiling for a unary call through grpcio on this machine;
* ``assign_unary``: ``Assign`` on the real server (``create_server``, SQLite in a temporary
  directory), one experiment with K=10 variants, Thompson sampling, ``inflight`` calls in
  flight (futures API, a closed loop: each completion launches the next call);
* ``assign_batch``: ``AssignBatch`` of ``batch`` decisions per call;
* ``assign_stream``: one bidirectional ``AssignStream`` with ``stream_inflight`` messages
  of ``batch`` decisions in flight;
* ``reward_batch``: ``RewardBatch`` of ``batch`` rewards per call, addressed by the
  ``batch_token`` + ``indices`` of AssignBatch responses drawn before the phase (each
  token used once, so every reward is accepted and durably committed).

The client runs in a separate (spawned) process so its GIL does not throttle the server;
both share this machine's cores. Echo and Assign alternate for ``rounds`` rounds (their
numbers are averaged) so drifting background load hits both alike. Each phase also reports
the CPU time each process spent per call. Server-side decision latency comes from the
server's ``allocator_decision_duration_seconds`` histogram, whose bucket counts are read
before and after each phase; its p99 is interpolated linearly inside the bucket (the
histogram covers the engine call only, not parsing, signing or gRPC).

``python -m benchmarks.service [--quick] [--json PATH] [--png PATH] [--phases a,b]``
"""

from __future__ import annotations

import functools
import gc
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
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

NAME = "service"
SCENARIOS = ("echo_unary", "assign_unary", "assign_batch", "assign_stream", "reward_batch")
EXPERIMENT = "bench"
ADMIN_TOKEN = "bench-admin-token"
ECHO_METHOD = "/bench.Echo/Echo"

# Targets (DESIGN: "microseconds", "millions of decisions per second").
TARGET_UNARY_THROUGHPUT_RATIO = 0.8  # Assign calls/s >= 0.8 x echo calls/s
TARGET_UNARY_P99_RATIO = 2.0  # Assign p99 <= 2 x echo p99
TARGET_BATCH_DECISIONS_PER_S = 1_000_000.0
TARGET_DECISION_P99_US = 20.0

CLIENT_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class ServiceSettings:
    """Sizes of one run; validates itself.

    >>> ServiceSettings(duration_s=1.0).inflight
    48
    """

    duration_s: float = 5.0  # measured seconds per phase
    warmup_s: float = 0.5  # seconds per phase before measuring
    inflight: int = 48  # unary Assign / echo calls in flight
    batch: int = 10_000  # decisions per AssignBatch call / stream message / RewardBatch call
    batch_inflight: int = 4  # AssignBatch calls in flight
    stream_inflight: int = 4  # AssignStream messages in flight
    reward_inflight: int = 4  # RewardBatch calls in flight
    n_arms: int = 10
    max_workers: int = 16  # the server's default thread pool (blocking handlers)
    max_reward_batches: int = 200  # most AssignBatch tokens drawn for the reward phase
    # Echo and Assign measured alternately this many times each: the machine's speed
    # moves within a run (one echo round took 5,000 calls/s, the next 10,000), so more
    # rounds, not longer ones, steady the ratio.
    rounds: int = 4

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s must be finite and > 0, got {self.duration_s}")
        if not (math.isfinite(self.warmup_s) and self.warmup_s >= 0):
            raise ValueError(f"warmup_s must be finite and >= 0, got {self.warmup_s}")
        if not 1 <= self.batch <= 100_000:
            raise ValueError(f"batch must be in [1, 100000], got {self.batch}")
        if min(self.inflight, self.batch_inflight, self.stream_inflight, self.reward_inflight) < 1:
            raise ValueError("every in-flight count must be >= 1")
        if self.n_arms < 2:
            raise ValueError(f"n_arms must be >= 2, got {self.n_arms}")
        if self.max_workers < 1 or self.max_reward_batches < 1 or self.rounds < 1:
            raise ValueError("max_workers, max_reward_batches and rounds must be >= 1")


QUICK = ServiceSettings(duration_s=1.0, warmup_s=0.3, rounds=1)


# ----------------------------------------------------------------------------------------
# Client side (runs in the spawned process): closed loops and their statistics
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Samples:
    """Completed calls of one phase: completion times and latencies (ns), CPU used."""

    ends_ns: np.ndarray
    latencies_ns: np.ndarray
    started_ns: int
    measure_from_ns: int
    cpu_s: float  # this (client) process's CPU time over the whole loop, warm-up included
    errors: tuple[str, ...] = ()

    def stats(self, per_call: int) -> dict[str, Any]:
        """Throughput and latency over calls completed after the warm-up."""
        keep = self.ends_ns >= self.measure_from_ns
        lat = self.latencies_ns[keep]
        calls = int(keep.sum())
        window = (float(self.ends_ns[keep].max()) - self.measure_from_ns) / 1e9 if calls else 0.0
        per_s = calls / window if window > 0 else 0.0
        total = int(self.ends_ns.size)
        wall = (float(self.ends_ns.max()) - self.started_ns) / 1e9 if total else 0.0
        return {
            "calls": calls,
            "window_s": round(window, 4),
            "per_s": per_s,
            "decisions_per_s": per_s * per_call,
            "items_per_call": per_call,
            "p50_ms": float(np.percentile(lat, 50)) / 1e6 if calls else None,
            "p99_ms": float(np.percentile(lat, 99)) / 1e6 if calls else None,
            "mean_ms": float(lat.mean()) / 1e6 if calls else None,
            "total_calls": total,
            "client_cpu_cores": self.cpu_s / wall if wall > 0 else None,
            "client_cpu_us_per_call": self.cpu_s / total * 1e6 if total else None,
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
        }


def unary_loop(
    method: Any,
    next_request: Callable[[], Any | None],
    inflight: int,
    warmup_s: float,
    duration_s: float,
    check: Callable[[Any], None] = lambda r: None,
) -> Samples:
    """Keep ``inflight`` calls of ``method`` (a unary multi-callable) going for a while.

    A closed loop on the futures API: each completion records its latency and launches the
    next call until the time is up or ``next_request`` returns None.
    """
    lock = threading.Lock()
    finished = threading.Event()
    ends: list[int] = []
    lats: list[int] = []
    errors: list[str] = []
    active = [0]
    cpu0 = time.process_time()
    start = time.perf_counter_ns()
    measure_from = start + int(warmup_s * 1e9)
    stop_at = measure_from + int(duration_s * 1e9)

    def launch() -> bool:
        req = next_request()
        if req is None:
            return False
        t0 = time.perf_counter_ns()
        method.future(req, timeout=60.0).add_done_callback(functools.partial(done, t0))
        return True

    def retire() -> None:
        with lock:
            active[0] -= 1
            if active[0] == 0:
                finished.set()

    def done(t0: int, fut: grpc.Future) -> None:
        now = time.perf_counter_ns()
        try:
            check(fut.result())
        except Exception as err:  # reported in the results; the loop stops
            with lock:
                errors.append(repr(err)[:300])
            retire()
            return
        with lock:
            ends.append(now)
            lats.append(now - t0)
        if now < stop_at and launch():
            return
        retire()

    with lock:
        active[0] = inflight
    for _ in range(inflight):
        if not launch():
            retire()
    finished.wait()
    return Samples(
        np.asarray(ends, dtype=np.int64),
        np.asarray(lats, dtype=np.int64),
        start,
        measure_from,
        time.process_time() - cpu0,
        tuple(errors),
    )


def stream_loop(
    stub: Any, request: pb.AssignBatchRequest, inflight: int, warmup_s: float, duration_s: float
) -> Samples:
    """One AssignStream with ``inflight`` messages outstanding; latency per message."""
    slots = threading.Semaphore(inflight)
    sent: dict[int, int] = {}
    ends: list[int] = []
    lats: list[int] = []
    cpu0 = time.process_time()
    start = time.perf_counter_ns()
    measure_from = start + int(warmup_s * 1e9)
    stop_at = measure_from + int(duration_s * 1e9)

    def requests() -> Iterator[pb.AssignStreamRequest]:
        i = 0
        while True:
            slots.acquire()
            now = time.perf_counter_ns()
            if now >= stop_at:
                return
            i += 1
            sent[i] = now
            yield pb.AssignStreamRequest(request_id=i, batch=request)

    errors: list[str] = []
    try:
        for resp in stub.AssignStream(requests(), timeout=duration_s + warmup_s + 60):
            now = time.perf_counter_ns()
            if len(resp.batch.variant_indices) != request.count:
                raise RuntimeError(f"stream answered {len(resp.batch.variant_indices)} decisions")
            ends.append(now)
            lats.append(now - sent.pop(resp.request_id))
            slots.release()
    except Exception as err:  # reported in the results
        errors.append(repr(err)[:300])
    return Samples(
        np.asarray(ends, dtype=np.int64),
        np.asarray(lats, dtype=np.int64),
        start,
        measure_from,
        time.process_time() - cpu0,
        tuple(errors),
    )


def _expect_count(n: int) -> Callable[[Any], None]:
    def check(resp: Any) -> None:
        got = len(resp.variant_indices) if hasattr(resp, "variant_indices") else resp.accepted
        if got != n:
            raise RuntimeError(f"expected {n} items, got {got}")

    return check


def run_client_phase(
    target: str, phase: str, settings: ServiceSettings, mark: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """One measured phase against ``target``; returns its statistics (client process).

    ``mark`` is called just before the timed loop starts (after connecting and, for
    rewards, drawing the tokens), so the server can start its CPU accounting there.
    """
    s = settings
    with grpc.insecure_channel(target, options=list(CLIENT_OPTIONS)) as channel:
        stub = pb_grpc.AllocatorStub(channel)
        assign_req = pb.AssignRequest(experiment=EXPERIMENT)
        batch_req = pb.AssignBatchRequest(experiment=EXPERIMENT, count=s.batch)
        # Connect before the clock starts.
        grpc.channel_ready_future(channel).result(timeout=30)
        if phase == "echo_unary":
            # Same client work as Assign: serialize an AssignRequest, parse an AssignResponse.
            echo = channel.unary_unary(
                ECHO_METHOD,
                request_serializer=pb.AssignRequest.SerializeToString,
                response_deserializer=pb.AssignResponse.FromString,
            )
            mark()
            samples = unary_loop(echo, lambda: assign_req, s.inflight, s.warmup_s, s.duration_s)
            return samples.stats(1)
        if phase == "assign_unary":
            mark()
            samples = unary_loop(
                stub.Assign, lambda: assign_req, s.inflight, s.warmup_s, s.duration_s
            )
            return samples.stats(1)
        if phase == "assign_batch":
            mark()
            samples = unary_loop(
                stub.AssignBatch,
                lambda: batch_req,
                s.batch_inflight,
                s.warmup_s,
                s.duration_s,
                _expect_count(s.batch),
            )
            return samples.stats(s.batch)
        if phase == "assign_stream":
            mark()
            samples = stream_loop(stub, batch_req, s.stream_inflight, s.warmup_s, s.duration_s)
            return samples.stats(s.batch)
        if phase == "reward_batch":
            return _reward_phase(stub, batch_req, s, mark)
    raise ValueError(f"unknown phase {phase!r}")


# Reward-phase tokens are drawn up front for this rate (several times the ~40k rewards/s
# one server reaches here), capped by max_reward_batches; running out is reported.
_REWARD_RATE_BUDGET = 200_000


def _reward_phase(
    stub: Any, batch_req: pb.AssignBatchRequest, s: ServiceSettings, mark: Callable[[], None]
) -> dict[str, Any]:
    """Draw tokens with AssignBatch (untimed), then redeem each once with RewardBatch."""
    rng = np.random.default_rng(7)
    indices = list(range(s.batch))
    wanted = math.ceil(_REWARD_RATE_BUDGET * (s.warmup_s + s.duration_s) / s.batch)
    t0 = time.perf_counter()
    requests: list[pb.RewardBatchRequest] = []
    for _ in range(min(wanted, s.max_reward_batches)):
        resp = stub.AssignBatch(batch_req, timeout=60)
        # Bernoulli rewards whose mean depends on the arm, so the posterior moves.
        arms = np.asarray(resp.variant_indices, dtype=np.int64)
        values = (rng.random(s.batch) < 0.05 + 0.01 * arms).astype(np.float64)
        requests.append(
            pb.RewardBatchRequest(
                experiment=EXPERIMENT,
                batch_token=resp.batch_token,
                indices=indices,
                values=values.tolist(),
            )
        )
    draw_s = time.perf_counter() - t0
    pool = iter(requests)
    mark()
    samples = unary_loop(
        stub.RewardBatch,
        lambda: next(pool, None),
        s.reward_inflight,
        s.warmup_s,
        s.duration_s,
        _expect_count(s.batch),
    )
    out = samples.stats(s.batch)
    out["tokens_drawn"] = len(requests)
    out["token_draw_s"] = round(draw_s, 3)
    out["token_pool_exhausted"] = next(pool, None) is None
    return out


def client_task(
    target: str, phase: str, params: Mapping[str, Any], mark: Callable[[], None]
) -> dict[str, Any]:
    """Entry point of the spawned client (see :class:`benchmarks.common.ClientProcess`)."""
    return run_client_phase(target, phase, ServiceSettings(**params), mark)


def run_phase(
    proc: ClientProcess, target: str, phase: str, settings: ServiceSettings
) -> dict[str, Any]:
    """Run one phase in the client and return its statistics plus this process's CPU.

    The server runs in this process, so its CPU time between the client's start mark and
    the result gives each phase's server CPU per call.
    """
    proc.start(target, phase, asdict(settings))
    proc.wait_mark()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = proc.result()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    total = out.get("total_calls") or 0
    out["server_cpu_cores"] = cpu / wall if wall > 0 else None
    out["server_cpu_us_per_call"] = cpu / total * 1e6 if total else None
    return out


# ----------------------------------------------------------------------------------------
# Server side (this process)
# ----------------------------------------------------------------------------------------


class EchoServer:
    """A server like the real one, answering ``reply`` to anything; ``stop`` it after use.

    The same kind of server as :func:`allocator.server.create_server` builds, on the same
    event loop (:func:`allocator.server.grpc_loop`; a second loop would cost one of the
    two servers a cross-thread hop per event), with the same channel options; one generic
    unary handler that runs on the loop, as Assign does, and returns raw bytes (no
    (de)serialization on the server).
    """

    def __init__(self, reply: bytes) -> None:
        # Imported here: the spawned client imports this module without the server stack.
        from allocator.server import SERVER_OPTIONS, grpc_loop

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return reply

        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server(options=list(SERVER_OPTIONS))
            server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(handle)}
                    ),
                )
            )
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self._loop = grpc_loop()
        self._server, self.port = self._loop.run(start())

    def stop(self) -> None:
        """Stop serving (the loop stays with its server)."""
        self._loop.run(self._server.stop(1.0))


def histogram_buckets(
    registry: Any, name: str, labels: Mapping[str, str] | None = None
) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of histogram ``name`` (one label set)."""
    want = dict(labels or {})
    out: list[tuple[float, float]] = []
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name != name + "_bucket":
                continue
            rest = {k: v for k, v in sample.labels.items() if k != "le"}
            if rest == want:
                out.append((float(sample.labels["le"]), float(sample.value)))
    return sorted(out)


def histogram_quantile(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]], q: float
) -> float | None:
    """Quantile ``q`` of the observations added between two bucket snapshots.

    Linear interpolation inside the bucket that holds the quantile (as Prometheus'
    histogram_quantile does), from 0 for the first bucket; None if nothing was observed.
    An answer in the +Inf bucket is reported as its lower bound.

    >>> histogram_quantile([(1.0, 0), (2.0, 0), (math.inf, 0)],
    ...                    [(1.0, 50), (2.0, 100), (math.inf, 100)], 0.75)
    1.5
    """
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    prev = dict(before)
    counts = [(le, c - prev.get(le, 0.0)) for le, c in after]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    lo_bound, lo_count = 0.0, 0.0
    for le, c in counts:
        if c >= rank:
            if math.isinf(le):
                return lo_bound
            inside = c - lo_count
            frac = (rank - lo_count) / inside if inside > 0 else 1.0
            return lo_bound + (le - lo_bound) * frac
        lo_bound, lo_count = le, c
    return lo_bound


def _histogram_summary(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    prev = dict(before)
    count = after[-1][1] - prev.get(math.inf, 0.0) if after else 0.0
    p50 = histogram_quantile(before, after, 0.5)
    p99 = histogram_quantile(before, after, 0.99)
    return {
        "observations": int(count),
        "p50_us": None if p50 is None else p50 * 1e6,
        "p99_us": None if p99 is None else p99 * 1e6,
        "top_bucket_us": after[-2][0] * 1e6 if len(after) >= 2 else None,
    }


DECISION_HISTOGRAM = "allocator_decision_duration_seconds"
RPC_HISTOGRAM = "allocator_request_duration_seconds"
_RPC_OF = {"assign_unary": "Assign", "assign_batch": "AssignBatch", "reward_batch": "RewardBatch"}


# Integers of a phase that are settings of it, the same in every round, not counts.
_PER_PHASE = frozenset({"items_per_call"})


def _mean_rounds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result from several rounds of a phase: rates and times (floats) averaged, counts
    (ints) summed, per-phase settings (``items_per_call``) kept, the rest from round 1."""
    out = dict(rounds[0])
    for key, value in rounds[0].items():
        values = [r.get(key) for r in rounds]
        if key in _PER_PHASE:
            if len(set(values)) > 1:
                raise ValueError(f"{key} differs between rounds: {values}")
        elif isinstance(value, float) and all(isinstance(v, float) for v in values):
            out[key] = sum(float(v or 0.0) for v in values) / len(values)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = int(sum(v or 0 for v in values))
    if len(rounds) > 1 and "per_s" in out:
        out["rounds"] = [{k: r.get(k) for k in ("per_s", "p50_ms", "p99_ms")} for r in rounds]
    return out


def run(settings: ServiceSettings, phases: Sequence[str] = SCENARIOS) -> dict[str, Any]:
    """Start both servers, run the phases from one client process, gather the results."""
    unknown = set(phases) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; choose from {SCENARIOS}")
    # Imported here, not at the top: the spawned client re-imports this module and does
    # not need the server stack (numba kernels, SQLAlchemy).
    from allocator_client import AllocatorClient
    from prometheus_client import CollectorRegistry

    from allocator.config import ServerConfig
    from allocator.server import create_server, freeze_heap

    t_start = time.perf_counter()
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        config = ServerConfig(
            listen="127.0.0.1:0",
            http_port=0,  # any free port; the histograms are read from the registry
            database_url=f"sqlite:///{Path(tmp) / 'bench.sqlite'}",
            admin_token=ADMIN_TOKEN,
            replica_id="bench",
            max_workers=settings.max_workers,
            log_level="WARNING",
            log_json=False,
        )
        registry = CollectorRegistry()
        running = create_server(config, registry=registry)
        freeze_heap()  # as ``allocator serve`` does
        echo_server: EchoServer | None = None
        try:
            target = f"127.0.0.1:{running.port}"
            variants = [f"v{i}" for i in range(settings.n_arms)]
            with AllocatorClient(target, admin_token=ADMIN_TOKEN, timeout=30) as client:
                client.create_experiment(
                    # auto_promote off: the run measures the adaptive (exact Thompson)
                    # path throughout, not a promoted experiment's fixed table.
                    pb.ExperimentSpec(
                        name=EXPERIMENT,
                        variants=variants,
                        policy=pb.POLICY_THOMPSON,
                        seed=1,
                        promotion=pb.PromotionSettings(auto_promote=False),
                    )
                )
                # The echo server answers with the bytes of a real AssignResponse.
                sample = client.assign(EXPERIMENT)
            reply = sample.SerializeToString()
            request_bytes = len(pb.AssignRequest(experiment=EXPERIMENT).SerializeToString())
            echo_server = EchoServer(reply)
            echo_port = echo_server.port
            ports = {p: running.port for p in SCENARIOS} | {"echo_unary": echo_port}
            unary = [p for p in ("echo_unary", "assign_unary") if p in phases]
            schedule = unary * settings.rounds + [
                p for p in phases if p not in ("echo_unary", "assign_unary")
            ]
            measured: dict[str, list[dict[str, Any]]] = {}
            with ClientProcess(client_task) as proc:
                # Untimed: the client's first calls pay for imports, channel and thread
                # start-up and would make whichever phase runs first look slow.
                warm = ServiceSettings(
                    **{
                        **asdict(settings),
                        "duration_s": min(0.5, settings.duration_s),
                        "warmup_s": 0.0,
                    }
                )
                run_phase(proc, f"127.0.0.1:{echo_port}", "echo_unary", warm)
                run_phase(proc, target, "assign_unary", warm)
                for phase in schedule:
                    hist: dict[str, tuple[str, dict[str, str] | None]] = {}
                    # The reward phase draws its tokens with AssignBatch inside the interval.
                    if phase != "reward_batch":
                        hist["decision"] = (DECISION_HISTOGRAM, {"rpc": "Assign"})
                    if phase in _RPC_OF:
                        hist["rpc"] = (RPC_HISTOGRAM, {"rpc": _RPC_OF[phase]})
                    before = {k: histogram_buckets(registry, n, lb) for k, (n, lb) in hist.items()}
                    stats = run_phase(proc, f"127.0.0.1:{ports[phase]}", phase, settings)
                    if phase != "echo_unary":
                        for key, (n, lb) in hist.items():
                            after = histogram_buckets(registry, n, lb)
                            stats[f"server_{key}"] = (before[key], after)
                    measured.setdefault(phase, []).append(stats)
                    print(
                        f"{phase}: {format_value(stats['per_s'])} calls/s, "
                        f"{format_value(stats['decisions_per_s'])} items/s, "
                        f"p50 {_fmt(stats['p50_ms'])} ms, p99 {_fmt(stats['p99_ms'])} ms, "
                        f"server CPU {_fmt(stats['server_cpu_us_per_call'])} us/call",
                        flush=True,
                    )
        finally:
            if echo_server is not None:
                echo_server.stop()
            running.stop(grace=2.0)
            # Objects this run froze are collectable again (a test run calls ``run`` in
            # its own process, and its garbage must not stay pinned).
            gc.unfreeze()
    results: list[dict[str, Any]] = [
        {"name": p, **_merge_phase(measured[p])} for p in SCENARIOS if p in measured
    ]
    assign: dict[str, Any] = next((r for r in results if r["name"] == "assign_unary"), {})
    decision_p99 = assign.get("server_decision", {}).get("p99_us")
    doc: dict[str, Any] = {
        "benchmark": NAME,
        "description": __doc__.split("\n\n")[0] if __doc__ else NAME,
        "settings": asdict(settings),
        "setup": {
            "experiment": f"K={settings.n_arms} variants, Thompson (Beta-Bernoulli), "
            "allocation mode EXACT",
            "store": "SQLite file in a temporary directory",
            "client": "one spawned Python process, one channel, grpc futures API "
            f"(closed loop, {settings.inflight} unary calls in flight; "
            f"{settings.batch_inflight} AssignBatch, {settings.reward_inflight} RewardBatch), "
            f"one bidirectional stream with {settings.stream_inflight} messages in flight "
            "for AssignStream",
            "shared_machine": f"client, echo server and allocator server share this "
            f"machine's {os.cpu_count()} logical CPUs (and any other load on it)",
            "echo": "generic unary handler, no (de)serialization on the server, answers the "
            f"{len(reply)}-byte serialized AssignResponse of a real call to "
            f"{request_bytes}-byte AssignRequests; a grpc.aio server on the allocator "
            "server's own event loop, handler on the loop (as Assign is), channel options "
            "of create_server",
            "rounds": f"echo_unary and assign_unary alternate {settings.rounds} time(s); "
            "their numbers are averages over the rounds",
            "latency": "client-side, from launching a call to its completion callback (ms)",
            "cpu": "server_cpu_us_per_call: CPU of the server process (all threads) over the "
            "loop / calls completed; client_cpu_*: the same for the client process",
            "server_decision_latency": "allocator_decision_duration_seconds bucket counts "
            "diffed before/after each phase (warm-up included); quantiles by linear "
            "interpolation inside the bucket; covers the engine call only (one observation "
            "per Assign or per AssignBatch call); answers above the top bucket are censored",
        },
        "machine": machine_info(("numpy", "numba", "grpcio", "protobuf")),
        "load_average_before": load_before,
        "load_average_after": _loadavg(),
        "results": results,
        "server_decision_p99_us": decision_p99,
    }
    doc["targets"] = evaluate_targets(results, decision_p99)
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return doc


def _merge_phase(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Average a phase's rounds; pool their server histograms (sum of the bucket diffs)."""
    snaps = {k: [r.pop(k) for r in rounds if k in r] for k in ("server_decision", "server_rpc")}
    out = _mean_rounds(rounds)
    for key, pairs in snaps.items():
        if pairs:
            out[key] = _histogram_summary(*_pool(pairs))
            if len(pairs) > 1:
                out[key]["p99_us_per_round"] = [_histogram_summary(*ba)["p99_us"] for ba in pairs]
    return out


Snapshot = list[tuple[float, float]]


def _pool(pairs: Sequence[tuple[Snapshot, Snapshot]]) -> tuple[Snapshot, Snapshot]:
    """(before, after) snapshots of several intervals as one: zeros, then the summed diffs."""
    bounds = [le for le, _ in pairs[0][1]]
    total = [0.0] * len(bounds)
    for before, after in pairs:
        prev = dict(before)
        for i, (le, count) in enumerate(after):
            total[i] += count - prev.get(le, 0.0)
    return [(le, 0.0) for le in bounds], list(zip(bounds, total, strict=True))


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else format_value(x)


# ----------------------------------------------------------------------------------------
# Targets, plot, summary
# ----------------------------------------------------------------------------------------


def evaluate_targets(
    results: Sequence[Mapping[str, Any]], decision_p99_us: float | None
) -> list[dict[str, Any]]:
    """The service targets, measured value against target (None if not measured)."""
    by = {r["name"]: r for r in results}

    def ratio(a: str, b: str, key: str) -> float | None:
        x = by.get(a, {}).get(key)
        y = by.get(b, {}).get(key)
        return None if x is None or not y else float(x) / float(y)

    def rate(name: str) -> float | None:
        r = by.get(name)
        return None if r is None else float(r["decisions_per_s"])

    return [
        target_entry(
            "assign_unary_throughput_vs_echo",
            "unary Assign calls/s / echo calls/s, same client and in-flight count",
            ratio("assign_unary", "echo_unary", "per_s"),
            ">=",
            TARGET_UNARY_THROUGHPUT_RATIO,
            "x",
        ),
        target_entry(
            "assign_unary_p99_vs_echo",
            "unary Assign p99 / echo p99 (client-side)",
            ratio("assign_unary", "echo_unary", "p99_ms"),
            "<=",
            TARGET_UNARY_P99_RATIO,
            "x",
        ),
        target_entry(
            "assign_batch_decisions_per_s",
            "AssignBatch decisions per second",
            rate("assign_batch"),
            ">=",
            TARGET_BATCH_DECISIONS_PER_S,
            "decisions/s",
        ),
        target_entry(
            "assign_stream_decisions_per_s",
            "AssignStream decisions per second",
            rate("assign_stream"),
            ">=",
            TARGET_BATCH_DECISIONS_PER_S,
            "decisions/s",
        ),
        target_entry(
            "server_decision_p99_us",
            "server-side p99 of one Assign decision (engine call, histogram)",
            decision_p99_us,
            "<=",
            TARGET_DECISION_P99_US,
            "us",
        ),
    ]


def make_plot(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Bar charts per phase: calls/s, decisions/s, client-side p50/p99, CPU per call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.5))
    panels = (
        ("calls per second", [r["per_s"] for r in results], None),
        (
            "decisions (rewards) per second",
            [r["decisions_per_s"] for r in results],
            TARGET_BATCH_DECISIONS_PER_S,
        ),
        (
            "server process CPU per call (us, all threads)",
            [r.get("server_cpu_us_per_call") or 0.0 for r in results],
            None,
        ),
    )
    for ax, (title, values, hline) in zip((axes[0], axes[1], axes[3]), panels, strict=True):
        bars = ax.bar(x, values, color="tab:blue")
        ax.bar_label(bars, labels=[format_value(v) for v in values], fontsize=7)
        ax.set_yscale("log")
        if hline is not None:
            ax.axhline(hline, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                "target (batch/stream)",
                (0.01, hline),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="grey",
                va="bottom",
            )
        ax.set_title(title, fontsize=10)
    ax = axes[2]
    width = 0.38
    p50 = [r["p50_ms"] or 0.0 for r in results]
    p99 = [r["p99_ms"] or 0.0 for r in results]
    b1 = ax.bar(x - width / 2, p50, width, label="p50", color="tab:green")
    b2 = ax.bar(x + width / 2, p99, width, label="p99", color="tab:red")
    ax.bar_label(b1, labels=[format_value(v) for v in p50], fontsize=6)
    ax.bar_label(b2, labels=[format_value(v) for v in p99], fontsize=6)
    ax.set_yscale("log")
    ax.set_title("client-side latency per call / message (ms)", fontsize=10)
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, names, rotation=20, fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(
        f"allocator over gRPC: client and servers share this machine ({os.cpu_count()} CPUs)",
        fontsize=11,
    )
    save_figure(fig, path)


def summary_rows(doc: Mapping[str, Any]) -> list[SummaryRow]:
    """The service rows of results/summary.md: the targets and each phase's throughput."""
    rows = target_rows(NAME, doc["targets"])
    for r in doc["results"]:
        rows.append(
            SummaryRow(
                NAME,
                f"{r['name']} per s",
                format_value(r["per_s"]),
                "calls/s",
                notes=f"{format_value(r['decisions_per_s'])} items/s, p50 {_fmt(r['p50_ms'])} ms, "
                f"p99 {_fmt(r['p99_ms'])} ms",
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = base_parser(NAME, "Assign / AssignBatch / AssignStream / RewardBatch over gRPC")
    parser.add_argument("--duration", type=float, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per phase")
    parser.add_argument("--inflight", type=int, help="unary calls in flight")
    parser.add_argument("--batch", type=int, help="decisions per batch call / stream message")
    parser.add_argument(
        "--max-reward-batches", type=int, help="most AssignBatch tokens drawn for the reward phase"
    )
    parser.add_argument("--rounds", type=int, help="echo / Assign rounds (alternating)")
    parser.add_argument(
        "--phases",
        type=lambda v: tuple(v.split(",")),
        default=SCENARIOS,
        help="comma-separated subset of " + ",".join(SCENARIOS),
    )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else ServiceSettings()
    overrides: dict[str, Any] = {}
    for field_name, value in (
        ("duration_s", args.duration),
        ("warmup_s", args.warmup),
        ("inflight", args.inflight),
        ("batch", args.batch),
        ("max_reward_batches", args.max_reward_batches),
        ("rounds", args.rounds),
    ):
        if value is not None:
            overrides[field_name] = value
    try:
        settings = ServiceSettings(**{**asdict(base), **overrides})
    except ValueError as err:
        parser.error(str(err))
    unknown = set(args.phases) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    doc = run(settings, args.phases)
    write_json(args.json, doc)
    make_plot(doc["results"], args.png)
    if not args.no_summary:
        update_summary(summary_rows(doc), args.summary, replace_benchmarks=True)
    print_targets(doc["targets"])
    print(f"wrote {args.json} and {args.png} in {doc['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Process wiring: gRPC server, health, reflection, HTTP metrics, graceful shutdown.

``create_server`` builds and starts a server on the configured address (port 0 picks a
free one) and returns it with its port, so tests can run a real server and call it
through a real stub; ``serve`` adds signal handling and blocks.

The gRPC server is a ``grpc.aio`` server on an event loop running in a thread of its own
(:func:`grpc_loop`), so callers stay synchronous; handlers that block run in a thread
pool of ``max_workers`` threads (see :mod:`allocator.service`).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import signal
import ssl
import sys
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
import uvloop
from allocator_client.v1 import allocator_pb2 as pb
from allocator_client.v1 import allocator_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from allocator.app import Allocator
from allocator.config import ServerConfig
from allocator.metrics import EngineCollector, Metrics
from allocator.sched import batch_all_but, batch_current_thread
from allocator.service import AllocatorServicer
from allocator.supervisor import Supervisor, evaluate_promotion, monitor_settings

log = logging.getLogger("allocator.server")

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Allocator"].full_name
# Reported NOT_SERVING while the store is unreachable: Assign still works from memory,
# rewards are refused with UNAVAILABLE until it is back.
STORE_HEALTH = "allocator.v1.Allocator/store"
# Channel options of the gRPC server (the service benchmark's echo server uses them too).
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
)


class LoopThread:
    """An event loop (uvloop) running on a daemon thread; ``run`` coroutines on it."""

    def __init__(self, name: str) -> None:
        # uvloop: grpc.aio's per-call scheduling (tasks, call_soon, wake-ups) is the loop's
        # hot path; uvloop's C loop measured faster than asyncio's here (README).
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def native_id(self) -> int:
        """The loop thread's kernel thread id."""
        assert self._thread.native_id is not None  # set once started
        return self._thread.native_id

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_LOOP: LoopThread | None = None
_LOOP_LOCK = threading.Lock()


def grpc_loop() -> LoopThread:
    """The process's one loop for grpc.aio servers: started on first use, never stopped.

    grpc.aio polls all of a process's completions on one thread and hands them to the loop
    it was first used on, which forwards those of any other loop with a cross-thread hop;
    with a loop per server, one server would pay that hop on every event (and a closed
    first loop would strand the rest). Servers of one process (tests, replicas, the
    benchmark's echo server) therefore share this loop.
    """
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = LoopThread("grpc")
        return _LOOP


@dataclass
class Running:
    """A started server and what stops it."""

    server: grpc.aio.Server
    port: int
    app: Allocator
    supervisor: Supervisor
    health: health.aio.HealthServicer
    http: ThreadingHTTPServer | None
    http_port: int
    loop: LoopThread
    pool: ThreadPoolExecutor
    _watch: asyncio.Future[None]

    def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service (and keep doing so)."""
        self.loop.run(self.health.enter_graceful_shutdown())

    def stop(self, grace: float = 5.0, delay: float = 0.0) -> None:
        """NOT_SERVING; after ``delay`` s still serving, drain in-flight RPCs, flush rewards,
        close the store."""

        async def drain() -> None:
            await self.health.enter_graceful_shutdown()
            # Still serving: pollers of the health service (load balancers) see NOT_SERVING
            # and move traffic away before new calls are refused.
            await asyncio.sleep(delay)
            self._watch.cancel()
            # WatchEvents never ends by itself: end it now (UNAVAILABLE, with where to
            # resume) instead of holding the stop for the whole grace period.
            self.app.events.close()
            await self.server.stop(grace)

        try:
            self.loop.run(drain(), timeout=delay + grace + 5)
        finally:
            # Even if draining failed: bodies still in the pool (a reward waiting for its
            # commit) finish before the writer is flushed and stopped.
            self.pool.shutdown(wait=True)
            self.supervisor.stop()
            try:
                self.app.stop()
            finally:
                # After the app: its final drain can still find a regression to send.
                self.supervisor.close()
            if self.http is not None:
                self.http.shutdown()
                self.http.server_close()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    chain = Path(config.tls_cert).read_bytes()
    key = Path(config.tls_key).read_bytes()
    if config.tls_client_ca:
        return grpc.ssl_server_credentials(
            [(key, chain)],
            root_certificates=Path(config.tls_client_ca).read_bytes(),
            require_client_auth=True,
        )
    return grpc.ssl_server_credentials([(key, chain)])


def _tls_problem(config: ServerConfig) -> str | None:
    """Why the TLS files may have made grpc fail to bind (it says only 'cannot bind'), by
    loading them with Python's OpenSSL; None if they load. Asked only after a failure:
    grpc's own TLS library accepts some files OpenSSL's defaults refuse (small keys)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # judge the files, not today's key-size policy
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    except ssl.SSLError as err:
        return (
            f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: not a PEM "
            f"certificate chain and its (unencrypted) private key ({err.reason or err})"
        )
    if config.tls_client_ca:
        try:
            ctx.load_verify_locations(config.tls_client_ca)
        except ssl.SSLError as err:
            reason = err.reason or err
            return f"--tls-client-ca {config.tls_client_ca}: not PEM CA certificates ({reason})"
    return None


def _http_server(
    config: ServerConfig, registry: CollectorRegistry, app: Allocator
) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body = generate_latest(registry)
                self._send(200, CONTENT_TYPE_LATEST, body)
            elif self.path.startswith("/healthz"):
                ok = app.healthy
                body = json.dumps(
                    {
                        "serving": True,
                        "store": "up" if ok else "down",
                        "error": app.writer.last_error,
                    }
                ).encode()
                self._send(200 if ok else 503, "application/json", body)
            else:
                self._send(404, "text/plain", b"see /metrics and /healthz\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((config.http_host, config.http_port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def create_server(
    config: ServerConfig, app: Allocator | None = None, registry: CollectorRegistry | None = None
) -> Running:
    """Open the store, recover, and start serving; returns the running server."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    if app is None:
        app = Allocator.open(config, metrics)
    registry.register(
        EngineCollector(
            app.engine,
            lambda: {n: r.lifecycle.state.value for n, r in app.records.items()},
            config.metrics_max_experiments,
        )
    )
    supervisor = Supervisor(
        app,
        config.promotion_interval_s,
        evaluate=evaluate_promotion,
        save_interval_s=config.snapshot_interval_s,
    )
    app.monitor_settings = monitor_settings
    app.start()
    supervisor.start()
    loop = grpc_loop()
    # The handler pool's threads, like every other thread but the loop's, must not
    # preempt the loop when they wake (allocator.sched).
    pool = ThreadPoolExecutor(
        max_workers=config.max_workers, thread_name_prefix="rpc", initializer=batch_current_thread
    )
    servicer = AllocatorServicer(app, metrics, config.admin_token, pool)
    try:
        server, port, health_servicer, watch = loop.run(_start_grpc(config, servicer))
    except BaseException:
        pool.shutdown()
        supervisor.stop()
        app.stop()
        supervisor.close()
        raise
    http = None
    if config.http_port >= 0:  # -1: off
        try:
            http = _http_server(config, registry, app)
        except OSError as err:
            loop.run(_abandon(server, watch))
            pool.shutdown()
            supervisor.stop()
            app.stop()
            supervisor.close()
            raise OSError(
                err.errno, f"--http-port {config.http_port} on {config.http_host}: {err.strerror}"
            ) from err
    http_port = http.server_address[1] if http is not None else 0
    # Now that grpc's threads (poller, event engine) and ours have started; threads they
    # start later inherit the policy. Threads the loop thread itself starts later would
    # not: the handler pool's batch themselves (its initializer), and nothing else on the
    # loop starts threads (no default executor is used).
    batch_all_but(loop.native_id)
    if config.exposed_plaintext_admin:
        log.warning(
            "the admin token travels in clear: --listen %s is not loopback and TLS is off "
            "(set --tls-cert/--tls-key, or listen on 127.0.0.1 behind a TLS proxy)",
            config.listen,
        )
    return Running(
        server,
        port,
        app,
        supervisor,
        health_servicer,
        http,
        int(http_port),
        loop,
        pool,
        watch,
    )


class _GenericHandlersOnly:
    """What the generated ``add_*Servicer_to_server`` functions see of the server.

    They register each service twice: as a generic handler and as "registered methods".
    grpc.aio (1.85) keeps one pending accept per registered method (21 here with health
    and reflection, plus the generic one) and runs an ``asyncio.wait`` over all of them
    for every incoming RPC (grpc/grpc#43461, an open fix). A trivial handler answered 8%
    fewer calls/s beside 25 registered methods than alone (8 alternating rounds); unary
    Assign went from 0.73-0.79x to 0.80-0.86x the echo ceiling in 5 alternating pairs
    (README, Performance). Generic handlers only: one pending accept, and a dict lookup
    finds the method. What registration would add: grpc's call tracers (the
    grpcio-observability / OpenTelemetry plugins, not used here) label unregistered
    methods "other". Drop this once grpc.aio's accept loop no longer scales with them.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """Dropped: the same handlers came as a generic handler just before."""


async def _abandon(server: grpc.aio.Server, watch: asyncio.Future[None]) -> None:
    """Undo ``_start_grpc`` (start-up failed after it)."""
    watch.cancel()
    await server.stop(0)


async def _start_grpc(
    config: ServerConfig, servicer: AllocatorServicer
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer, asyncio.Future[None]]:
    """Build, bind and start the gRPC server (on the loop that will run it)."""
    server = grpc.aio.server(options=list(SERVER_OPTIONS))
    services = _GenericHandlersOnly(server)
    pb_grpc.add_AllocatorServicer_to_server(servicer, services)  # first: looked up first
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, services)
    # What reflection.enable_server_reflection does for an aio server, through the proxy.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        ),
        services,
    )
    creds = _credentials(config)
    try:
        if creds is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, creds)
    except RuntimeError:  # grpc's "Failed to bind", without the reason
        port = 0
    if port == 0:
        problem = _tls_problem(config) if creds is not None else None
        if problem is not None:
            raise OSError(errno.EINVAL, problem)
        raise OSError(
            errno.EADDRNOTAVAIL,
            f"--listen {config.listen}: cannot bind (port in use, or not an address of this host)",
        )
    await server.start()
    for name in ("", SERVICE_NAME, STORE_HEALTH):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watch = asyncio.ensure_future(_watch_store(servicer.app, health_servicer))
    return server, port, health_servicer, watch


async def _watch_store(app: Allocator, health_servicer: health.aio.HealthServicer) -> None:
    """Mirror the store's reachability in the STORE_HEALTH service."""
    serving = True
    while True:
        await asyncio.sleep(0.2)
        ok = app.healthy
        if ok != serving:
            serving = ok
            await health_servicer.set(
                STORE_HEALTH,
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(config: ServerConfig) -> None:
    """Structured (JSON lines) or plain logs on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if config.log_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


def freeze_heap() -> int:
    """Take what is alive after start-up out of the cyclic collector's walks; returns how
    many objects that was.

    A full collection walks every tracked object, and it runs on whichever thread
    allocates, usually the event loop: under the service benchmark the ~265,000 objects of
    start-up (modules, compiled kernels, descriptors, loaded experiments) made each one a
    70-120 ms stall of every call in flight; frozen, 2-5 ms. Frozen objects are still
    freed by reference counting; only cycles among them are never collected, and those live
    as long as the process anyway. Call it once, after :func:`create_server` (``serve``
    does; a process starting many servers, a test run, should not, or each would pin the
    previous ones' garbage).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; then drain, flush and exit 0."""
    setup_logging(config)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: draining", signum)
        done.set()

    # Installed before the server starts: health turns SERVING inside create_server, and a
    # SIGTERM arriving between that and a later install would kill the process outright.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running = create_server(config)
    frozen = freeze_heap()
    log.info(
        "allocator serving gRPC on %s (port %d), metrics on http://%s:%d/metrics, store %s; "
        "%d start-up objects frozen out of the cyclic GC",
        config.listen,
        running.port,
        config.http_host,
        running.http_port,
        config.database_url.split("@")[-1],
        frozen,
    )
    print(
        f"allocator: gRPC listening on {config.listen.rpartition(':')[0]}:{running.port}; "
        f"metrics at http://{config.http_host}:{running.http_port}/metrics",
        flush=True,
    )
    while not done.wait(1.0):
        pass
    t0 = time.monotonic()
    running.stop(config.grace_s, config.shutdown_delay_s)
    log.info("stopped cleanly in %.2f s", time.monotonic() - t0)
    # Everything is flushed. Interpreter teardown resets Python-level handlers to the
    # default, so a repeated SIGTERM arriving now would end the process with -15 instead of
    # 0; ignoring it is right, the shutdown it asks for is done.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0

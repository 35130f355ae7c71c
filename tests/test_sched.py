"""Only the event-loop thread may preempt on wake-up (allocator.sched)."""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

import pytest
from allocator_client import AllocatorClient
from allocator_client.v1 import allocator_pb2 as pb

from allocator.sched import batch_all_but, batch_current_thread
from allocator.server import Running, grpc_loop
from tests.test_durability import ServerProcess, server_processes

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SCHED_BATCH is a Linux scheduling policy"
)


def _policy(tid: int) -> int:
    return os.sched_getscheduler(tid)


def _threads(pid: int | str = "self") -> dict[int, tuple[str, int]]:
    """Name and policy of each thread of ``pid``; threads that exit meanwhile (earlier
    tests' servers wind down) are left out."""
    out = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{entry}/comm").read_text().strip()
            out[int(entry)] = (comm, os.sched_getscheduler(int(entry)))
        except OSError:
            continue
    return out


def test_a_running_server_leaves_only_its_event_loop_to_preempt(
    server: Running, client: AllocatorClient
) -> None:
    # A blocking RPC starts a handler-pool thread after start-up; Assign runs on the loop.
    client.create_experiment(pb.ExperimentSpec(name="e", variants=["a", "b"]))
    client.assign("e")
    loop = server.loop.native_id
    assert _policy(loop) == os.SCHED_OTHER
    pool = [t.native_id for t in threading.enumerate() if t.name.startswith("rpc")]
    assert pool, "the handler pool started no thread"
    others = {tid: t for tid, t in _threads().items() if tid != loop}
    # grpc's own threads (poller, event engine) too, not only ours.
    assert "event_engine" in {comm for comm, _ in others.values()}
    assert {tid: t for tid, t in others.items() if t[1] != os.SCHED_BATCH} == {}


def test_threads_with_another_policy_are_left_alone() -> None:
    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def idle() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    t = threading.Thread(target=idle)
    t.start()
    try:
        ready.wait(10)
        # Keeps the process's event loop as it is, for the other tests' servers.
        batch_all_but(grpc_loop().native_id)
        assert _policy(tid[0]) == os.SCHED_IDLE
    finally:
        done.set()
        t.join()


def test_a_pool_thread_batches_itself_and_its_children_inherit() -> None:
    seen: list[int] = []

    def child() -> None:
        seen.append(_policy(0))

    def worker() -> None:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        batch_current_thread()
        seen.append(_policy(0))
        c = threading.Thread(target=child)
        c.start()
        c.join()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [os.SCHED_BATCH, os.SCHED_BATCH]


def test_allocator_serve_freezes_its_start_up_heap_and_favours_its_loop(tmp_path: Path) -> None:
    """The real entry point does both (the benchmark measures them; a refactor must not
    drop them)."""
    server = ServerProcess(f"sqlite:///{tmp_path / 's.sqlite'}", "sched", tmp_path)
    # Spawned from a batch thread, the server inherits SCHED_BATCH everywhere: its loop
    # must take SCHED_OTHER back.
    before = os.sched_getscheduler(0)
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        server.spawn()
    finally:
        os.sched_setscheduler(0, before, os.sched_param(0))
    with server_processes(server):
        server.wait_ready()
        with AllocatorClient(server.target, timeout=10) as c:
            c.create_experiment(pb.ExperimentSpec(name="t", variants=["a", "b"]))  # pool
            c.assign("t")  # loop
        assert server.proc is not None
        pid = server.proc.pid
        policies = [policy for _, policy in _threads(pid).values()]
        # One thread keeps SCHED_OTHER: the event loop.
        assert policies.count(os.SCHED_OTHER) == 1, policies
        assert len(policies) > 5  # grpc's threads and ours, all the others batch
        frozen = re.search(r"(\d+) start-up objects frozen", server.tail(20_000))
        assert frozen is not None, server.tail()
        # numpy, scipy, numba, grpc and SQLAlchemy alone are far more than 10,000 objects;
        # a freeze that froze nothing says 0.
        assert int(frozen.group(1)) > 10_000
        assert server.terminate() == 0

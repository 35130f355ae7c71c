"""`make demo`: a simulated serving fleet against a running allocator.

Four model variants with hidden true conversion rates; a few "model servers" ask for
decisions in batches and report conversions with a delay, like real traffic. Every second
the terminal shows how traffic shifts and the posterior; when the promotion rule fires,
the PROMOTED event and its reasons are printed.

Connects to ``ALLOCATOR_TARGET`` (default 127.0.0.1:50051, where `make serve` listens); if
nothing answers there, it starts an embedded server on a temporary SQLite file.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence

import grpc
from allocator_client import AllocatorClient
from allocator_client.v1 import allocator_pb2 as pb

TRUE_RATES = {"control": 0.10, "ranker-v2": 0.11, "ranker-v3": 0.13, "ranker-v4": 0.09}


def _reachable(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            grpc.channel_ready_future(ch).result(timeout=1.0)
        return True
    except grpc.FutureTimeoutError:
        return False


def _fleet(
    client: AllocatorClient,
    name: str,
    stop: threading.Event,
    delay_s: float,
    seed: int,
) -> None:
    """One model server: decide in batches, report each conversion `delay_s` later."""
    rng = random.Random(seed)
    pending: deque[tuple[float, str, list[int], list[float]]] = deque()
    rates = list(TRUE_RATES.values())
    while not stop.is_set():
        batch = client.assign_batch(name, 200)
        values = [1.0 if rng.random() < rates[v] else 0.0 for v in batch.variant_indices]
        pending.append((time.monotonic() + delay_s, batch.batch_token, list(range(200)), values))
        while pending and pending[0][0] <= time.monotonic():
            _, token, idx, vals = pending.popleft()
            client.reward_batch(name, vals, batch_token=token, indices=idx)
        time.sleep(0.1)


def _show(client: AllocatorClient, name: str, started: float) -> str:
    rep = client.get_report(name)
    state = pb.ExperimentState.Name(rep.experiment.state).removeprefix("EXPERIMENT_STATE_")
    total = sum(v.assignments for v in rep.variants) or 1
    lines = [f"t={time.monotonic() - started:5.1f}s  {name}  state={state}"]
    lines.append(
        f"  {'variant':<10}{'true':>6}{'now':>7}{'so far':>8}{'rewards':>9}{'mean':>8}"
        f"{'P(best)':>9}"
    )
    now = list(rep.allocation_history[-1].shares) if rep.allocation_history else []
    for i, v in enumerate(rep.variants):
        share = v.assignments / total
        current = now[i] if i < len(now) else float("nan")
        bar = "#" * round(current * 30) if current == current else ""
        lines.append(
            f"  {v.name:<10}{TRUE_RATES.get(v.name, float('nan')):>6.2f}{current:>7.1%}"
            f"{share:>8.1%}{v.rewards:>9}{v.mean:>8.4f}{v.p_best:>9.3f}  {bar}"
        )
    if rep.promotion.decision:
        lines.append(
            f"  promotion rule: {rep.promotion.decision}; {'; '.join(rep.promotion.reasons)}"
        )
    return "\n".join(lines)


def run(target: str, seconds: float, delay_s: float) -> int:
    """Create an experiment, drive it, print progress until promotion or timeout."""
    name = f"demo-{int(time.time())}"
    client = AllocatorClient(target, timeout=10)
    # A 5% floor per variant keeps every arm learning: the promotion rule needs evidence on
    # the runners-up too, which pure Thompson sampling starves (see the README).
    spec = pb.ExperimentSpec(
        name=name,
        variants=list(TRUE_RATES),
        traffic=pb.TrafficSettings(floor=0.05),
        promotion=pb.PromotionSettings(min_samples_per_variant=500),
    )
    client.create_experiment(spec)
    print(f"created {name}: hidden conversion rates {json.dumps(TRUE_RATES)}")
    stop = threading.Event()
    promoted = threading.Event()

    def watch() -> None:
        try:
            for ev in client.watch_events(name):
                kind = pb.EventType.Name(ev.type).removeprefix("EVENT_TYPE_")
                print(f"\n*** EVENT {kind} {ev.variant}: {ev.reason}\n", flush=True)
                if ev.type == pb.EVENT_TYPE_PROMOTED:
                    promoted.set()
        except grpc.RpcError:
            return

    threading.Thread(target=watch, daemon=True).start()
    fleet = [
        threading.Thread(target=_fleet, args=(client, name, stop, delay_s, i), daemon=True)
        for i in range(3)
    ]
    for t in fleet:
        t.start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            time.sleep(1.0)
            print(_show(client, name, started), flush=True)
            if promoted.is_set():
                time.sleep(2.0)
                print(_show(client, name, started), flush=True)
                break
        else:
            print("no promotion within the time limit (the rule waits for enough evidence)")
    finally:
        stop.set()
        for t in fleet:
            t.join(5)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m allocator.demo`."""
    import os

    p = argparse.ArgumentParser(prog="allocator demo", description=__doc__.split("\n")[0])
    p.add_argument("--target", default=os.environ.get("ALLOCATOR_TARGET", "127.0.0.1:50051"))
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--delay", type=float, default=0.5, help="reward delay in seconds")
    ns = p.parse_args(argv)
    if _reachable(ns.target):
        return run(ns.target, ns.seconds, ns.delay)
    from allocator.config import ServerConfig
    from allocator.server import create_server

    print(f"no allocator at {ns.target}: starting an embedded one on a temporary SQLite file")
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(
            listen="127.0.0.1:0",
            http_port=-1,
            database_url=f"sqlite:///{tmp}/demo.sqlite",
            log_json=False,
        )
        running = create_server(config)
        try:
            return run(f"127.0.0.1:{running.port}", ns.seconds, ns.delay)
        finally:
            running.stop(1.0)


if __name__ == "__main__":
    raise SystemExit(main())

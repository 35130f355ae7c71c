"""The lock-free per-RPC metrics expose what prometheus_client's own types would."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from allocator.metrics import DECISION_BUCKETS, RPC_BUCKETS, Metrics, RpcMetrics


def _samples(registry: CollectorRegistry, family: str) -> dict[tuple[str, tuple], float]:
    """Samples of one family, by (name, labels), through a real text exposition."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        if f.name == family
        for s in f.samples
        if not s.name.endswith("_created")
    }


# Durations around and on every bucket bound (a value equal to a bound belongs in it).
durations = st.lists(
    st.one_of(
        st.sampled_from(RPC_BUCKETS),
        st.floats(min_value=0.0, max_value=5.0, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(durations)
def test_request_histogram_matches_prometheus_client(values: list[float]) -> None:
    ours = CollectorRegistry()
    rpc = RpcMetrics()
    ours.register(rpc)
    theirs = CollectorRegistry()
    ref = Histogram(
        "allocator_request_duration_seconds",
        "reference",
        ["rpc"],
        buckets=RPC_BUCKETS,
        registry=theirs,
    )
    for v in values:
        rpc.done("Assign", "OK", v)
        ref.labels(rpc="Assign").observe(v)
    got = _samples(ours, "allocator_request_duration_seconds")
    want = _samples(theirs, "allocator_request_duration_seconds")
    assert got.keys() == want.keys()
    for key, value in want.items():
        # Sums of the same floats in the same order: equal up to rounding of the addition.
        assert abs(got[key] - value) <= 1e-9 * max(1.0, abs(value)), key


def test_counts_from_many_threads_are_exact() -> None:
    rpc = RpcMetrics()
    threads, per_thread = 8, 5_000
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            rpc.done("Assign", "OK", 1e-5)
            rpc.decision("Assign", 2e-6)
        rpc.count("AssignStream", "CANCELLED")

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    registry = CollectorRegistry()
    registry.register(rpc)
    requests = _samples(registry, "allocator_requests")
    assert requests[("allocator_requests_total", (("code", "OK"), ("rpc", "Assign")))] == (
        threads * per_thread
    )
    key = ("allocator_requests_total", (("code", "CANCELLED"), ("rpc", "AssignStream")))
    assert requests[key] == threads
    decisions = _samples(registry, "allocator_decision_duration_seconds")
    assert decisions[("allocator_decision_duration_seconds_count", (("rpc", "Assign"),))] == (
        threads * per_thread
    )
    # 2 us lies in the (1 us, 2 us] bucket: nothing below it, everything from it on.
    assert DECISION_BUCKETS[1] == 2e-6
    le = (("le", "1e-06"), ("rpc", "Assign"))
    assert decisions[("allocator_decision_duration_seconds_bucket", le)] == 0
    le = (("le", "2e-06"), ("rpc", "Assign"))
    assert decisions[("allocator_decision_duration_seconds_bucket", le)] == threads * per_thread


def test_metrics_registers_the_rpc_series() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.rpc.done("GetReport", "NOT_FOUND", 0.003)
    got = _samples(registry, "allocator_request_duration_seconds")
    assert got[("allocator_request_duration_seconds_count", (("rpc", "GetReport"),))] == 1
    assert got[("allocator_request_duration_seconds_sum", (("rpc", "GetReport"),))] == 0.003
    le = (("le", "0.0025"), ("rpc", "GetReport"))
    assert got[("allocator_request_duration_seconds_bucket", le)] == 0
    le = (("le", "0.005"), ("rpc", "GetReport"))
    assert got[("allocator_request_duration_seconds_bucket", le)] == 1

"""Prometheus metrics, all in one place, registered on a registry passed in.

Per-experiment series (assignments, rewards, allocation, P(best)) are not counted on the
hot path: a custom collector reads them from the engine's arrays at scrape time, so an
Assign costs nothing extra, and the label cardinality is bounded by ``max_experiments``
(the rest are summed under ``experiment="_other"``).

>>> from prometheus_client import CollectorRegistry
>>> m = Metrics(CollectorRegistry())
>>> m.requests.labels(rpc="Assign", code="OK").inc()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from allocator.engine import Engine

# Decisions take microseconds; RPCs take tens of microseconds to milliseconds.
DECISION_BUCKETS = (
    1e-6,
    2e-6,
    5e-6,
    1e-5,
    2e-5,
    5e-5,
    1e-4,
    2e-4,
    5e-4,
    1e-3,
    2e-3,
    5e-3,
    1e-2,
    2.5e-2,
    0.1,
)
RPC_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.5)
FLUSH_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5, 2.0)


class Metrics:
    """Every metric the server exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "allocator_requests_total",
            "RPCs handled, by method and gRPC status code.",
            ["rpc", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "allocator_request_duration_seconds",
            "Server-side RPC handling time.",
            ["rpc"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "allocator_decision_duration_seconds",
            "Engine time of one decision call: rpc=Assign (one decision) or AssignBatch "
            "(a whole batch, so the two never mix in one quantile).",
            ["rpc"],
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.decision_single = self.decision_seconds.labels(rpc="Assign")
        self.decision_batch = self.decision_seconds.labels(rpc="AssignBatch")
        self.rewards = Counter(
            "allocator_reward_items_total",
            "Reward items received, by outcome (accepted, duplicate, expired).",
            ["status"],
            registry=registry,
        )
        self.events = Counter(
            "allocator_events_total",
            "Lifecycle and monitoring events emitted, by type.",
            ["type"],
            registry=registry,
        )
        self.flush_seconds = Histogram(
            "allocator_store_flush_duration_seconds",
            "Time of one group commit of rewards to the store.",
            buckets=FLUSH_BUCKETS,
            registry=registry,
        )
        self.flush_rows = Counter(
            "allocator_store_flushed_rewards_total",
            "Rewards written to the store by group commit.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "allocator_store_queue_depth",
            "Rewards waiting for the next group commit.",
            registry=registry,
        )
        self.store_up = Gauge(
            "allocator_store_up",
            "1 when the last store operation succeeded, 0 while the store is unreachable.",
            registry=registry,
        )
        self.store_up.set(1)


class EngineCollector(Collector):
    """Reads per-experiment series from the engine at scrape time."""

    def __init__(
        self,
        engine: Engine,
        states: Callable[[], dict[str, str]] | None = None,
        max_experiments: int = 100,
    ) -> None:
        self.engine = engine
        self.states = states or (lambda: {})
        self.max_experiments = max_experiments

    def collect(self) -> Iterator[Metric]:
        assignments = CounterMetricFamily(
            "allocator_assignments",
            "Decisions made, by experiment and variant.",
            labels=["experiment", "variant"],
        )
        rewards = CounterMetricFamily(
            "allocator_rewards",
            "Rewards applied to the posterior, by experiment and variant.",
            labels=["experiment", "variant"],
        )
        share = GaugeMetricFamily(
            "allocator_allocation_share",
            "Share of traffic each variant receives now (the propensity).",
            labels=["experiment", "variant"],
        )
        mean = GaugeMetricFamily(
            "allocator_reward_mean",
            "Mean reward per variant (undiscounted).",
            labels=["experiment", "variant"],
        )
        experiments = GaugeMetricFamily(
            "allocator_experiments", "Experiments by lifecycle state.", labels=["state"]
        )
        names = self.engine.names()
        other_pulls = 0.0
        other_rewards = 0.0
        for i, name in enumerate(names):
            try:
                view = self.engine.view(name)
            except KeyError:
                continue
            pulls = view.pulls
            n = view.reward_counts
            if i >= self.max_experiments:
                other_pulls += float(pulls.sum())
                other_rewards += float(n.sum())
                continue
            sums = view.epoch_stats[:, :, 1].sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                means = np.where(n > 0, sums / np.maximum(n, 1), np.nan)
            for k, variant in enumerate(view.config.variants):
                labels = [name, variant]
                assignments.add_metric(labels, float(pulls[k]))
                rewards.add_metric(labels, float(n[k]))
                share.add_metric(labels, float(view.alloc[k]))
                mean.add_metric(labels, float(means[k]))
        if len(names) > self.max_experiments:
            assignments.add_metric(["_other", "_other"], other_pulls)
            rewards.add_metric(["_other", "_other"], other_rewards)
        counts: dict[str, int] = {}
        for state in self.states().values():
            counts[state] = counts.get(state, 0) + 1
        for state, c in sorted(counts.items()):
            experiments.add_metric([state], c)
        yield assignments
        yield rewards
        yield share
        yield mean
        yield experiments

"""Every RPC and every documented status code, against a real server on port 0."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from allocator_client import AllocatorClient
from allocator_client.client import status_code
from allocator_client.v1 import allocator_pb2 as pb
from allocator_client.v1 import allocator_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from allocator import app as app_module
from allocator import stats
from allocator.app import Ended, EventHub, StoredEvent
from allocator.config import ServerConfig
from allocator.lifecycle import Event, EventType
from allocator.server import STORE_HEALTH, Running, create_server
from allocator.service import _code_for, _watch_ended
from allocator.store import SqlStore, StoreUnavailable
from tests.conftest import ADMIN_TOKEN, server_config, wait_until


def _spec(
    name: str = "exp", variants: tuple[str, ...] = ("a", "b", "c"), **kw: Any
) -> pb.ExperimentSpec:
    return pb.ExperimentSpec(name=name, variants=list(variants), seed=11, **kw)


@pytest.fixture
def stub(server: Running) -> Iterator[pb_grpc.AllocatorStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield pb_grpc.AllocatorStub(ch)


def _code(fn: object, *args: object, **kw: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kw)  # type: ignore[operator]
    return err.value.code(), err.value.details()


ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def test_create_get_list_archive(client: AllocatorClient, stub: pb_grpc.AllocatorStub) -> None:
    exp = client.create_experiment(_spec())
    assert exp.state == pb.EXPERIMENT_STATE_RUNNING and exp.version >= 1
    assert client.get_experiment("exp").spec.variants == ["a", "b", "c"]
    client.create_experiment(_spec("other"))
    assert [e.spec.name for e in client.list_experiments()] == ["exp", "other"]
    page = stub.ListExperiments(pb.ListExperimentsRequest(page_size=1))
    assert [e.spec.name for e in page.experiments] == ["exp"] and page.next_page_token
    archived = client.archive_experiment("other", reason="done")
    assert archived.state == pb.EXPERIMENT_STATE_ARCHIVED
    code, details = _code(client.assign, "other")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "archived" in details


def test_list_page_size_is_capped_not_refused(stub: pb_grpc.AllocatorStub) -> None:
    """The proto says "capped at 1000"; 5000 was INVALID_ARGUMENT."""
    for i in range(3):
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec(f"e{i}")))
    for size in (5000, 1001, 2**32 - 1):
        page = stub.ListExperiments(pb.ListExperimentsRequest(page_size=size))
        assert [e.spec.name for e in page.experiments] == ["e0", "e1", "e2"]
        assert not page.next_page_token


def test_create_errors_name_the_field(client: AllocatorClient, stub: pb_grpc.AllocatorStub) -> None:
    client.create_experiment(_spec())
    code, details = _code(stub.CreateExperiment, pb.CreateExperimentRequest(spec=_spec()))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "'exp'" in details
    bad = [
        (_spec("x", ("a",)), "spec.variants"),
        (_spec("", ("a", "b")), "spec.name"),
        (_spec("x", ("a", "a")), "unique"),
        (_spec("bad name", ("a", "b")), "name"),
        (_spec("x", policy=pb.POLICY_EPSILON_GREEDY, epsilon=3.0), "spec.epsilon"),
        (_spec("x", weights=[1.0, 2.0, 3.0]), "spec.weights"),
        (_spec("x", prior_alpha=-1.0), "spec.prior_alpha"),
        (_spec("x", policy=pb.POLICY_KL_UCB, reward_type=pb.REWARD_TYPE_NORMAL), "spec.policy"),
        # Accepted before: UCB1's bonus assumes rewards in [0, 1]; UCB1-Normal discounted
        # never leaves its forcing rule (an equal split).
        (_spec("x", policy=pb.POLICY_UCB1, reward_type=pb.REWARD_TYPE_NORMAL), "spec.policy"),
        (
            _spec(
                "x", policy=pb.POLICY_UCB_NORMAL, reward_type=pb.REWARD_TYPE_NORMAL, discount=0.99
            ),
            "spec.discount",
        ),
        (_spec("x", traffic=pb.TrafficSettings(floor=0.5)), "spec.traffic"),
        # Accepted before, then every GetReport failed INTERNAL / the rule never ran.
        (_spec("x", promotion=pb.PromotionSettings(alpha=2.0)), "spec.promotion.alpha"),
        (_spec("x", promotion=pb.PromotionSettings(alpha=0.0)), "spec.promotion.alpha"),
        (_spec("x", promotion=pb.PromotionSettings(power=1.5)), "spec.promotion.power"),
        (
            _spec("x", promotion=pb.PromotionSettings(p_best_threshold=2.0)),
            "spec.promotion.p_best_threshold",
        ),
        (
            _spec("x", promotion=pb.PromotionSettings(futility_probability=0.1)),
            "spec.promotion.futility_probability",
        ),
        # A 0/1 rate cannot move by 1: the power analysis had no control rate to use.
        (_spec("x", promotion=pb.PromotionSettings(min_effect=1.0)), "spec.promotion.min_effect"),
    ]
    for spec, field in bad:
        code, details = _code(stub.CreateExperiment, pb.CreateExperimentRequest(spec=spec))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (spec, details)
        assert field in details, details
    assert [e.spec.name for e in client.list_experiments()] == ["exp"]


def _refused(stub: pb_grpc.AllocatorStub, cases: list[tuple[pb.ExperimentSpec, str]]) -> None:
    """Each spec is refused INVALID_ARGUMENT naming its field, and nothing is created."""
    before = list(stub.ListExperiments(pb.ListExperimentsRequest()).experiments)
    for spec, field in cases:
        code, details = _code(stub.CreateExperiment, pb.CreateExperimentRequest(spec=spec))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (spec, details)
        assert details.startswith(f"{field}: "), details
    assert list(stub.ListExperiments(pb.ListExperimentsRequest()).experiments) == before


def test_a_holdout_share_promotion_cannot_use_is_refused_at_create(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    """holdout_share 2 was accepted; Promote then failed INVALID_ARGUMENT "shares" after
    the store had committed PROMOTED, and the next start-up failed on the stored spec."""
    field = "spec.monitoring.holdout_share"
    _refused(
        stub,
        [
            (_spec("x", monitoring=pb.MonitoringSettings(holdout_share=share)), field)
            for share in (2.0, 1.0, -0.1, float("nan"), float("inf"))
        ],
    )
    client.create_experiment(_spec(monitoring=pb.MonitoringSettings(holdout_share=0.25)))
    client.promote("exp", "b")
    stub.AddVariant(pb.AddVariantRequest(experiment="exp", variant="d"))
    stub.Promote(pb.PromoteRequest(experiment="exp", variant="c"), metadata=ADMIN)
    override = server.app.engine.view("exp").override
    assert override is not None and override.tolist() == [0.0, 0.25, 0.75, 0.0]


def test_a_stored_holdout_share_out_of_range_neither_breaks_promote_nor_start_up(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """An experiment created before holdout_share was checked: Promote failed "shares"
    after committing PROMOTED, and every start-up failed after that."""
    config = server_config(f"sqlite:///{tmp_path / 'h.sqlite'}")
    running = create_server(config, registry=registry)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.AllocatorStub(ch)
            stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
            stub.Promote(pb.PromoteRequest(experiment="exp", variant="b"), metadata=ADMIN)
            stub.AddVariant(pb.AddVariantRequest(experiment="exp", variant="d"))
            running.app.records["exp"].spec.monitoring.holdout_share = 2.0  # as once stored
            # Promote stores the spec with the state: the bad share is in the store now.
            out = stub.Promote(pb.PromoteRequest(experiment="exp", variant="c"), metadata=ADMIN)
            assert (out.experiment.state, out.experiment.champion) == (
                pb.EXPERIMENT_STATE_PROMOTED,
                "c",
            )
            assert out.experiment.spec.monitoring.holdout_share == 2.0
            override = running.app.engine.view("exp").override
            assert override is not None and override.tolist() == [0.0, 0.0, 1.0, 0.0]
    finally:
        running.stop(1.0)
    running = create_server(config, registry=CollectorRegistry())
    try:
        rec = running.app.records["exp"]
        assert rec.lifecycle.state.value == "PROMOTED"
        override = running.app.engine.view("exp").override
        assert override is not None and override.tolist() == [0.0, 0.0, 1.0, 0.0]
    finally:
        running.stop(1.0)


def test_monitoring_settings_the_supervisor_cannot_use_are_refused_at_create(
    stub: pb_grpc.AllocatorStub,
) -> None:
    """Each was accepted, then the supervisor logged a traceback on every pass (or ran a
    detector the spec did not ask for)."""

    def mon(**kw: Any) -> pb.ExperimentSpec:
        return _spec("x", monitoring=pb.MonitoringSettings(**kw))

    ph = pb.DRIFT_DETECTOR_PAGE_HINKLEY
    m = "spec.monitoring"
    _refused(
        stub,
        [
            (mon(detector=99), f"{m}.detector"),
            (mon(on_regression=99), f"{m}.on_regression"),
            (mon(detector_threshold=0.0), f"{m}.detector_threshold"),
            (mon(detector_threshold=-1.0), f"{m}.detector_threshold"),
            (mon(detector_threshold=float("nan")), f"{m}.detector_threshold"),
            (mon(detector_threshold=float("inf")), f"{m}.detector_threshold"),
            (mon(detector=ph, detector_threshold=0.0), f"{m}.detector_threshold"),
            (mon(detector_slack=float("nan")), f"{m}.detector_slack"),
            (mon(detector_slack=-0.5), f"{m}.detector_slack"),
            (mon(detector=ph, detector_slack=-0.5), f"{m}.detector_slack"),
            # No default CUSUM threshold reaches the target run length with this slack.
            (mon(detector_slack=10.0), f"{m}.detector_slack"),
            (mon(detector=ph, detector_slack=10.0), f"{m}.detector_slack"),
            (mon(webhook_url="http://"), f"{m}.webhook_url"),
            (mon(webhook_url="https:///path"), f"{m}.webhook_url"),
            (mon(webhook_url="hooks.example.com/retrain"), f"{m}.webhook_url"),
            (mon(webhook_url="file:///etc/passwd"), f"{m}.webhook_url"),
            (mon(webhook_url="http://host:99999/x"), f"{m}.webhook_url"),
            (mon(webhook_url="http://ho st/x"), f"{m}.webhook_url"),
        ],
    )
    ok = [
        mon(detector_slack=10.0, detector_threshold=3.0),
        mon(detector=ph, detector_slack=0.0, detector_threshold=5.0),
        mon(detector=pb.DRIFT_DETECTOR_NONE, on_regression=pb.REGRESSION_ACTION_REOPEN),
        mon(webhook_url="https://hooks.example.com:8443/retrain?team=ml"),
    ]
    for i, spec in enumerate(ok):
        spec.name = f"ok{i}"
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec))


def test_guardrails_the_rule_cannot_use_are_refused_at_create(
    stub: pb_grpc.AllocatorStub,
) -> None:
    def guard(*gs: pb.Guardrail) -> pb.ExperimentSpec:
        return _spec("x", promotion=pb.PromotionSettings(guardrails=list(gs)))

    lat = pb.Guardrail(metric="latency_ms", tolerance=5.0)
    g = "spec.promotion.guardrails"
    _refused(
        stub,
        [
            (guard(pb.Guardrail(metric="", tolerance=1.0)), f"{g}[0].metric"),
            (guard(lat, pb.Guardrail(metric="m" * 101)), f"{g}[1].metric"),
            (guard(lat, lat), f"{g}[1].metric"),
            (guard(pb.Guardrail(metric="errors", tolerance=-0.1)), f"{g}[0].tolerance"),
            (guard(lat, pb.Guardrail(metric="e", tolerance=float("nan"))), f"{g}[1].tolerance"),
            (guard(pb.Guardrail(metric="e", tolerance=float("inf"))), f"{g}[0].tolerance"),
        ],
    )
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=guard(lat, pb.Guardrail(metric="e"))))


def test_spec_errors_name_the_field_not_a_word_of_the_message(
    stub: pb_grpc.AllocatorStub,
) -> None:
    """The field used to be the message's first word: spec.every, spec.variant, ..."""
    normal = pb.REWARD_TYPE_NORMAL
    _refused(
        stub,
        [
            (_spec("x", ("a", "")), "spec.variants"),
            (_spec("x", ("a", "v" * 201)), "spec.variants"),
            (_spec("x", ("a", "b", "a")), "spec.variants"),
            (_spec("x", tuple(f"v{i}" for i in range(1001))), "spec.variants"),
            (_spec("x", table_refresh_rewards=0), "spec.table_refresh_rewards"),
            (_spec("x", table_refresh_ms=0), "spec.table_refresh_ms"),
            (_spec("x", policy=pb.POLICY_KL_UCB, reward_type=normal), "spec.policy"),
            (_spec("x", policy=pb.POLICY_UCB_NORMAL), "spec.policy"),
            (_spec("x", traffic=pb.TrafficSettings(floor=0.5)), "spec.traffic.floor"),
            (_spec("x", traffic=pb.TrafficSettings(cap=0.2)), "spec.traffic.cap"),
            (
                _spec("x", traffic=pb.TrafficSettings(control_share=1.0)),
                "spec.traffic.control_share",
            ),
            (_spec("x", policy=pb.POLICY_FIXED_SPLIT, weights=[0, 0, 0]), "spec.weights"),
            (_spec("x", prior_mean=float("inf"), reward_type=normal), "spec.prior_mean"),
            (
                _spec("x", promotion=pb.PromotionSettings(futility_probability=0.1)),
                "spec.promotion.futility_probability",
            ),
            (
                _spec("x", promotion=pb.PromotionSettings(indifference_margin=-1.0)),
                "spec.promotion.indifference_margin",
            ),
        ],
    )


def test_a_stored_experiment_the_policy_check_now_refuses_still_loads(
    tmp_path: Path, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UCB1 with NORMAL rewards was accepted before check_policy: a server whose store holds
    such an experiment starts and serves it (the check is made at creation only), while a
    new one is refused."""
    config = server_config(f"sqlite:///{tmp_path / 's.sqlite'}")
    ucb1_normal: dict[str, Any] = {"policy": pb.POLICY_UCB1, "reward_type": pb.REWARD_TYPE_NORMAL}
    monkeypatch.setattr(app_module, "check_policy", lambda config: None)  # an older server
    running = create_server(config, registry=registry)
    try:
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            c.create_experiment(_spec(**ucb1_normal))
    finally:
        running.stop(1.0)
    monkeypatch.undo()
    running = create_server(config, registry=CollectorRegistry())
    try:
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            assert c.assign("exp").variant in ("a", "b", "c")
            code, details = _code(c.create_experiment, _spec("new", **ucb1_normal))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec.policy" in details
    finally:
        running.stop(1.0)


def test_report_of_a_stored_spec_with_an_impossible_min_effect_still_answers(
    client: AllocatorClient, server: Running
) -> None:
    """Created before min_effect >= 0.99 was refused, a Bernoulli experiment made every
    GetReport fail INTERNAL (no control rate leaves room for the effect): it now answers,
    without a power analysis."""
    client.create_experiment(_spec(promotion=pb.PromotionSettings(min_effect=0.5)))
    assert client.get_report("exp").HasField("power")
    server.app.records["exp"].spec.promotion.min_effect = 1.0  # as loaded from an old row
    report = client.get_report("exp")
    assert not report.HasField("power") and len(report.variants) == 3


def test_unknown_experiment_is_not_found(stub: pb_grpc.AllocatorStub) -> None:
    for call, req in [
        (stub.GetExperiment, pb.GetExperimentRequest(experiment="nope")),
        (stub.Assign, pb.AssignRequest(experiment="nope")),
        (stub.AssignBatch, pb.AssignBatchRequest(experiment="nope", count=3)),
        (stub.GetReport, pb.GetReportRequest(experiment="nope")),
    ]:
        code, details = _code(call, req)
        assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in details
    code, details = _code(stub.Assign, pb.AssignRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "experiment" in details


def test_assign_and_reward_with_duplicates(client: AllocatorClient, server: Running) -> None:
    client.create_experiment(_spec())
    d = client.assign("exp")
    assert d.variant in ("a", "b", "c") and 0 < d.propensity <= 1
    assert client.reward(d.decision_id, 1.0) == pb.REWARD_STATUS_ACCEPTED
    assert client.reward(d.decision_id, 1.0) == pb.REWARD_STATUS_DUPLICATE
    assert sum(server.app.engine.counts("exp").values()) == 1
    ev = client.reward_event("exp", "b", "order-17", 0.0)
    assert ev == pb.REWARD_STATUS_ACCEPTED
    assert client.reward_event("exp", "b", "order-17", 0.0) == pb.REWARD_STATUS_DUPLICATE
    assert server.app.engine.counts("exp")["b"] >= 1


def test_unit_id_is_sticky(client: AllocatorClient) -> None:
    client.create_experiment(_spec())
    first = [client.assign("exp", unit_id=f"u{i}").variant for i in range(30)]
    assert first == [client.assign("exp", unit_id=f"u{i}").variant for i in range(30)]


def test_reward_errors_change_nothing(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    client.create_experiment(_spec())
    d = client.assign("exp")
    forged = d.decision_id[:-3] + ("AAA" if not d.decision_id.endswith("AAA") else "BBB")
    for req, field in [
        (pb.RewardRequest(decision_id=forged, value=1.0), "decision_id"),
        (pb.RewardRequest(decision_id="garbage", value=1.0), "decision_id"),
        (pb.RewardRequest(decision_id=d.decision_id, value=float("nan")), "value"),
        (pb.RewardRequest(decision_id=d.decision_id, value=2.0), "value"),
        (pb.RewardRequest(value=1.0), "target"),
        (
            pb.RewardRequest(
                event=pb.EventTarget(experiment="exp", variant="zzz", event_id="e"), value=1
            ),
            "event.variant",
        ),
        (
            pb.RewardRequest(
                event=pb.EventTarget(experiment="exp", variant="a", event_id=""), value=1
            ),
            "event.event_id",
        ),
        (
            pb.RewardRequest(
                event=pb.EventTarget(experiment="exp", variant="a", event_id="x" * 257), value=1
            ),
            "event.event_id",
        ),
        (
            pb.RewardRequest(event=pb.EventTarget(variant="a", event_id="e"), value=1),
            "event.experiment",
        ),
        (
            pb.RewardRequest(
                event=pb.EventTarget(experiment="exp", variant="a", event_id="e"),
                value=1,
                guardrails={"latency_ms": float("nan")},
            ),
            "guardrails.latency_ms",
        ),
        (
            pb.RewardRequest(decision_id=d.decision_id, value=1, guardrails={"m" * 101: 1.0}),
            "guardrails",
        ),
    ]:
        # The unary request's own field names (it is checked as a batch of one, whose
        # errors said variants[0], event_ids[0], values, ...).
        code, details = _code(stub.Reward, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith(f"{field}: "), details
    b = client.assign_batch("exp", 10)
    bad_batch = pb.RewardBatchRequest(
        experiment="exp", batch_token=b.batch_token, indices=[0, 1, 99], values=[1, 1, 1]
    )
    code, details = _code(stub.RewardBatch, bad_batch)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "indices[2]" in details
    mixed = pb.RewardBatchRequest(
        experiment="exp", decision_ids=[d.decision_id, "junk"], values=[1.0, 1.0]
    )
    code, details = _code(stub.RewardBatch, mixed)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "decision_ids[1]" in details
    # Nothing of the failed batches was applied.
    assert sum(server.app.engine.counts("exp").values()) == 0
    assert client.reward(d.decision_id, 1.0) == pb.REWARD_STATUS_ACCEPTED


def test_decision_of_another_experiment_is_rejected(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub
) -> None:
    client.create_experiment(_spec("one"))
    client.create_experiment(_spec("two"))
    d = client.assign("one")
    req = pb.RewardBatchRequest(experiment="two", decision_ids=[d.decision_id], values=[1.0])
    code, details = _code(stub.RewardBatch, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "belongs to 'one'" in details


def test_expired_decision_is_reported_expired(tmp_path: Path, registry: CollectorRegistry) -> None:
    running = create_server(
        server_config(f"sqlite:///{tmp_path / 'e.sqlite'}", attribution_window_s=1),
        registry=registry,
    )
    try:
        with AllocatorClient(f"127.0.0.1:{running.port}", timeout=5) as c:
            c.create_experiment(_spec())
            d = c.assign("exp")
            time.sleep(1.3)
            assert c.reward(d.decision_id, 1.0) == pb.REWARD_STATUS_EXPIRED
            assert sum(running.app.engine.counts("exp").values()) == 0
            # A value that is bad for any experiment is refused even when every id expired
            # and no experiment is named (nothing to look the reward kind up in).
            with pytest.raises(grpc.RpcError) as err:
                c.reward(d.decision_id, float("nan"))
            assert status_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT
            assert "reward 0 is not a finite number" in err.value.details()
            # A bad value after an expired item is named at its place in the request.
            fresh = c.assign("exp")
            with pytest.raises(grpc.RpcError) as err:
                c.reward_batch("exp", [1.0, 2.0], decision_ids=[d.decision_id, fresh.decision_id])
            assert status_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT
            assert "reward 1 is 2.0" in err.value.details()
            assert sum(running.app.engine.counts("exp").values()) == 0
    finally:
        running.stop(1.0)


def test_batch_and_streams(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    client.create_experiment(_spec())
    b = client.assign_batch("exp", 500)
    assert len(b.variant_indices) == 500 and len(b.propensities) == 500
    resp = client.reward_batch(
        "exp", [1.0] * 500, batch_token=b.batch_token, indices=list(range(500))
    )
    assert resp.accepted == 500 and resp.duplicates == 0
    again = client.reward_batch("exp", [1.0] * 2, decision_ids=[b.decision_id(0), b.decision_id(1)])
    assert again.duplicates == 2
    reqs = [
        pb.AssignStreamRequest(
            request_id=i, batch=pb.AssignBatchRequest(experiment="exp", count=50)
        )
        for i in range(5)
    ]
    out = list(stub.AssignStream(iter(reqs)))
    assert [r.request_id for r in out] == list(range(5))
    rreqs = [
        pb.RewardStreamRequest(
            request_id=i,
            batch=pb.RewardBatchRequest(
                experiment="exp",
                batch_token=r.batch.batch_token,
                indices=list(range(50)),
                values=[0.0] * 50,
            ),
        )
        for i, r in enumerate(out)
    ]
    rout = list(stub.RewardStream(iter(rreqs)))
    assert [r.batch.accepted for r in rout] == [50] * 5
    assert sum(server.app.engine.counts("exp").values()) == 750
    bad = iter(
        [
            pb.AssignStreamRequest(
                request_id=1, batch=pb.AssignBatchRequest(experiment="zz", count=1)
            )
        ]
    )
    code, _ = _code(lambda: list(stub.AssignStream(bad)))
    assert code == grpc.StatusCode.NOT_FOUND


def test_report_has_both_statistics(client: AllocatorClient, server: Running) -> None:
    client.create_experiment(_spec())
    for _ in range(5):
        b = client.assign_batch("exp", 400)
        values = [
            1.0 if (v == 1 and i % 3 == 0) or i % 10 == 0 else 0.0
            for i, v in enumerate(b.variant_indices)
        ]
        client.reward_batch("exp", values, batch_token=b.batch_token, indices=list(range(400)))
    rep = client.get_report("exp")
    assert [v.name for v in rep.variants] == ["a", "b", "c"]
    assert sum(v.assignments for v in rep.variants) == 2000
    assert sum(v.rewards for v in rep.variants) == 2000
    assert abs(sum(v.p_best for v in rep.variants) - 1.0) < 1e-9
    assert rep.variants[1].p_best > 0.9
    assert [(t.name, t.variant) for t in rep.tests] == [
        ("pearson_chi2", "b"),
        ("pearson_chi2", "c"),
        ("stratified_z", "b"),
        ("stratified_z", "c"),
    ]
    assert all(0 <= t.p_value <= 1 for t in rep.tests)
    # Two challengers against one control: Holm-adjusted within each family, never below
    # the raw p-value.
    for family in ("pearson_chi2", "stratified_z"):
        tests = [t for t in rep.tests if t.name == family]
        holm = stats.holm([t.p_value for t in tests])
        assert [t.p_value_adjusted for t in tests] == pytest.approx(holm.tolist(), rel=1e-12)
        assert all(t.p_value <= t.p_value_adjusted <= 1 for t in tests)
    for v in rep.variants[1:]:
        assert v.stratified_lift_ci_low < v.stratified_lift < v.stratified_lift_ci_high
    # Adaptive allocation, honestly logged: no sample-ratio mismatch.
    assert not rep.srm.flagged
    assert rep.allocation_history and "stratified" in rep.notes
    for v in rep.variants:
        assert v.ci_low <= v.mean <= v.ci_high or v.rewards == 0


def test_report_of_a_fresh_experiment_and_power(client: AllocatorClient) -> None:
    spec = _spec(promotion=pb.PromotionSettings(min_effect=0.02))
    client.create_experiment(spec)
    rep = client.get_report("exp")
    assert [v.rewards for v in rep.variants] == [0, 0, 0]
    assert not rep.tests and not rep.srm.flagged
    # Before data the control rate is taken as 0.5 (the largest variance): the size must
    # match the two-proportion formula for 0.5 vs 0.52 with Bonferroni over 2 comparisons.
    from allocator import stats

    assert rep.power.sample_size_per_variant == stats.sample_size_proportions(
        0.5, 0.02, alpha=0.05, power=0.8, k_arms=3
    )
    assert rep.power.samples_remaining == 3 * rep.power.sample_size_per_variant


def test_admin_needs_token_and_transitions(server: Running, stub: pb_grpc.AllocatorStub) -> None:
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    req = pb.PromoteRequest(experiment="exp", variant="b", reason="test")
    code, details = _code(stub.Promote, req)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
    code, _ = _code(stub.Promote, req, metadata=(("authorization", "Bearer wrong"),))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, details = _code(
        stub.Promote, pb.PromoteRequest(experiment="exp", variant="zz"), metadata=ADMIN
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "variant" in details
    promoted = stub.Promote(req, metadata=ADMIN).experiment
    assert promoted.state == pb.EXPERIMENT_STATE_PROMOTED and promoted.champion == "b"
    batch = stub.AssignBatch(pb.AssignBatchRequest(experiment="exp", count=200))
    assert set(batch.variant_indices) == {1}
    code, details = _code(stub.Promote, req, metadata=ADMIN)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "PROMOTED" in details
    paused = stub.Pause(pb.PauseRequest(experiment="exp", reason="incident"), metadata=ADMIN)
    assert paused.experiment.state == pb.EXPERIMENT_STATE_PAUSED
    resumed = stub.Resume(pb.ResumeRequest(experiment="exp"), metadata=ADMIN)
    assert resumed.experiment.state == pb.EXPERIMENT_STATE_PROMOTED
    back = stub.Rollback(pb.RollbackRequest(experiment="exp", reason="regressed"), metadata=ADMIN)
    assert (
        back.experiment.state == pb.EXPERIMENT_STATE_ROLLED_BACK and back.experiment.champion == "a"
    )
    batch = stub.AssignBatch(pb.AssignBatchRequest(experiment="exp", count=200))
    assert set(batch.variant_indices) == {0}
    added = stub.AddVariant(pb.AddVariantRequest(experiment="exp", variant="d", reason="retrained"))
    assert added.experiment.state == pb.EXPERIMENT_STATE_REOPENED
    assert list(added.experiment.spec.variants) == ["a", "b", "c", "d"]
    audit = server.app.store.list_audit(server.app.records["exp"].id)
    assert [a.action for a in audit] == [
        "CREATE",
        "PROMOTE",
        "PAUSE",
        "RESUME",
        "ROLLBACK",
        "ADD_VARIANT",
    ]


def _raw_unary(port: int, method: str, request: Any, authorization: bytes) -> None:
    """Send one unary call over a bare HTTP/2 connection, with header bytes the Python
    client refuses to send (it allows only ASCII metadata values; other clients and
    proxies need not), and wait for the server to end it. The outcome is read from the
    server's metrics: the response is HPACK-encoded."""

    def frame(kind: int, flags: int, payload: bytes) -> bytes:
        return (
            len(payload).to_bytes(3, "big")
            + bytes([kind, flags])
            + (1).to_bytes(4, "big")
            + payload
        )

    def literal(name: bytes, value: bytes) -> bytes:  # HPACK: literal, new name, no Huffman
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    headers = b"".join(
        literal(k, v)
        for k, v in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", f"/allocator.v1.Allocator/{method}".encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"authorization", authorization),
        ]
    )
    body = request.SerializeToString()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + (0).to_bytes(3, "big")
            + b"\x04\x00"
            + (0).to_bytes(4, "big")  # SETTINGS
            + frame(1, 0x4, headers)  # HEADERS, END_HEADERS
            + frame(0, 0x1, b"\x00" + len(body).to_bytes(4, "big") + body)  # DATA, END_STREAM
        )
        # Read frames until the server ends stream 1 (its trailers: a frame of that stream
        # with END_STREAM), however long a loaded machine takes (the socket's 10 s timeout).
        buf = b""
        while True:
            while len(buf) < 9:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection before ending the call"
                buf += chunk
            size, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
            stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            while len(buf) < 9 + size:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection before ending the call"
                buf += chunk
            buf = buf[9 + size :]
            # END_STREAM on our stream, or the server resetting it (RST_STREAM) or the
            # connection (GOAWAY): the call is over either way, its code in the metrics.
            if (stream == 1 and (flags & 0x1 or kind == 3)) or kind == 7:
                return


def _rpc_codes(registry: CollectorRegistry, rpc: str) -> dict[str, float]:
    codes = ("OK", "PERMISSION_DENIED", "UNAUTHENTICATED", "INTERNAL", "CANCELLED")
    out = {
        c: registry.get_sample_value("allocator_requests_total", {"rpc": rpc, "code": c})
        for c in codes
    }
    return {c: v for c, v in out.items() if v}


def test_an_admin_token_no_client_could_send_is_refused_at_start_up() -> None:
    """gRPC metadata values are printable ASCII (grpcio refuses to send anything else, and
    whitespace may be trimmed): with such a --admin-token no admin call could succeed.
    The error gives the position, never the secret."""
    for token, position in (("jeton-\u00e9t\u00e9", 7), ("two words", 4), ("tab\t", 4)):
        with pytest.raises(ValueError, match=f"character {position} is not") as err:
            ServerConfig(admin_token=token)
        assert token not in str(err.value)
    env = {"ALLOCATOR_ADMIN_TOKEN": "s3cr\u00eat"}
    with pytest.raises(ValueError, match="character 5 is not"):
        ServerConfig.from_args([], env=env)
    assert ServerConfig(admin_token="Ab0-._~+/=!").admin_token == "Ab0-._~+/=!"


def test_a_non_ascii_bearer_is_permission_denied(
    server: Running, stub: pb_grpc.AllocatorStub, registry: CollectorRegistry
) -> None:
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    req = pb.PauseRequest(experiment="exp")
    _raw_unary(server.port, "Pause", req, "Bearer t\u00f6ken".encode())
    wait_until(lambda: bool(_rpc_codes(registry, "Pause")), 5, "Pause to finish")
    assert _rpc_codes(registry, "Pause") == {"PERMISSION_DENIED": 1.0}
    assert server.app.records["exp"].lifecycle.state.value == "RUNNING"


def test_add_variant_refuses_a_weight_it_cannot_use_and_changes_nothing(
    server: Running, stub: pb_grpc.AllocatorStub
) -> None:
    """AddVariantRequest.weight was never read: any value was accepted and dropped."""
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    fixed = _spec("fixed", policy=pb.POLICY_FIXED_SPLIT, weights=[1.0, 2.0, 3.0])
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=fixed))
    before = {n: (r.version, r.config.variants) for n, r in server.app.records.items()}
    for experiment, weight, says in [
        ("exp", 2.0, "only POLICY_FIXED_SPLIT"),  # a Thompson experiment
        ("exp", -1.0, "finite number >= 0"),
        ("fixed", -1.0, "finite number >= 0"),
        ("fixed", float("nan"), "finite number >= 0"),
        ("fixed", float("inf"), "finite number >= 0"),
    ]:
        req = pb.AddVariantRequest(experiment=experiment, variant="d", weight=weight)
        code, details = _code(stub.AddVariant, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith("weight: ") and says in details, details
    assert {n: (r.version, r.config.variants) for n, r in server.app.records.items()} == before
    # 0 is no weight, for a policy without weights as when it is unset.
    added = stub.AddVariant(pb.AddVariantRequest(experiment="exp", variant="d", weight=0.0))
    assert list(added.experiment.spec.variants) == ["a", "b", "c", "d"]
    assert not added.experiment.spec.weights


def test_promote_without_a_variant_promotes_the_highest_p_best(
    server: Running, stub: pb_grpc.AllocatorStub
) -> None:
    """The proto's "empty means the rule's candidate": the variant of highest P(best);
    refused while there are no rewards to pick one by, and only for the admin."""
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    req = pb.PromoteRequest(experiment="exp", reason="clear winner")
    code, _ = _code(stub.Promote, req)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, details = _code(stub.Promote, req, metadata=ADMIN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("variant:"), details
    n = 60  # c: 60/60 successes, a and b 0/60: P(best) of c is 1 to many decimals
    for variant, value in (("a", 0.0), ("b", 0.0), ("c", 1.0)):
        stub.RewardBatch(
            pb.RewardBatchRequest(
                experiment="exp",
                event_ids=[f"{variant}{i}" for i in range(n)],
                variants=[variant] * n,
                values=[value] * n,
            )
        )
    promoted = stub.Promote(req, metadata=ADMIN).experiment
    assert promoted.state == pb.EXPERIMENT_STATE_PROMOTED and promoted.champion == "c"


def test_creating_an_experiment_emits_created(server: Running, stub: pb_grpc.AllocatorStub) -> None:
    """EVENT_TYPE_CREATED is sent (and filterable) like every other event type."""
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec("first")))
    stub.Pause(pb.PauseRequest(experiment="first"), metadata=ADMIN)  # filtered out
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec("second")))
    call = stub.WatchEvents(
        pb.WatchEventsRequest(after_sequence=1, types=[pb.EVENT_TYPE_CREATED]), timeout=10
    )
    got = []
    for resp in call:
        got.append((resp.event.type, resp.event.experiment))
        if len(got) == 1:  # the replay is done: this one is live
            stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec("third")))
        if len(got) == 2:
            call.cancel()
            break
    assert got == [(pb.EVENT_TYPE_CREATED, "second"), (pb.EVENT_TYPE_CREATED, "third")]


def test_rollback_returns_traffic_to_the_variant_named(
    server: Running, stub: pb_grpc.AllocatorStub
) -> None:
    """RollbackRequest.variant is where traffic goes (here not the previous champion a);
    an unknown one is INVALID_ARGUMENT naming the field, the champion itself is refused."""
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    stub.Promote(pb.PromoteRequest(experiment="exp", variant="c"), metadata=ADMIN)
    version = server.app.records["exp"].version
    code, details = _code(
        stub.Rollback, pb.RollbackRequest(experiment="exp", variant="zz"), metadata=ADMIN
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "variant" in details
    code, details = _code(
        stub.Rollback, pb.RollbackRequest(experiment="exp", variant="c"), metadata=ADMIN
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "PROMOTED" in details
    assert server.app.records["exp"].version == version  # neither changed anything
    back = stub.Rollback(
        pb.RollbackRequest(experiment="exp", variant="b", reason="b is safe"), metadata=ADMIN
    ).experiment
    assert (back.state, back.champion) == (pb.EXPERIMENT_STATE_ROLLED_BACK, "b")
    batch = stub.AssignBatch(pb.AssignBatchRequest(experiment="exp", count=200))
    assert set(batch.variant_indices) == {1}
    rollback = server.app.store.list_audit(server.app.records["exp"].id)[-1]
    assert (rollback.action, rollback.reason) == ("ROLLBACK", "b is safe")


def test_a_fixed_split_variant_gets_its_weight_or_the_mean(
    server: Running, stub: pb_grpc.AllocatorStub
) -> None:
    """AddVariantRequest.weight, as the proto says: the new variant's relative weight,
    default the mean weight (an equal split stays equal); the engine serves the same."""

    def fixed(name: str, weights: list[float]) -> None:
        spec = _spec(name, ("a", "b"), policy=pb.POLICY_FIXED_SPLIT, weights=weights)
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec))

    def add(name: str, **kw: Any) -> list[float]:
        exp = stub.AddVariant(pb.AddVariantRequest(experiment=name, variant="c", **kw)).experiment
        shares = server.app.engine.view(name).alloc
        weights = list(exp.spec.weights) or [1.0] * 3
        assert np.allclose(shares, np.array(weights) / sum(weights)), (shares, weights)
        assert server.app.engine.config(name).policy.weights == tuple(exp.spec.weights)
        return list(exp.spec.weights)

    fixed("given", [1.0, 3.0])
    assert add("given", weight=4.0) == [1.0, 3.0, 4.0]
    fixed("mean", [1.0, 3.0])
    assert add("mean") == [1.0, 3.0, 2.0]
    fixed("equal", [])
    assert add("equal", weight=2.0) == [1.0, 1.0, 2.0]
    fixed("still_equal", [])
    assert add("still_equal") == []


def test_create_stores_the_experiment_its_audit_row_and_created_event_or_nothing(
    server: Running, stub: pb_grpc.AllocatorStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store failure writing the CREATED event undoes the whole create: UNAVAILABLE for
    an experiment that does not exist, not for one that does (a retry then works)."""
    import sqlalchemy as sa

    store = server.app.store
    assert isinstance(store, SqlStore)
    real = store._insert_event

    def down(*args: object) -> int:
        raise sa.exc.OperationalError("INSERT", None, Exception("connection lost"))

    monkeypatch.setattr(store, "_insert_event", down)
    code, _ = _code(stub.CreateExperiment, pb.CreateExperimentRequest(spec=_spec()))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert server.app.store.get_experiment("exp") is None and "exp" not in server.app.records
    assert server.app.store.list_audit() == []
    monkeypatch.setattr(store, "_insert_event", real)
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    rec = server.app.records["exp"]
    assert [a.action for a in server.app.store.list_audit(rec.id)] == ["CREATE"]
    assert [e.type for e in server.app.store.events_after(0)] == ["CREATED"]


def test_an_event_this_version_cannot_read_is_skipped_not_fatal(
    server: Running, stub: pb_grpc.AllocatorStub
) -> None:
    """A stored event of a type a newer replica knows (or with broken details) is skipped
    by the replay and by the hub; the events after it still reach watchers."""
    from allocator.store import EventRecord

    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    exp_id = server.app.records["exp"].id
    for row in (
        EventRecord(experiment_id=exp_id, type="FROM_THE_FUTURE", at=1.0),
        EventRecord(experiment_id=exp_id, type="PAUSED", at=1.0, details_json="{not json"),
    ):
        server.app.store.append_event(row)
    stub.Pause(pb.PauseRequest(experiment="exp", reason="after them"), metadata=ADMIN)
    replay = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=1), timeout=10)
    first = next(replay)
    replay.cancel()
    assert (first.event.type, first.event.reason) == (pb.EVENT_TYPE_PAUSED, "after them")
    assert server.app._hub_seq == first.event.sequence  # the hub moved past them too


def test_watch_events_live_and_replay(server: Running, stub: pb_grpc.AllocatorStub) -> None:
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    # Two events first, so the replay below starts after a real sequence number (0 = live).
    stub.Pause(pb.PauseRequest(experiment="exp"), metadata=ADMIN)
    stub.Resume(pb.ResumeRequest(experiment="exp"), metadata=ADMIN)
    got: list[pb.Event] = []
    call = stub.WatchEvents(pb.WatchEventsRequest(experiment="exp"))

    def read() -> None:
        for resp in call:
            got.append(resp.event)
            if len(got) == 2:
                return

    t = threading.Thread(target=read)
    t.start()
    # A live-only watch sees what is published after it subscribed: wait for that.
    wait_until(lambda: len(server.app.events._subs) == 1, 10, "the watcher's subscription")
    stub.Promote(pb.PromoteRequest(experiment="exp", variant="c"), metadata=ADMIN)
    stub.Rollback(pb.RollbackRequest(experiment="exp"), metadata=ADMIN)
    t.join(10)
    call.cancel()
    assert [e.type for e in got] == [pb.EVENT_TYPE_PROMOTED, pb.EVENT_TYPE_ROLLED_BACK]
    assert got[0].variant == "c" and got[0].sequence < got[1].sequence
    replay = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=got[0].sequence - 1))
    seen = []
    for resp in replay:
        seen.append(resp.event.type)
        if len(seen) == 2:
            break
    replay.cancel()
    assert seen == [pb.EVENT_TYPE_PROMOTED, pb.EVENT_TYPE_ROLLED_BACK]
    code, _ = _code(lambda: list(stub.WatchEvents(pb.WatchEventsRequest(experiment="nope"))))
    assert code == grpc.StatusCode.NOT_FOUND


def test_health_reflection_and_shutdown(server: Running) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "allocator.v1.Allocator", STORE_HEALTH):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        out = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in out[0].list_services_response.service}
        assert {
            "allocator.v1.Allocator",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        server.enter_graceful_shutdown()
        resp = health.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_services_register_no_methods_with_the_aio_server(
    tmp_path: Path, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc.aio (1.85) waits on one pending accept per registered method for every RPC it
    takes (grpc/grpc#43461): 25 of them cost a trivial handler 8% of its calls/s. The
    generated add_*_to_server functions register each service both ways; only the generic
    handlers may reach the server, and every service must still answer through them."""
    registered: list[str] = []
    monkeypatch.setattr(
        grpc.aio._server.Server,
        "add_registered_method_handlers",
        lambda self, service, handlers: registered.append(service),
    )
    running = create_server(
        server_config(f"sqlite:///{tmp_path / 'alloc.sqlite'}"), registry=registry
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.AllocatorStub(ch)
            stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()), metadata=ADMIN)
            assert stub.Assign(pb.AssignRequest(experiment="exp")).variant in ("a", "b", "c")
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            assert "allocator.v1.Allocator" in {
                s.name for s in next(refl).list_services_response.service
            }
    finally:
        running.stop(grace=1.0)
    assert registered == []


def test_metrics_endpoint_parses_and_has_documented_series(
    client: AllocatorClient, server: Running
) -> None:
    client.create_experiment(_spec())
    d = client.assign("exp")
    client.reward(d.decision_id, 1.0)
    with pytest.raises(grpc.RpcError):
        client.assign("missing")
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for name in (
        "allocator_requests",
        "allocator_request_duration_seconds",
        "allocator_decision_duration_seconds",
        "allocator_assignments",
        "allocator_rewards",
        "allocator_allocation_share",
        "allocator_reward_items",
        "allocator_store_flush_duration_seconds",
        "allocator_store_queue_depth",
        "allocator_store_up",
        "allocator_experiments",
        "allocator_events",
    ):
        assert name in families, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("allocator_requests_total", (("code", "OK"), ("rpc", "Assign")))] == 1
    assert samples[("allocator_requests_total", (("code", "NOT_FOUND"), ("rpc", "Assign")))] == 1
    assert (
        samples[("allocator_assignments_total", (("experiment", "exp"), ("variant", d.variant)))]
        == 1
    )
    assert samples[("allocator_reward_items_total", (("status", "accepted"),))] == 1
    health = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/healthz", timeout=5)
    assert health.status == 200


def test_huge_rewards_are_refused_and_leave_state_untouched(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    """1e200 is finite, but its square is inf: accepted, it made the posterior's sum of
    squares inf and the expected loss NaN, and was logged and replayed for ever. Every
    reward form refuses it (and a guardrail value, and a default reward) naming the item;
    nothing is applied or logged, so the same event ids are still free."""
    client.create_experiment(_spec("n", ("a", "b"), reward_type=pb.REWARD_TYPE_NORMAL))
    engine = server.app.engine
    assert client.reward_event("n", "a", "e0", 1.5) == pb.REWARD_STATUS_ACCEPTED
    before = engine.view("n")
    b = client.assign_batch("n", 2)
    huge = [
        (
            pb.RewardBatchRequest(
                experiment="n", event_ids=["e1", "e2"], variants=["a", "b"], values=[2.0, 1e200]
            ),
            "reward 1 is 1e+200",
        ),
        (
            pb.RewardBatchRequest(
                experiment="n", batch_token=b.batch_token, indices=[0, 1], values=[-1e200, 1.0]
            ),
            "reward 0 is -1e+200",
        ),
        (
            pb.RewardBatchRequest(
                experiment="n",
                event_ids=["e1"],
                variants=["a"],
                values=[1.0],
                guardrails=[pb.GuardrailColumn(metric="latency_ms", values=[1e200])],
            ),
            "guardrails[0].latency_ms",
        ),
    ]
    for req, what in huge:
        code, details = _code(stub.RewardBatch, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and what in details, details
    target = pb.EventTarget(experiment="n", variant="b", event_id="e2")
    code, details = _code(stub.Reward, pb.RewardRequest(event=target, value=1e200))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("value:"), details
    after = engine.view("n")
    np.testing.assert_array_equal(after.stats, before.stats)
    np.testing.assert_array_equal(after.epoch_stats, before.epoch_stats)
    assert engine.guardrail_stats("n") == {}
    ok = client.reward_batch("n", [2.0, 3.0], event_ids=["e1", "e2"], variants=["a", "b"])
    assert ok.accepted == 2  # not DUPLICATE: the refused requests logged nothing
    spec = _spec("d", ("a", "b"), reward_type=pb.REWARD_TYPE_NORMAL, default_reward=1e200)
    code, details = _code(stub.CreateExperiment, pb.CreateExperimentRequest(spec=spec))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec.default_reward" in details


def test_guardrail_columns_are_tracked_and_validated(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    client.create_experiment(_spec())
    ids = ["g0", "g1", "g2"]
    req = pb.RewardBatchRequest(
        experiment="exp",
        event_ids=ids,
        variants=["a", "b", "b"],
        values=[1.0, 0.0, 1.0],
        guardrails=[pb.GuardrailColumn(metric="latency_ms", values=[12.0, float("nan"), 30.0])],
    )
    assert stub.RewardBatch(req).accepted == 3
    lat = server.app.engine.guardrail_stats("exp")["latency_ms"]
    assert lat[0].tolist() == [1.0, 12.0, 144.0] and lat[1].tolist() == [1.0, 30.0, 900.0]
    bad = pb.RewardBatchRequest(
        experiment="exp",
        event_ids=["h0"],
        variants=["a"],
        values=[1.0],
        guardrails=[pb.GuardrailColumn(metric="latency_ms", values=[1.0, 2.0])],
    )
    code, details = _code(stub.RewardBatch, bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "guardrails[0].values" in details
    inf = pb.RewardRequest(
        event=pb.EventTarget(experiment="exp", variant="a", event_id="h1"),
        value=1.0,
        guardrails={"latency_ms": float("inf")},
    )
    code, details = _code(stub.Reward, inf)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "latency_ms" in details


def test_indexed_rewards_are_columnar_but_behave_like_decision_ids(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    client.create_experiment(_spec())
    b = client.assign_batch("exp", 6)
    req = pb.RewardBatchRequest(
        experiment="exp",
        batch_token=b.batch_token,
        indices=[0, 1, 2, 2],  # the repeat of item 2 is a duplicate within the request
        values=[1.0, 0.0, 1.0, 1.0],
        prediction_scores=[0.5, float("nan"), 0.25, 0.75],
        guardrails=[pb.GuardrailColumn(metric="latency_ms", values=[10.0, 20.0, 30.0, 40.0])],
    )
    resp = stub.RewardBatch(req)
    assert (resp.accepted, resp.duplicates, resp.expired) == (3, 1, 0)
    assert list(resp.statuses) == [pb.REWARD_STATUS_ACCEPTED] * 3 + [pb.REWARD_STATUS_DUPLICATE]
    assert sum(server.app.engine.counts("exp").values()) == 3
    # Guardrails of the three accepted items only: n = 3, sum = 10 + 20 + 30.
    lat = server.app.engine.guardrail_stats("exp")["latency_ms"]
    assert lat[:, 0].sum() == 3.0 and lat[:, 1].sum() == 60.0
    # The same decisions by decision id are the same dedup keys: duplicates.
    again = client.reward_batch("exp", [1.0] * 2, decision_ids=[b.decision_id(1), b.decision_id(3)])
    assert (again.accepted, again.duplicates) == (1, 1)
    assert sum(server.app.engine.counts("exp").values()) == 4


def test_indexed_reward_errors_name_the_field_and_write_nothing(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    client.create_experiment(_spec("one"))
    client.create_experiment(_spec("two"))
    b = client.assign_batch("one", 4)
    forged = b.batch_token[:-2] + ("AA" if not b.batch_token.endswith("AA") else "BA")

    def req(**kw: Any) -> pb.RewardBatchRequest:
        base: dict[str, Any] = {
            "experiment": "one",
            "batch_token": b.batch_token,
            "indices": [0, 1],
            "values": [1.0, 1.0],
        }
        return pb.RewardBatchRequest(**{**base, **kw})

    for bad, field in [
        (req(batch_token=forged), "batch_token"),
        (req(batch_token="not a token"), "batch_token"),
        (req(experiment="two"), "belongs to 'one'"),
        (req(decision_ids=["x"]), "batch_token"),
        (req(indices=[0, 4]), "indices[1]"),
        (req(values=[1.0]), "values"),
        (req(values=[1.0, 2.0]), "values"),  # Bernoulli rewards are in [0, 1]
        (req(prediction_scores=[0.5]), "prediction_scores"),
        (req(values=[]), "values"),
    ]:
        code, details = _code(stub.RewardBatch, bad)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert field in details, details
    assert sum(server.app.engine.counts("one").values()) == 0
    assert stub.RewardBatch(req()).accepted == 2


def test_reward_batch_refuses_mixed_addressing_and_writes_nothing(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    """The proto allows exactly one of three ways: the fields of another way were ignored
    (decision_ids won over event_ids and indices, batch_token over variants)."""
    client.create_experiment(_spec())
    d = client.assign("exp")
    b = client.assign_batch("exp", 2)
    ids: dict[str, Any] = {"decision_ids": [d.decision_id]}
    token: dict[str, Any] = {"batch_token": b.batch_token, "indices": [0]}
    events: dict[str, Any] = {"event_ids": ["e0"], "variants": ["a"]}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({**ids, "event_ids": ["e0"]}, "event_ids", "decision_ids"),
        ({**ids, "variants": ["a"]}, "variants", "decision_ids"),
        ({**ids, "variant_indices": [0]}, "variant_indices", "decision_ids"),
        ({**ids, **events}, "event_ids", "decision_ids"),
        ({**ids, "indices": [0]}, "indices", "decision_ids"),
        ({**ids, **token}, "batch_token", "decision_ids"),
        ({**token, "variants": ["a"]}, "variants", "batch_token, indices"),
        ({**token, "variant_indices": [0]}, "variant_indices", "batch_token, indices"),
        ({**token, **events}, "event_ids", "batch_token, indices"),
        ({"indices": [0], **events}, "event_ids", "indices"),
        # A form's other fields without its first one.
        ({"indices": [0]}, "batch_token", "indices"),
        ({"variants": ["a"]}, "event_ids", "variants"),
    ]
    for kw, field, named in cases:
        req = pb.RewardBatchRequest(experiment="exp", values=[1.0], **kw)
        code, details = _code(stub.RewardBatch, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (kw, details)
        assert details.startswith(f"{field}: ") and named in details, (kw, details)
        stream = stub.RewardStream(iter([pb.RewardStreamRequest(request_id=1, batch=req)]))
        assert _code(list, stream)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert sum(server.app.engine.counts("exp").values()) == 0
    for kw in (ids, token, events):
        assert stub.RewardBatch(pb.RewardBatchRequest(experiment="exp", values=[1.0], **kw))
    assert sum(server.app.engine.counts("exp").values()) == 3


def test_decision_ids_this_replica_has_not_loaded_are_unavailable_not_invalid(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    """Our signature on a decision id naming an experiment or variant we don't know means
    another replica made it and ours has not synced it yet: UNAVAILABLE (clients retry),
    not INVALID_ARGUMENT (they would drop the reward). A malformed index is bad input."""
    client.create_experiment(_spec())
    rec = server.app.get("exp")
    now = server.app.clock()
    sign, sign_batch = server.app.signer.issue, server.app.signer.issue_batch
    unloaded = [
        pb.RewardRequest(decision_id=sign(rec.id + 1, 0, 0, now), value=1),
        pb.RewardRequest(decision_id=sign(rec.id, 3, 0, now), value=1),  # a 4th variant
        pb.RewardRequest(decision_id=sign_batch(rec.id + 1, [0, 1], 0, now) + ".1", value=1),
    ]
    for req in unloaded:
        code, details = _code(stub.Reward, req)
        assert code == grpc.StatusCode.UNAVAILABLE and "retry" in details, details
    code, details = _code(
        stub.RewardBatch,
        pb.RewardBatchRequest(
            batch_token=sign_batch(rec.id, [0, 3], 0, now), indices=[0], values=[1]
        ),
    )
    assert code == grpc.StatusCode.UNAVAILABLE and "variant 3" in details, details
    # By decision ids of that batch: its items reuse one check, which covers every variant.
    token = sign_batch(rec.id, [0, 3], 0, now)
    code, details = _code(
        stub.RewardBatch,
        pb.RewardBatchRequest(decision_ids=[token + ".0", token + ".1"], values=[1, 1]),
    )
    assert code == grpc.StatusCode.UNAVAILABLE and "variant 3" in details, details
    b = client.assign_batch("exp", 3)
    code, details = _code(stub.Reward, pb.RewardRequest(decision_id=b.batch_token + ".\u00b2"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "decimal" in details, details
    assert sum(server.app.engine.counts("exp").values()) == 0


def test_a_reward_batch_larger_than_the_queue_is_invalid_not_overload(tmp_path: Path) -> None:
    """A batch that could never fit the reward queue is refused as bad input: answering
    RESOURCE_EXHAUSTED would have the client retry it forever."""
    config = server_config(f"sqlite:///{tmp_path / 'q.sqlite'}", flush_max_rows=2, max_queue=4)
    running = create_server(config, registry=CollectorRegistry())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.AllocatorStub(ch)
            stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))

            def batch(n: int) -> pb.RewardBatchRequest:
                ids = [f"e{i}" for i in range(n)]
                return pb.RewardBatchRequest(
                    experiment="exp", event_ids=ids, variants=["a"] * n, values=[1.0] * n
                )

            code, details = _code(stub.RewardBatch, batch(5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert details.startswith("values:") and "at most 4" in details, details
            assert sum(running.app.engine.counts("exp").values()) == 0
            assert stub.RewardBatch(batch(4)).accepted == 4
    finally:
        running.stop(grace=1.0)


def test_indexed_rewards_of_an_expired_batch_are_expired(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    client.create_experiment(_spec(attribution_window_seconds=60))
    b = client.assign_batch("exp", 3)
    clock = server.app.clock
    # Past the experiment's own window (60 s), then past the token lifetime too.
    for later in (61.0, server.app.signer.ttl_seconds + 10):
        server.app.clock = lambda later=later: clock() + later  # type: ignore[misc]
        try:
            resp = stub.RewardBatch(
                pb.RewardBatchRequest(
                    experiment="exp", batch_token=b.batch_token, indices=[0, 2], values=[1, 1]
                )
            )
            # Values bad for any experiment, or for this (Bernoulli) one, are refused
            # though the batch expired.
            code, details = _code(
                stub.RewardBatch,
                pb.RewardBatchRequest(
                    batch_token=b.batch_token, indices=[0, 2], values=[1, np.inf]
                ),
            )
            named = _code(
                stub.RewardBatch,
                pb.RewardBatchRequest(
                    experiment="exp", batch_token=b.batch_token, indices=[0, 2], values=[1, 2]
                ),
            )
        finally:
            server.app.clock = clock
        assert (resp.accepted, resp.expired) == (0, 2)
        assert list(resp.statuses) == [pb.REWARD_STATUS_EXPIRED] * 2
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "reward 1 is not a finite" in details
        assert named[0] == grpc.StatusCode.INVALID_ARGUMENT and "reward 1 is 2.0" in named[1]
    assert sum(server.app.engine.counts("exp").values()) == 0


def test_failed_transition_writes_nothing_and_changes_nothing(
    stub: pb_grpc.AllocatorStub, server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    from allocator.store import StoreUnavailable

    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    rec = server.app.records["exp"]
    real = server.app.store.update_state

    def down(*args: object, **kwargs: object) -> object:
        raise StoreUnavailable("update_state", "injected")

    monkeypatch.setattr(server.app.store, "update_state", down)
    code, _ = _code(stub.Promote, pb.PromoteRequest(experiment="exp", variant="b"), metadata=ADMIN)
    assert code == grpc.StatusCode.UNAVAILABLE
    code, _ = _code(stub.AddVariant, pb.AddVariantRequest(experiment="exp", variant="d"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert rec.lifecycle.state.value == "RUNNING" and rec.config.n_arms == 3
    assert server.app.engine.view("exp").stats.shape == (3, 3)
    assert server.app.engine.view("exp").override is None
    stored = server.app.store.events_after(0, experiment_id=rec.id)
    assert [e.type for e in stored] == ["CREATED"]  # nothing of the failed transitions
    monkeypatch.setattr(server.app.store, "update_state", real)
    stub.Promote(pb.PromoteRequest(experiment="exp", variant="b"), metadata=ADMIN)
    stub.AddVariant(pb.AddVariantRequest(experiment="exp", variant="d"))
    # Each transition's event was committed with its state change and audit row.
    kinds = [e.type for e in server.app.store.events_after(0, experiment_id=rec.id)]
    assert kinds == ["CREATED", "PROMOTED", "VARIANT_ADDED", "REOPENED"]
    actions = [a.action for a in server.app.store.list_audit(rec.id)]
    assert actions == ["CREATE", "PROMOTE", "ADD_VARIANT"]


def test_infinite_prediction_score_is_rejected_in_every_form(
    client: AllocatorClient, stub: pb_grpc.AllocatorStub, server: Running
) -> None:
    client.create_experiment(_spec())
    b = client.assign_batch("exp", 2)
    inf = float("inf")
    forms = [
        pb.RewardBatchRequest(
            experiment="exp",
            batch_token=b.batch_token,
            indices=[0, 1],
            values=[1.0, 0.0],
            prediction_scores=[0.5, inf],
        ),
        pb.RewardBatchRequest(
            experiment="exp",
            event_ids=["s0", "s1"],
            variants=["a", "b"],
            values=[1.0, 0.0],
            prediction_scores=[inf, 0.5],
        ),
    ]
    for req, index in zip(forms, (1, 0), strict=True):
        code, details = _code(stub.RewardBatch, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"prediction_scores[{index}]" in details
    single = pb.RewardRequest(decision_id=b.decision_id(0), value=1.0, prediction_score=-inf)
    code, details = _code(stub.Reward, single)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prediction_score:")
    assert sum(server.app.engine.counts("exp").values()) == 0
    # NaN still means "no score": accepted.
    ok = forms[0]
    del ok.prediction_scores[:]
    ok.prediction_scores.extend([float("nan"), 0.25])
    assert stub.RewardBatch(ok).accepted == 2


def test_open_streams_hold_no_handler_thread(tmp_path: Path, registry: CollectorRegistry) -> None:
    """Long-lived streams must not starve unary calls of the (small) blocking pool.

    With a thread-pool server every open stream held one of ``max_workers`` threads for its
    whole life, so as many idle watchers as threads made every other RPC hang.
    """
    running = create_server(
        server_config(f"sqlite:///{tmp_path / 's.sqlite'}", max_workers=2), registry=registry
    )
    idle = threading.Event()

    def quiet() -> Iterator[pb.AssignStreamRequest]:
        idle.wait(30)  # an open stream that sends nothing until the test ends
        return
        yield

    calls: list[Any] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.AllocatorStub(ch)
            stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()), timeout=10)
            for _ in range(6):
                call = stub.WatchEvents(pb.WatchEventsRequest())
                calls.append(call)
            calls += [stub.AssignStream(quiet()), stub.RewardStream(quiet())]
            time.sleep(0.5)  # every stream is open on the server by now
            # Assign runs on the loop, GetExperiment and RewardBatch in the 2-thread pool.
            d = stub.Assign(pb.AssignRequest(experiment="exp"), timeout=5)
            assert stub.GetExperiment(pb.GetExperimentRequest(experiment="exp"), timeout=5)
            out = stub.RewardBatch(
                pb.RewardBatchRequest(decision_ids=[d.decision_id], values=[1.0]), timeout=5
            )
            assert out.accepted == 1
    finally:
        idle.set()
        for call in calls:
            call.cancel()
        running.stop(1.0)


def test_a_busy_experiment_never_stalls_the_event_loop(
    server: Running, stub: pb_grpc.AllocatorStub
) -> None:
    """Assign runs on the event loop; if it waited there for an experiment another thread
    holds (a 100k-unit AssignBatch, an estimate on Resume), every RPC would wait with it."""
    for name in ("busy", "free"):
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec(name)))
    lock = server.app.engine._experiments["busy"].lock  # what those long operations hold
    lock.acquire()
    try:
        waiting = stub.Assign.future(pb.AssignRequest(experiment="busy"), timeout=30)
        # Answered while "busy" is still held: the loop did not block on its lock.
        assert stub.Assign(pb.AssignRequest(experiment="free"), timeout=5).variant
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert not waiting.done()  # the busy experiment's call waits in the pool instead
    finally:
        lock.release()
    d = waiting.result(timeout=10)
    assert d.variant in ("a", "b", "c") and d.decision_id
    out = stub.Reward(pb.RewardRequest(decision_id=d.decision_id, value=1.0))
    assert out.status == pb.REWARD_STATUS_ACCEPTED


def test_watchers_end_with_unavailable_when_the_server_stops(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """A stop ends open WatchEvents calls at once, saying where to resume, instead of
    holding the stop for its whole grace period and then cancelling them."""
    running = create_server(server_config(f"sqlite:///{tmp_path / 's.sqlite'}"), registry=registry)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = pb_grpc.AllocatorStub(ch)
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()), timeout=10)
        stub.Pause(pb.PauseRequest(experiment="exp"), metadata=ADMIN, timeout=10)
        call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0))
        first: list[pb.Event] = []
        ended: list[grpc.RpcError] = []

        def read() -> None:
            try:
                for resp in call:
                    first.append(resp.event)
            except grpc.RpcError as err:
                ended.append(err)

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: bool(running.app.events._subs), 10, "the watcher's subscription")
        stub.Resume(pb.ResumeRequest(experiment="exp"), metadata=ADMIN, timeout=10)
        wait_until(lambda: bool(first), 10, "the RESUMED event at the watcher")
        # A grace far longer than the test: before, the watcher held the stop for all of it.
        stopper = threading.Thread(target=running.stop, args=(120.0,))
        stopper.start()
        reader.join(30)
        assert ended, "the watcher was not ended by the stop"
        assert ended[0].code() == grpc.StatusCode.UNAVAILABLE
        assert f"after_sequence={first[-1].sequence}" in ended[0].details()
        stopper.join(60)
        assert not stopper.is_alive()


def test_events_published_out_of_order_reach_a_watcher_once_each_in_order(
    server: Running, stub: pb_grpc.AllocatorStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads commit events 1 and 2 and publish them in the order 2, 1 (the first
    is held between its commit and its publish): the watcher still gets both, once each,
    in sequence order, so resuming after the last sequence seen skips nothing."""
    stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()))
    app = server.app
    rec = app.records["exp"]
    first_committed, second_published = threading.Event(), threading.Event()
    append = app.store.append_event

    def held_append(record: Any) -> int:
        seq = append(record)
        if record.reason == "first":
            first_committed.set()
            second_published.wait(10)
        return seq

    monkeypatch.setattr(app.store, "append_event", held_append)
    app.event_listeners.append(
        lambda _rec, e: second_published.set() if e.reason == "second" else None
    )
    call = stub.WatchEvents(pb.WatchEventsRequest(experiment="exp"))
    got: list[pb.Event] = []

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled below if events are lost
            for resp in call:
                got.append(resp.event)
                if len(got) == 3:
                    return

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: len(app.events._subs) == 1, 10, "the watcher's subscription")
    first = threading.Thread(target=app.emit, args=(rec, EventType.DRIFT_DETECTED, "first"))
    first.start()
    assert first_committed.wait(10)
    app.emit(rec, EventType.DRIFT_DETECTED, "second")
    first.join(10)
    app.emit(rec, EventType.DRIFT_DETECTED, "third")  # a repeat of either would come first
    reader.join(10)
    call.cancel()
    assert [e.reason for e in got] == ["first", "second", "third"]
    assert [e.sequence for e in got] == sorted({e.sequence for e in got})


def test_a_slow_watcher_is_dropped_without_blocking_the_publisher() -> None:
    hub = EventHub()
    q = hub.subscribe()
    event = StoredEvent(1, Event(EventType.PROMOTED, "exp", 0, 0.0))

    def publish_all() -> None:
        for _ in range(EventHub.QUEUE_SIZE + 5):
            hub.publish(event)

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    publisher.join(30)
    assert not publisher.is_alive(), "publish blocked on a full subscriber queue"
    items = [q.get_nowait() for _ in range(q.qsize())]
    assert items[-1] == Ended.SLOW and all(i == event for i in items[:-1])
    hub.publish(event)  # no longer subscribed: nothing more arrives
    assert q.empty()
    code, details = _code_for(_watch_ended(Ended.SLOW, 41))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "after_sequence=41" in details
    code, details = _code_for(_watch_ended(Ended.SHUTDOWN, 41))
    assert code == grpc.StatusCode.UNAVAILABLE and "after_sequence=41" in details


def test_shutdown_delay_reports_not_serving_while_still_serving(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """Load balancers poll health: during the delay they must see NOT_SERVING while calls
    that still arrive are answered, and only then are new calls refused."""
    running = create_server(server_config(f"sqlite:///{tmp_path / 's.sqlite'}"), registry=registry)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = pb_grpc.AllocatorStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        stub.CreateExperiment(pb.CreateExperimentRequest(spec=_spec()), timeout=10)
        stopper = threading.Thread(target=running.stop, args=(1.0, 5.0))
        stopper.start()
        for _ in range(200):
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Inside the 5 s delay: a late caller still gets its decision and its reward in.
        d = stub.Assign(pb.AssignRequest(experiment="exp"), timeout=5)
        out = stub.Reward(pb.RewardRequest(decision_id=d.decision_id, value=1.0), timeout=5)
        assert out.status == pb.REWARD_STATUS_ACCEPTED
        assert stopper.is_alive()
        stopper.join(30)
        assert not stopper.is_alive()
        code, _ = _code(stub.Assign, pb.AssignRequest(experiment="exp"), timeout=5)
        assert code == grpc.StatusCode.UNAVAILABLE  # stopped: new calls are refused


def test_config_rejects_negative_shutdown_times() -> None:
    for name in ("grace_s", "shutdown_delay_s"):
        for bad in (-1.0, float("nan")):
            kwargs: dict[str, Any] = {name: bad}
            with pytest.raises(ValueError, match=name):
                ServerConfig(**kwargs)
    env = {"ALLOCATOR_SHUTDOWN_DELAY_S": "2.5"}
    assert ServerConfig.from_args([], env=env).shutdown_delay_s == 2.5
    assert ServerConfig.from_args(["--shutdown-delay-s", "4"], env=env).shutdown_delay_s == 4.0


@pytest.mark.parametrize(
    ("listen", "tls", "exposed"),
    [
        ("127.0.0.1:0", False, False),
        ("[::1]:0", False, False),
        ("localhost:0", False, False),
        ("LocalHost.:0", False, False),
        ("127.0.0.2:0", False, False),
        ("[::ffff:127.0.0.1]:0", False, False),
        ("[::ffff:10.0.0.1]:0", False, True),
        ("0.0.0.0:0", False, True),
        ("[::]:0", False, True),
        ("10.1.2.3:0", False, True),
        ("allocator.internal:0", False, True),
        ("0.0.0.0:0", True, False),
    ],
)
def test_an_admin_token_sent_in_clear_over_the_network_is_flagged(
    listen: str, tls: bool, exposed: bool
) -> None:
    cert, key = ("c.pem", "k.pem") if tls else ("", "")
    config = ServerConfig(listen=listen, admin_token="t", tls_cert=cert, tls_key=key)
    assert config.exposed_plaintext_admin is exposed
    assert not ServerConfig(listen=listen).exposed_plaintext_admin  # no token: nothing to leak


def test_a_server_with_a_plaintext_admin_token_off_loopback_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'w.sqlite'}"
    for listen in ("127.0.0.1:0", "0.0.0.0:0"):
        caplog.clear()
        running = create_server(
            server_config(url, listen=listen, http_port=-1), registry=CollectorRegistry()
        )
        running.stop(1.0)
        warned = [r for r in caplog.records if "admin token travels in clear" in r.getMessage()]
        assert len(warned) == (listen == "0.0.0.0:0"), listen


def test_a_cancelled_watcher_is_unsubscribed(server: Running, stub: pb_grpc.AllocatorStub) -> None:
    """Idle watchers wait for the hub's wake-up (no polling); a client that goes away must
    still end its subscription at once, not at the next event."""
    hub = server.app.events
    calls = [stub.WatchEvents(pb.WatchEventsRequest()) for _ in range(3)]
    for _ in range(100):
        if len(hub._subs) == 3:
            break
        time.sleep(0.05)
    assert len(hub._subs) == 3
    for call in calls:
        call.cancel()
    for _ in range(100):
        if not hub._subs:
            break
        time.sleep(0.05)
    assert not hub._subs
    # Counted as what they were: cancelled by the client, not served to the end.
    codes = _rpc_codes(server.app.metrics.registry, "WatchEvents")
    assert codes == {"CANCELLED": 3.0}, codes


def test_a_resuming_watcher_survives_a_server_restart(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """The client's ``resume`` turns the stop's UNAVAILABLE into a reconnect from the last
    sequence seen: every event once, in order, across a restart on the same store. With
    the default retry policy: its backoff is over in a fraction of a second, long before
    the server is back, so the reconnect and the retried unary call must wait for it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = server_config(f"sqlite:///{tmp_path / 's.sqlite'}", listen=f"127.0.0.1:{port}")
    running = create_server(config, registry=registry)
    got: list[pb.Event] = []
    with AllocatorClient(f"127.0.0.1:{port}", admin_token=ADMIN_TOKEN, timeout=10.0) as c:
        c.create_experiment(_spec())
        watch = c.watch_events("exp", resume=True)

        def read() -> None:
            for event in watch:
                got.append(event)
                if event.type == pb.EVENT_TYPE_RESUMED:
                    return

        reader = threading.Thread(target=read)
        reader.start()
        # Subscribed (live only) before the pause, or its event is not this watcher's.
        wait_until(lambda: bool(running.app.events._subs), 10, "the watcher's subscription")
        c.pause("exp")
        wait_until(lambda: bool(got), 10, "the PAUSED event at the watcher")
        running.stop(1.0)
        running = create_server(config, registry=CollectorRegistry())
        try:
            c.get_experiment("exp")  # retried (idempotent) until the channel reconnects
            c.resume("exp")  # admin calls are not retried
            reader.join(30)
        finally:
            running.stop(1.0)
    assert [e.type for e in got] == [pb.EVENT_TYPE_PAUSED, pb.EVENT_TYPE_RESUMED]
    assert got[0].sequence < got[1].sequence


def test_busy_ports_are_named_and_leave_nothing_running(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"--listen 127.0.0.1:{port}: cannot bind"):
            create_server(
                server_config(url, listen=f"127.0.0.1:{port}"), registry=CollectorRegistry()
            )
        with pytest.raises(OSError, match=f"--http-port {port} on 127.0.0.1"):
            create_server(server_config(url, http_port=port), registry=CollectorRegistry())
    # Both failed start-ups let go of the store (its lock) and everything they started.
    running = create_server(server_config(url), registry=registry)
    try:
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            assert c.create_experiment(_spec()).spec.name == "exp"
    finally:
        running.stop(1.0)


def test_cli_report_says_what_the_srm_check_covers(
    server: Running, client: AllocatorClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from allocator import cli

    client.create_experiment(_spec(allocation_mode=pb.ALLOCATION_MODE_TABLE))
    client.assign_batch("exp", 500)
    client.assign("exp", unit_id="user-1")  # follows the epoch's shares: not covered
    covered = client.get_report("exp").srm.decisions
    assert covered == 500
    assert cli.main(["--target", f"127.0.0.1:{server.port}", "report", "exp"]) == 0
    out = capsys.readouterr().out
    assert f"over {covered} table decisions" in out
    assert "SRM: sequential p = 1 (one-look chi-square p = " in out


def test_report_runs_the_rank_test_on_logged_continuous_rewards(
    client: AllocatorClient, server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mann-Whitney needs the rewards themselves, which the report reads from the log:
    continuous rewards get it (b shifted by 0.5 sd over 400 rewards each: p ~ 1e-12);
    0/1 rewards do not (their chi-square is the test). With the store down the rest of
    the report, served from memory, still answers."""
    rng = np.random.default_rng(8)
    client.create_experiment(_spec("cont", ("a", "b"), reward_type=pb.REWARD_TYPE_NORMAL))
    client.create_experiment(_spec("bin", ("a", "b")))
    for variant, shift in (("a", 0.0), ("b", 0.5)):
        values = rng.normal(10.0 + shift, 1.0, 400).tolist()
        ids = [f"{variant}{i}" for i in range(400)]
        client.reward_batch("cont", values, event_ids=ids, variants=[variant] * 400)
        client.reward_batch("bin", [1.0, 0.0] * 200, event_ids=ids, variants=[variant] * 400)
    rank = [t for t in client.get_report("cont").tests if t.name == "mann_whitney_u"]
    assert [t.variant for t in rank] == ["b"]
    assert rank[0].p_value < 1e-6 and rank[0].p_value_adjusted == rank[0].p_value
    assert not any(t.name == "mann_whitney_u" for t in client.get_report("bin").tests)

    def down(*args: object) -> None:
        raise StoreUnavailable("read", "connection refused")

    monkeypatch.setattr(server.app.store, "recent_rewards", down)
    report = client.get_report("cont")
    assert len(report.variants) == 2
    assert [t.name for t in report.tests] == ["welch_t"]


def test_report_intervals_use_the_spec_alpha(
    client: AllocatorClient, server: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    from allocator import cli

    client.create_experiment(_spec(promotion=pb.PromotionSettings(alpha=0.1)))
    client.create_experiment(_spec("default"))
    assert client.get_report("exp").interval_level == pytest.approx(0.9)
    assert client.get_report("default").interval_level == pytest.approx(0.95)
    # The CLI's table says which level it shows, and that the tests are descriptive.
    client.reward_batch(
        "exp", [1.0, 0.0] * 10, event_ids=[f"e{i}" for i in range(20)], variants=["a", "b"] * 10
    )
    assert cli.main(["--target", f"127.0.0.1:{server.port}", "report", "exp"]) == 0
    out = capsys.readouterr().out
    assert "90% CI" in out and "95% CI" not in out
    assert "descriptive under adaptive allocation" in out
    rep = client.get_report("exp")
    b = rep.variants[1]
    assert (
        f"b - control: lift {b.lift:+.4f} [{b.lift_ci_low:.4f}, {b.lift_ci_high:.4f}], "
        f"stratified by epoch {b.stratified_lift:+.4f}" in out
    )

"""Pure parts of the Python client, against a fake stub (real-server tests live elsewhere)."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from allocator_client import (
    AllocatorClient,
    BatchAssignment,
    RetryPolicy,
    RetryThrottle,
    RewardBatcher,
    batch_decision_id,
    pb,
    reward_batch_request,
)
from allocator_client.client import NO_RETRY, pushback_seconds, status_code

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeRpcError(grpc.RpcError):
    """What a failed unary call raises: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, trailing: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(code.name)
        self._code = code
        self._trailing = tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


@dataclass(frozen=True)
class Recorded:
    rpc: str
    request: Any
    timeout: float | None
    metadata: Any
    wait_for_ready: bool | None = None


def _default_response(rpc: str, request: Any) -> Any:
    if rpc == "RewardBatch":
        n = len(request.values)
        return pb.RewardBatchResponse(accepted=n, statuses=[pb.REWARD_STATUS_ACCEPTED] * n)
    return getattr(pb, f"{rpc}Response")()


class FakeStub:
    """Records every call; ``script[rpc]`` lists outcomes (response or exception) in order."""

    def __init__(self, script: dict[str, list[Any]] | None = None) -> None:
        self.script = script or {}
        self.calls: list[Recorded] = []
        self.lock = threading.Lock()
        self.on_call: Callable[[Recorded], None] = lambda call: None

    def __getattr__(self, rpc: str) -> Callable[..., Any]:
        if not rpc[:1].isupper():
            raise AttributeError(rpc)

        def method(
            request: Any,
            timeout: float | None = None,
            metadata: Any = None,
            wait_for_ready: bool | None = None,
        ) -> Any:
            call = Recorded(rpc, request, timeout, metadata, wait_for_ready)
            with self.lock:
                self.calls.append(call)
                outcomes = self.script.get(rpc)
                outcome = outcomes.pop(0) if outcomes else _default_response(rpc, request)
            self.on_call(call)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return method

    def rpcs(self) -> list[str]:
        return [call.rpc for call in self.calls]


class FakeClock:
    """Monotonic time that moves only when the client sleeps (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_client(stub: FakeStub, **kwargs: Any) -> tuple[AllocatorClient, list[float]]:
    clock = FakeClock()
    defaults: dict[str, Any] = {"sleep": clock.sleep, "rand": lambda: 1.0, "clock": clock}
    client = AllocatorClient("unused", stub=stub, **{**defaults, **kwargs})
    return client, clock.sleeps


# RetryPolicy ---------------------------------------------------------------------------


def test_backoff_schedule_is_exponential_and_capped() -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.05, max_backoff=0.3, multiplier=2.0)
    top = [policy.backoff(n, rand=lambda: 1.0) for n in range(1, 6)]
    assert top == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
    # Full jitter scales the whole window: rand() = u gives u times the cap.
    assert policy.backoff(3, rand=lambda: 0.25) == pytest.approx(0.05)
    assert policy.backoff(3, rand=lambda: 0.0) == 0.0


def test_backoff_rejects_retry_zero() -> None:
    with pytest.raises(ValueError, match="retry"):
        RetryPolicy().backoff(0, rand=lambda: 1.0)


def test_delay_only_for_idempotent_calls_on_retryable_codes_within_budget() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=1.0)

    def delay(code: grpc.StatusCode | None, attempt: int, idempotent: bool = True) -> Any:
        return policy.delay(code, attempt, idempotent=idempotent, rand=lambda: 1.0)

    for code in (UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert delay(code, 1) == pytest.approx(0.1)
        assert delay(code, 2) == pytest.approx(0.2)
        assert delay(code, 3) is None  # third attempt was the last
        assert delay(code, 1, idempotent=False) is None
    for code in (
        # The attempt had all the call's time left, and the server may have acted on it.
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
        None,
    ):
        assert delay(code, 1) is None


def test_delay_honours_server_pushback() -> None:
    policy = RetryPolicy(max_attempts=3)
    kwargs: dict[str, Any] = {"idempotent": True, "rand": lambda: 1.0}
    assert policy.delay(UNAVAILABLE, 1, pushback=0.75, **kwargs) == 0.75
    assert policy.delay(UNAVAILABLE, 1, pushback=-1.0, **kwargs) is None
    assert policy.delay(UNAVAILABLE, 3, pushback=0.75, **kwargs) is None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_attempts": 0}, ValueError),
        ({"max_attempts": 2.0}, TypeError),
        ({"max_attempts": True}, TypeError),
        ({"initial_backoff": -0.1}, ValueError),
        ({"initial_backoff": math.nan}, ValueError),
        ({"max_backoff": 0.01, "initial_backoff": 0.1}, ValueError),
        ({"multiplier": 0.5}, ValueError),
        ({"multiplier": "2"}, TypeError),
        ({"codes": frozenset({14})}, TypeError),
        ({"throttle_codes": frozenset({8})}, TypeError),
        ({"throttle_max_tokens": -1}, ValueError),
        ({"throttle_max_tokens": 1001}, ValueError),
        ({"throttle_token_ratio": 0.0001}, ValueError),
        ({"throttle_token_ratio": math.inf}, ValueError),
    ],
)
def test_retry_policy_validates_itself(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        RetryPolicy(**kwargs)


def test_pushback_and_status_code_parsing() -> None:
    assert pushback_seconds(FakeRpcError(UNAVAILABLE, [("grpc-retry-pushback-ms", "250")])) == 0.25
    assert pushback_seconds(FakeRpcError(UNAVAILABLE, [("grpc-retry-pushback-ms", b"0")])) == 0.0
    assert pushback_seconds(FakeRpcError(UNAVAILABLE, [("grpc-retry-pushback-ms", "-5")])) == -1.0
    assert pushback_seconds(FakeRpcError(UNAVAILABLE, [("other", "1")])) is None
    assert pushback_seconds(ValueError("no metadata")) is None
    assert status_code(FakeRpcError(grpc.StatusCode.NOT_FOUND)) is grpc.StatusCode.NOT_FOUND
    assert status_code(grpc.RpcError()) is None


# Client call loop ----------------------------------------------------------------------


def test_assign_retries_unavailable_with_backoff_then_succeeds() -> None:
    answer = pb.AssignResponse(variant="b", variant_index=1, decision_id="d1", propensity=0.7)
    stub = FakeStub({"Assign": [FakeRpcError(UNAVAILABLE), FakeRpcError(UNAVAILABLE), answer]})
    client, sleeps = make_client(stub, retries=RetryPolicy(initial_backoff=0.05))
    assert client.assign("exp", unit_id="u1") == answer
    assert stub.rpcs() == ["Assign"] * 3
    assert sleeps == pytest.approx([0.05, 0.1])
    assert stub.calls[0].request == pb.AssignRequest(experiment="exp", unit_id="u1")


def test_retries_give_up_after_max_attempts_with_the_last_error() -> None:
    errors = [FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED) for _ in range(3)]
    stub = FakeStub({"Reward": list(errors)})
    client, sleeps = make_client(stub, retries=RetryPolicy(max_attempts=3))
    with pytest.raises(FakeRpcError) as caught:
        client.reward("d1", 1.0)
    assert caught.value is errors[-1]
    assert len(stub.calls) == 3
    assert len(sleeps) == 2


def test_non_idempotent_and_non_retryable_calls_fail_at_once() -> None:
    stub = FakeStub(
        {
            "CreateExperiment": [FakeRpcError(UNAVAILABLE)],
            "Pause": [FakeRpcError(UNAVAILABLE)],
            "Assign": [FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)],
        }
    )
    client, sleeps = make_client(stub)
    with pytest.raises(FakeRpcError):
        client.create_experiment(pb.ExperimentSpec(name="e", variants=["a", "b"]))
    with pytest.raises(FakeRpcError):
        client.pause("e")
    with pytest.raises(FakeRpcError):
        client.assign("e")
    assert stub.rpcs() == ["CreateExperiment", "Pause", "Assign"]
    assert sleeps == []


def test_retries_are_throttled_while_most_attempts_fail_and_return_with_successes() -> None:
    """A6 throttling with max_tokens 10, ratio 0.1: four failed attempts of the first call
    leave 6 tokens; the second call's failure leaves 5, not more than half, so it is not
    retried. A failure counts before the check, so a retry needs more than 6 tokens
    before it: 11 successes (6.1, then 5.1 after the failure)."""
    stub = FakeStub({"Assign": [FakeRpcError(EXHAUSTED) for _ in range(5)]})
    client, sleeps = make_client(stub, retries=RetryPolicy(max_attempts=4))
    for _ in range(2):
        with pytest.raises(FakeRpcError):
            client.assign("e")
    assert len(stub.calls) == 4 + 1 and len(sleeps) == 3
    assert client._throttle.tokens == 5.0
    for _ in range(10):
        client.assign("e")  # succeeds
    assert client._throttle.tokens == pytest.approx(6.0)
    stub.script["Assign"] = [FakeRpcError(EXHAUSTED)]
    with pytest.raises(FakeRpcError):
        client.assign("e")  # 5.0 after its failure: still throttled
    client.assign("e")
    client.assign("e")  # 5.2
    assert client._throttle.tokens == pytest.approx(5.2)
    for _ in range(9):
        client.assign("e")  # 6.1
    stub.script["Assign"] = [FakeRpcError(EXHAUSTED), pb.AssignResponse(variant="a")]
    calls = len(stub.calls)
    assert client.assign("e").variant == "a"  # 5.1 after the failure: retried
    assert len(stub.calls) == calls + 2


def test_only_retryable_failures_of_retryable_calls_count() -> None:
    """From a bucket half drained (8 tokens, below its cap so a success would show): a
    NOT_FOUND, or a RESOURCE_EXHAUSTED of a call that is never retried, changes
    nothing."""
    stub = FakeStub(
        {
            "Assign": [FakeRpcError(EXHAUSTED), FakeRpcError(EXHAUSTED)]
            + [FakeRpcError(grpc.StatusCode.NOT_FOUND) for _ in range(20)],
            "CreateExperiment": [FakeRpcError(EXHAUSTED) for _ in range(20)],
        }
    )
    client, _ = make_client(stub, retries=RetryPolicy(max_attempts=2))
    with pytest.raises(FakeRpcError):
        client.assign("e")
    assert client._throttle.tokens == 8.0
    for _ in range(20):
        with pytest.raises(FakeRpcError):
            client.assign("e")
        with pytest.raises(FakeRpcError):
            client.create_experiment(pb.ExperimentSpec(name="e", variants=["a", "b"]))
    assert client._throttle.tokens == 8.0


def test_an_unreachable_server_does_not_throttle_unless_asked() -> None:
    """UNAVAILABLE (a server down or draining) is not an overload: a restart is ridden out
    by every call's retries, however many fail. With UNAVAILABLE among throttle_codes
    (A6 as written) the fifth failed attempt stops them."""
    stub = FakeStub({"Assign": [FakeRpcError(UNAVAILABLE) for _ in range(40)]})
    client, _ = make_client(stub, retries=RetryPolicy(max_attempts=4))
    for _ in range(10):
        with pytest.raises(FakeRpcError):
            client.assign("e")
    assert len(stub.calls) == 40 and client._throttle.tokens == 10.0
    stub = FakeStub({"Assign": [FakeRpcError(UNAVAILABLE) for _ in range(40)]})
    a6 = RetryPolicy(max_attempts=4, throttle_codes=frozenset({UNAVAILABLE, EXHAUSTED}))
    client, _ = make_client(stub, retries=a6)
    for _ in range(2):
        with pytest.raises(FakeRpcError):
            client.assign("e")
    assert len(stub.calls) == 4 + 1


def test_throttle_counts_exactly() -> None:
    """Ratio 0.2: 5 failures (5 tokens), 5 successes (6), 1 failure: exactly 5, not more
    than half, so throttled. Adding 0.2 in floats five times gives 6.000000000000001."""
    throttle = RetryThrottle(10, 0.2)
    for failed in [True] * 5 + [False] * 5 + [True]:
        throttle.record(failed=failed)
    assert throttle.tokens == 5.0 and not throttle.allows_retry()


def test_a_throttle_of_zero_tokens_never_stops_retries() -> None:
    stub = FakeStub({"Reward": [FakeRpcError(EXHAUSTED) for _ in range(40)]})
    client, _ = make_client(stub, retries=RetryPolicy(max_attempts=4, throttle_max_tokens=0))
    for _ in range(10):
        with pytest.raises(FakeRpcError):
            client.reward("d", 1.0)
    assert len(stub.calls) == 40


def test_no_retry_policy_makes_one_attempt() -> None:
    stub = FakeStub({"GetReport": [FakeRpcError(UNAVAILABLE)]})
    client, _ = make_client(stub, retries=NO_RETRY)
    with pytest.raises(FakeRpcError):
        client.get_report("e")
    assert len(stub.calls) == 1


def test_timeout_bounds_the_whole_call_retries_and_backoff_included() -> None:
    """Each attempt gets the time left; a retry that could not finish in time is not
    made."""
    clock = FakeClock()
    stub = FakeStub({"Reward": [FakeRpcError(UNAVAILABLE) for _ in range(5)]})

    def slow(call: Recorded) -> None:  # every attempt takes 0.1 s before failing
        clock.now += 0.1

    stub.on_call = slow
    client = AllocatorClient(
        "unused",
        stub=stub,
        timeout=0.5,
        retries=RetryPolicy(max_attempts=10, initial_backoff=0.1, multiplier=2.0),
        sleep=clock.sleep,
        rand=lambda: 1.0,
        clock=clock,
    )
    with pytest.raises(FakeRpcError):
        client.reward("d1", 1.0)
    # t=0: attempt (0.1 s), wait 0.1; t=0.2: attempt with 0.3 s left (0.1 s); at t=0.3 the
    # next wait (0.2) would leave no time for an attempt, so it gives up there.
    assert [c.timeout for c in stub.calls] == pytest.approx([0.5, 0.3])
    assert clock.sleeps == pytest.approx([0.1])
    assert clock.now - 1000.0 == pytest.approx(0.3)


def test_pushback_longer_than_the_time_left_gives_up_at_once() -> None:
    pushback = [("grpc-retry-pushback-ms", "600000")]
    stub = FakeStub({"Reward": [FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, pushback)]})
    client, sleeps = make_client(stub, timeout=0.1)
    with pytest.raises(FakeRpcError):
        client.reward("d1", 1.0)
    assert sleeps == [] and len(stub.calls) == 1


@pytest.mark.parametrize("token", ["s3cret\n", " s3cret", "sé", "a\tb"])
def test_an_admin_token_that_cannot_be_sent_is_refused_up_front(token: str) -> None:
    with pytest.raises(ValueError, match="admin_token"):
        AllocatorClient("unused", stub=FakeStub(), admin_token=token)


def test_reward_batch_request_takes_numpy_columns() -> None:
    np = pytest.importorskip("numpy")
    request = reward_batch_request(
        "e",
        np.array([1.0, 0.0]),
        event_ids=["x", "y"],
        variants=["a", "b"],
        prediction_scores=np.array([0.25, 0.5]),
    )
    assert list(request.prediction_scores) == [0.25, 0.5]
    empty = reward_batch_request(
        "e", [1.0], event_ids=["x"], variants=["a"], prediction_scores=np.array([])
    )
    assert list(empty.prediction_scores) == []


def test_every_call_carries_a_deadline_and_only_admin_calls_the_token() -> None:
    stub = FakeStub()
    client, _ = make_client(stub, timeout=0.5, admin_token="s3cret")
    client.assign("e")
    client.get_report("e", timeout=10.0)
    client.promote("e", "b", reason="clear winner")
    client.rollback("e")
    client.resume("e")
    assert [call.timeout for call in stub.calls] == [0.5, 10.0, 0.5, 0.5, 0.5]
    bearer = (("authorization", "Bearer s3cret"),)
    assert [call.metadata for call in stub.calls] == [None, None, bearer, bearer, bearer]
    assert stub.calls[2].request == pb.PromoteRequest(
        experiment="e", variant="b", reason="clear winner"
    )


def test_reward_and_reward_event_build_the_oneof() -> None:
    stub = FakeStub({"Reward": [pb.RewardResponse(status=pb.REWARD_STATUS_DUPLICATE)]})
    client, _ = make_client(stub)
    assert client.reward("tok.3", 1.0, prediction_score=0.9) == pb.REWARD_STATUS_DUPLICATE
    client.reward_event("e", "b", "evt-1", 2.5, guardrails={"latency_seconds": 0.02})
    first, second = (call.request for call in stub.calls)
    assert first.WhichOneof("target") == "decision_id"
    assert first.prediction_score == 0.9
    assert second.WhichOneof("target") == "event"
    assert not second.HasField("prediction_score")
    assert second.event == pb.EventTarget(experiment="e", variant="b", event_id="evt-1")
    assert dict(second.guardrails) == {"latency_seconds": 0.02}


def test_add_variant_sets_weight_only_when_given() -> None:
    stub = FakeStub()
    client, _ = make_client(stub)
    client.add_variant("e", "c")
    client.add_variant("e", "d", weight=2.0, reason="retrained")
    assert not stub.calls[0].request.HasField("weight")
    assert stub.calls[1].request.weight == 2.0


def test_list_experiments_follows_pages() -> None:
    page1 = pb.ListExperimentsResponse(
        experiments=[pb.Experiment(spec=pb.ExperimentSpec(name="a"))], next_page_token="p2"
    )
    page2 = pb.ListExperimentsResponse(
        experiments=[pb.Experiment(spec=pb.ExperimentSpec(name="b"))]
    )
    stub = FakeStub({"ListExperiments": [page1, page2]})
    client, _ = make_client(stub)
    names = [e.spec.name for e in client.list_experiments([pb.EXPERIMENT_STATE_RUNNING])]
    assert names == ["a", "b"]
    assert [call.request.page_token for call in stub.calls] == ["", "p2"]


class FakeStream:
    """A server stream: its events, then ``error`` (if any) as the stream's end."""

    def __init__(self, events: Sequence[pb.Event], error: BaseException | None = None) -> None:
        self.responses = [pb.WatchEventsResponse(event=e) for e in events]
        self.error = error
        self.cancelled = False

    def __iter__(self) -> Iterator[pb.WatchEventsResponse]:
        yield from self.responses
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


def test_watch_events_yields_events_and_cancels_the_call() -> None:
    events = [pb.Event(sequence=i, type=pb.EVENT_TYPE_PROMOTED) for i in (7, 8)]
    stream = FakeStream(events)
    stub = FakeStub({"WatchEvents": [stream]})
    client, _ = make_client(stub)
    watch = client.watch_events("e", types=[pb.EVENT_TYPE_PROMOTED], after_sequence=6)
    assert next(watch).sequence == 7
    watch.close()
    assert stream.cancelled
    request = stub.calls[0].request
    assert (request.experiment, list(request.types), request.after_sequence) == (
        "e",
        [pb.EVENT_TYPE_PROMOTED],
        6,
    )
    assert stub.calls[0].timeout is None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"timeout": 0.0}, ValueError),
        ({"timeout": math.inf}, ValueError),
        ({"admin_token": ""}, ValueError),
        ({"retries": 3}, TypeError),
    ],
)
def test_client_validates_its_settings(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        AllocatorClient("localhost:1", stub=FakeStub(), **kwargs)


def test_client_owns_and_closes_a_real_channel() -> None:
    # Channels connect lazily, so nothing listens on these ports and nothing is dialled.
    with AllocatorClient("localhost:1") as plain:
        assert plain.stub is not None
    tls = AllocatorClient("localhost:1", credentials=grpc.ssl_channel_credentials())
    tls.close()
    tls.close()


def test_channels_reconnect_quickly_unless_options_say_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gRPC's own reconnect backoff grows to 120 s; the client's channels cap it at 5 s
    (and start at 0.1 s), and an option the caller passes wins."""
    seen: list[dict[str, Any]] = []
    real = grpc.insecure_channel

    def capture(target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        seen.append(dict(options))
        return real(target, options=options)

    monkeypatch.setattr(grpc, "insecure_channel", capture)
    AllocatorClient("localhost:1").close()
    AllocatorClient("localhost:1", options=[("grpc.max_reconnect_backoff_ms", 30_000)]).close()
    assert seen[0]["grpc.initial_reconnect_backoff_ms"] == 100
    assert seen[0]["grpc.max_reconnect_backoff_ms"] == 5000
    assert "grpc.min_reconnect_backoff_ms" not in seen[0]  # the connect timeout: left alone
    assert seen[1]["grpc.max_reconnect_backoff_ms"] == 30_000


# Batch decisions -----------------------------------------------------------------------


def test_batch_decision_id_expansion() -> None:
    assert batch_decision_id("tok", 0) == "tok.0"
    assert batch_decision_id("a.b", 12) == "a.b.12"
    with pytest.raises(ValueError, match="batch_token"):
        batch_decision_id("", 0)
    with pytest.raises(ValueError, match="index"):
        batch_decision_id("tok", -1)
    with pytest.raises(TypeError, match="index"):
        batch_decision_id("tok", True)


def test_assign_batch_returns_plain_columns_and_lazy_decision_ids() -> None:
    response = pb.AssignBatchResponse(
        variants=["a", "b", "c"],
        variant_indices=[2, 0, 2],
        propensities=[0.5, 0.25, 0.5],
        batch_token="T",
        state=pb.EXPERIMENT_STATE_RUNNING,
        allocation_epoch=4,
    )
    stub = FakeStub({"AssignBatch": [response]})
    client, _ = make_client(stub)
    batch = client.assign_batch("e", 3)
    assert isinstance(batch, BatchAssignment)
    assert len(batch) == 3
    assert batch.variants == ["c", "a", "c"]
    assert batch.variant(1) == "a"
    assert batch.propensities == [0.5, 0.25, 0.5]
    assert type(batch.variant_indices) is list and type(batch.propensities) is list
    assert batch.decision_id(2) == "T.2"
    assert batch.decision_ids() == ["T.0", "T.1", "T.2"]
    assert (batch.state, batch.allocation_epoch) == (pb.EXPERIMENT_STATE_RUNNING, 4)
    with pytest.raises(IndexError):
        batch.decision_id(3)
    with pytest.raises(IndexError):
        batch.decision_id(-1)
    assert stub.calls[0].request == pb.AssignBatchRequest(experiment="e", count=3)


# RewardBatch requests ------------------------------------------------------------------


def test_reward_batch_request_addressing_forms() -> None:
    by_id = reward_batch_request("e", [1.0, 0.0], decision_ids=["d1", "T.4"])
    assert list(by_id.decision_ids) == ["d1", "T.4"] and list(by_id.values) == [1.0, 0.0]
    by_token = reward_batch_request(
        "e", [1.0], batch_token="T", indices=[4], prediction_scores=[0.3]
    )
    assert (by_token.batch_token, list(by_token.indices)) == ("T", [4])
    assert list(by_token.prediction_scores) == [0.3]
    by_event = reward_batch_request("e", [2.0], event_ids=["x"], variant_indices=[1])
    assert (list(by_event.event_ids), list(by_event.variant_indices)) == (["x"], [1])
    assert list(by_event.variants) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"decision_ids": ["d"], "batch_token": "T", "indices": [0]}, "exactly one"),
        ({"decision_ids": ["d", "e"]}, "decision_ids has 2"),
        ({"batch_token": "T"}, "indices"),
        ({"batch_token": "", "indices": [0]}, "non-empty batch_token"),
        ({"event_ids": ["x"]}, "one of variants"),
        ({"event_ids": ["x"], "variants": ["a"], "variant_indices": [0]}, "one of variants"),
        ({"variants": ["a"]}, "event_ids"),
        ({"decision_ids": ["d"], "prediction_scores": [0.1, 0.2]}, "prediction_scores has 2"),
    ],
)
def test_reward_batch_request_rejects_bad_addressing(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reward_batch_request("e", [1.0], **kwargs)


def test_reward_batch_is_sent_as_built() -> None:
    stub = FakeStub()
    client, _ = make_client(stub)
    result = client.reward_batch("e", [1.0, 0.0], batch_token="T", indices=[0, 1])
    assert result.accepted == 2
    assert stub.calls[0].request.batch_token == "T"


# RewardBatcher -------------------------------------------------------------------------


def sent_items(stub: FakeStub) -> list[tuple[str, ...]]:
    """One tuple of ids per RewardBatch request, in send order."""
    return [
        tuple(call.request.decision_ids) or tuple(call.request.event_ids)
        for call in stub.calls
        if call.rpc == "RewardBatch"
    ]


def test_batcher_flushes_by_count_in_the_adding_thread() -> None:
    stub = FakeStub()
    client, _ = make_client(stub)
    with RewardBatcher(client, "e", max_items=3, max_delay_ms=60_000) as batcher:
        for i in range(7):
            batcher.add(f"d{i}", float(i % 2))
        # Synchronous: the third and sixth add sent their batch before returning.
        assert sent_items(stub) == [("d0", "d1", "d2"), ("d3", "d4", "d5")]
    assert sent_items(stub)[-1] == ("d6",)
    assert list(stub.calls[0].request.values) == [0.0, 1.0, 0.0]
    assert all(call.request.experiment == "e" for call in stub.calls)


def test_batcher_flushes_everything_on_close_and_splits_addressing() -> None:
    stub = FakeStub()
    client, _ = make_client(stub)
    batcher = RewardBatcher(client, "e", max_items=100, max_delay_ms=60_000)
    batcher.add("d1", 1.0, prediction_score=0.8)
    batcher.add_event("b", "evt-1", 0.0)
    batcher.add("d2", 0.0)
    assert stub.calls == []
    batcher.close()
    batcher.close()  # idempotent
    assert sent_items(stub) == [("d1", "d2"), ("evt-1",)]
    by_id, by_event = (call.request for call in stub.calls)
    scores = list(by_id.prediction_scores)
    assert scores[0] == 0.8 and math.isnan(scores[1])  # NaN marks "no score"
    assert list(by_event.variants) == ["b"] and list(by_event.prediction_scores) == []
    with pytest.raises(RuntimeError, match="closed"):
        batcher.add("d3", 1.0)


def test_batcher_flushes_by_time_in_the_background() -> None:
    stub = FakeStub()
    sent = threading.Event()
    stub.on_call = lambda call: sent.set()
    client, _ = make_client(stub)
    with RewardBatcher(client, "e", max_items=1000, max_delay_ms=20) as batcher:
        batcher.add("d1", 1.0)
        # 20 ms deadline; 5 s only bounds a hung test, it is not a tolerance.
        assert sent.wait(5.0)
        assert sent_items(stub) == [("d1",)]


def test_batcher_hands_failed_batches_to_on_error() -> None:
    error = FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION)  # e.g. archived: all of it
    stub = FakeStub({"RewardBatch": [error]})
    client, _ = make_client(stub)
    failures: list[tuple[BaseException, pb.RewardBatchRequest]] = []
    with RewardBatcher(
        client,
        "e",
        max_items=2,
        max_delay_ms=60_000,
        on_error=lambda exc, req: failures.append((exc, req)),
    ) as batcher:
        batcher.add("d1", 1.0)
        batcher.add("d2", 1.0)  # first batch fails
        batcher.add("d3", 1.0)
        batcher.add("d4", 1.0)  # second batch goes through
    assert len(failures) == 1
    assert failures[0][0] is error
    assert list(failures[0][1].decision_ids) == ["d1", "d2"]
    assert sent_items(stub) == [("d1", "d2"), ("d3", "d4")]


def test_batcher_sends_around_a_bad_reward_in_halves() -> None:
    """The server rejects a whole batch (recording none of it) for one bad decision id:
    the batcher resends halves, so the 7 good rewards are recorded and only the bad one
    reaches on_error."""
    stub = FakeStub()
    real = stub.__getattr__("RewardBatch")

    def reward_batch(request: pb.RewardBatchRequest, **kwargs: Any) -> Any:
        if "bad" in request.decision_ids:
            with stub.lock:
                stub.calls.append(Recorded("RewardBatch", request, None, None))
            raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)
        return real(request, **kwargs)

    stub.RewardBatch = reward_batch  # type: ignore[attr-defined]
    client, _ = make_client(stub)
    failures: list[pb.RewardBatchRequest] = []
    ids = ["d0", "d1", "d2", "bad", "d4", "d5", "d6", "d7"]
    with RewardBatcher(
        client,
        "e",
        max_items=100,
        max_delay_ms=60_000,
        on_error=lambda exc, req: failures.append(req),
    ) as batcher:
        for decision_id in ids:
            batcher.add(decision_id, 1.0)
    assert [list(req.decision_ids) for req in failures] == [["bad"]]
    accepted = [
        d
        for call in stub.calls
        if "bad" not in call.request.decision_ids
        for d in call.request.decision_ids
    ]
    assert sorted(accepted) == sorted(d for d in ids if d != "bad")
    assert len(stub.calls) == 1 + 2 + 2 + 2  # 8, then halves of 4, of 2, of 1 around "bad"


def test_a_failing_on_error_does_not_stop_the_batcher() -> None:
    """on_error raises for the decision-id half of a timed flush: the event half of that
    flush is still sent, and the timer thread goes on flushing later rewards."""
    stub = FakeStub({"RewardBatch": [FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION)]})
    client, _ = make_client(stub)

    def explode(exc: BaseException, req: pb.RewardBatchRequest) -> None:
        raise RuntimeError("handler bug")

    batcher = RewardBatcher(client, "e", max_items=100, max_delay_ms=20, on_error=explode)
    try:
        batcher.add("d1", 1.0)
        batcher.add_event("a", "e1", 1.0)
        _wait_for(lambda: len(stub.calls) == 2)
        batcher.add("d2", 1.0)
        _wait_for(lambda: len(stub.calls) == 3)  # the timer thread is alive
    finally:
        batcher.close()
    assert sent_items(stub) == [("d1",), ("e1",), ("d2",)]


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.005)


def test_batcher_logs_rewards_the_server_found_expired(caplog: pytest.LogCaptureFixture) -> None:
    response = pb.RewardBatchResponse(accepted=1, expired=2)
    stub = FakeStub({"RewardBatch": [response]})
    client, _ = make_client(stub)
    with RewardBatcher(client, "e", max_items=3) as batcher:
        for decision_id in ("d1", "d2", "d3"):
            batcher.add(decision_id, 1.0)
    assert "2 of 3 rewards of 'e' arrived after their decision's TTL" in caplog.text


def test_close_waits_for_a_send_in_progress_in_another_thread() -> None:
    stub = FakeStub()
    entered, release = threading.Event(), threading.Event()

    def block(call: Recorded) -> None:
        entered.set()
        release.wait(10)

    stub.on_call = block
    client, _ = make_client(stub)
    batcher = RewardBatcher(client, "e", max_items=1, max_delay_ms=60_000)
    adder = threading.Thread(target=batcher.add, args=("d1", 1.0))
    adder.start()  # a count-triggered send, in the adding thread
    assert entered.wait(10)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # still waiting for the send
    release.set()
    closer.join(10)
    adder.join(10)
    assert not closer.is_alive()


def test_a_server_that_stays_down_gives_unavailable_not_deadline_exceeded() -> None:
    """The retry waits for the channel to reconnect within the deadline; when it never
    does, the caller learns the server was unreachable (nothing can have been acted on),
    not DEADLINE_EXCEEDED."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        # 2 s: time for a refused first attempt even on a starved machine, then the wait.
        AllocatorClient(f"127.0.0.1:{port}", timeout=2.0) as client,
        pytest.raises(grpc.RpcError) as err,
    ):
        client.reward("d1", 1.0)
    assert status_code(err.value) == UNAVAILABLE


@pytest.mark.parametrize("where", ["add", "flush", "timer"])
def test_close_from_on_error_does_not_deadlock(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """on_error runs inside a send; closing the batcher from it (to give up on a dead
    server, say) must not wait for that very send, nor join the timer thread from itself."""
    stub = FakeStub({"RewardBatch": [FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION)]})
    client, _ = make_client(stub)
    batcher: RewardBatcher | None = None

    def give_up(exc: BaseException, req: pb.RewardBatchRequest) -> None:
        assert batcher is not None
        batcher.close()

    max_items, delay = (1, 60_000.0) if where == "add" else (100, 60_000.0)
    if where == "timer":
        delay = 10.0
    batcher = RewardBatcher(client, "e", max_items=max_items, max_delay_ms=delay, on_error=give_up)

    def work() -> None:
        assert batcher is not None
        batcher.add("d1", 1.0)
        if where == "flush":
            batcher.flush()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    _wait_for(lambda: batcher._closed and not batcher._timer.is_alive())
    with pytest.raises(RuntimeError, match="closed"):
        batcher.add("d2", 1.0)
    assert "on_error failed" not in caplog.text  # close() itself did not raise


def test_failing_sends_in_two_threads_that_both_close_do_not_deadlock() -> None:
    """Two sends fail at once (the timer's and a count-triggered one) and each on_error
    closes the batcher: each close must not wait for the other thread's send, which is
    itself waiting in its close."""
    gate = threading.Barrier(2, timeout=10)
    stub = FakeStub({"RewardBatch": [FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION)] * 2})
    client, _ = make_client(stub)
    batcher: RewardBatcher | None = None

    def give_up(exc: BaseException, req: pb.RewardBatchRequest) -> None:
        assert batcher is not None
        gate.wait()  # both sends are in on_error now
        batcher.close()

    batcher = RewardBatcher(client, "e", max_items=2, max_delay_ms=20, on_error=give_up)
    batcher.add("d1", 1.0)  # flushed by the timer in 20 ms
    _wait_for(lambda: len(stub.calls) == 1)

    def add_two() -> None:  # the second add sends d2, d3 and fails too
        assert batcher is not None
        batcher.add("d2", 1.0)
        batcher.add("d3", 1.0)

    adder = threading.Thread(target=add_two)
    adder.start()
    adder.join(10)
    assert not adder.is_alive()
    _wait_for(lambda: not batcher._timer.is_alive())


def test_on_error_closing_the_client_of_two_batchers_does_not_deadlock() -> None:
    """Both timers fail at once and close the client, which closes both batchers: each
    timer would join the other, itself joining the first."""
    gate = threading.Barrier(2, timeout=10)
    stub = FakeStub({"RewardBatch": [FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION)] * 2})
    client, _ = make_client(stub)

    def shut_down(exc: BaseException, req: pb.RewardBatchRequest) -> None:
        gate.wait()
        client.close()

    one = RewardBatcher(client, "e", max_delay_ms=10, on_error=shut_down)
    two = RewardBatcher(client, "e", max_delay_ms=10, on_error=shut_down)
    one.add("d1", 1.0)
    two.add("d2", 1.0)
    _wait_for(lambda: not one._timer.is_alive() and not two._timer.is_alive())
    assert not client._batchers


def test_a_close_between_taking_a_batch_and_sending_it_waits_for_the_send() -> None:
    """A batch taken from the buffer counts as being sent from that moment: a close()
    (the client's, say) in the gap before its RPC must wait for it, not close the channel
    under it."""
    stub = FakeStub()
    client, _ = make_client(stub)
    batcher = RewardBatcher(client, "e", max_delay_ms=60_000)
    batcher.add("d1", 1.0)
    with batcher._cond:
        taken = batcher._take()  # as add/flush/the timer do, before sending outside the lock
    closer = threading.Thread(target=client.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waiting for the taken batch
    batcher._send(taken)
    closer.join(10)
    assert not closer.is_alive()
    assert sent_items(stub) == [("d1",)]


def test_a_timed_out_wait_for_the_channel_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A readiness future left running stays subscribed to the channel (and keeps asking
    it to connect) for as long as the server is down: one per failed call."""
    futures: list[Any] = []

    class NeverReady:
        cancelled = False

        def result(self, timeout: float | None = None) -> None:
            raise grpc.FutureTimeoutError()

        def cancel(self) -> bool:
            self.cancelled = True
            return True

    def ready_future(channel: grpc.Channel) -> NeverReady:
        futures.append(NeverReady())
        return futures[-1]

    monkeypatch.setattr(grpc, "channel_ready_future", ready_future)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The wait ends at once (NeverReady); the deadline only has to leave room for a retry.
    with AllocatorClient(f"127.0.0.1:{port}", timeout=5.0) as client:
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                client.reward("d1", 1.0)
    assert len(futures) == 3 and all(f.cancelled for f in futures)


def test_closing_the_client_flushes_its_batchers_first() -> None:
    """``with AllocatorClient(...)`` ends before interpreter exit: the batcher's rewards
    must go out while the channel still works, not fail at exit on a closed one."""
    stub = FakeStub()
    client, _ = make_client(stub)
    with client:
        batcher = RewardBatcher(client, "e", max_delay_ms=60_000)
        batcher.add("d1", 1.0)
    assert sent_items(stub) == [("d1",)]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.add("d2", 1.0)


def test_a_batch_bad_throughout_is_not_split_down_to_every_item() -> None:
    """Every one of 1,000 rewards is bad (ids signed with a retired key, say): halving
    would cost 1,999 calls; the split budget (8 per bit of n: 80) stops it, and what is
    left goes to on_error whole."""
    stub = FakeStub({"RewardBatch": [FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)] * 5000})
    client, _ = make_client(stub)
    failed: list[int] = []
    with RewardBatcher(
        client,
        "e",
        max_items=1000,
        max_delay_ms=60_000,
        on_error=lambda exc, req: failed.append(len(req.values)),
    ) as batcher:
        for i in range(1000):
            batcher.add(f"d{i}", 1.0)
    assert len(stub.calls) <= 1 + 2 * 80
    assert sum(failed) == 1000  # every reward reached on_error exactly once


def test_rewards_still_buffered_at_interpreter_exit_are_sent() -> None:
    """A script that never closes its batcher: the buffered rewards go out at exit."""
    script = textwrap.dedent(
        """
        from allocator_client import AllocatorClient, RewardBatcher, pb

        class Stub:
            def RewardBatch(self, request, timeout=None, metadata=None, wait_for_ready=None):
                print("sent", list(request.decision_ids), flush=True)
                return pb.RewardBatchResponse(accepted=len(request.values))

        batcher = RewardBatcher(AllocatorClient("x", stub=Stub()), "e", max_delay_ms=60_000)
        batcher.add("d1", 1.0)
        batcher.add("d2", 0.0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "sent ['d1', 'd2']"


def test_batcher_is_thread_safe() -> None:
    stub = FakeStub()
    client, _ = make_client(stub)
    batcher = RewardBatcher(client, "e", max_items=64, max_delay_ms=5)

    def produce(worker: int) -> None:
        for i in range(250):
            batcher.add(f"w{worker}-{i}", 1.0)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.close()
    ids = [item for batch in sent_items(stub) for item in batch]
    assert len(ids) == 1000
    assert len(set(ids)) == 1000
    assert all(len(batch) <= 64 for batch in sent_items(stub))


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.add("", 1.0), ValueError),
        (lambda b: b.add("d", math.nan), ValueError),
        (lambda b: b.add("d", "1"), TypeError),
        (lambda b: b.add("d", 1.0, prediction_score=math.inf), ValueError),
        (lambda b: b.add_event("", "evt", 1.0), ValueError),
        (lambda b: b.add_event("b", "", 1.0), ValueError),
    ],
)
def test_batcher_rejects_bad_rewards_before_buffering(
    call: Callable[[RewardBatcher], None], error: type[Exception]
) -> None:
    stub = FakeStub()
    client, _ = make_client(stub)
    with (
        RewardBatcher(client, "e", max_items=1, max_delay_ms=60_000) as batcher,
        pytest.raises(error),
    ):
        call(batcher)
    assert stub.calls == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"experiment": ""}, ValueError),
        ({"max_items": 0}, ValueError),
        ({"max_items": 1.5}, TypeError),
        ({"max_delay_ms": 0.0}, ValueError),
        ({"max_delay_ms": math.nan}, ValueError),
    ],
)
def test_batcher_validates_its_settings(kwargs: dict[str, Any], error: type[Exception]) -> None:
    client, _ = make_client(FakeStub())
    settings: dict[str, Any] = {"experiment": "e", **kwargs}
    with pytest.raises(error):
        RewardBatcher(client, **settings)


def _events(*sequences: int) -> list[pb.Event]:
    return [pb.Event(sequence=i, type=pb.EVENT_TYPE_PROMOTED) for i in sequences]


def test_watch_events_resumes_after_the_last_event_seen() -> None:
    stub = FakeStub(
        {
            "WatchEvents": [
                FakeStream(_events(7, 8), FakeRpcError(grpc.StatusCode.UNAVAILABLE)),
                # Dropped for falling behind, before any event of this connection.
                FakeStream([], FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED)),
                FakeStream(_events(9)),
            ]
        }
    )
    client, sleeps = make_client(stub)
    got = [e.sequence for e in client.watch_events("e", after_sequence=6, resume=True)]
    assert got == [7, 8, 9]
    assert [c.request.after_sequence for c in stub.calls] == [6, 8, 8]
    assert all(c.request.experiment == "e" for c in stub.calls)
    # Backoff of failures in a row: 1st, then 2nd retry (rand() = 1: the cap).
    assert sleeps == pytest.approx([0.05, 0.1])


def test_watch_events_gives_up_and_does_not_resume_other_codes() -> None:
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    stub = FakeStub({"WatchEvents": [FakeStream([], unavailable) for _ in range(5)]})
    client, sleeps = make_client(stub, retries=RetryPolicy(max_attempts=3))
    with pytest.raises(grpc.RpcError):
        list(client.watch_events(resume=True))
    assert len(stub.calls) == 3 and len(sleeps) == 2
    for code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND):
        stub = FakeStub({"WatchEvents": [FakeStream(_events(1), FakeRpcError(code))]})
        client, sleeps = make_client(stub)
        with pytest.raises(grpc.RpcError):
            list(client.watch_events(resume=True))
        assert len(stub.calls) == 1 and sleeps == []
    # Without resume, even UNAVAILABLE ends the watch.
    stub = FakeStub({"WatchEvents": [FakeStream(_events(1), unavailable)]})
    client, sleeps = make_client(stub)
    with pytest.raises(grpc.RpcError):
        list(client.watch_events())
    assert len(stub.calls) == 1

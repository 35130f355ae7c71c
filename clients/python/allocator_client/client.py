"""Thin typed client for the allocator gRPC service (allocator.v1)."""

from __future__ import annotations

import atexit
import collections
import logging
import math
import random
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from allocator_client.v1 import allocator_pb2 as pb
from allocator_client.v1 import allocator_pb2_grpc as pb_grpc

_log = logging.getLogger(__name__)

# Not DEADLINE_EXCEEDED: an attempt gets all of the call's remaining time, so none is left
# after it, and the server may have acted on it (an Assign whose answer was lost).
RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
# Channel defaults (``options`` overrides them): gRPC's own reconnect backoff starts at 1 s
# and grows to 120 s, so a client would notice a restarted server seconds to minutes late,
# and retries waiting for the channel (below) would wait that long. Not
# grpc.min_reconnect_backoff_ms: core uses it as the connect attempt's minimum timeout
# (20 s), and a short one fails slow TLS handshakes (grpc/grpc#12830, #33593).
CHANNEL_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
)
PUSHBACK_KEY = "grpc-retry-pushback-ms"
# How a WatchEvents stream ends when reconnecting helps (see watch_events).
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _require_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, applied to idempotent calls only.

    Retry n (1-based) waits ``uniform(0, min(max_backoff, initial_backoff *
    multiplier ** (n - 1)))`` seconds, unless the server sent a pushback hint.

    >>> policy = RetryPolicy(max_attempts=3, initial_backoff=0.1)
    >>> policy.delay(grpc.StatusCode.UNAVAILABLE, 1, idempotent=True, rand=lambda: 1.0)
    0.1
    """

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES
    # Retry throttling (gRPC design A6), per client: see RetryThrottle. 0 turns it off.
    throttle_max_tokens: float = 10.0
    throttle_token_ratio: float = 0.1
    # Failures that drain the bucket: the server's "overloaded" answer. Not UNAVAILABLE:
    # a server that can't be reached gets no load from a retry (it first waits for the
    # channel to connect), and this server refuses cheaply when its store is down or it
    # is draining; throttling those would only turn a restart ridden out within each
    # call's deadline into failed calls. A6 counts every retryable code: add UNAVAILABLE.
    throttle_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("initial_backoff", "max_backoff", "multiplier"):
            _require_finite(name, getattr(self, name))
        if self.initial_backoff < 0:
            raise ValueError(f"initial_backoff must be >= 0, got {self.initial_backoff}")
        if self.max_backoff < self.initial_backoff:
            raise ValueError(f"max_backoff {self.max_backoff} < initial {self.initial_backoff}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        for name in ("codes", "throttle_codes"):
            if not all(isinstance(code, grpc.StatusCode) for code in getattr(self, name)):
                raise TypeError(f"{name} must hold grpc.StatusCode values")
        for name in ("throttle_max_tokens", "throttle_token_ratio"):
            _require_finite(name, getattr(self, name))
        if not 0 <= self.throttle_max_tokens <= 1000:  # A6's bounds
            raise ValueError(
                f"throttle_max_tokens must be in [0, 1000], got {self.throttle_max_tokens}"
            )
        if not 0.001 <= self.throttle_token_ratio <= 1:  # A6: 3 decimal places
            raise ValueError(
                f"throttle_token_ratio must be in [0.001, 1], got {self.throttle_token_ratio}"
            )

    def backoff(self, retry: int, rand: Callable[[], float]) -> float:
        """Jittered wait in seconds before retry number ``retry`` (1 = first retry)."""
        if retry < 1:
            raise ValueError(f"retry must be >= 1, got {retry}")
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        # Full jitter (uniform on [0, cap]): after an outage many clients fail at once, and
        # spreading their retries over the whole window avoids a synchronized second wave.
        return cap * rand()

    def delay(
        self,
        code: grpc.StatusCode | None,
        attempt: int,
        *,
        idempotent: bool,
        rand: Callable[[], float],
        pushback: float | None = None,
    ) -> float | None:
        """Seconds to wait before retrying after failed ``attempt`` (1-based); None: give up.

        ``pushback`` is the server's ``grpc-retry-pushback-ms`` hint in seconds; a negative
        hint means "do not retry" (gRPC retry design A6).
        """
        if not idempotent or code not in self.codes or attempt >= self.max_attempts:
            return None
        if pushback is not None:
            return None if pushback < 0 else pushback
        return self.backoff(attempt, rand)


class RetryThrottle:
    """Retry throttling of gRPC's retry design (A6), one per client.

    A bucket of ``max_tokens`` tokens loses 1 for every attempt of a retryable call that
    fails with one of ``RetryPolicy.throttle_codes`` (by default RESOURCE_EXHAUSTED, the
    server's overload answer) and gains ``token_ratio`` for every one that succeeds (kept
    within [0, max_tokens]; other outcomes change nothing). A retry is made only while
    more than half of the tokens are left. When the server turns most calls away, every
    call then makes one attempt instead of ``max_attempts``, so a fleet's retries don't
    multiply the load that is failing it; as calls succeed again, retries return.
    Counted in thousandths of a token, as A6 allows three decimals (and grpc-java
    counts), so repeated ratios add up exactly. Thread-safe; ``max_tokens=0`` never
    throttles.
    """

    def __init__(self, max_tokens: float, token_ratio: float) -> None:
        self._max = round(max_tokens * 1000)
        self._ratio = round(token_ratio * 1000)
        self._milli = self._max
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        """Tokens left now."""
        return self._milli / 1000

    def record(self, *, failed: bool) -> None:
        """Count one attempt's outcome (``failed``: answered with a throttle code)."""
        if self._max == 0:
            return
        with self._lock:
            if failed:
                self._milli = max(0, self._milli - 1000)
            else:
                self._milli = min(self._max, self._milli + self._ratio)

    def allows_retry(self) -> bool:
        """Whether more than half the tokens are left (always, when off)."""
        return self._max == 0 or 2 * self._milli > self._max


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status code of an error raised by a call, or None if it has none."""
    code = getattr(error, "code", None)
    if not callable(code):
        return None
    value = code()
    return value if isinstance(value, grpc.StatusCode) else None


def pushback_seconds(error: BaseException) -> float | None:
    """The server's retry pushback hint in seconds, -1.0 if it forbids a retry, None if absent."""
    trailing = getattr(error, "trailing_metadata", None)
    if not callable(trailing):
        return None
    for key, value in trailing() or ():
        if key == PUSHBACK_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            # A6: anything but a non-negative integer means the server wants no retry.
            return int(text) / 1000.0 if text.isdigit() else -1.0
    return None


def _header_safe(token: str) -> bool:
    """Whether ``token`` can be sent as-is in a metadata value."""
    return bool(token) and token.isascii() and token.isprintable() and token == token.strip()


def batch_decision_id(batch_token: str, index: int) -> str:
    """Decision id of item ``index`` of an AssignBatch response: ``<batch_token>.<index>``."""
    if not isinstance(batch_token, str) or not batch_token:
        raise ValueError("batch_token must be a non-empty string")
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return f"{batch_token}.{index}"


@dataclass(frozen=True, slots=True)
class BatchAssignment:
    """The decisions of one AssignBatch call, columnar; decision ids are built on demand.

    >>> batch = BatchAssignment("tok", ("a", "b"), [1, 0], [0.7, 0.3],
    ...                         pb.EXPERIMENT_STATE_RUNNING, 3)
    >>> batch.variants, batch.decision_id(1)
    (['b', 'a'], 'tok.1')
    """

    batch_token: str
    names: tuple[str, ...]
    variant_indices: list[int]
    propensities: list[float]
    state: pb.ExperimentState
    allocation_epoch: int

    @classmethod
    def from_response(cls, response: pb.AssignBatchResponse) -> BatchAssignment:
        """Copy an AssignBatchResponse into plain Python lists."""
        return cls(
            batch_token=response.batch_token,
            names=tuple(response.variants),
            variant_indices=list(response.variant_indices),
            propensities=list(response.propensities),
            state=response.state,
            allocation_epoch=response.allocation_epoch,
        )

    def __len__(self) -> int:
        return len(self.variant_indices)

    @property
    def variants(self) -> list[str]:
        """Variant name per decision."""
        names = self.names
        return [names[i] for i in self.variant_indices]

    def variant(self, i: int) -> str:
        """Variant name of decision ``i``."""
        return self.names[self.variant_indices[i]]

    def decision_id(self, i: int) -> str:
        """Decision id of decision ``i`` (pass it to Reward)."""
        if not 0 <= i < len(self.variant_indices):
            raise IndexError(f"decision {i} out of range for a batch of {len(self)}")
        return batch_decision_id(self.batch_token, i)

    def decision_ids(self) -> list[str]:
        """All decision ids, in order."""
        prefix = f"{self.batch_token}."
        return [f"{prefix}{i}" for i in range(len(self.variant_indices))]


def reward_batch_request(
    experiment: str,
    values: Sequence[float],
    *,
    decision_ids: Sequence[str] | None = None,
    batch_token: str | None = None,
    indices: Sequence[int] | None = None,
    event_ids: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    variant_indices: Sequence[int] | None = None,
    prediction_scores: Sequence[float] | None = None,
) -> pb.RewardBatchRequest:
    """Build a RewardBatchRequest, checking that exactly one addressing form is used."""
    forms = {
        "decision_ids": decision_ids is not None,
        "batch_token": batch_token is not None or indices is not None,
        "event_ids": event_ids is not None or variants is not None or variant_indices is not None,
    }
    used = [name for name, present in forms.items() if present]
    if len(used) != 1:
        raise ValueError(f"use exactly one of decision_ids, batch_token, event_ids; got {used}")
    n = len(values)
    # len(), not truthiness: a NumPy column has no truth value.
    scores = None if prediction_scores is None or len(prediction_scores) == 0 else prediction_scores
    columns: dict[str, Sequence[Any] | None] = {"prediction_scores": scores}
    if decision_ids is not None:
        columns["decision_ids"] = decision_ids
    elif forms["batch_token"]:
        if not batch_token or indices is None:
            raise ValueError("batch_token addressing needs a non-empty batch_token and indices")
        columns["indices"] = indices
    else:
        if event_ids is None or (variants is None) == (variant_indices is None):
            raise ValueError("event addressing needs event_ids and one of variants/variant_indices")
        columns.update(event_ids=event_ids, variants=variants, variant_indices=variant_indices)
    for name, column in columns.items():
        if column is not None and len(column) != n:
            raise ValueError(f"{name} has {len(column)} items, values has {n}")
    request = pb.RewardBatchRequest(experiment=experiment, values=values)
    if batch_token is not None:
        request.batch_token = batch_token
    for name, column in columns.items():
        if column is not None:
            getattr(request, name).extend(column)
    return request


class AllocatorClient:
    """Blocking client with deadlines on every call and retries for idempotent calls.

    Assign, AssignBatch, Reward*, Get*/List* and GetReport are retried on UNAVAILABLE and
    RESOURCE_EXHAUSTED; CreateExperiment, AddVariant, Archive and the admin calls are never
    retried. ``timeout`` is the deadline of the whole call, its retries and their backoff
    included: each attempt gets the time left, and a retry first waits for the channel to
    reconnect within it (if it never does, the UNAVAILABLE is raised). An Assign whose
    first attempt reached the
    server but whose answer was lost is a decision nobody serves; on an experiment with a
    ``default_reward`` it later receives that default.

    >>> with AllocatorClient("localhost:50051", admin_token="s3cret") as client:
    ...     choice = client.assign("ranker", unit_id="user-42")
    ...     client.reward(choice.decision_id, 1.0)
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 2.0,
        admin_token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        retries: RetryPolicy = DEFAULT_RETRY,
        options: Sequence[tuple[str, Any]] = (),
        stub: Any = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _require_finite("timeout", timeout)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if admin_token is not None and not _header_safe(admin_token):
            # Checked here: a token read from a file with its newline would otherwise make
            # every admin call fail later with gRPC's "invalid metadata".
            raise ValueError(
                "admin_token must be non-empty printable ASCII without surrounding whitespace"
            )
        if not isinstance(retries, RetryPolicy):
            raise TypeError(f"retries must be a RetryPolicy, got {type(retries).__name__}")
        self._timeout = float(timeout)
        self._retries = retries
        self._throttle = RetryThrottle(retries.throttle_max_tokens, retries.throttle_token_ratio)
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        self._admin_metadata: tuple[tuple[str, str], ...] | None = (
            None if admin_token is None else (("authorization", f"Bearer {admin_token}"),)
        )
        self._channel: grpc.Channel | None = None
        self._batchers: weakref.WeakSet[RewardBatcher] = weakref.WeakSet()
        if stub is None:
            merged = list({**dict(CHANNEL_DEFAULTS), **dict(options)}.items())
            if credentials is None:
                self._channel = grpc.insecure_channel(target, options=merged)
            else:
                self._channel = grpc.secure_channel(target, credentials, options=merged)
            stub = pb_grpc.AllocatorStub(self._channel)
        self._stub = stub

    @property
    def stub(self) -> Any:
        """The generated stub, for the streaming RPCs this class does not wrap."""
        return self._stub

    def close(self) -> None:
        """Close the RewardBatchers built on this client (flushing them, while the channel
        still works), then the channel it opened (not one behind an injected stub)."""
        for batcher in list(self._batchers):
            batcher.close()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> AllocatorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ready_within(self, seconds: float) -> bool:
        """Whether the channel this client owns connects within ``seconds`` (True at once
        for an injected stub: its channel is not ours to watch)."""
        if self._channel is None:
            return True
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=seconds)
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()  # else it stays subscribed to the channel's state
        return True

    def _call(
        self,
        rpc: str,
        request: Any,
        *,
        idempotent: bool,
        admin: bool = False,
        timeout: float | None = None,
    ) -> Any:
        method = getattr(self._stub, rpc)
        budget = self._timeout if timeout is None else timeout
        _require_finite("timeout", budget)
        if budget <= 0:
            raise ValueError(f"timeout must be > 0, got {budget}")
        end = self._clock() + budget
        metadata = self._admin_metadata if admin else None
        attempt = 1
        remaining = budget
        while True:
            try:
                response = method(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as error:
                code = status_code(error)
                # As in gRPC, only calls that may be retried count, and only failures that
                # say the server is overloaded (not, say, INVALID_ARGUMENT).
                if idempotent and code in self._retries.throttle_codes:
                    self._throttle.record(failed=True)
                wait = self._retries.delay(
                    code,
                    attempt,
                    idempotent=idempotent,
                    rand=self._rand,
                    pushback=pushback_seconds(error),
                )
                remaining = end - self._clock()
                if wait is None or wait >= remaining or not self._throttle.allows_retry():
                    raise  # no retry, none that could finish in the deadline, or throttled
                _log.debug("%s failed (%s), retry %d in %.3fs", rpc, error, attempt, wait)
                self._sleep(wait)
                remaining = end - self._clock()
                # The retry waits (within the deadline) for the channel to reconnect rather
                # than failing at once between two connection attempts; if it never does,
                # the caller gets this UNAVAILABLE, not a DEADLINE_EXCEEDED that would
                # suggest the server may have acted.
                if remaining <= 0 or not self._ready_within(remaining):
                    raise
                remaining = end - self._clock()
                attempt += 1
            else:
                if idempotent:
                    self._throttle.record(failed=False)
                return response

    # Experiments -------------------------------------------------------------------------

    def create_experiment(
        self, spec: pb.ExperimentSpec, *, timeout: float | None = None
    ) -> pb.Experiment:
        """Create an experiment (never retried: a retry could meet ALREADY_EXISTS)."""
        request = pb.CreateExperimentRequest(spec=spec)
        response = self._call(
            "CreateExperiment", request, idempotent=False, admin=True, timeout=timeout
        )
        return response.experiment

    def get_experiment(self, experiment: str, *, timeout: float | None = None) -> pb.Experiment:
        """One experiment by name."""
        request = pb.GetExperimentRequest(experiment=experiment)
        response = self._call("GetExperiment", request, idempotent=True, timeout=timeout)
        return response.experiment

    def list_experiments(
        self,
        states: Iterable[pb.ExperimentState] = (),
        *,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> list[pb.Experiment]:
        """All experiments in ``states`` (all states if empty), following pagination."""
        experiments: list[pb.Experiment] = []
        wanted = list(states)
        page_token = ""
        while True:
            request = pb.ListExperimentsRequest(
                states=wanted, page_size=page_size, page_token=page_token
            )
            response = self._call("ListExperiments", request, idempotent=True, timeout=timeout)
            experiments.extend(response.experiments)
            page_token = response.next_page_token
            if not page_token:
                return experiments

    def archive_experiment(
        self, experiment: str, *, reason: str = "", timeout: float | None = None
    ) -> pb.Experiment:
        """Archive an experiment."""
        request = pb.ArchiveExperimentRequest(experiment=experiment, reason=reason)
        response = self._call(
            "ArchiveExperiment", request, idempotent=False, admin=True, timeout=timeout
        )
        return response.experiment

    def add_variant(
        self,
        experiment: str,
        variant: str,
        *,
        weight: float | None = None,
        reason: str = "",
        timeout: float | None = None,
    ) -> pb.Experiment:
        """Add a variant (e.g. a retrained model) to a live experiment."""
        request = pb.AddVariantRequest(experiment=experiment, variant=variant, reason=reason)
        if weight is not None:
            request.weight = weight
        response = self._call("AddVariant", request, idempotent=False, admin=True, timeout=timeout)
        return response.experiment

    # Decisions ---------------------------------------------------------------------------

    def assign(
        self,
        experiment: str,
        *,
        unit_id: str = "",
        context: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> pb.AssignResponse:
        """Pick a variant for one request."""
        request = pb.AssignRequest(experiment=experiment, unit_id=unit_id, context=context)
        return self._call("Assign", request, idempotent=True, timeout=timeout)

    def assign_batch(
        self,
        experiment: str,
        count: int = 0,
        *,
        unit_ids: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> BatchAssignment:
        """Pick variants for ``count`` requests (or one per unit id)."""
        request = pb.AssignBatchRequest(experiment=experiment, count=count, unit_ids=unit_ids)
        response = self._call("AssignBatch", request, idempotent=True, timeout=timeout)
        return BatchAssignment.from_response(response)

    # Rewards (idempotent by decision id / event id, so always retried) ---------------------

    def reward(
        self,
        decision_id: str,
        value: float,
        *,
        guardrails: Mapping[str, float] | None = None,
        prediction_score: float | None = None,
        timeout: float | None = None,
    ) -> pb.RewardStatus:
        """Reward one decision; returns ACCEPTED, DUPLICATE or EXPIRED."""
        request = pb.RewardRequest(decision_id=decision_id, value=value, guardrails=guardrails)
        return self._send_reward(request, prediction_score, timeout)

    def reward_event(
        self,
        experiment: str,
        variant: str,
        event_id: str,
        value: float,
        *,
        guardrails: Mapping[str, float] | None = None,
        prediction_score: float | None = None,
        timeout: float | None = None,
    ) -> pb.RewardStatus:
        """Reward an event keyed by the caller's own id; returns the reward status."""
        target = pb.EventTarget(experiment=experiment, variant=variant, event_id=event_id)
        request = pb.RewardRequest(event=target, value=value, guardrails=guardrails)
        return self._send_reward(request, prediction_score, timeout)

    def _send_reward(
        self, request: pb.RewardRequest, prediction_score: float | None, timeout: float | None
    ) -> pb.RewardStatus:
        if prediction_score is not None:
            request.prediction_score = prediction_score
        response = self._call("Reward", request, idempotent=True, timeout=timeout)
        return response.status

    def reward_batch(
        self,
        experiment: str,
        values: Sequence[float],
        *,
        decision_ids: Sequence[str] | None = None,
        batch_token: str | None = None,
        indices: Sequence[int] | None = None,
        event_ids: Sequence[str] | None = None,
        variants: Sequence[str] | None = None,
        variant_indices: Sequence[int] | None = None,
        prediction_scores: Sequence[float] | None = None,
        timeout: float | None = None,
    ) -> pb.RewardBatchResponse:
        """Reward many items of one experiment; address them in exactly one way."""
        request = reward_batch_request(
            experiment,
            values,
            decision_ids=decision_ids,
            batch_token=batch_token,
            indices=indices,
            event_ids=event_ids,
            variants=variants,
            variant_indices=variant_indices,
            prediction_scores=prediction_scores,
        )
        return self.send_reward_batch(request, timeout=timeout)

    def send_reward_batch(
        self, request: pb.RewardBatchRequest, *, timeout: float | None = None
    ) -> pb.RewardBatchResponse:
        """Send a prebuilt RewardBatchRequest."""
        return self._call("RewardBatch", request, idempotent=True, timeout=timeout)

    # Reports and admin -------------------------------------------------------------------

    def get_report(self, experiment: str, *, timeout: float | None = None) -> pb.GetReportResponse:
        """Bayesian and frequentist report of an experiment."""
        request = pb.GetReportRequest(experiment=experiment)
        return self._call("GetReport", request, idempotent=True, timeout=timeout)

    def promote(
        self,
        experiment: str,
        variant: str = "",
        *,
        reason: str = "",
        timeout: float | None = None,
    ) -> pb.Experiment:
        """Admin: promote ``variant`` (empty: the rule's candidate)."""
        request = pb.PromoteRequest(experiment=experiment, variant=variant, reason=reason)
        return self._admin("Promote", request, timeout)

    def rollback(
        self,
        experiment: str,
        variant: str = "",
        *,
        reason: str = "",
        timeout: float | None = None,
    ) -> pb.Experiment:
        """Admin: return traffic to ``variant`` (empty: the previous champion)."""
        request = pb.RollbackRequest(experiment=experiment, variant=variant, reason=reason)
        return self._admin("Rollback", request, timeout)

    def pause(
        self, experiment: str, *, reason: str = "", timeout: float | None = None
    ) -> pb.Experiment:
        """Admin: freeze the allocation."""
        return self._admin("Pause", pb.PauseRequest(experiment=experiment, reason=reason), timeout)

    def resume(
        self, experiment: str, *, reason: str = "", timeout: float | None = None
    ) -> pb.Experiment:
        """Admin: undo pause."""
        request = pb.ResumeRequest(experiment=experiment, reason=reason)
        return self._admin("Resume", request, timeout)

    def _admin(self, rpc: str, request: Any, timeout: float | None) -> pb.Experiment:
        # Not idempotent: a retried Pause whose first attempt landed fails FAILED_PRECONDITION.
        response = self._call(rpc, request, idempotent=False, admin=True, timeout=timeout)
        return response.experiment

    def watch_events(
        self,
        experiment: str = "",
        *,
        types: Iterable[pb.EventType] = (),
        after_sequence: int = 0,
        timeout: float | None = None,
        resume: bool = False,
    ) -> Generator[pb.Event, None, None]:
        """Yield events as they happen; ``timeout`` None means no deadline (long-lived).

        ``resume``: when the stream ends with UNAVAILABLE (the server stopping, or
        unreachable) or RESOURCE_EXHAUSTED (this watcher fell behind and was dropped),
        reconnect after the retry policy's backoff with ``after_sequence`` = the last
        sequence seen, so nothing is missed or repeated; give up (raise) after
        ``max_attempts`` failures in a row. A reconnect waits for the server to come back
        (``wait_for_ready``: with no ``timeout``, as long as it takes; a restart counts as
        one failure). ``timeout`` applies to each connection. With
        ``after_sequence`` 0 and no event seen yet, the reconnect is live-only too, so
        events of the gap are not replayed. Without ``resume``, resume yourself with
        ``after_sequence``. Closing the generator cancels the call.
        """
        types = list(types)
        last = after_sequence
        failures = 0
        while True:
            request = pb.WatchEventsRequest(experiment=experiment, types=types, after_sequence=last)
            call = None
            try:
                # A reconnect waits for the server to be back (a restart takes seconds,
                # more than the retry policy's backoff) rather than failing at once.
                call = self._stub.WatchEvents(request, timeout=timeout, wait_for_ready=failures > 0)
                for response in call:
                    failures = 0
                    last = max(last, response.event.sequence)
                    yield response.event
                return
            except grpc.RpcError as error:
                code = status_code(error)
                failures += 1
                wait = (
                    self._retries.delay(
                        code,
                        failures,
                        idempotent=True,
                        rand=self._rand,
                        pushback=pushback_seconds(error),
                    )
                    if resume and code in _RESUMABLE
                    else None
                )
                if wait is None:
                    raise
                _log.info(
                    "WatchEvents ended (%s); resuming after sequence %d in %.2f s",
                    error,
                    last,
                    wait,
                )
                self._sleep(wait)
            finally:
                cancel = getattr(call, "cancel", None)
                if callable(cancel):
                    cancel()


ErrorHandler = Callable[[BaseException, pb.RewardBatchRequest], None]


def _log_failed_batch(error: BaseException, request: pb.RewardBatchRequest) -> None:
    _log.error("dropping %d rewards of %r: %s", len(request.values), request.experiment, error)


@dataclass(frozen=True, slots=True)
class _Pending:
    decision_id: str  # empty for event rewards
    variant: str
    event_id: str
    value: float
    score: float  # NaN: no prediction score


def _groups(items: Sequence[_Pending]) -> list[list[_Pending]]:
    """The items addressed by decision id, then those addressed by event id (non-empty)."""
    by_decision = [item for item in items if item.decision_id]
    by_event = [item for item in items if not item.decision_id]
    return [group for group in (by_decision, by_event) if group]


def _request(experiment: str, group: Sequence[_Pending]) -> pb.RewardBatchRequest:
    """One RewardBatch of ``group`` (all addressed the same way)."""
    scores = [item.score for item in group]
    request = pb.RewardBatchRequest(
        experiment=experiment,
        values=[item.value for item in group],
        prediction_scores=[] if all(math.isnan(s) for s in scores) else scores,
    )
    if group[0].decision_id:
        request.decision_ids.extend(item.decision_id for item in group)
    else:
        request.event_ids.extend(item.event_id for item in group)
        request.variants.extend(item.variant for item in group)
    return request


# Batchers still open at interpreter exit are closed (flushed) then, not dropped with their
# daemon timer thread.
_open_batchers: weakref.WeakSet[RewardBatcher] = weakref.WeakSet()
# Set while this thread runs a batcher's send (and so its on_error): a close() from there
# must not wait for sends, its own or another thread's that may be waiting for it.
_in_send = threading.local()


@atexit.register
def _close_open_batchers() -> None:
    for batcher in list(_open_batchers):
        batcher.close()


class RewardBatcher:
    """Buffers rewards of one experiment and sends them with RewardBatch.

    Flushes when ``max_items`` are buffered (in the thread that adds the last one), when
    the oldest buffered reward is ``max_delay_ms`` old (in a background thread), and on
    ``flush()``/``close()``; closing its client closes it first, and one still open at
    interpreter exit is closed then. A batch the server rejects as INVALID_ARGUMENT (it
    then records none of it) is sent again in halves, so a bad reward costs only itself
    (a split budget of 8 per bit of the batch size stops a batch bad throughout from
    costing a call per reward; the rest goes to ``on_error`` whole). A batch that still
    fails after the
    client's retries goes to ``on_error(error, request)``; the default logs and drops it.
    Rewards the server reports EXPIRED (past their decision's TTL) are logged. Thread-safe.

    >>> with RewardBatcher(client, "ranker", max_items=500, max_delay_ms=50) as batcher:
    ...     batcher.add(choice.decision_id, 1.0)
    """

    def __init__(
        self,
        client: AllocatorClient,
        experiment: str,
        *,
        max_items: int = 1000,
        max_delay_ms: float = 100.0,
        on_error: ErrorHandler = _log_failed_batch,
    ) -> None:
        if not experiment:
            raise ValueError("experiment must be non-empty")
        if isinstance(max_items, bool) or not isinstance(max_items, int):
            raise TypeError(f"max_items must be an int, got {type(max_items).__name__}")
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        _require_finite("max_delay_ms", max_delay_ms)
        if max_delay_ms <= 0:
            raise ValueError(f"max_delay_ms must be > 0, got {max_delay_ms}")
        self._client = client
        self._experiment = experiment
        self._max_items = max_items
        self._max_delay = max_delay_ms / 1000.0
        self._on_error = on_error
        self._cond = threading.Condition()
        self._items: list[_Pending] = []
        self._oldest = 0.0  # monotonic time of the first buffered item
        self._closed = False
        # Threads with a send in progress (close waits for those of other threads).
        self._senders: collections.Counter[int] = collections.Counter()
        self._timer = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._timer.start()
        _open_batchers.add(self)
        client._batchers.add(self)

    def add(self, decision_id: str, value: float, *, prediction_score: float | None = None) -> None:
        """Buffer a reward for a decision id (single or ``<batch_token>.<i>``)."""
        if not isinstance(decision_id, str) or not decision_id:
            raise ValueError("decision_id must be a non-empty string")
        self._add(_Pending(decision_id, "", "", *self._checked(value, prediction_score)))

    def add_event(
        self,
        variant: str,
        event_id: str,
        value: float,
        *,
        prediction_score: float | None = None,
    ) -> None:
        """Buffer a reward keyed by the caller's event id."""
        if not variant or not event_id:
            raise ValueError("variant and event_id must be non-empty")
        self._add(_Pending("", variant, event_id, *self._checked(value, prediction_score)))

    @staticmethod
    def _checked(value: float, prediction_score: float | None) -> tuple[float, float]:
        # Checked here because one bad value would make the server reject the whole batch.
        _require_finite("value", value)
        if prediction_score is None:
            return float(value), math.nan
        _require_finite("prediction_score", prediction_score)
        return float(value), float(prediction_score)

    def _add(self, item: _Pending) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("RewardBatcher is closed")
            if not self._items:
                self._oldest = time.monotonic()
                self._cond.notify()
            self._items.append(item)
            full = len(self._items) >= self._max_items
            batch = self._take() if full else []
        self._send(batch)

    def _take(self) -> list[_Pending]:
        """The buffered items, this thread counted as sending them (caller holds _cond):
        taken and counted in one step, so a close() never sees them in neither place."""
        items, self._items = self._items, []
        if items:
            self._senders[threading.get_ident()] += 1
        return items

    def _send(self, items: Sequence[_Pending]) -> None:
        """Send what ``_take`` handed this thread, then stop counting it as a sender."""
        if not items:
            return
        me = threading.get_ident()
        outer = getattr(_in_send, "active", False)
        _in_send.active = True
        try:
            for group in _groups(items):
                # Splits allowed: enough to find a handful of bad rewards among n (at most
                # 2 log2 n calls each), not the 2n - 1 of a batch that is bad throughout.
                self._send_group(group, [8 * max(1, len(group).bit_length())])
        finally:
            _in_send.active = outer
            with self._cond:
                self._senders[me] -= 1
                if not self._senders[me]:
                    del self._senders[me]
                self._cond.notify_all()

    def _send_group(self, group: Sequence[_Pending], splits: list[int]) -> None:
        request = _request(self._experiment, group)
        try:
            response = self._client.send_reward_batch(request)
        except Exception as error:  # the batcher must outlive any failed batch
            code = status_code(error)
            if code == grpc.StatusCode.INVALID_ARGUMENT and len(group) > 1 and splits[0] > 0:
                # Rejected whole for its bad items, nothing recorded: halves, until each bad
                # one fails alone (about 2 log2(n) calls per bad reward).
                splits[0] -= 1
                half = len(group) // 2
                self._send_group(group[:half], splits)
                self._send_group(group[half:], splits)
                return
            try:
                self._on_error(error, request)
            except Exception:  # a failing handler must not stop the timer or the flush
                _log.exception("on_error failed; %d rewards dropped", len(group))
            return
        if response.expired:
            _log.warning(
                "%d of %d rewards of %r arrived after their decision's TTL and were not counted",
                response.expired,
                len(group),
                self._experiment,
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._items:
                        remaining = self._oldest + self._max_delay - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                batch = self._take()
            self._send(batch)

    def flush(self) -> None:
        """Send everything buffered now, in the calling thread."""
        with self._cond:
            batch = self._take()
        self._send(batch)

    def close(self) -> None:
        """Stop the timer, flush what is left and wait for sends in progress in other
        threads; idempotent. Called from ``on_error`` (inside a send, of this batcher or
        another) it only stops the batcher and flushes: waiting there could wait for a
        thread that is waiting for this one."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        _open_batchers.discard(self)
        self._client._batchers.discard(self)
        if getattr(_in_send, "active", False):
            self.flush()
            return
        self._timer.join()
        self.flush()
        with self._cond:
            while self._senders:
                self._cond.wait()

    def __enter__(self) -> RewardBatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

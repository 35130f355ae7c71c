"""The gRPC servicer: validate -> application -> response. No maths, no SQL.

It runs on a ``grpc.aio`` server. Each unary handler is a plain function; :func:`_rpc`
runs it on the event loop (Assign: microseconds, no I/O) or in a thread pool (everything
that may wait on the store or do real work), so the per-call thread hand-off of a
thread-pool server is paid only where the work dwarfs it. Streams are async generators and
hold no thread between messages.

Domain errors are mapped to status codes by type in one place (:func:`_code_for`), so no
RPC ever answers UNKNOWN or leaks a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import itertools
import json
import logging
import math
import queue
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import numpy as np
from allocator_client.v1 import allocator_pb2 as pb
from allocator_client.v1 import allocator_pb2_grpc as pb_grpc

from allocator.app import (
    ACCEPTED,
    DUPLICATE,
    EXPIRED,
    STATUSES,
    Allocator,
    Ended,
    EventHub,
    Record,
)
from allocator.convert import EVENT_TO_PB, PB_TO_EVENT, PB_TO_STATE, STATE_TO_PB
from allocator.errors import (
    Busy,
    ExperimentExists,
    InvalidArgument,
    NotLoadedYet,
    Overloaded,
    PermissionDenied,
    ShuttingDown,
    Unauthenticated,
    UnknownExperiment,
    WrongState,
)
from allocator.lifecycle import Action
from allocator.metrics import Metrics
from allocator.report import build_report, spec_alpha
from allocator.stats import holm
from allocator.store import StoreUnavailable, VersionConflict

log = logging.getLogger("allocator.service")

_STATUS = {
    ACCEPTED: pb.REWARD_STATUS_ACCEPTED,
    DUPLICATE: pb.REWARD_STATUS_DUPLICATE,
    EXPIRED: pb.REWARD_STATUS_EXPIRED,
}

# Allocator.reward_indexed's outcome codes -> the wire enum, by NumPy fancy indexing.
_STATUS_BY_CODE = np.array([_STATUS[s] for s in STATUSES], dtype=np.int64)

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownExperiment, grpc.StatusCode.NOT_FOUND),
    (ExperimentExists, grpc.StatusCode.ALREADY_EXISTS),
    (WrongState, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (NotLoadedYet, grpc.StatusCode.UNAVAILABLE),
    # Another replica changed the experiment between our read and our write.
    (VersionConflict, grpc.StatusCode.ABORTED),
)

T = TypeVar("T")
Handler = Callable[..., Any]
AsyncHandler = Callable[..., Awaitable[Any]]
StreamHandler = Callable[..., AsyncGenerator[Any, None]]

# Stored events are replayed in pages of this many (one store read per page).
_REPLAY_PAGE = 1000


# A unary Reward is checked as a batch of one: its fields' names in the batch's errors.
_UNARY_REWARD_FIELDS = {
    "values": "value",
    "prediction_scores[0]": "prediction_score",
    "guardrails[0]": "guardrails",
    "experiment": "event.experiment",
    "variants[0]": "event.variant",
    "event_ids[0]": "event.event_id",
}


def _renamed(err: InvalidArgument, names: dict[str, str]) -> InvalidArgument:
    """``err`` naming its field (or the field it is a part of) as ``names`` says."""
    for old, new in names.items():
        if err.field == old or err.field.startswith((old + ".", old + "[")):
            return InvalidArgument(new + err.field[len(old) :], err.message)
    return err


def _code_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(err, kind):
            return code, str(err)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def _rpc(*, inline: bool = False) -> Callable[[Handler], AsyncHandler]:
    """Make a plain handler body an asyncio RPC: timed, counted, errors mapped to a status.

    ``inline`` bodies run on the event loop itself: only for microseconds of CPU with no
    I/O (Assign), where a hand-off to a thread would cost more than the work. They are
    called with ``wait=False`` and raise :class:`Busy`, having changed nothing, rather than
    wait for a lock another thread holds (a large batch, an estimate); the call then runs
    in the pool with ``wait=True``. Every other body runs in the servicer's thread pool, so
    a store write, a report or a large batch never stalls the loop.
    """

    def wrap(fn: Handler) -> AsyncHandler:
        name = fn.__name__

        @functools.wraps(fn)
        async def unary(
            self: AllocatorServicer, request: Any, context: grpc.aio.ServicerContext
        ) -> Any:
            start = time.perf_counter()
            try:
                if inline:
                    try:
                        response = fn(self, request, context, False)
                    except Busy:
                        response = await self._blocking(fn, self, request, context, True)
                else:
                    response = await self._blocking(fn, self, request, context)
            except asyncio.CancelledError:
                self._done(name, grpc.StatusCode.CANCELLED, start)
                raise
            except Exception as err:
                code, details = _code_for(err)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", name)
                # Counted before aborting: abort sends the status at once, and whoever
                # sees it may read /metrics next.
                self._done(name, code, start)
                await context.abort(code, details)
            self._done(name, grpc.StatusCode.OK, start)
            return response

        return unary

    return wrap


def _stream(fn: StreamHandler) -> StreamHandler:
    """Same mapping for streaming handlers (async generators)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def gen(
        self: AllocatorServicer, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[Any, None]:
        try:
            # aclosing: when the client goes away, the handler's own ``finally`` (a
            # WatchEvents unsubscribe) runs now, not whenever the generator is collected.
            async with contextlib.aclosing(fn(self, request, context)) as items:
                async for item in items:
                    yield item
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            self.metrics.rpc.count(name, "CANCELLED")
            raise
        except Exception as err:
            code, details = _code_for(err)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            self.metrics.rpc.count(name, code.name)  # before the status is sent, as in _rpc
            await context.abort(code, details)
        else:
            self.metrics.rpc.count(name, "OK")

    return gen


# RewardBatchRequest's ways to address items, each by its fields, the one that must be
# set first: a request uses exactly one.
_ADDRESSING = (
    ("decision_ids",),
    ("batch_token", "indices"),
    ("event_ids", "variants", "variant_indices"),
)


def _addressing(request: pb.RewardBatchRequest) -> str:
    """Which way ``request`` addresses its items (the form's first field); a field of
    another form, or a form without its first field, is INVALID_ARGUMENT."""
    sent = [[f for f in form if getattr(request, f)] for form in _ADDRESSING]
    used = [i for i, fields in enumerate(sent) if fields]
    if not used:
        raise InvalidArgument("decision_ids", "send decision_ids, batch_token or event_ids")
    if len(used) > 1:
        first, *others = (sent[i] for i in used)
        raise InvalidArgument(
            others[0][0],
            f"cannot be sent with {', '.join(first)}: address the items one way, by "
            "decision_ids, batch_token + indices or event_ids + variants (or variant_indices)",
        )
    form = _ADDRESSING[used[0]]
    if form[0] not in sent[used[0]]:
        raise InvalidArgument(form[0], f"is required with {', '.join(sent[used[0]])}")
    return form[0]


def _watch_ended(why: Ended, last: int) -> Exception:
    """The status a WatchEvents call ends with, saying where to resume."""
    resume = f"reconnect with after_sequence={last}"
    if why == Ended.SHUTDOWN:
        return ShuttingDown(f"server is shutting down; {resume}")
    return Overloaded(
        f"watcher fell {EventHub.QUEUE_SIZE:,} events behind and was dropped; {resume}"
    )


class AllocatorServicer(pb_grpc.AllocatorServicer):
    """allocator.v1.Allocator over an :class:`Allocator` application."""

    def __init__(self, app: Allocator, metrics: Metrics, admin_token: str, pool: Executor) -> None:
        self.app = app
        self.pool = pool  # runs every handler body that is not ``inline``
        self.metrics = metrics
        self.admin_token = admin_token

    def _done(self, rpc: str, code: grpc.StatusCode, start: float) -> None:
        """Count a finished call by status code and observe its duration."""
        self.metrics.rpc.done(rpc, code.name, time.perf_counter() - start)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread pool, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- helpers -----------------------------------------------------------------------------
    def _admin(self, context: grpc.aio.ServicerContext) -> str:
        """Check the bearer token; returns the actor name for the audit log."""
        sent = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                sent = str(value)
        if not sent:
            raise Unauthenticated("admin RPC: send metadata 'authorization: Bearer <token>'")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("admin RPC: authorization must be 'Bearer <token>'")
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, so
        # INTERNAL), and a raw HTTP/2 client may send them (the configured token is ASCII).
        if not self.admin_token or not hmac.compare_digest(
            token.encode(), self.admin_token.encode()
        ):
            raise PermissionDenied("admin token is not valid")
        return "admin"

    def _experiment(self, rec: Record) -> pb.Experiment:
        lc = rec.lifecycle
        out = pb.Experiment(
            spec=rec.spec,
            state=STATE_TO_PB[lc.state],
            champion=rec.config.variants[lc.champion] if lc.champion is not None else "",
            version=rec.version,
        )
        out.create_time.FromNanoseconds(int(rec.created_at * 1e9))
        out.update_time.FromNanoseconds(int(rec.updated_at * 1e9))
        return out

    # -- experiments -------------------------------------------------------------------------
    @_rpc()
    def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateExperimentResponse:
        rec = self.app.create(request.spec)
        return pb.CreateExperimentResponse(experiment=self._experiment(rec))

    @_rpc()
    def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetExperimentResponse:
        return pb.GetExperimentResponse(
            experiment=self._experiment(self.app.get(request.experiment))
        )

    @_rpc()
    def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExperimentsResponse:
        for i, s in enumerate(request.states):
            if s not in PB_TO_STATE:
                raise InvalidArgument(f"states[{i}]", f"unknown state {s}")
        states = [PB_TO_STATE[s] for s in request.states]
        recs = self.app.experiments(states)
        if request.page_token:
            recs = [r for r in recs if r.name > request.page_token]
        # uint32 on the wire, so never negative; "capped at 1000" (the proto): not refused.
        size = min(request.page_size or 100, 1000)
        page = recs[:size]
        return pb.ListExperimentsResponse(
            experiments=[self._experiment(r) for r in page],
            next_page_token=page[-1].name if len(recs) > size else "",
        )

    @_rpc()
    def ArchiveExperiment(
        self, request: pb.ArchiveExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.ArchiveExperimentResponse:
        rec = self.app.transition(
            request.experiment, Action.ARCHIVE, actor="api", reason=request.reason or "archived"
        )
        return pb.ArchiveExperimentResponse(experiment=self._experiment(rec))

    @_rpc()
    def AddVariant(
        self, request: pb.AddVariantRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddVariantResponse:
        rec = self.app.add_variant(
            request.experiment,
            request.variant,
            actor="api",
            reason=request.reason,
            weight=request.weight if request.HasField("weight") else None,
        )
        return pb.AddVariantResponse(experiment=self._experiment(rec))

    # -- decisions ---------------------------------------------------------------------------
    @_rpc(inline=True)
    def Assign(
        self, request: pb.AssignRequest, context: grpc.aio.ServicerContext, wait: bool = True
    ) -> pb.AssignResponse:
        rec, d, token = self.app.assign(request.experiment, request.unit_id, wait=wait)
        return pb.AssignResponse(
            variant=d.variant,
            variant_index=d.arm,
            decision_id=token,
            propensity=d.propensity,
            state=STATE_TO_PB[rec.lifecycle.state],
            allocation_epoch=d.epoch,
        )

    def _assign_batch(self, request: pb.AssignBatchRequest) -> pb.AssignBatchResponse:
        rec, b, token = self.app.assign_batch(
            request.experiment, request.count, tuple(request.unit_ids)
        )
        return pb.AssignBatchResponse(
            variants=b.variants,
            variant_indices=b.arms.tolist(),
            propensities=b.propensities.tolist(),
            batch_token=token,
            state=STATE_TO_PB[rec.lifecycle.state],
            allocation_epoch=b.epoch,
        )

    @_rpc()
    def AssignBatch(
        self, request: pb.AssignBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.AssignBatchResponse:
        return self._assign_batch(request)

    @_stream
    async def AssignStream(
        self,
        request_iterator: AsyncIterator[pb.AssignStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncGenerator[pb.AssignStreamResponse, None]:
        async for req in request_iterator:
            batch = await self._blocking(self._assign_batch, req.batch)
            yield pb.AssignStreamResponse(request_id=req.request_id, batch=batch)

    # -- rewards -----------------------------------------------------------------------------
    @_rpc()
    def Reward(
        self, request: pb.RewardRequest, context: grpc.aio.ServicerContext
    ) -> pb.RewardResponse:
        score = [request.prediction_score] if request.HasField("prediction_score") else []
        guard = [dict(request.guardrails)] if request.guardrails else []
        which = request.WhichOneof("target")
        try:
            if which == "decision_id":
                statuses = self.app.reward(
                    experiment="",
                    values=[request.value],
                    decision_ids=[request.decision_id],
                    scores=score,
                    guardrails=guard,
                    field="decision_id",
                )
            elif which == "event":
                ev = request.event
                statuses = self.app.reward(
                    experiment=ev.experiment,
                    values=[request.value],
                    event_ids=[ev.event_id],
                    variants=[ev.variant],
                    scores=score,
                    guardrails=guard,
                    field="event",
                )
            else:
                raise InvalidArgument("target", "set decision_id or event")
        except InvalidArgument as err:
            raise _renamed(err, _UNARY_REWARD_FIELDS) from None
        return pb.RewardResponse(status=_STATUS[statuses[0]])

    @staticmethod
    def _guardrail_rows(request: pb.RewardBatchRequest) -> list[dict[str, float]]:
        """Columnar guardrails to one dict per item (NaN: not measured for that item)."""
        if not request.guardrails:
            return []
        n = len(request.values)
        rows: list[dict[str, float]] = [{} for _ in range(n)]
        for j, col in enumerate(request.guardrails):
            if not col.metric:
                raise InvalidArgument(f"guardrails[{j}].metric", "is required")
            if len(col.values) != n:
                raise InvalidArgument(
                    f"guardrails[{j}].values", f"{len(col.values)} values for {n} rewards"
                )
            for i, v in enumerate(col.values):
                if not math.isnan(v):
                    rows[i][col.metric] = v
        return rows

    def _reward_indexed(self, request: pb.RewardBatchRequest) -> pb.RewardBatchResponse:
        """The batch_token + indices form, as columns end to end."""
        codes = self.app.reward_indexed(
            experiment=request.experiment,
            batch_token=request.batch_token,
            indices=np.fromiter(request.indices, dtype=np.int64, count=len(request.indices)),
            values=np.fromiter(request.values, dtype=np.float64, count=len(request.values)),
            scores=(
                np.fromiter(request.prediction_scores, dtype=np.float64)
                if request.prediction_scores
                else None
            ),
            guardrails=self._guardrail_rows(request),
        )
        counts = np.bincount(codes, minlength=len(STATUSES)).tolist()
        return pb.RewardBatchResponse(
            accepted=counts[STATUSES.index(ACCEPTED)],
            duplicates=counts[STATUSES.index(DUPLICATE)],
            expired=counts[STATUSES.index(EXPIRED)],
            statuses=_STATUS_BY_CODE[codes].tolist(),
        )

    def _reward_batch(self, request: pb.RewardBatchRequest) -> pb.RewardBatchResponse:
        form = _addressing(request)
        if form == "batch_token":
            return self._reward_indexed(request)
        common: dict[str, Any] = {
            "experiment": request.experiment,
            "values": list(request.values),
            "scores": list(request.prediction_scores),
            "guardrails": self._guardrail_rows(request),
        }
        if form == "decision_ids":
            statuses = self.app.reward(decision_ids=list(request.decision_ids), **common)
        else:
            statuses = self.app.reward(
                event_ids=list(request.event_ids),
                variants=list(request.variants),
                variant_indices=list(request.variant_indices),
                field="event_ids",
                **common,
            )
        return pb.RewardBatchResponse(
            accepted=statuses.count(ACCEPTED),
            duplicates=statuses.count(DUPLICATE),
            expired=statuses.count(EXPIRED),
            statuses=[_STATUS[s] for s in statuses],
        )

    @_rpc()
    def RewardBatch(
        self, request: pb.RewardBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.RewardBatchResponse:
        return self._reward_batch(request)

    @_stream
    async def RewardStream(
        self,
        request_iterator: AsyncIterator[pb.RewardStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncGenerator[pb.RewardStreamResponse, None]:
        async for req in request_iterator:
            batch = await self._blocking(self._reward_batch, req.batch)
            yield pb.RewardStreamResponse(request_id=req.request_id, batch=batch)

    # -- reports -----------------------------------------------------------------------------
    @_rpc()
    def GetReport(
        self, request: pb.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetReportResponse:
        rec = self.app.get(request.experiment)
        resp = build_report(self.app.engine, rec.name, alpha=spec_alpha(rec.spec))
        resp.experiment.CopyFrom(self._experiment(rec))
        resp.report_time.GetCurrentTime()
        status = self.app.promotion_status(rec)
        if status is not None:
            resp.promotion.CopyFrom(status)
        drift = rec.scores.compare()
        # The KS tests are their own family (one per variant with scores): Holm over them,
        # not over the comparisons with control. PSI is an index, with no p-value.
        ks_adjusted = holm([ks.p_value for ks, _ in drift.values()]).tolist()
        for (arm, (ks, psi)), ks_p in zip(drift.items(), ks_adjusted, strict=True):
            name = rec.config.variants[arm]
            resp.tests.append(
                pb.TestResult(
                    name="ks_prediction_drift",
                    variant=name,
                    statistic=ks.statistic,
                    p_value=ks.p_value,
                    p_value_adjusted=ks_p,
                )
            )
            resp.tests.append(
                pb.TestResult(
                    name="psi_prediction_drift",
                    variant=name,
                    statistic=psi.value,
                    p_value=float("nan"),
                    p_value_adjusted=float("nan"),
                )
            )
        resp.tests.extend(self.app.rank_tests(rec))
        power = self.app.power(rec)
        if power is not None:
            resp.power.CopyFrom(power)
        return resp

    # -- admin -------------------------------------------------------------------------------
    def _admin_transition(
        self, action: Action, request: Any, context: grpc.aio.ServicerContext, variant: str = ""
    ) -> pb.Experiment:
        actor = self._admin(context)
        rec = self.app.transition(
            request.experiment,
            action,
            actor=actor,
            reason=request.reason or "manual",
            variant=variant,
        )
        return self._experiment(rec)

    @_rpc()
    def Promote(
        self, request: pb.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> pb.PromoteResponse:
        self._admin(context)  # before the candidate is looked up: it reveals the leader
        variant = request.variant or self.app.promotion_candidate(request.experiment)
        exp = self._admin_transition(Action.PROMOTE, request, context, variant)
        return pb.PromoteResponse(experiment=exp)

    @_rpc()
    def Rollback(
        self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackResponse:
        exp = self._admin_transition(Action.ROLLBACK, request, context, request.variant)
        return pb.RollbackResponse(experiment=exp)

    @_rpc()
    def Pause(
        self, request: pb.PauseRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseResponse:
        return pb.PauseResponse(experiment=self._admin_transition(Action.PAUSE, request, context))

    @_rpc()
    def Resume(
        self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeResponse:
        return pb.ResumeResponse(experiment=self._admin_transition(Action.RESUME, request, context))

    # -- events ------------------------------------------------------------------------------
    @_stream
    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.WatchEventsResponse, None]:
        if request.experiment:
            await self._blocking(self.app.get, request.experiment)
        for i, t in enumerate(request.types):
            if t not in PB_TO_EVENT:
                raise InvalidArgument(f"types[{i}]", f"unknown event type {t}")
        types = {PB_TO_EVENT[t] for t in request.types}
        # Subscribed before the replay, so nothing published meanwhile is missed; what
        # both deliver is skipped by sequence number. The hub wakes this loop when it
        # queues an item: no polling.
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        sub = self.app.events.subscribe(lambda: loop.call_soon_threadsafe(wake.set))
        try:
            last = request.after_sequence
            if request.after_sequence:
                stored = self.app.stored_events(request.after_sequence)
                while page := await self._blocking(_take, stored, _REPLAY_PAGE):
                    for item in page:
                        if self._wanted(item.event, request.experiment, types):
                            yield self._event(item.seq, item.event)
                        last = max(last, item.seq)
            while not context.done():
                try:
                    live = sub.get_nowait()
                except queue.Empty:
                    # No await between the check and clear(): a wake-up for an item queued
                    # since runs on this loop only after it, so none is lost.
                    wake.clear()
                    await wake.wait()
                    continue
                if isinstance(live, Ended):
                    raise _watch_ended(live, last)
                # The hub hands over events once each, in sequence order, and commit order
                # is sequence order (Allocator._deliver_events): anything at or below the
                # last sequence sent was sent already, by the replay or live.
                if live.seq <= last:
                    continue
                if self._wanted(live.event, request.experiment, types):
                    yield self._event(live.seq, live.event)
                last = live.seq
        finally:
            self.app.events.unsubscribe(sub)

    @staticmethod
    def _wanted(event: Any, experiment: str, types: set[Any]) -> bool:
        return (not experiment or event.experiment == experiment) and (
            not types or event.type in types
        )

    def _event(self, seq: int, event: Any) -> pb.WatchEventsResponse:
        rec = self.app.records.get(event.experiment)
        variant = ""
        if rec is not None and event.variant is not None and event.variant < rec.config.n_arms:
            variant = rec.config.variants[event.variant]
        out = pb.Event(
            sequence=seq,
            type=EVENT_TO_PB[event.type],
            experiment=event.experiment,
            variant=variant,
            reason=event.reason,
            details_json=json.dumps(dict(event.details), default=str),
        )
        out.time.FromNanoseconds(int(event.at * 1e9))
        return pb.WatchEventsResponse(event=out)


def _take(items: Iterator[T], n: int) -> list[T]:
    """Up to ``n`` more items of ``items``."""
    return list(itertools.islice(items, n))

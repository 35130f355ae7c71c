"""The gRPC servicer: validate -> application -> response. No maths, no SQL.

Domain errors are mapped to status codes by type in one place (:func:`_abort_for`), so no
RPC ever answers UNKNOWN or leaks a traceback.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import math
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
from allocator_client.v1 import allocator_pb2 as pb
from allocator_client.v1 import allocator_pb2_grpc as pb_grpc

from allocator.app import ACCEPTED, DUPLICATE, EXPIRED, STATUSES, Allocator, Record
from allocator.convert import EVENT_TO_PB, PB_TO_EVENT, PB_TO_STATE, STATE_TO_PB
from allocator.errors import (
    ExperimentExists,
    InvalidArgument,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    UnknownExperiment,
    WrongState,
)
from allocator.lifecycle import Action
from allocator.metrics import Metrics
from allocator.report import build_report
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
    # Another replica changed the experiment between our read and our write.
    (VersionConflict, grpc.StatusCode.ABORTED),
)

F = TypeVar("F", bound=Callable[..., Any])


def _code_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(err, kind):
            return code, str(err)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def _rpc(fn: F) -> F:
    """Time the call, count it by status code, map domain errors to a status."""
    name = fn.__name__

    @functools.wraps(fn)
    def unary(self: AllocatorServicer, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return fn(self, request, context)
        except Exception as err:
            code, details = _code_for(err)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            context.abort(code, details)
        finally:
            self._counter(name, code).inc()
            self._seconds(name).observe(time.perf_counter() - start)

    return unary  # type: ignore[return-value]


def _stream(fn: F) -> F:
    """Same mapping for streaming handlers (generators)."""
    name = fn.__name__

    @functools.wraps(fn)
    def gen(self: AllocatorServicer, request: Any, context: grpc.ServicerContext) -> Any:
        code = grpc.StatusCode.OK
        try:
            yield from fn(self, request, context)
        except Exception as err:
            code, details = _code_for(err)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            context.abort(code, details)
        finally:
            self._counter(name, code).inc()

    return gen  # type: ignore[return-value]


class AllocatorServicer(pb_grpc.AllocatorServicer):
    """allocator.v1.Allocator over an :class:`Allocator` application."""

    def __init__(self, app: Allocator, metrics: Metrics, admin_token: str) -> None:
        self.app = app
        self.metrics = metrics
        self.admin_token = admin_token
        # labels() takes a lock and builds the label tuple on every call (~2 us each, twice
        # per RPC); the children never change, so each is looked up once. A race only makes
        # two threads fetch the same child.
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._timers: dict[str, Any] = {}

    def _counter(self, rpc: str, code: grpc.StatusCode) -> Any:
        """The requests counter child of (rpc, code)."""
        child = self._counters.get((rpc, code))
        if child is None:
            child = self.metrics.requests.labels(rpc=rpc, code=code.name)
            self._counters[(rpc, code)] = child
        return child

    def _seconds(self, rpc: str) -> Any:
        """The request duration histogram child of ``rpc``."""
        child = self._timers.get(rpc)
        if child is None:
            child = self.metrics.request_seconds.labels(rpc=rpc)
            self._timers[rpc] = child
        return child

    # -- helpers -----------------------------------------------------------------------------
    def _admin(self, context: grpc.ServicerContext) -> str:
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
        if not self.admin_token or not hmac.compare_digest(token, self.admin_token):
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
    @_rpc
    def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context: grpc.ServicerContext
    ) -> pb.CreateExperimentResponse:
        rec = self.app.create(request.spec)
        return pb.CreateExperimentResponse(experiment=self._experiment(rec))

    @_rpc
    def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.ServicerContext
    ) -> pb.GetExperimentResponse:
        return pb.GetExperimentResponse(
            experiment=self._experiment(self.app.get(request.experiment))
        )

    @_rpc
    def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.ServicerContext
    ) -> pb.ListExperimentsResponse:
        for i, s in enumerate(request.states):
            if s not in PB_TO_STATE:
                raise InvalidArgument(f"states[{i}]", f"unknown state {s}")
        states = [PB_TO_STATE[s] for s in request.states]
        recs = self.app.experiments(states)
        if request.page_token:
            recs = [r for r in recs if r.name > request.page_token]
        size = request.page_size or 100
        if size > 1000:
            raise InvalidArgument("page_size", "must be at most 1000")
        page = recs[:size]
        return pb.ListExperimentsResponse(
            experiments=[self._experiment(r) for r in page],
            next_page_token=page[-1].name if len(recs) > size else "",
        )

    @_rpc
    def ArchiveExperiment(
        self, request: pb.ArchiveExperimentRequest, context: grpc.ServicerContext
    ) -> pb.ArchiveExperimentResponse:
        rec = self.app.transition(
            request.experiment, Action.ARCHIVE, actor="api", reason=request.reason or "archived"
        )
        return pb.ArchiveExperimentResponse(experiment=self._experiment(rec))

    @_rpc
    def AddVariant(
        self, request: pb.AddVariantRequest, context: grpc.ServicerContext
    ) -> pb.AddVariantResponse:
        rec = self.app.add_variant(
            request.experiment, request.variant, actor="api", reason=request.reason
        )
        return pb.AddVariantResponse(experiment=self._experiment(rec))

    # -- decisions ---------------------------------------------------------------------------
    @_rpc
    def Assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.AssignResponse:
        rec, d, token = self.app.assign(request.experiment, request.unit_id)
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

    @_rpc
    def AssignBatch(
        self, request: pb.AssignBatchRequest, context: grpc.ServicerContext
    ) -> pb.AssignBatchResponse:
        return self._assign_batch(request)

    @_stream
    def AssignStream(
        self, request_iterator: Iterator[pb.AssignStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.AssignStreamResponse]:
        for req in request_iterator:
            yield pb.AssignStreamResponse(
                request_id=req.request_id, batch=self._assign_batch(req.batch)
            )

    # -- rewards -----------------------------------------------------------------------------
    @_rpc
    def Reward(self, request: pb.RewardRequest, context: grpc.ServicerContext) -> pb.RewardResponse:
        score = [request.prediction_score] if request.HasField("prediction_score") else []
        guard = [dict(request.guardrails)] if request.guardrails else []
        which = request.WhichOneof("target")
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
        if request.decision_ids or request.event_ids:
            raise InvalidArgument("batch_token", "use one addressing form per request")
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
        if request.batch_token:
            return self._reward_indexed(request)
        common: dict[str, Any] = {
            "experiment": request.experiment,
            "values": list(request.values),
            "scores": list(request.prediction_scores),
            "guardrails": self._guardrail_rows(request),
        }
        if request.decision_ids:
            statuses = self.app.reward(decision_ids=list(request.decision_ids), **common)
        elif request.event_ids:
            statuses = self.app.reward(
                event_ids=list(request.event_ids),
                variants=list(request.variants),
                variant_indices=list(request.variant_indices),
                field="event_ids",
                **common,
            )
        else:
            raise InvalidArgument("decision_ids", "send decision_ids, batch_token or event_ids")
        return pb.RewardBatchResponse(
            accepted=statuses.count(ACCEPTED),
            duplicates=statuses.count(DUPLICATE),
            expired=statuses.count(EXPIRED),
            statuses=[_STATUS[s] for s in statuses],
        )

    @_rpc
    def RewardBatch(
        self, request: pb.RewardBatchRequest, context: grpc.ServicerContext
    ) -> pb.RewardBatchResponse:
        return self._reward_batch(request)

    @_stream
    def RewardStream(
        self, request_iterator: Iterator[pb.RewardStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.RewardStreamResponse]:
        for req in request_iterator:
            yield pb.RewardStreamResponse(
                request_id=req.request_id, batch=self._reward_batch(req.batch)
            )

    # -- reports -----------------------------------------------------------------------------
    @_rpc
    def GetReport(
        self, request: pb.GetReportRequest, context: grpc.ServicerContext
    ) -> pb.GetReportResponse:
        rec = self.app.get(request.experiment)
        resp = build_report(self.app.engine, rec.name)
        resp.experiment.CopyFrom(self._experiment(rec))
        resp.report_time.GetCurrentTime()
        status = self.app.promotion_status(rec)
        if status is not None:
            resp.promotion.CopyFrom(status)
        for arm, (ks, psi) in rec.scores.compare().items():
            name = rec.config.variants[arm]
            resp.tests.append(
                pb.TestResult(
                    name="ks_prediction_drift",
                    variant=name,
                    statistic=ks.statistic,
                    p_value=ks.p_value,
                )
            )
            resp.tests.append(
                pb.TestResult(
                    name="psi_prediction_drift",
                    variant=name,
                    statistic=psi.value,
                    p_value=float("nan"),
                )
            )
        power = self.app.power(rec)
        if power is not None:
            resp.power.CopyFrom(power)
        return resp

    # -- admin -------------------------------------------------------------------------------
    def _admin_transition(
        self, action: Action, request: Any, context: grpc.ServicerContext, variant: str = ""
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

    @_rpc
    def Promote(
        self, request: pb.PromoteRequest, context: grpc.ServicerContext
    ) -> pb.PromoteResponse:
        if not request.variant:
            self._admin(context)
            raise InvalidArgument("variant", "name the variant to promote")
        exp = self._admin_transition(Action.PROMOTE, request, context, request.variant)
        return pb.PromoteResponse(experiment=exp)

    @_rpc
    def Rollback(
        self, request: pb.RollbackRequest, context: grpc.ServicerContext
    ) -> pb.RollbackResponse:
        exp = self._admin_transition(Action.ROLLBACK, request, context, request.variant)
        return pb.RollbackResponse(experiment=exp)

    @_rpc
    def Pause(self, request: pb.PauseRequest, context: grpc.ServicerContext) -> pb.PauseResponse:
        return pb.PauseResponse(experiment=self._admin_transition(Action.PAUSE, request, context))

    @_rpc
    def Resume(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.ResumeResponse:
        return pb.ResumeResponse(experiment=self._admin_transition(Action.RESUME, request, context))

    # -- events ------------------------------------------------------------------------------
    @_stream
    def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchEventsResponse]:
        if request.experiment:
            self.app.get(request.experiment)
        for i, t in enumerate(request.types):
            if t not in PB_TO_EVENT:
                raise InvalidArgument(f"types[{i}]", f"unknown event type {t}")
        types = {PB_TO_EVENT[t] for t in request.types}
        sub = self.app.events.subscribe()
        try:
            last = request.after_sequence
            if request.after_sequence:
                for item in self.app.stored_events(request.after_sequence):
                    if self._wanted(item.event, request.experiment, types):
                        yield self._event(item.seq, item.event)
                    last = max(last, item.seq)
            while context.is_active():
                try:
                    live = sub.get(timeout=0.25)
                except queue.Empty:
                    continue
                if live is None:
                    return
                if live.seq <= last:
                    continue
                if self._wanted(live.event, request.experiment, types):
                    yield self._event(live.seq, live.event)
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

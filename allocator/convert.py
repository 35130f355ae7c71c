"""Between the wire (allocator.v1 messages) and the domain (configs, decisions, reports).

Every check of a request field raises :class:`InvalidArgument` naming that field, so the
servicer can answer INVALID_ARGUMENT with a message a caller can act on.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from allocator_client.v1 import allocator_pb2 as pb
from google.protobuf import json_format

from allocator.engine import AllocationMode, ExperimentConfig, Shaping
from allocator.errors import InvalidArgument
from allocator.guardrails import MAX_METRIC_NAME
from allocator.lifecycle import EventType, State
from allocator.policies import PolicyConfig, PolicyKind, RewardKind, check_new
from allocator.promotion import GuardrailCheck, PromotionSettings
from allocator.report import MAX_BERNOULLI_MIN_EFFECT

_POLICY = {
    pb.POLICY_UNSPECIFIED: PolicyKind.THOMPSON,
    pb.POLICY_THOMPSON: PolicyKind.THOMPSON,
    pb.POLICY_UCB1: PolicyKind.UCB1,
    pb.POLICY_KL_UCB: PolicyKind.KL_UCB,
    pb.POLICY_UCB_NORMAL: PolicyKind.UCB_NORMAL,
    pb.POLICY_EPSILON_GREEDY: PolicyKind.EPSILON_GREEDY,
    pb.POLICY_FIXED_SPLIT: PolicyKind.FIXED_SPLIT,
}
_REWARD = {
    pb.REWARD_TYPE_UNSPECIFIED: RewardKind.BERNOULLI,
    pb.REWARD_TYPE_BERNOULLI: RewardKind.BERNOULLI,
    pb.REWARD_TYPE_NORMAL: RewardKind.NORMAL,
}
_MODE = {
    pb.ALLOCATION_MODE_UNSPECIFIED: AllocationMode.EXACT,
    pb.ALLOCATION_MODE_EXACT: AllocationMode.EXACT,
    pb.ALLOCATION_MODE_TABLE: AllocationMode.TABLE,
}
STATE_TO_PB = {
    State.RUNNING: pb.EXPERIMENT_STATE_RUNNING,
    State.PAUSED: pb.EXPERIMENT_STATE_PAUSED,
    State.PROMOTED: pb.EXPERIMENT_STATE_PROMOTED,
    State.REOPENED: pb.EXPERIMENT_STATE_REOPENED,
    State.ROLLED_BACK: pb.EXPERIMENT_STATE_ROLLED_BACK,
    State.ARCHIVED: pb.EXPERIMENT_STATE_ARCHIVED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}
EVENT_TO_PB = {t: getattr(pb, f"EVENT_TYPE_{t.value}") for t in EventType}
PB_TO_EVENT = {v: k for k, v in EVENT_TO_PB.items()}
# Every value the proto defines (the supervisor maps them to detectors and reactions).
_DETECTORS = {v: v for v in pb.DriftDetector.values()}
_REACTIONS = {v: v for v in pb.RegressionAction.values()}


def _opt(msg: Any, field: str, default: float) -> float:
    return float(getattr(msg, field)) if msg.HasField(field) else default


def _check_enum(value: int, table: Mapping[Any, Any], field: str) -> Any:
    if value not in table:
        raise InvalidArgument(field, f"unknown value {value}")
    return table[value]


# The spec's optional real-valued policy settings (each checked finite, then by the policy).
_REAL_FIELDS = (
    "prior_alpha",
    "prior_beta",
    "prior_mean",
    "prior_kappa",
    "prior_shape",
    "prior_rate",
    "epsilon",
    "discount",
)
# Which spec field an error of PolicyConfig, Shaping or ExperimentConfig is about, by the
# longest opening of its message that is listed (see `_settings_error`).
_SPEC_FIELDS = {
    **{f: f"spec.{f}" for f in (*_REAL_FIELDS, "weights", "name", "variants", "seed")},
    # The policy does not fit the reward type.
    "policy": "spec.policy",
    "kl_ucb": "spec.policy",
    "ucb_normal": "spec.policy",
    "every variant name": "spec.variants",
    "variant names": "spec.variants",
    "at most": "spec.variants",
    # Cross-field limits name the field that made them fail (control_share < 1 alone, and
    # cap > 0, are checked first).
    "control_share + floor * variants": "spec.traffic.floor",
    "cap * variants": "spec.traffic.cap",
    **{f: f"spec.traffic.{f}" for f in ("control_share", "floor", "cap", "exploration_samples")},
}


def spec_to_config(spec: pb.ExperimentSpec) -> ExperimentConfig:
    """The engine configuration of a spec; ``InvalidArgument`` names the bad field."""
    if not spec.name:
        raise InvalidArgument("spec.name", "is required")
    if len(spec.variants) < 2:
        raise InvalidArgument("spec.variants", "at least 2 variants are required")
    kind = _check_enum(spec.policy, _POLICY, "spec.policy")
    reward = _check_enum(spec.reward_type, _REWARD, "spec.reward_type")
    mode = _check_enum(spec.allocation_mode, _MODE, "spec.allocation_mode")
    if spec.weights and kind != PolicyKind.FIXED_SPLIT:
        raise InvalidArgument("spec.weights", "only POLICY_FIXED_SPLIT takes weights")
    for field in _REAL_FIELDS:
        if spec.HasField(field) and not math.isfinite(getattr(spec, field)):
            raise InvalidArgument(f"spec.{field}", "must be a finite number")
    # The engine checks the two together; each is a uint32, so 0 is the one bad value.
    for field in ("table_refresh_rewards", "table_refresh_ms"):
        if spec.HasField(field) and getattr(spec, field) < 1:
            raise InvalidArgument(f"spec.{field}", "must be >= 1")
    try:
        policy = PolicyConfig(
            kind=kind,
            reward=reward,
            prior_alpha=_opt(spec, "prior_alpha", 1.0),
            prior_beta=_opt(spec, "prior_beta", 1.0),
            prior_mean=_opt(spec, "prior_mean", 0.0),
            prior_kappa=_opt(spec, "prior_kappa", 1e-3),
            prior_shape=_opt(spec, "prior_shape", 1.0),
            prior_rate=_opt(spec, "prior_rate", 1.0),
            epsilon=_opt(spec, "epsilon", 0.1),
            weights=tuple(spec.weights),
            discount=_opt(spec, "discount", 1.0),
        )
    except ValueError as err:
        raise _settings_error(err, _SPEC_FIELDS, "spec") from None
    traffic = spec.traffic
    try:
        shaping = Shaping(
            control_share=_opt(traffic, "control_share", 0.0),
            floor=_opt(traffic, "floor", 0.0),
            cap=_opt(traffic, "cap", 1.0),
            exploration_samples=int(traffic.exploration_samples)
            if traffic.HasField("exploration_samples")
            else 0,
        )
    except ValueError as err:
        raise _settings_error(err, _SPEC_FIELDS, "spec") from None
    try:
        return ExperimentConfig(
            name=spec.name,
            variants=tuple(spec.variants),
            policy=policy,
            mode=mode,
            refresh_rewards=int(spec.table_refresh_rewards)
            if spec.HasField("table_refresh_rewards")
            else 1000,
            refresh_ms=int(spec.table_refresh_ms) if spec.HasField("table_refresh_ms") else 1000,
            seed=int(spec.seed),
            shaping=shaping,
        )
    except ValueError as err:
        raise _settings_error(err, _SPEC_FIELDS, "spec") from None


def check_policy(config: ExperimentConfig) -> None:
    """Reject a policy a new experiment could not learn with, naming the field.

    Checked when an experiment is created (not when a stored one is loaded), as
    :func:`check_promotion`.
    """
    try:
        check_new(config.policy)
    except ValueError as err:
        raise _settings_error(err, _SPEC_FIELDS, "spec") from None


def promotion_settings(spec: pb.ExperimentSpec) -> PromotionSettings:
    """The rule's settings from a spec's promotion block (defaults as in the proto)."""
    p = spec.promotion

    def opt(field: str) -> float | None:
        return float(getattr(p, field)) if p.HasField(field) else None

    threshold = opt("p_best_threshold")
    return PromotionSettings(
        p_best_threshold=0.95 if threshold is None else threshold,
        expected_loss_tolerance=opt("expected_loss_tolerance"),
        indifference_margin=opt("indifference_margin"),
        min_samples_per_variant=int(p.min_samples_per_variant)
        if p.HasField("min_samples_per_variant")
        else 100,
        min_duration_seconds=float(p.min_duration_seconds),
        min_effect=opt("min_effect"),
        futility_probability=opt("futility_probability") or None,
    )


# PromotionSettings' attributes that come from spec.promotion fields of the same name.
_PROMOTION_FIELDS = {
    f: f"spec.promotion.{f}"
    for f in (
        "p_best_threshold",
        "expected_loss_tolerance",
        "indifference_margin",
        "min_samples_per_variant",
        "min_duration_seconds",
        "min_effect",
        "futility_probability",
    )
}


def check_promotion(spec: pb.ExperimentSpec) -> None:
    """Reject a promotion block the rule or the report could not use, naming the field.

    Checked when an experiment is created (not when a stored one is loaded).
    """
    p = spec.promotion
    for field in ("alpha", "power"):
        if p.HasField(field) and not 0.0 < getattr(p, field) < 1.0:
            raise InvalidArgument(f"spec.promotion.{field}", "must be in (0, 1)")
    bernoulli = spec.reward_type in (pb.REWARD_TYPE_UNSPECIFIED, pb.REWARD_TYPE_BERNOULLI)
    if bernoulli and p.HasField("min_effect") and not p.min_effect < MAX_BERNOULLI_MIN_EFFECT:
        raise InvalidArgument(
            "spec.promotion.min_effect",
            f"is a difference of two rates: must be below {MAX_BERNOULLI_MIN_EFFECT}",
        )
    try:
        promotion_settings(spec)
    except ValueError as err:
        raise _settings_error(err, _PROMOTION_FIELDS, "spec.promotion") from None
    seen: dict[str, int] = {}
    for i, g in enumerate(p.guardrails):
        where = f"spec.promotion.guardrails[{i}]"
        if not g.metric or len(g.metric) > MAX_METRIC_NAME:
            raise InvalidArgument(f"{where}.metric", f"must be 1-{MAX_METRIC_NAME} characters")
        if g.metric in seen:
            raise InvalidArgument(
                f"{where}.metric", f"{g.metric!r} is already guardrails[{seen[g.metric]}]"
            )
        seen[g.metric] = i
        try:  # the check the rule will build, on placeholder means
            GuardrailCheck(
                means=(0.0, 0.0),
                max_degradation=g.tolerance,
                lower_is_better=not g.higher_is_better,
            )
        except ValueError as err:
            raise InvalidArgument(f"{where}.tolerance", str(err)) from None


# Which monitoring field a detector settings error is about (its message's first word).
_DETECTOR_FIELDS = {
    "k": "spec.monitoring.detector_slack",
    "delta": "spec.monitoring.detector_slack",
    # No default threshold reaches the target run length with this much slack.
    "arl0": "spec.monitoring.detector_slack",
    "h": "spec.monitoring.detector_threshold",
    "lam": "spec.monitoring.detector_threshold",
}


def check_monitoring(
    spec: pb.ExperimentSpec, build: Callable[[pb.ExperimentSpec], object] | None = None
) -> None:
    """Reject a monitoring block that promotion or the monitors could not use, naming the
    field: checked when an experiment is created, so no later Promote, supervisor pass or
    restart is the first to find out.

    ``build``: what makes the monitor settings of a spec at run time (the supervisor's
    ``monitor_settings``), run here so its settings records judge the detector's numbers.
    """
    m = spec.monitoring
    # NaN fails both comparisons. 1 would leave the champion no traffic at all.
    if m.HasField("holdout_share") and not 0.0 <= m.holdout_share < 1.0:
        raise InvalidArgument("spec.monitoring.holdout_share", "must be in [0, 1)")
    _check_enum(m.detector, _DETECTORS, "spec.monitoring.detector")
    _check_enum(m.on_regression, _REACTIONS, "spec.monitoring.on_regression")
    if m.webhook_url:
        _check_webhook_url(m.webhook_url)
    if build is not None:
        try:
            build(spec)
        except ValueError as err:
            raise _settings_error(err, _DETECTOR_FIELDS, "spec.monitoring") from None


def _check_webhook_url(url: str) -> None:
    """An absolute http(s) URL with a host (what the webhook notifier can POST to)."""
    try:
        parsed = urllib.parse.urlsplit(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname)
        parsed.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError:
        ok = False
    if not ok or any(c.isspace() for c in url):
        raise InvalidArgument(
            "spec.monitoring.webhook_url",
            f"must be an absolute http(s) URL with a host, got {url!r}",
        )


def _settings_error(err: ValueError, fields: Mapping[str, str], default: str) -> InvalidArgument:
    """``err`` of a settings record as INVALID_ARGUMENT on the request field it is about.

    Settings records say which of their attributes is wrong first (``'epsilon must be
    ...'``); ``fields`` maps those openings (whole words) to request fields, the longest
    that matches wins, and a message that starts otherwise is about ``default``.
    """
    msg = str(err)
    matches = [o for o in fields if re.match(rf"{re.escape(o)}\b", msg)]
    if not matches:
        return InvalidArgument(default, msg)
    return InvalidArgument(fields[max(matches, key=len)], msg)


def spec_to_json(spec: pb.ExperimentSpec) -> str:
    """Canonical JSON of a spec, for the store."""
    return json_format.MessageToJson(spec, sort_keys=True, indent=None)


def spec_from_json(text: str) -> pb.ExperimentSpec:
    """Inverse of :func:`spec_to_json`."""
    spec = pb.ExperimentSpec()
    json_format.Parse(text, spec)
    return spec

import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_UNSPECIFIED: _ClassVar[Policy]
    POLICY_THOMPSON: _ClassVar[Policy]
    POLICY_UCB1: _ClassVar[Policy]
    POLICY_KL_UCB: _ClassVar[Policy]
    POLICY_UCB_NORMAL: _ClassVar[Policy]
    POLICY_EPSILON_GREEDY: _ClassVar[Policy]
    POLICY_FIXED_SPLIT: _ClassVar[Policy]

class RewardType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REWARD_TYPE_UNSPECIFIED: _ClassVar[RewardType]
    REWARD_TYPE_BERNOULLI: _ClassVar[RewardType]
    REWARD_TYPE_NORMAL: _ClassVar[RewardType]

class AllocationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALLOCATION_MODE_UNSPECIFIED: _ClassVar[AllocationMode]
    ALLOCATION_MODE_EXACT: _ClassVar[AllocationMode]
    ALLOCATION_MODE_TABLE: _ClassVar[AllocationMode]

class ExperimentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERIMENT_STATE_UNSPECIFIED: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_RUNNING: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_PAUSED: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_PROMOTED: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_REOPENED: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_ROLLED_BACK: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_ARCHIVED: _ClassVar[ExperimentState]

class DriftDetector(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRIFT_DETECTOR_UNSPECIFIED: _ClassVar[DriftDetector]
    DRIFT_DETECTOR_CUSUM: _ClassVar[DriftDetector]
    DRIFT_DETECTOR_PAGE_HINKLEY: _ClassVar[DriftDetector]
    DRIFT_DETECTOR_NONE: _ClassVar[DriftDetector]

class RegressionAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REGRESSION_ACTION_UNSPECIFIED: _ClassVar[RegressionAction]
    REGRESSION_ACTION_ROLLBACK: _ClassVar[RegressionAction]
    REGRESSION_ACTION_REOPEN: _ClassVar[RegressionAction]
    REGRESSION_ACTION_NOTIFY_ONLY: _ClassVar[RegressionAction]

class RewardStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REWARD_STATUS_UNSPECIFIED: _ClassVar[RewardStatus]
    REWARD_STATUS_ACCEPTED: _ClassVar[RewardStatus]
    REWARD_STATUS_DUPLICATE: _ClassVar[RewardStatus]
    REWARD_STATUS_EXPIRED: _ClassVar[RewardStatus]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_CREATED: _ClassVar[EventType]
    EVENT_TYPE_VARIANT_ADDED: _ClassVar[EventType]
    EVENT_TYPE_PROMOTED: _ClassVar[EventType]
    EVENT_TYPE_ROLLED_BACK: _ClassVar[EventType]
    EVENT_TYPE_REOPENED: _ClassVar[EventType]
    EVENT_TYPE_PAUSED: _ClassVar[EventType]
    EVENT_TYPE_RESUMED: _ClassVar[EventType]
    EVENT_TYPE_ARCHIVED: _ClassVar[EventType]
    EVENT_TYPE_DRIFT_DETECTED: _ClassVar[EventType]
    EVENT_TYPE_RETRAIN_REQUESTED: _ClassVar[EventType]
    EVENT_TYPE_SRM_DETECTED: _ClassVar[EventType]
    EVENT_TYPE_FUTILITY_STOPPED: _ClassVar[EventType]
POLICY_UNSPECIFIED: Policy
POLICY_THOMPSON: Policy
POLICY_UCB1: Policy
POLICY_KL_UCB: Policy
POLICY_UCB_NORMAL: Policy
POLICY_EPSILON_GREEDY: Policy
POLICY_FIXED_SPLIT: Policy
REWARD_TYPE_UNSPECIFIED: RewardType
REWARD_TYPE_BERNOULLI: RewardType
REWARD_TYPE_NORMAL: RewardType
ALLOCATION_MODE_UNSPECIFIED: AllocationMode
ALLOCATION_MODE_EXACT: AllocationMode
ALLOCATION_MODE_TABLE: AllocationMode
EXPERIMENT_STATE_UNSPECIFIED: ExperimentState
EXPERIMENT_STATE_RUNNING: ExperimentState
EXPERIMENT_STATE_PAUSED: ExperimentState
EXPERIMENT_STATE_PROMOTED: ExperimentState
EXPERIMENT_STATE_REOPENED: ExperimentState
EXPERIMENT_STATE_ROLLED_BACK: ExperimentState
EXPERIMENT_STATE_ARCHIVED: ExperimentState
DRIFT_DETECTOR_UNSPECIFIED: DriftDetector
DRIFT_DETECTOR_CUSUM: DriftDetector
DRIFT_DETECTOR_PAGE_HINKLEY: DriftDetector
DRIFT_DETECTOR_NONE: DriftDetector
REGRESSION_ACTION_UNSPECIFIED: RegressionAction
REGRESSION_ACTION_ROLLBACK: RegressionAction
REGRESSION_ACTION_REOPEN: RegressionAction
REGRESSION_ACTION_NOTIFY_ONLY: RegressionAction
REWARD_STATUS_UNSPECIFIED: RewardStatus
REWARD_STATUS_ACCEPTED: RewardStatus
REWARD_STATUS_DUPLICATE: RewardStatus
REWARD_STATUS_EXPIRED: RewardStatus
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_CREATED: EventType
EVENT_TYPE_VARIANT_ADDED: EventType
EVENT_TYPE_PROMOTED: EventType
EVENT_TYPE_ROLLED_BACK: EventType
EVENT_TYPE_REOPENED: EventType
EVENT_TYPE_PAUSED: EventType
EVENT_TYPE_RESUMED: EventType
EVENT_TYPE_ARCHIVED: EventType
EVENT_TYPE_DRIFT_DETECTED: EventType
EVENT_TYPE_RETRAIN_REQUESTED: EventType
EVENT_TYPE_SRM_DETECTED: EventType
EVENT_TYPE_FUTILITY_STOPPED: EventType

class ExperimentSpec(_message.Message):
    __slots__ = ("name", "variants", "policy", "reward_type", "prior_alpha", "prior_beta", "prior_mean", "prior_kappa", "prior_shape", "prior_rate", "epsilon", "weights", "discount", "allocation_mode", "table_refresh_rewards", "table_refresh_ms", "seed", "promotion", "traffic", "monitoring", "attribution_window_seconds", "default_reward")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REWARD_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_ALPHA_FIELD_NUMBER: _ClassVar[int]
    PRIOR_BETA_FIELD_NUMBER: _ClassVar[int]
    PRIOR_MEAN_FIELD_NUMBER: _ClassVar[int]
    PRIOR_KAPPA_FIELD_NUMBER: _ClassVar[int]
    PRIOR_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_RATE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DISCOUNT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_MODE_FIELD_NUMBER: _ClassVar[int]
    TABLE_REFRESH_REWARDS_FIELD_NUMBER: _ClassVar[int]
    TABLE_REFRESH_MS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    MONITORING_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_REWARD_FIELD_NUMBER: _ClassVar[int]
    name: str
    variants: _containers.RepeatedScalarFieldContainer[str]
    policy: Policy
    reward_type: RewardType
    prior_alpha: float
    prior_beta: float
    prior_mean: float
    prior_kappa: float
    prior_shape: float
    prior_rate: float
    epsilon: float
    weights: _containers.RepeatedScalarFieldContainer[float]
    discount: float
    allocation_mode: AllocationMode
    table_refresh_rewards: int
    table_refresh_ms: int
    seed: int
    promotion: PromotionSettings
    traffic: TrafficSettings
    monitoring: MonitoringSettings
    attribution_window_seconds: int
    default_reward: float
    def __init__(self, name: _Optional[str] = ..., variants: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[Policy, str]] = ..., reward_type: _Optional[_Union[RewardType, str]] = ..., prior_alpha: _Optional[float] = ..., prior_beta: _Optional[float] = ..., prior_mean: _Optional[float] = ..., prior_kappa: _Optional[float] = ..., prior_shape: _Optional[float] = ..., prior_rate: _Optional[float] = ..., epsilon: _Optional[float] = ..., weights: _Optional[_Iterable[float]] = ..., discount: _Optional[float] = ..., allocation_mode: _Optional[_Union[AllocationMode, str]] = ..., table_refresh_rewards: _Optional[int] = ..., table_refresh_ms: _Optional[int] = ..., seed: _Optional[int] = ..., promotion: _Optional[_Union[PromotionSettings, _Mapping]] = ..., traffic: _Optional[_Union[TrafficSettings, _Mapping]] = ..., monitoring: _Optional[_Union[MonitoringSettings, _Mapping]] = ..., attribution_window_seconds: _Optional[int] = ..., default_reward: _Optional[float] = ...) -> None: ...

class PromotionSettings(_message.Message):
    __slots__ = ("auto_promote", "p_best_threshold", "expected_loss_tolerance", "min_samples_per_variant", "min_duration_seconds", "min_effect", "futility_probability", "alpha", "power", "guardrails", "indifference_margin")
    AUTO_PROMOTE_FIELD_NUMBER: _ClassVar[int]
    P_BEST_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LOSS_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_PER_VARIANT_FIELD_NUMBER: _ClassVar[int]
    MIN_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_EFFECT_FIELD_NUMBER: _ClassVar[int]
    FUTILITY_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    INDIFFERENCE_MARGIN_FIELD_NUMBER: _ClassVar[int]
    auto_promote: bool
    p_best_threshold: float
    expected_loss_tolerance: float
    min_samples_per_variant: int
    min_duration_seconds: int
    min_effect: float
    futility_probability: float
    alpha: float
    power: float
    guardrails: _containers.RepeatedCompositeFieldContainer[Guardrail]
    indifference_margin: float
    def __init__(self, auto_promote: _Optional[bool] = ..., p_best_threshold: _Optional[float] = ..., expected_loss_tolerance: _Optional[float] = ..., min_samples_per_variant: _Optional[int] = ..., min_duration_seconds: _Optional[int] = ..., min_effect: _Optional[float] = ..., futility_probability: _Optional[float] = ..., alpha: _Optional[float] = ..., power: _Optional[float] = ..., guardrails: _Optional[_Iterable[_Union[Guardrail, _Mapping]]] = ..., indifference_margin: _Optional[float] = ...) -> None: ...

class Guardrail(_message.Message):
    __slots__ = ("metric", "higher_is_better", "tolerance")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    metric: str
    higher_is_better: bool
    tolerance: float
    def __init__(self, metric: _Optional[str] = ..., higher_is_better: _Optional[bool] = ..., tolerance: _Optional[float] = ...) -> None: ...

class TrafficSettings(_message.Message):
    __slots__ = ("floor", "cap", "control_share", "exploration_samples")
    FLOOR_FIELD_NUMBER: _ClassVar[int]
    CAP_FIELD_NUMBER: _ClassVar[int]
    CONTROL_SHARE_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    floor: float
    cap: float
    control_share: float
    exploration_samples: int
    def __init__(self, floor: _Optional[float] = ..., cap: _Optional[float] = ..., control_share: _Optional[float] = ..., exploration_samples: _Optional[int] = ...) -> None: ...

class MonitoringSettings(_message.Message):
    __slots__ = ("holdout_share", "detector", "detector_threshold", "detector_slack", "on_regression", "webhook_url")
    HOLDOUT_SHARE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_SLACK_FIELD_NUMBER: _ClassVar[int]
    ON_REGRESSION_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    holdout_share: float
    detector: DriftDetector
    detector_threshold: float
    detector_slack: float
    on_regression: RegressionAction
    webhook_url: str
    def __init__(self, holdout_share: _Optional[float] = ..., detector: _Optional[_Union[DriftDetector, str]] = ..., detector_threshold: _Optional[float] = ..., detector_slack: _Optional[float] = ..., on_regression: _Optional[_Union[RegressionAction, str]] = ..., webhook_url: _Optional[str] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("spec", "state", "champion", "create_time", "update_time", "version")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CHAMPION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    spec: ExperimentSpec
    state: ExperimentState
    champion: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    version: int
    def __init__(self, spec: _Optional[_Union[ExperimentSpec, _Mapping]] = ..., state: _Optional[_Union[ExperimentState, str]] = ..., champion: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class CreateExperimentRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ExperimentSpec
    def __init__(self, spec: _Optional[_Union[ExperimentSpec, _Mapping]] = ...) -> None: ...

class CreateExperimentResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    def __init__(self, experiment: _Optional[str] = ...) -> None: ...

class GetExperimentResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ("states", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[ExperimentState]
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[ExperimentState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments", "next_page_token")
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[Experiment]
    next_page_token: str
    def __init__(self, experiments: _Optional[_Iterable[_Union[Experiment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ArchiveExperimentRequest(_message.Message):
    __slots__ = ("experiment", "reason")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    reason: str
    def __init__(self, experiment: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ArchiveExperimentResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class AddVariantRequest(_message.Message):
    __slots__ = ("experiment", "variant", "weight", "reason")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    variant: str
    weight: float
    reason: str
    def __init__(self, experiment: _Optional[str] = ..., variant: _Optional[str] = ..., weight: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class AddVariantResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("experiment", "unit_id", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    UNIT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    unit_id: str
    context: _containers.ScalarMap[str, str]
    def __init__(self, experiment: _Optional[str] = ..., unit_id: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AssignResponse(_message.Message):
    __slots__ = ("variant", "variant_index", "decision_id", "propensity", "state", "allocation_epoch")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_INDEX_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    variant: str
    variant_index: int
    decision_id: str
    propensity: float
    state: ExperimentState
    allocation_epoch: int
    def __init__(self, variant: _Optional[str] = ..., variant_index: _Optional[int] = ..., decision_id: _Optional[str] = ..., propensity: _Optional[float] = ..., state: _Optional[_Union[ExperimentState, str]] = ..., allocation_epoch: _Optional[int] = ...) -> None: ...

class AssignBatchRequest(_message.Message):
    __slots__ = ("experiment", "count", "unit_ids")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    UNIT_IDS_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    count: int
    unit_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, experiment: _Optional[str] = ..., count: _Optional[int] = ..., unit_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AssignBatchResponse(_message.Message):
    __slots__ = ("variants", "variant_indices", "propensities", "batch_token", "state", "allocation_epoch")
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_INDICES_FIELD_NUMBER: _ClassVar[int]
    PROPENSITIES_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedScalarFieldContainer[str]
    variant_indices: _containers.RepeatedScalarFieldContainer[int]
    propensities: _containers.RepeatedScalarFieldContainer[float]
    batch_token: str
    state: ExperimentState
    allocation_epoch: int
    def __init__(self, variants: _Optional[_Iterable[str]] = ..., variant_indices: _Optional[_Iterable[int]] = ..., propensities: _Optional[_Iterable[float]] = ..., batch_token: _Optional[str] = ..., state: _Optional[_Union[ExperimentState, str]] = ..., allocation_epoch: _Optional[int] = ...) -> None: ...

class AssignStreamRequest(_message.Message):
    __slots__ = ("request_id", "batch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    batch: AssignBatchRequest
    def __init__(self, request_id: _Optional[int] = ..., batch: _Optional[_Union[AssignBatchRequest, _Mapping]] = ...) -> None: ...

class AssignStreamResponse(_message.Message):
    __slots__ = ("request_id", "batch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    batch: AssignBatchResponse
    def __init__(self, request_id: _Optional[int] = ..., batch: _Optional[_Union[AssignBatchResponse, _Mapping]] = ...) -> None: ...

class EventTarget(_message.Message):
    __slots__ = ("experiment", "variant", "event_id")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    variant: str
    event_id: str
    def __init__(self, experiment: _Optional[str] = ..., variant: _Optional[str] = ..., event_id: _Optional[str] = ...) -> None: ...

class RewardRequest(_message.Message):
    __slots__ = ("decision_id", "event", "value", "guardrails", "prediction_score")
    class GuardrailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SCORE_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    event: EventTarget
    value: float
    guardrails: _containers.ScalarMap[str, float]
    prediction_score: float
    def __init__(self, decision_id: _Optional[str] = ..., event: _Optional[_Union[EventTarget, _Mapping]] = ..., value: _Optional[float] = ..., guardrails: _Optional[_Mapping[str, float]] = ..., prediction_score: _Optional[float] = ...) -> None: ...

class RewardResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: RewardStatus
    def __init__(self, status: _Optional[_Union[RewardStatus, str]] = ...) -> None: ...

class RewardBatchRequest(_message.Message):
    __slots__ = ("experiment", "decision_ids", "batch_token", "indices", "event_ids", "variants", "variant_indices", "values", "prediction_scores", "guardrails")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    DECISION_IDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SCORES_FIELD_NUMBER: _ClassVar[int]
    GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    decision_ids: _containers.RepeatedScalarFieldContainer[str]
    batch_token: str
    indices: _containers.RepeatedScalarFieldContainer[int]
    event_ids: _containers.RepeatedScalarFieldContainer[str]
    variants: _containers.RepeatedScalarFieldContainer[str]
    variant_indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    prediction_scores: _containers.RepeatedScalarFieldContainer[float]
    guardrails: _containers.RepeatedCompositeFieldContainer[GuardrailColumn]
    def __init__(self, experiment: _Optional[str] = ..., decision_ids: _Optional[_Iterable[str]] = ..., batch_token: _Optional[str] = ..., indices: _Optional[_Iterable[int]] = ..., event_ids: _Optional[_Iterable[str]] = ..., variants: _Optional[_Iterable[str]] = ..., variant_indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., prediction_scores: _Optional[_Iterable[float]] = ..., guardrails: _Optional[_Iterable[_Union[GuardrailColumn, _Mapping]]] = ...) -> None: ...

class GuardrailColumn(_message.Message):
    __slots__ = ("metric", "values")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    metric: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, metric: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class RewardBatchResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "expired", "statuses")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    expired: int
    statuses: _containers.RepeatedScalarFieldContainer[RewardStatus]
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., expired: _Optional[int] = ..., statuses: _Optional[_Iterable[_Union[RewardStatus, str]]] = ...) -> None: ...

class RewardStreamRequest(_message.Message):
    __slots__ = ("request_id", "batch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    batch: RewardBatchRequest
    def __init__(self, request_id: _Optional[int] = ..., batch: _Optional[_Union[RewardBatchRequest, _Mapping]] = ...) -> None: ...

class RewardStreamResponse(_message.Message):
    __slots__ = ("request_id", "batch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    batch: RewardBatchResponse
    def __init__(self, request_id: _Optional[int] = ..., batch: _Optional[_Union[RewardBatchResponse, _Mapping]] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    def __init__(self, experiment: _Optional[str] = ...) -> None: ...

class VariantReport(_message.Message):
    __slots__ = ("name", "assignments", "rewards", "mean", "ci_low", "ci_high", "p_best", "expected_loss", "lift", "lift_ci_low", "lift_ci_high", "stratified_mean", "stratified_se", "ipw_mean", "stratified_lift", "stratified_lift_ci_low", "stratified_lift_ci_high")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    P_BEST_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LOSS_FIELD_NUMBER: _ClassVar[int]
    LIFT_FIELD_NUMBER: _ClassVar[int]
    LIFT_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    LIFT_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    STRATIFIED_MEAN_FIELD_NUMBER: _ClassVar[int]
    STRATIFIED_SE_FIELD_NUMBER: _ClassVar[int]
    IPW_MEAN_FIELD_NUMBER: _ClassVar[int]
    STRATIFIED_LIFT_FIELD_NUMBER: _ClassVar[int]
    STRATIFIED_LIFT_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    STRATIFIED_LIFT_CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    name: str
    assignments: int
    rewards: int
    mean: float
    ci_low: float
    ci_high: float
    p_best: float
    expected_loss: float
    lift: float
    lift_ci_low: float
    lift_ci_high: float
    stratified_mean: float
    stratified_se: float
    ipw_mean: float
    stratified_lift: float
    stratified_lift_ci_low: float
    stratified_lift_ci_high: float
    def __init__(self, name: _Optional[str] = ..., assignments: _Optional[int] = ..., rewards: _Optional[int] = ..., mean: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., p_best: _Optional[float] = ..., expected_loss: _Optional[float] = ..., lift: _Optional[float] = ..., lift_ci_low: _Optional[float] = ..., lift_ci_high: _Optional[float] = ..., stratified_mean: _Optional[float] = ..., stratified_se: _Optional[float] = ..., ipw_mean: _Optional[float] = ..., stratified_lift: _Optional[float] = ..., stratified_lift_ci_low: _Optional[float] = ..., stratified_lift_ci_high: _Optional[float] = ...) -> None: ...

class TestResult(_message.Message):
    __slots__ = ("name", "variant", "statistic", "p_value", "p_value_adjusted")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_ADJUSTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    variant: str
    statistic: float
    p_value: float
    p_value_adjusted: float
    def __init__(self, name: _Optional[str] = ..., variant: _Optional[str] = ..., statistic: _Optional[float] = ..., p_value: _Optional[float] = ..., p_value_adjusted: _Optional[float] = ...) -> None: ...

class SrmCheck(_message.Message):
    __slots__ = ("p_value", "flagged", "decisions", "sequential_p_value")
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    p_value: float
    flagged: bool
    decisions: int
    sequential_p_value: float
    def __init__(self, p_value: _Optional[float] = ..., flagged: _Optional[bool] = ..., decisions: _Optional[int] = ..., sequential_p_value: _Optional[float] = ...) -> None: ...

class PowerAnalysis(_message.Message):
    __slots__ = ("sample_size_per_variant", "samples_remaining", "min_effect", "alpha", "power")
    SAMPLE_SIZE_PER_VARIANT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_REMAINING_FIELD_NUMBER: _ClassVar[int]
    MIN_EFFECT_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    sample_size_per_variant: int
    samples_remaining: int
    min_effect: float
    alpha: float
    power: float
    def __init__(self, sample_size_per_variant: _Optional[int] = ..., samples_remaining: _Optional[int] = ..., min_effect: _Optional[float] = ..., alpha: _Optional[float] = ..., power: _Optional[float] = ...) -> None: ...

class PromotionStatus(_message.Message):
    __slots__ = ("decision", "candidate", "reasons")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    decision: str
    candidate: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, decision: _Optional[str] = ..., candidate: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class AllocationSnapshot(_message.Message):
    __slots__ = ("epoch", "time", "shares")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    time: _timestamp_pb2.Timestamp
    shares: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, epoch: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., shares: _Optional[_Iterable[float]] = ...) -> None: ...

class GetReportResponse(_message.Message):
    __slots__ = ("experiment", "variants", "interval_level", "tests", "srm", "power", "promotion", "allocation_history", "notes", "report_time")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    SRM_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_HISTORY_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIME_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    variants: _containers.RepeatedCompositeFieldContainer[VariantReport]
    interval_level: float
    tests: _containers.RepeatedCompositeFieldContainer[TestResult]
    srm: SrmCheck
    power: PowerAnalysis
    promotion: PromotionStatus
    allocation_history: _containers.RepeatedCompositeFieldContainer[AllocationSnapshot]
    notes: str
    report_time: _timestamp_pb2.Timestamp
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ..., variants: _Optional[_Iterable[_Union[VariantReport, _Mapping]]] = ..., interval_level: _Optional[float] = ..., tests: _Optional[_Iterable[_Union[TestResult, _Mapping]]] = ..., srm: _Optional[_Union[SrmCheck, _Mapping]] = ..., power: _Optional[_Union[PowerAnalysis, _Mapping]] = ..., promotion: _Optional[_Union[PromotionStatus, _Mapping]] = ..., allocation_history: _Optional[_Iterable[_Union[AllocationSnapshot, _Mapping]]] = ..., notes: _Optional[str] = ..., report_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("experiment", "variant", "reason")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    variant: str
    reason: str
    def __init__(self, experiment: _Optional[str] = ..., variant: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("experiment", "variant", "reason")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    variant: str
    reason: str
    def __init__(self, experiment: _Optional[str] = ..., variant: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("experiment", "reason")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    reason: str
    def __init__(self, experiment: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("experiment", "reason")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    reason: str
    def __init__(self, experiment: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("experiment", "types", "after_sequence")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    types: _containers.RepeatedScalarFieldContainer[EventType]
    after_sequence: int
    def __init__(self, experiment: _Optional[str] = ..., types: _Optional[_Iterable[_Union[EventType, str]]] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("sequence", "type", "experiment", "variant", "time", "reason", "details_json")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    type: EventType
    experiment: str
    variant: str
    time: _timestamp_pb2.Timestamp
    reason: str
    details_json: str
    def __init__(self, sequence: _Optional[int] = ..., type: _Optional[_Union[EventType, str]] = ..., experiment: _Optional[str] = ..., variant: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., details_json: _Optional[str] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

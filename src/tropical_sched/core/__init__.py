"""Engine-agnostic core types: requests, SLOs, snapshots, slack, decisions and errors (stdlib only)."""

from tropical_sched.core.decisions import DecodePlacement, RouteAction, RouteDecision
from tropical_sched.core.errors import (
    ConfigError,
    DataFormatError,
    ProfileFormatError,
    SimulationError,
    TraceFormatError,
    TropicalError,
    UnknownNameError,
    check_fields,
)
from tropical_sched.core.request import Request, RequestRecord, Slo
from tropical_sched.core.slack import (
    QueueFinish,
    decode_first_token_wait_s,
    expected_step_in_flight_s,
    min_tpot_slack_s,
    num_behind_tpot_pace,
    predicted_queue_finish,
    queued_prefill_s,
    tpot_slack_s,
    ttft_slack_s,
)
from tropical_sched.core.slo import (
    DEFAULT_TPOT_SLO_S,
    DEFAULT_TTFT_SLO_SCALE,
    SLO_CLASS_PRESETS,
    SloClass,
    SloSpec,
    parse_slo_classes,
)
from tropical_sched.core.snapshot import (
    ClusterSnapshot,
    DecodeBatch,
    DecodeView,
    PrefillState,
    WorkerRole,
    WorkerSnapshot,
)

__all__ = [
    "DEFAULT_TPOT_SLO_S",
    "DEFAULT_TTFT_SLO_SCALE",
    "SLO_CLASS_PRESETS",
    "ClusterSnapshot",
    "ConfigError",
    "DataFormatError",
    "DecodeBatch",
    "DecodePlacement",
    "DecodeView",
    "PrefillState",
    "ProfileFormatError",
    "QueueFinish",
    "Request",
    "RequestRecord",
    "RouteAction",
    "RouteDecision",
    "SimulationError",
    "Slo",
    "SloClass",
    "SloSpec",
    "TraceFormatError",
    "TropicalError",
    "UnknownNameError",
    "WorkerRole",
    "WorkerSnapshot",
    "check_fields",
    "decode_first_token_wait_s",
    "expected_step_in_flight_s",
    "min_tpot_slack_s",
    "num_behind_tpot_pace",
    "parse_slo_classes",
    "predicted_queue_finish",
    "queued_prefill_s",
    "tpot_slack_s",
    "ttft_slack_s",
]

"""The router service, the replay client and a fake engine (needs the ``serve`` extra:
``pip install 'tropical-sched[serve]'``)."""

from tropical_sched.serve.config import (
    CalibrationSettings,
    ClusterFileError,
    Engine,
    InstanceConfig,
    RouterConfig,
    SloDefaults,
    check_base_url,
    engine_address,
    load_router_config,
)
from tropical_sched.serve.decision_log import (
    DecisionLog,
    RouteSummary,
    complete_entry,
    new_entry,
    read_decision_log,
    summarize_decision_log,
)
from tropical_sched.serve.fake_engine import FakeEngine, FakeEngineStats
from tropical_sched.serve.openai import BadRequest
from tropical_sched.serve.replay import EndpointInfo, ReplaySettings, probe_endpoint, replay, replay_sync
from tropical_sched.serve.router import (
    MAX_REQUEST_BODY_BYTES,
    MAX_REQUEST_HEADER_BYTES,
    ROUTE_HEADER,
    SLO_HEADER_RANGE_MS,
    SLO_HEADERS,
    Router,
    parse_slo_headers,
)
from tropical_sched.serve.upstream import HttpError

__all__ = [
    "MAX_REQUEST_BODY_BYTES",
    "MAX_REQUEST_HEADER_BYTES",
    "ROUTE_HEADER",
    "SLO_HEADERS",
    "SLO_HEADER_RANGE_MS",
    "BadRequest",
    "CalibrationSettings",
    "ClusterFileError",
    "DecisionLog",
    "EndpointInfo",
    "Engine",
    "FakeEngine",
    "FakeEngineStats",
    "HttpError",
    "InstanceConfig",
    "ReplaySettings",
    "RouteSummary",
    "Router",
    "RouterConfig",
    "SloDefaults",
    "check_base_url",
    "complete_entry",
    "engine_address",
    "load_router_config",
    "new_entry",
    "parse_slo_headers",
    "probe_endpoint",
    "read_decision_log",
    "replay",
    "replay_sync",
    "summarize_decision_log",
]

"""The router service, the replay client and a fake engine (needs the ``serve`` extra:
``pip install 'tropical-sched[serve]'``)."""

from tropical_sched.serve.config import (
    ClusterFileError,
    Engine,
    InstanceConfig,
    RouterConfig,
    SloDefaults,
    load_router_config,
)
from tropical_sched.serve.fake_engine import FakeEngine, FakeEngineStats
from tropical_sched.serve.replay import ReplaySettings, replay, replay_sync
from tropical_sched.serve.router import SLO_HEADERS, Router, parse_slo_headers

__all__ = [
    "SLO_HEADERS",
    "ClusterFileError",
    "Engine",
    "FakeEngine",
    "FakeEngineStats",
    "InstanceConfig",
    "ReplaySettings",
    "Router",
    "RouterConfig",
    "SloDefaults",
    "load_router_config",
    "parse_slo_headers",
    "replay",
    "replay_sync",
]

"""Scheduling policies (Tropical and the baselines), their interfaces, the router queue and the registry."""

from tropical_sched.policies.base import EngineSettings, LocalScheduler, Policy, PolicyContext
from tropical_sched.policies.baselines import (
    ColocatedConfig,
    ColocatedPolicy,
    DistServeConfig,
    DistServePolicy,
    least_loaded,
)
from tropical_sched.policies.dispatcher import Dispatcher, DispatchStats
from tropical_sched.policies.local import FcfsScheduler, ShortestRemainingPrefillFirst, SlackCappedScheduler
from tropical_sched.policies.registry import POLICIES, PolicyEntry, make_policy, policy_names
from tropical_sched.policies.toggle import AttainmentWindow, MultiplexingToggle, ToggleConfig
from tropical_sched.policies.tropical import PrefillOrder, RouteOrder, SlackTest, TropicalConfig, TropicalPolicy

__all__ = [
    "POLICIES",
    "AttainmentWindow",
    "ColocatedConfig",
    "ColocatedPolicy",
    "DispatchStats",
    "Dispatcher",
    "DistServeConfig",
    "DistServePolicy",
    "EngineSettings",
    "FcfsScheduler",
    "LocalScheduler",
    "MultiplexingToggle",
    "Policy",
    "PolicyContext",
    "PolicyEntry",
    "PrefillOrder",
    "RouteOrder",
    "ShortestRemainingPrefillFirst",
    "SlackCappedScheduler",
    "SlackTest",
    "ToggleConfig",
    "TropicalConfig",
    "TropicalPolicy",
    "least_loaded",
    "make_policy",
    "policy_names",
]

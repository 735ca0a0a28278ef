"""Scheduling policies (Tropical and the baselines), their interfaces, the router queue and the registry."""

from tropical_sched.policies.base import EngineSettings, FirstTokenPredictor, LocalScheduler, Policy, PolicyContext
from tropical_sched.policies.baselines import (
    ColocatedBase,
    ColocatedConfig,
    ColocatedPolicy,
    DistServeConfig,
    DistServePolicy,
    least_loaded,
)
from tropical_sched.policies.dispatcher import Dispatcher, DispatchStats
from tropical_sched.policies.local import (
    FcfsScheduler,
    RunsEveryDecode,
    ShortestRemainingPrefillFirst,
    SlackCappedScheduler,
    deadline_floor_tokens,
)
from tropical_sched.policies.registry import POLICIES, PolicyEntry, make_policy, policy_names
from tropical_sched.policies.scorpio import CreditBatchingScheduler, ScorpioConfig, ScorpioPolicy, virtual_batch_size
from tropical_sched.policies.slos_serve import (
    AdmissionPlan,
    DecodePlannerScheduler,
    SlosServeConfig,
    SlosServePolicy,
    plan_admission,
)
from tropical_sched.policies.tempo import GainDensityScheduler, TempoConfig, TempoPolicy
from tropical_sched.policies.toggle import AttainmentWindow, MultiplexingToggle, ToggleConfig
from tropical_sched.policies.tropical import PrefillOrder, RouteOrder, SlackTest, TropicalConfig, TropicalPolicy

__all__ = [
    "POLICIES",
    "AdmissionPlan",
    "AttainmentWindow",
    "ColocatedBase",
    "ColocatedConfig",
    "ColocatedPolicy",
    "CreditBatchingScheduler",
    "DecodePlannerScheduler",
    "DispatchStats",
    "Dispatcher",
    "DistServeConfig",
    "DistServePolicy",
    "EngineSettings",
    "FcfsScheduler",
    "FirstTokenPredictor",
    "GainDensityScheduler",
    "LocalScheduler",
    "MultiplexingToggle",
    "Policy",
    "PolicyContext",
    "PolicyEntry",
    "PrefillOrder",
    "RouteOrder",
    "RunsEveryDecode",
    "ScorpioConfig",
    "ScorpioPolicy",
    "ShortestRemainingPrefillFirst",
    "SlackCappedScheduler",
    "SlackTest",
    "SlosServeConfig",
    "SlosServePolicy",
    "TempoConfig",
    "TempoPolicy",
    "ToggleConfig",
    "TropicalConfig",
    "TropicalPolicy",
    "deadline_floor_tokens",
    "least_loaded",
    "make_policy",
    "plan_admission",
    "policy_names",
    "virtual_batch_size",
]

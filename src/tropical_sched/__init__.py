"""tropical-sched: SLO-aware multiplexing between disaggregated and colocated LLM serving.

The engine-agnostic core: latency predictors fitted from GPU profiles, TTFT/TPOT slack accounting, the Tropical
routing rule and multiplexing toggle, baseline policies, and a discrete-event cluster simulator to compare them on
real traces. Engine adapters live in :mod:`tropical_sched.adapters`, the GPU profiler in
:mod:`tropical_sched.profiling`; this package never imports an engine or torch.

Quick start::

    from tropical_sched import load_profile, load_trace, make_workload, simulate, summarize

    profile = load_profile("a100-llama2-70b-tp4")
    workload = make_workload(load_trace("azure-conv-2023"), max_model_len=profile.max_model_len,
                             num_requests=2000, rate_per_s=2.5)
    for policy in ("tropical", "distserve"):
        print(policy, summarize(simulate(workload, profile, policy).records).slo_attainment)

The names below are imported on first use (PEP 562): engines load this package in every process through the
adapters' plug-in entry points, which need none of the simulator, the policies or numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tropical_sched._version import __version__

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from tropical_sched.core import (
        ClusterSnapshot,
        ConfigError,
        DataFormatError,
        DecodeBatch,
        DecodePlacement,
        PrefillState,
        ProfileFormatError,
        Request,
        RequestRecord,
        RouteAction,
        RouteDecision,
        SimulationError,
        Slo,
        SloClass,
        SloSpec,
        TraceFormatError,
        TropicalError,
        UnknownNameError,
        WorkerRole,
        WorkerSnapshot,
        min_tpot_slack_s,
        tpot_slack_s,
        ttft_slack_s,
    )
    from tropical_sched.metrics import AttainmentSummary, summarize
    from tropical_sched.policies import (
        Dispatcher,
        EngineSettings,
        LocalScheduler,
        Policy,
        PolicyContext,
        RouteOrder,
        SlackTest,
        ToggleConfig,
        TropicalConfig,
        TropicalPolicy,
        make_policy,
        policy_names,
    )
    from tropical_sched.predictors import (
        Profile,
        ProfileRangeWarning,
        StepTimeModel,
        bundled_profile_names,
        load_profile,
    )
    from tropical_sched.sim import ClusterConfig, SimulationResult, simulate
    from tropical_sched.sim.experiment import Experiment, ExperimentResult, run_experiment
    from tropical_sched.workloads import Trace, Workload, bundled_trace_names, load_trace, make_workload

# public name -> the module it comes from (must list exactly ``__all__`` less ``__version__``; tested)
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        (
            "ClusterSnapshot",
            "ConfigError",
            "DataFormatError",
            "DecodeBatch",
            "DecodePlacement",
            "PrefillState",
            "ProfileFormatError",
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
            "min_tpot_slack_s",
            "tpot_slack_s",
            "ttft_slack_s",
        ),
        "tropical_sched.core",
    ),
    **dict.fromkeys(("AttainmentSummary", "summarize"), "tropical_sched.metrics"),
    **dict.fromkeys(
        (
            "Dispatcher",
            "EngineSettings",
            "LocalScheduler",
            "Policy",
            "PolicyContext",
            "RouteOrder",
            "SlackTest",
            "ToggleConfig",
            "TropicalConfig",
            "TropicalPolicy",
            "make_policy",
            "policy_names",
        ),
        "tropical_sched.policies",
    ),
    **dict.fromkeys(
        ("Profile", "ProfileRangeWarning", "StepTimeModel", "bundled_profile_names", "load_profile"),
        "tropical_sched.predictors",
    ),
    **dict.fromkeys(("ClusterConfig", "SimulationResult", "simulate"), "tropical_sched.sim"),
    **dict.fromkeys(("Experiment", "ExperimentResult", "run_experiment"), "tropical_sched.sim.experiment"),
    **dict.fromkeys(
        ("Trace", "Workload", "bundled_trace_names", "load_trace", "make_workload"), "tropical_sched.workloads"
    ),
}

__all__ = [
    "AttainmentSummary",
    "ClusterConfig",
    "ClusterSnapshot",
    "ConfigError",
    "DataFormatError",
    "DecodeBatch",
    "DecodePlacement",
    "Dispatcher",
    "EngineSettings",
    "Experiment",
    "ExperimentResult",
    "LocalScheduler",
    "Policy",
    "PolicyContext",
    "PrefillState",
    "Profile",
    "ProfileFormatError",
    "ProfileRangeWarning",
    "Request",
    "RequestRecord",
    "RouteAction",
    "RouteDecision",
    "RouteOrder",
    "SimulationError",
    "SimulationResult",
    "SlackTest",
    "Slo",
    "SloClass",
    "SloSpec",
    "StepTimeModel",
    "ToggleConfig",
    "Trace",
    "TraceFormatError",
    "TropicalConfig",
    "TropicalError",
    "TropicalPolicy",
    "UnknownNameError",
    "WorkerRole",
    "WorkerSnapshot",
    "Workload",
    "__version__",
    "bundled_profile_names",
    "bundled_trace_names",
    "load_profile",
    "load_trace",
    "make_policy",
    "make_workload",
    "min_tpot_slack_s",
    "policy_names",
    "run_experiment",
    "simulate",
    "summarize",
    "tpot_slack_s",
    "ttft_slack_s",
]


def __getattr__(name: str) -> Any:
    """Import a public name (or a subpackage, as ``import tropical_sched; tropical_sched.sim`` did) on first use."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

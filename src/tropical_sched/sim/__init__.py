"""Discrete-event simulator of a GPU serving cluster driven by the latency profiles, and the evaluations on it."""

from tropical_sched.sim.calibration import SimCalibration
from tropical_sched.sim.config import ClusterConfig, DecodePlacementTime, FirstTokenAt
from tropical_sched.sim.experiment import Experiment, ExperimentResult, PolicyOutcome, run_experiment
from tropical_sched.sim.goodput import (
    CurvePoint,
    GoodputResult,
    SearchRun,
    SearchSettings,
    SloScaleResult,
    evaluate_point,
    find_threshold,
    run_goodput,
    run_slo_scale,
)
from tropical_sched.sim.plan import PlanCandidate, PlanResult, candidate_splits, cluster_yaml, run_plan
from tropical_sched.sim.simulator import (
    SimEvent,
    SimulationResult,
    SimulationStats,
    WorkerStats,
    build_requests,
    engine_profile_of,
    policy_context,
    simulate,
)

__all__ = [
    "ClusterConfig",
    "CurvePoint",
    "DecodePlacementTime",
    "Experiment",
    "ExperimentResult",
    "FirstTokenAt",
    "GoodputResult",
    "PlanCandidate",
    "PlanResult",
    "PolicyOutcome",
    "SearchRun",
    "SearchSettings",
    "SimCalibration",
    "SimEvent",
    "SimulationResult",
    "SimulationStats",
    "SloScaleResult",
    "WorkerStats",
    "build_requests",
    "candidate_splits",
    "cluster_yaml",
    "engine_profile_of",
    "evaluate_point",
    "find_threshold",
    "policy_context",
    "run_experiment",
    "run_goodput",
    "run_plan",
    "run_slo_scale",
    "simulate",
]

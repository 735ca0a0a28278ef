"""Discrete-event simulator of a GPU serving cluster driven by the latency profiles."""

from tropical_sched.sim.config import ClusterConfig
from tropical_sched.sim.simulator import (
    SimEvent,
    SimulationResult,
    SimulationStats,
    WorkerStats,
    build_requests,
    simulate,
)

__all__ = [
    "ClusterConfig",
    "SimEvent",
    "SimulationResult",
    "SimulationStats",
    "WorkerStats",
    "build_requests",
    "simulate",
]

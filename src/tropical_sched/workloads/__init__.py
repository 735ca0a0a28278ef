"""Workloads: bundled real traces, trace loaders, arrival processes and context limits."""

from tropical_sched.workloads.arrivals import gamma_arrivals, poisson_arrivals, rescale_arrivals
from tropical_sched.workloads.traces import BUNDLED_TRACES, BundledTrace, Trace, bundled_trace_names, load_trace
from tropical_sched.workloads.workload import (
    ArrivalProcess,
    Overlength,
    Workload,
    WorkloadReport,
    make_workload,
    workload_report_counts,
)

__all__ = [
    "BUNDLED_TRACES",
    "ArrivalProcess",
    "BundledTrace",
    "Overlength",
    "Trace",
    "Workload",
    "WorkloadReport",
    "bundled_trace_names",
    "gamma_arrivals",
    "load_trace",
    "make_workload",
    "poisson_arrivals",
    "rescale_arrivals",
    "workload_report_counts",
]

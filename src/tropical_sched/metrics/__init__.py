"""Metrics: SLO attainment, latency percentiles, simulator fidelity."""

from tropical_sched.metrics.attainment import AttainmentSummary, summarize, summarize_by_class
from tropical_sched.metrics.fidelity import FIDELITY_METRICS, FidelityRow, fidelity_rows
from tropical_sched.metrics.plots import plot_goodput, plot_plan

__all__ = [
    "FIDELITY_METRICS",
    "AttainmentSummary",
    "FidelityRow",
    "fidelity_rows",
    "plot_goodput",
    "plot_plan",
    "summarize",
    "summarize_by_class",
]

"""Metrics: SLO attainment, latency percentiles."""

from tropical_sched.metrics.attainment import AttainmentSummary, summarize
from tropical_sched.metrics.plots import plot_goodput

__all__ = ["AttainmentSummary", "plot_goodput", "summarize"]

"""Metrics: SLO attainment, latency percentiles."""

from tropical_sched.metrics.attainment import AttainmentSummary, summarize

__all__ = ["AttainmentSummary", "summarize"]

"""Simulator fidelity: a measured run against the simulation of the same requests (``tropical validate``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tropical_sched.metrics.attainment import AttainmentSummary

__all__ = ["FIDELITY_METRICS", "FidelityRow", "fidelity_rows"]

FIDELITY_METRICS = ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "slo_attainment")
"""The metrics compared, as :class:`AttainmentSummary` field names."""


@dataclass(frozen=True, slots=True)
class FidelityRow:
    """One metric, measured and simulated.

    Attributes:
        metric: an :class:`AttainmentSummary` field name (seconds for latencies, a fraction for attainment).
        measured: the value on the real endpoint.
        simulated: the value in the simulator.
        relative_error: ``|simulated - measured| / measured``; ``nan`` when ``measured`` is 0 or either is ``nan``.
    """

    metric: str
    measured: float
    simulated: float
    relative_error: float


def fidelity_rows(measured: AttainmentSummary, simulated: AttainmentSummary) -> list[FidelityRow]:
    """Compare the two runs metric by metric, in :data:`FIDELITY_METRICS` order."""
    rows = []
    for metric in FIDELITY_METRICS:
        m, s = float(getattr(measured, metric)), float(getattr(simulated, metric))
        error = abs(s - m) / m if m and not (math.isnan(m) or math.isnan(s)) else math.nan
        rows.append(FidelityRow(metric, m, s, error))
    return rows

"""SLO attainment and latency percentiles of a run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tropical_sched.core.request import RequestRecord

__all__ = ["AttainmentSummary", "summarize", "summarize_by_class"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AttainmentSummary:
    """Headline figures of one run (design doc section 1).

    Attributes:
        num_requests: requests in the run.
        slo_attainment: fraction meeting both TTFT and TPOT SLOs, in [0, 1] (rejected requests count as misses).
        ttft_attainment: fraction meeting the TTFT SLO, in [0, 1].
        tpot_attainment: fraction meeting the TPOT SLO, in [0, 1].
        ttft_p50_s, ttft_p90_s: TTFT percentiles over served requests, seconds (``nan`` if none was served).
        tpot_p50_s, tpot_p90_s: TPOT percentiles over served requests with more than one output token, seconds.
        num_rejected: requests declined by the scheduler.
        num_multiplexed: requests whose prefill ran on a multiplexing worker.
        num_preempted: requests preempted at least once.
    """

    num_requests: int
    slo_attainment: float
    ttft_attainment: float
    tpot_attainment: float
    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    num_rejected: int
    num_multiplexed: int
    num_preempted: int

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict (JSON-ready; ``nan`` stays ``nan``)."""
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def summarize(records: Sequence[RequestRecord]) -> AttainmentSummary:
    """Summarise a run's records.

    Percentiles use numpy's default (linear interpolation). TPOT percentiles exclude one-token requests, whose
    TPOT is 0 by definition and says nothing about decode speed.

    Args:
        records: one record per request.

    Returns:
        The summary; attainments are 0 for an empty run.
    """
    n = len(records)
    served = [r for r in records if not r.rejected]
    ttft = [r.ttft_s for r in served]
    tpot = [r.tpot_s for r in served if r.num_output_tokens > 1]
    met_ttft = sum(r.met_ttft for r in records)
    met_tpot = sum(r.met_tpot for r in records)
    met_both = sum(r.met_slo for r in records)
    return AttainmentSummary(
        num_requests=n,
        slo_attainment=met_both / n if n else 0.0,
        ttft_attainment=met_ttft / n if n else 0.0,
        tpot_attainment=met_tpot / n if n else 0.0,
        ttft_p50_s=_percentile(ttft, 50),
        ttft_p90_s=_percentile(ttft, 90),
        tpot_p50_s=_percentile(tpot, 50),
        tpot_p90_s=_percentile(tpot, 90),
        num_rejected=n - len(served),
        num_multiplexed=sum(r.multiplexed for r in records),
        num_preempted=sum(r.num_preemptions > 0 for r in records),
    )


def summarize_by_class(records: Sequence[RequestRecord]) -> dict[str, AttainmentSummary]:
    """Summaries per SLO class (:attr:`RequestRecord.slo_class`), classes in order of first appearance.

    Returns:
        ``{class name: summary}``; empty when no record has a class (a workload with uniform SLOs).
    """
    groups: dict[str, list[RequestRecord]] = {}
    for record in records:
        if record.slo_class:
            groups.setdefault(record.slo_class, []).append(record)
    return {name: summarize(group) for name, group in groups.items()}

"""Requests, their SLOs, and what happened to them.

Times are seconds (``*_s`` for durations, ``*_at_s`` for points in time on the caller's clock); token counts
are ``num_*_tokens``. Milliseconds appear only at the edges (CLI flags, HTTP headers) and are converted once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tropical_sched.core.errors import ConfigError

__all__ = ["Request", "RequestRecord", "Slo"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Slo:
    """Per-request latency targets (design doc section 1).

    Attributes:
        ttft_s: time-to-first-token target, seconds, > 0.
        tpot_s: time-per-output-token target (mean gap between tokens after the first), seconds, > 0.

    Raises:
        ConfigError: a target is not a positive finite number.
    """

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"Slo.{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A request as a scheduler sees it: what is known at arrival.

    The output length is not part of it (no real scheduler knows it); simulators keep it on the side.

    Attributes:
        request_id: unique id within one run.
        arrival_at_s: arrival time, seconds on the scheduler's clock.
        num_prompt_tokens: prompt length in tokens, >= 1.
        slo: the request's TTFT and TPOT targets.
        max_output_tokens: the client's cap on output tokens, if it gave one (>= 1).
        slo_class: the name of the request's SLO class in a workload with heterogeneous SLOs; ``""`` if none.

    Raises:
        ConfigError: a field is out of range.
    """

    request_id: str
    arrival_at_s: float
    num_prompt_tokens: int
    slo: Slo
    max_output_tokens: int | None = None
    slo_class: str = ""

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1:
            raise ConfigError(
                f"Request.num_prompt_tokens must be >= 1, got {self.num_prompt_tokens!r} (request {self.request_id!r})"
            )
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ConfigError(
                f"Request.max_output_tokens must be >= 1, got {self.max_output_tokens!r} (request {self.request_id!r})"
            )

    @property
    def ttft_deadline_at_s(self) -> float:
        """Latest acceptable first-token time: ``arrival_at_s + slo.ttft_s``."""
        return self.arrival_at_s + self.slo.ttft_s


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """What happened to one request, from arrival to its last token or its rejection.

    Attributes:
        request_id: the request's id.
        arrival_at_s: arrival time, seconds.
        num_prompt_tokens: prompt length as served (after any clipping), tokens.
        num_output_tokens: output tokens produced, counting the first; 0 if rejected.
        ttft_slo_s: the request's TTFT target, seconds.
        tpot_slo_s: the request's TPOT target, seconds.
        first_token_at_s: when the first output token was produced; ``None`` if rejected.
        finished_at_s: when the last output token was produced; ``None`` if rejected.
        first_scheduled_at_s: when its prefill first ran on a worker; ``None`` if rejected.
        prefill_worker_id: worker that computed the prefill (the last time, after any preemption).
        decode_worker_id: worker that produced the remaining tokens (same as the prefill worker unless the KV
            cache was transferred).
        multiplexed: the prefill ran on a multiplexing worker alongside its decodes (Tropical's local path).
        rejected: the scheduler declined the request; it counts as missing both SLOs.
        reject_reason: why, when rejected.
        num_preemptions: times the request was preempted and recomputed.
        slo_class: the request's SLO class name; ``""`` if the workload has none.
    """

    request_id: str
    arrival_at_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_slo_s: float
    tpot_slo_s: float
    first_token_at_s: float | None
    finished_at_s: float | None
    first_scheduled_at_s: float | None = None
    prefill_worker_id: int | None = None
    decode_worker_id: int | None = None
    multiplexed: bool = False
    rejected: bool = False
    reject_reason: str = ""
    num_preemptions: int = 0
    slo_class: str = ""

    @property
    def ttft_s(self) -> float:
        """Time to first token, seconds; ``inf`` for a rejected request."""
        if self.first_token_at_s is None:
            return math.inf
        return self.first_token_at_s - self.arrival_at_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first, seconds; 0 for one token; ``inf`` if rejected.

        Design doc section 1: ``(t_last - t_first) / (n_out - 1)``.
        """
        if self.rejected or self.first_token_at_s is None or self.finished_at_s is None:
            return math.inf
        if self.num_output_tokens <= 1:
            return 0.0
        return (self.finished_at_s - self.first_token_at_s) / (self.num_output_tokens - 1)

    @property
    def queueing_s(self) -> float:
        """Time from arrival until the prefill first ran, seconds; ``inf`` if rejected."""
        if self.first_scheduled_at_s is None:
            return math.inf
        return self.first_scheduled_at_s - self.arrival_at_s

    @property
    def met_ttft(self) -> bool:
        """TTFT within its SLO (a rejected request never meets it)."""
        return not self.rejected and self.ttft_s <= self.ttft_slo_s

    @property
    def met_tpot(self) -> bool:
        """TPOT within its SLO (a rejected request never meets it)."""
        return not self.rejected and self.tpot_s <= self.tpot_slo_s

    @property
    def met_slo(self) -> bool:
        """Both SLOs met: the request counts towards SLO attainment and goodput."""
        return self.met_ttft and self.met_tpot

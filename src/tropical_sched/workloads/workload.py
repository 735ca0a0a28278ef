"""Turn a trace into the requests of one run: context limit, request count, arrival process."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tropical_sched.core.errors import ConfigError
from tropical_sched.workloads.arrivals import gamma_arrivals, poisson_arrivals, rescale_arrivals
from tropical_sched.workloads.traces import Trace

__all__ = ["ArrivalProcess", "Overlength", "Workload", "WorkloadReport", "make_workload", "workload_report_counts"]

# Gamma burstiness beyond these draws degenerate gaps: shape 1 / cv^2 overflows or underflows (a division by zero
# deep in numpy), and well before that every gap is equal (cv -> 0) or all but one are 0 (cv -> inf).
_MIN_BURSTINESS_CV = 0.01
_MAX_BURSTINESS_CV = 100.0


class Overlength(str, enum.Enum):
    """What to do with prompts that do not fit the model's context."""

    FILTER = "filter"
    """Drop them (and report how many)."""
    CLIP = "clip"
    """Cut them to the longest prompt that fits (and report how many)."""


class ArrivalProcess(str, enum.Enum):
    """Where arrival times come from."""

    TRACE = "trace"
    """The trace's real arrivals, rescaled to the requested rate if one is given."""
    POISSON = "poisson"
    """Poisson arrivals at the requested rate."""
    GAMMA = "gamma"
    """Gamma arrivals at the requested rate with a given coefficient of variation (burstiness)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadReport:
    """How a workload was made from its trace.

    Attributes:
        trace: the trace's name.
        num_requests: requests in the workload.
        num_filtered: trace requests dropped because their prompt exceeded the context.
        num_prompts_clipped: the workload's prompts cut to fit the context.
        num_outputs_clipped: the workload's outputs cut so that prompt + output fits the context.
        max_model_len: the context limit applied, tokens.
        overlength: ``filter`` or ``clip``.
        arrival_process: how arrivals were made.
        rate_per_s: the workload's mean arrival rate, requests per second.
    """

    trace: str
    num_requests: int
    num_filtered: int
    num_prompts_clipped: int
    num_outputs_clipped: int
    max_model_len: int
    overlength: Overlength
    arrival_process: ArrivalProcess
    rate_per_s: float

    def describe(self) -> str:
        """One line for logs and the CLI."""
        parts = [
            f"{self.num_requests} requests of {self.trace} at {self.rate_per_s:.3g} req/s "
            f"({self.arrival_process.value} arrivals)"
        ]
        if self.num_filtered:
            parts.append(f"{self.num_filtered} prompts over {self.max_model_len - 1} tokens filtered out")
        if self.num_prompts_clipped:
            parts.append(f"{self.num_prompts_clipped} prompts clipped to {self.max_model_len - 1} tokens")
        if self.num_outputs_clipped:
            parts.append(f"{self.num_outputs_clipped} outputs clipped to the {self.max_model_len}-token context")
        return "; ".join(parts)


def workload_report_counts(reports: Sequence[WorkloadReport]) -> dict[str, int]:
    """The counts of ``reports``, summed, for result JSON (``workload_report``): ``num_requests``,
    ``num_filtered``, ``num_prompts_clipped``, ``num_outputs_clipped``."""
    fields = ("num_requests", "num_filtered", "num_prompts_clipped", "num_outputs_clipped")
    return {name: sum(getattr(report, name) for report in reports) for name in fields}


@dataclass(frozen=True, slots=True)
class Workload:
    """The requests of one run, column-wise.

    Attributes:
        arrival_at_s: arrival times, seconds, sorted, shape (n,).
        num_prompt_tokens: prompt lengths, tokens, shape (n,).
        num_output_tokens: output lengths, tokens, >= 1, shape (n,).
        report: how it was made.
    """

    arrival_at_s: np.ndarray
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray
    report: WorkloadReport

    def __len__(self) -> int:
        return int(self.arrival_at_s.shape[0])


def make_workload(
    trace: Trace,
    *,
    max_model_len: int,
    num_requests: int | None = None,
    rate_per_s: float | None = None,
    arrival_process: ArrivalProcess | str | None = None,
    burstiness_cv: float = 1.0,
    overlength: Overlength | str = Overlength.FILTER,
    seed: int = 0,
    start_index: int = 0,
) -> Workload:
    """Build a run's requests from a trace.

    Steps, in order: apply the context limit to the whole trace (``filter`` drops prompts longer than
    ``max_model_len - 1``, ``clip`` cuts them; outputs are then cut so prompt + output <= ``max_model_len``, as an
    engine would stop there); choose the requests (the first ``num_requests`` of a trace with arrivals, keeping
    its burst pattern; a seeded random sample of a length-only trace); make the arrivals.

    Args:
        trace: the source trace.
        max_model_len: the model's context, tokens, >= 2.
        num_requests: how many requests; default all (after filtering).
        rate_per_s: target mean rate, requests per second. Required for Poisson/Gamma arrivals and length-only
            traces; with real arrivals, rescales them.
        arrival_process: ``trace``, ``poisson`` or ``gamma``; default ``trace`` if the trace has arrivals, else
            ``poisson``.
        burstiness_cv: coefficient of variation of Gamma inter-arrival times, in [0.01, 100].
        overlength: ``filter`` or ``clip``.
        seed: seed of the generator used for sampling and arrivals.
        start_index: with a timed trace, start at this request (after filtering; wraps around), so that runs with
            different windows of the same trace can be compared.

    Returns:
        The workload and its report.

    Raises:
        ConfigError: a parameter is out of range, a rate is missing, or nothing is left after filtering.
    """
    if max_model_len < 2:
        raise ConfigError(f"max_model_len must be >= 2, got {max_model_len!r}")
    try:
        overlength = Overlength(overlength)
    except ValueError:
        raise ConfigError(f"overlength must be 'filter' or 'clip', got {overlength!r}") from None
    if arrival_process is None:
        arrival_process = ArrivalProcess.TRACE if trace.arrival_at_s is not None else ArrivalProcess.POISSON
    try:
        arrival_process = ArrivalProcess(arrival_process)
    except ValueError:
        raise ConfigError(
            f"arrival_process must be one of {[a.value for a in ArrivalProcess]}, got {arrival_process!r}"
        ) from None
    if arrival_process is ArrivalProcess.TRACE and trace.arrival_at_s is None:
        raise ConfigError(f"trace {trace.name} has no arrival times; use Poisson or Gamma arrivals with a rate")
    if arrival_process is not ArrivalProcess.TRACE and rate_per_s is None:
        raise ConfigError(f"{arrival_process.value} arrivals need a rate (rate_per_s / --rate) for {trace.name}")
    if arrival_process is ArrivalProcess.GAMMA and not _MIN_BURSTINESS_CV <= burstiness_cv <= _MAX_BURSTINESS_CV:
        raise ConfigError(
            f"burstiness_cv (--burstiness) must be in [{_MIN_BURSTINESS_CV:g}, {_MAX_BURSTINESS_CV:g}] for gamma "
            f"arrivals, got {burstiness_cv!r}"
        )
    if num_requests is not None and num_requests < 1:
        raise ConfigError(f"num_requests must be >= 1, got {num_requests!r}")
    if start_index < 0:
        raise ConfigError(f"start_index must be >= 0, got {start_index!r}")

    rng = np.random.default_rng(seed)
    prompt = trace.num_prompt_tokens.copy()
    output = trace.num_output_tokens.copy()
    arrival = trace.arrival_at_s.copy() if trace.arrival_at_s is not None else None
    max_prompt = max_model_len - 1
    over = prompt > max_prompt
    num_filtered = 0
    if overlength is Overlength.FILTER:
        num_filtered = int(over.sum())
        keep = ~over
        prompt, output = prompt[keep], output[keep]
        arrival = arrival[keep] if arrival is not None else None
        over = over[keep]
    else:
        prompt = np.minimum(prompt, max_prompt)
    if len(prompt) == 0:
        raise ConfigError(f"no request of {trace.name} fits max_model_len={max_model_len}")

    if trace.arrival_at_s is not None and start_index % len(prompt):
        shift = start_index % len(prompt)
        prompt, output, over = np.roll(prompt, -shift), np.roll(output, -shift), np.roll(over, -shift)
        if arrival is not None:  # the wrapped part follows the end at the trace's mean gap
            gap = (arrival[-1] - arrival[0]) / max(len(arrival) - 1, 1)
            arrival = np.concatenate([arrival[shift:], arrival[:shift] + arrival[-1] - arrival[0] + gap])
    if arrival_process is ArrivalProcess.TRACE:
        n = len(prompt) if num_requests is None else min(num_requests, len(prompt))
        prompt, output, over = prompt[:n], output[:n], over[:n]
        assert arrival is not None
        arrival = arrival[:n] - arrival[0]
        if rate_per_s is not None:
            arrival = rescale_arrivals(arrival, rate_per_s)
    else:
        n = len(prompt) if num_requests is None else num_requests
        if trace.arrival_at_s is not None:
            index = np.arange(min(n, len(prompt)))  # a timed trace keeps its order
        else:
            index = rng.choice(len(prompt), size=n, replace=n > len(prompt))
        prompt, output, over = prompt[index], output[index], over[index]
        assert rate_per_s is not None
        if arrival_process is ArrivalProcess.POISSON:
            arrival = poisson_arrivals(len(prompt), rate_per_s, rng)
        else:
            arrival = gamma_arrivals(len(prompt), rate_per_s, rng, cv=burstiness_cv)

    output_limit = max_model_len - prompt
    num_outputs_clipped = int((output > output_limit).sum())
    output = np.minimum(output, output_limit)
    span = float(arrival[-1] - arrival[0]) if len(arrival) > 1 else 0.0
    rate = (len(arrival) - 1) / span if span > 0 else float("inf")
    report = WorkloadReport(
        trace=trace.name,
        num_requests=len(prompt),
        num_filtered=num_filtered,
        num_prompts_clipped=int(over.sum()),
        num_outputs_clipped=num_outputs_clipped,
        max_model_len=max_model_len,
        overlength=overlength,
        arrival_process=arrival_process,
        rate_per_s=rate,
    )
    return Workload(
        arrival_at_s=np.asarray(arrival, dtype=np.float64),
        num_prompt_tokens=prompt.astype(np.int64),
        num_output_tokens=output.astype(np.int64),
        report=report,
    )

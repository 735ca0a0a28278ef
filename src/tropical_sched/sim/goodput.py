"""Goodput: the highest request rate a deployment sustains at a target SLO attainment, and the SLO-scale view.

Goodput (DistServe, OSDI'24, section 2; the Tropical paper's headline metric) is the highest request rate at which
the joint SLO attainment stays at or above a target (0.9), here also divided by the number of GPUs. It is found by
search on the rate: from a starting rate, double (or halve) until the target is bracketed, then bisect until the
bracket is narrower than a relative tolerance. Every evaluation is one simulation, and all of them are kept as the
attainment curve. The search assumes attainment falls as the rate rises; a noisy curve can make it settle on a
local crossing, which is why several seeds (different windows of a timed trace, or different Poisson draws) are run
and their spread reported.

The SLO-scale view (DistServe, section 6) fixes the rate and multiplies both SLOs by ``s``: the tightest ``s`` at
which a policy still reaches the target says how much latency headroom it needs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from tropical_sched.core.errors import ConfigError, check_fields
from tropical_sched.core.slo import SloSpec
from tropical_sched.metrics.attainment import summarize
from tropical_sched.predictors.profile import Profile, load_profile
from tropical_sched.sim.experiment import Experiment
from tropical_sched.sim.simulator import simulate
from tropical_sched.workloads.traces import Trace, load_trace
from tropical_sched.workloads.workload import Workload, make_workload, workload_report_counts

__all__ = [
    "CurvePoint",
    "GoodputResult",
    "SearchRun",
    "SearchSettings",
    "SloScaleResult",
    "default_start_rate_per_s",
    "evaluate_point",
    "find_threshold",
    "run_goodput",
    "run_slo_scale",
    "scaled",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchSettings:
    """How a threshold is searched.

    Attributes:
        target_attainment: joint SLO attainment to reach, in (0, 1].
        relative_tolerance: stop when the bracket is narrower than this fraction of its lower end, > 0.
        max_evaluations: simulations per search at most, >= 2.
        initial_value: where the search starts (a rate in req/s, or an SLO scale); ``None`` picks one from the
            workload (rates) or 1.0 (SLO scales).
    """

    target_attainment: float = 0.9
    relative_tolerance: float = 0.03
    max_evaluations: int = 16
    initial_value: float | None = None

    def __post_init__(self) -> None:
        checks = {
            "target_attainment": 0 < self.target_attainment <= 1,
            "relative_tolerance": self.relative_tolerance > 0,
            "max_evaluations": self.max_evaluations >= 2,
            "initial_value": self.initial_value is None or self.initial_value > 0,
        }
        check_fields(self, checks)


@dataclass(frozen=True, slots=True, kw_only=True)
class CurvePoint:
    """One simulation of a search.

    Attributes:
        value: the rate (req/s) or SLO scale simulated.
        slo_attainment: joint attainment, in [0, 1].
        ttft_attainment: TTFT attainment, in [0, 1].
        tpot_attainment: TPOT attainment, in [0, 1].
        ttft_p90_s: P90 TTFT, seconds.
        tpot_p90_s: P90 TPOT, seconds.
        multiplexed_fraction: share of requests whose prefill was multiplexed, in [0, 1].
    """

    value: float
    slo_attainment: float
    ttft_attainment: float
    tpot_attainment: float
    ttft_p90_s: float
    tpot_p90_s: float
    multiplexed_fraction: float


def find_threshold(
    evaluate: Callable[[float], CurvePoint],
    start: float,
    settings: SearchSettings,
    *,
    passing_side: Literal["below", "above"],
) -> tuple[float, list[CurvePoint]]:
    """Search the boundary between values that reach the target attainment and values that do not.

    ``passing_side="below"``: low values pass (rates); the result is the highest passing value seen, 0 if none.
    ``passing_side="above"``: high values pass (SLO scales); the result is the lowest passing value, ``inf`` if none.

    Args:
        evaluate: simulates one value.
        start: the first value, > 0.
        settings: target, tolerance and evaluation budget.
        passing_side: which side of the boundary passes.

    Returns:
        The threshold and every point evaluated, sorted by value.
    """
    target = settings.target_attainment
    best_pass: float | None = None
    best_fail: float | None = None
    points: list[CurvePoint] = []
    value = start
    for _ in range(settings.max_evaluations):
        point = evaluate(value)
        points.append(point)
        if point.slo_attainment >= target:
            best_pass = (
                value
                if best_pass is None
                else (max(best_pass, value) if passing_side == "below" else min(best_pass, value))
            )
        else:
            best_fail = (
                value
                if best_fail is None
                else (min(best_fail, value) if passing_side == "below" else max(best_fail, value))
            )
        if best_pass is None:
            value = value / 2 if passing_side == "below" else value * 2
            if value < 1e-4 or value > 1e4:
                break
        elif best_fail is None:
            value = value * 2 if passing_side == "below" else value / 2
            if value < 1e-4 or value > 1e4:
                break
        else:
            low, high = sorted((best_pass, best_fail))
            if high - low <= settings.relative_tolerance * low:
                break
            value = (low + high) / 2
    points.sort(key=lambda p: p.value)
    if best_pass is None:
        return (0.0 if passing_side == "below" else math.inf), points
    return best_pass, points


@lru_cache(maxsize=8)
def _cached_inputs(trace: str, profile: str) -> tuple[Trace, Profile]:
    return load_trace(trace), _cached_profile(profile)


@lru_cache(maxsize=8)
def _cached_profile(name: str) -> Profile:
    return load_profile(name)


def _point_workload(experiment: Experiment, seed: int, rate_per_s: float | None) -> Workload:
    """The requests of one simulated point: seed ``seed``'s slice of the trace at ``rate_per_s``. The slice, and
    so what was filtered or clipped, does not depend on the rate."""
    trace, profile = _cached_inputs(experiment.trace, experiment.profile)
    num_requests = experiment.num_requests or len(trace)
    return make_workload(
        trace,
        max_model_len=profile.max_model_len,
        num_requests=experiment.num_requests,
        rate_per_s=rate_per_s,
        arrival_process=experiment.arrival_process,
        burstiness_cv=experiment.burstiness_cv,
        overlength=experiment.overlength,
        seed=seed,
        start_index=seed * num_requests,
    )


def workload_report_json(experiment: Experiment, seeds: Sequence[int]) -> dict[str, int]:
    """What was filtered or clipped to fit the model's context, summed over the seeds' workloads (the same at
    every rate): ``num_filtered``, ``num_prompts_clipped``, ``num_outputs_clipped``, and ``num_requests``."""
    rate_per_s = experiment.rate_per_s if experiment.rate_per_s is not None else 1.0  # any rate: the same slice
    reports = [_point_workload(experiment, seed, rate_per_s).report for seed in seeds]
    return workload_report_counts(reports)


def evaluate_point(
    experiment: Experiment, policy: str, seed: int, *, rate_per_s: float | None = None, slo_scale: float | None = None
) -> CurvePoint:
    """Simulate one policy at one rate (or SLO scale) and one seed.

    The seed picks the window of a timed trace (``start_index = seed * num_requests``) or the draw of sampled
    lengths and Poisson/Gamma arrivals.

    Args:
        experiment: the setting; its ``rate_per_s`` and ``slo`` are the defaults for the two overrides.
        policy: a registered policy name.
        seed: the seed, >= 0.
        rate_per_s: the rate to simulate, req/s.
        slo_scale: multiplier on both SLOs of ``experiment.slo``.

    Returns:
        The point's attainments and latencies.
    """
    profile = _cached_inputs(experiment.trace, experiment.profile)[1]
    workload = _point_workload(experiment, seed, rate_per_s if rate_per_s is not None else experiment.rate_per_s)
    slo = experiment.slo if slo_scale is None else scaled(experiment.slo, slo_scale)
    result = simulate(
        workload,
        profile,
        policy,
        cluster=experiment.cluster,
        slo=slo,
        policy_options=experiment.policy_options.get(policy),
        engine_profile=_cached_profile(experiment.engine_profile) if experiment.engine_profile else None,
        worker_profiles=[_cached_profile(name) for name in experiment.worker_profiles]
        if experiment.worker_profiles is not None
        else None,
    )
    summary = summarize(result.records)
    return CurvePoint(
        value=rate_per_s if rate_per_s is not None else (slo_scale if slo_scale is not None else math.nan),
        slo_attainment=summary.slo_attainment,
        ttft_attainment=summary.ttft_attainment,
        tpot_attainment=summary.tpot_attainment,
        ttft_p90_s=summary.ttft_p90_s,
        tpot_p90_s=summary.tpot_p90_s,
        multiplexed_fraction=summary.num_multiplexed / max(summary.num_requests, 1),
    )


def default_start_rate_per_s(experiment: Experiment) -> float:
    """A starting rate near the cluster's prefill capacity: half of ``num_workers / mean isolated prefill``."""
    trace, profile = _cached_inputs(experiment.trace, experiment.profile)
    model = profile.step_time
    prompts = trace.num_prompt_tokens[: experiment.num_requests or len(trace)]
    capped = [min(int(n), profile.max_model_len - 1) for n in prompts[:2000]]
    mean_prefill_s = statistics.fmean(model.prefill_time_s(n) for n in capped)
    return round(0.5 * experiment.num_workers / mean_prefill_s, 2)


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchRun:
    """One policy's search with one seed.

    Attributes:
        policy: the policy.
        seed: the seed.
        threshold: the goodput (req/s) or the tightest SLO scale.
        curve: every point evaluated, sorted by value.
    """

    policy: str
    seed: int
    threshold: float
    curve: tuple[CurvePoint, ...]


def _goodput_task(experiment: Experiment, policy: str, seed: int, settings: SearchSettings, start: float) -> SearchRun:
    threshold, curve = find_threshold(
        lambda rate: evaluate_point(experiment, policy, seed, rate_per_s=rate), start, settings, passing_side="below"
    )
    return SearchRun(policy=policy, seed=seed, threshold=threshold, curve=tuple(curve))


def _slo_scale_task(
    experiment: Experiment, policy: str, seed: int, settings: SearchSettings, start: float
) -> SearchRun:
    threshold, curve = find_threshold(
        lambda scale: evaluate_point(experiment, policy, seed, slo_scale=scale), start, settings, passing_side="above"
    )
    return SearchRun(policy=policy, seed=seed, threshold=threshold, curve=tuple(curve))


def _run_tasks(
    task: Callable[[Experiment, str, int, SearchSettings, float], SearchRun],
    work: Sequence[tuple[Hashable, Experiment, str, int]],
    settings: SearchSettings,
    start: float,
    jobs: int,
    progress: Callable[[int], None] | None,
) -> dict[Hashable, list[SearchRun]]:
    """Run ``task`` on every ``(key, experiment, policy, seed)`` of ``work``, in ``jobs`` processes; the runs by
    key, each list sorted by seed."""
    runs: dict[Hashable, list[SearchRun]] = {key: [] for key, *_ in work}
    if jobs <= 1:
        for key, experiment, policy, seed in work:
            runs[key].append(task(experiment, policy, seed, settings, start))
            if progress is not None:
                progress(1)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {
                pool.submit(task, experiment, policy, seed, settings, start): key
                for key, experiment, policy, seed in work
            }
            for future in as_completed(futures):
                runs[futures[future]].append(future.result())
                if progress is not None:
                    progress(1)
    for key_runs in runs.values():
        key_runs.sort(key=lambda r: r.seed)
    return runs


def _run_searches(
    task: Callable[[Experiment, str, int, SearchSettings, float], SearchRun],
    experiment: Experiment,
    seeds: Sequence[int],
    settings: SearchSettings,
    start: float,
    jobs: int,
    progress: Callable[[int], None] | None,
) -> dict[str, list[SearchRun]]:
    work = [(policy, experiment, policy, seed) for policy in experiment.policies for seed in seeds]
    runs = _run_tasks(task, work, settings, start, jobs, progress)
    return {str(policy): policy_runs for policy, policy_runs in runs.items()}


def _jobs(jobs: int | None) -> int:
    if jobs is None:
        return max(1, min(os.cpu_count() or 1, 8))
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs!r}")
    return jobs


@dataclass(frozen=True, slots=True, kw_only=True)
class GoodputResult:
    """Goodput of every policy of an experiment.

    Attributes:
        experiment: the setting (its ``rate_per_s`` is ignored: the rate is searched).
        settings: the search settings.
        num_gpus: GPUs in the cluster.
        runs: per policy, one search per seed.
    """

    experiment: Experiment
    settings: SearchSettings
    num_gpus: int
    runs: dict[str, list[SearchRun]]

    def goodput_per_s(self, policy: str) -> float:
        """Mean goodput over seeds, req/s."""
        return statistics.fmean(run.threshold for run in self.runs[policy])

    def spread_per_s(self, policy: str) -> tuple[float, float]:
        """(min, max) goodput over seeds, req/s."""
        values = [run.threshold for run in self.runs[policy]]
        return min(values), max(values)

    def best_baseline(self, policy: str = "tropical") -> tuple[str, float] | None:
        """The other policy with the highest goodput, and that goodput; ``None`` if there is no other."""
        others = [(name, self.goodput_per_s(name)) for name in self.runs if name != policy]
        return max(others, key=lambda item: item[1]) if others else None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data, ``schema_version`` 1."""
        exp = self.experiment
        return {
            "schema_version": 1,
            "target_attainment": self.settings.target_attainment,
            "trace": exp.trace,
            "profile": exp.profile,
            "num_workers": exp.num_workers,
            "num_gpus": self.num_gpus,
            "num_requests_per_point": exp.num_requests,
            "slo": exp.slo.describe(),
            "engine": exp.describe_engine(),
            "seeds": [run.seed for run in next(iter(self.runs.values()))],
            "workload_report": workload_report_json(exp, [run.seed for run in next(iter(self.runs.values()))]),
            "policies": {
                name: {
                    "goodput_per_s": self.goodput_per_s(name),
                    "goodput_per_gpu_per_s": self.goodput_per_s(name) / self.num_gpus,
                    "goodput_per_s_by_seed": [run.threshold for run in runs],
                    "curve": sorted([point.value, point.slo_attainment] for run in runs for point in run.curve),
                    "points": [{"seed": run.seed, **dataclasses.asdict(point)} for run in runs for point in run.curve],
                }
                for name, runs in self.runs.items()
            },
        }


def run_goodput(
    experiment: Experiment,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    settings: SearchSettings | None = None,
    jobs: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> GoodputResult:
    """Search every policy's goodput, once per seed, in parallel processes.

    Args:
        experiment: the setting; ``num_requests`` is the size of each simulated point (default: the whole trace,
            which is slow; 1,000 to 3,000 is typical).
        seeds: seeds to run; each gives one search per policy.
        settings: target, tolerance, evaluation budget and start.
        jobs: worker processes (default: the CPU count, at most 8).
        progress: called with 1 after every finished search.

    Returns:
        Per policy and seed, the goodput and the curve.

    Raises:
        ConfigError: a setting is invalid.
    """
    settings = settings or SearchSettings()
    if not seeds:
        raise ConfigError("seeds is empty")
    start = settings.initial_value or default_start_rate_per_s(experiment)
    profile = _cached_inputs(experiment.trace, experiment.profile)[1]
    runs = _run_searches(_goodput_task, experiment, seeds, settings, start, _jobs(jobs), progress)
    return GoodputResult(
        experiment=experiment,
        settings=settings,
        num_gpus=experiment.num_workers * profile.tensor_parallel_size,
        runs=runs,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SloScaleResult:
    """The tightest SLO scale at which each policy reaches the target at a fixed rate.

    Attributes:
        experiment: the setting (its ``rate_per_s`` is the fixed rate).
        settings: the search settings.
        runs: per policy, one search per seed (threshold = the tightest scale, ``inf`` if none reached it).
    """

    experiment: Experiment
    settings: SearchSettings
    runs: dict[str, list[SearchRun]]

    def tightest_scale(self, policy: str) -> float:
        """Mean over seeds of the tightest passing scale (``inf`` if a seed never passed)."""
        return statistics.fmean(run.threshold for run in self.runs[policy])

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data, ``schema_version`` 1."""
        return {
            "schema_version": 1,
            "target_attainment": self.settings.target_attainment,
            "rate_per_s": self.experiment.rate_per_s,
            "engine": self.experiment.describe_engine(),
            "policies": {
                name: {
                    "tightest_slo_scale": _finite_or_none(self.tightest_scale(name)),
                    "curve": sorted([p.value, p.slo_attainment] for run in runs for p in run.curve),
                }
                for name, runs in self.runs.items()
            },
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_slo_scale(
    experiment: Experiment,
    *,
    seeds: Sequence[int] = (0,),
    settings: SearchSettings | None = None,
    jobs: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> SloScaleResult:
    """Search, at the experiment's fixed rate, the tightest scale ``s`` of both SLOs that still reaches the target.

    Raises:
        ConfigError: the experiment has no fixed rate for a trace without arrivals, or a setting is invalid.
    """
    settings = settings or SearchSettings()
    start = settings.initial_value or 1.0
    runs = _run_searches(_slo_scale_task, experiment, seeds, settings, start, _jobs(jobs), progress)
    return SloScaleResult(experiment=experiment, settings=settings, runs=runs)


def scaled(slo: SloSpec, scale: float) -> SloSpec:
    """``slo`` with both SLOs multiplied by ``scale`` (on top of its own ``slo_scale``)."""
    return dataclasses.replace(slo, slo_scale=slo.slo_scale * scale)

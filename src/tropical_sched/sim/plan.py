"""Deployment planning: which policy and which prefill : decode split of N instances serves the most goodput.

For each policy, every split it can run (colocated policies: all N instances colocated; ``distserve``: 1 to N-1
prefill instances, the rest decode; ``tropical``: 0 to N-1 prefill instances, the rest multiplexing) gets a
goodput search (:mod:`tropical_sched.sim.goodput`: the highest rate at the target joint SLO attainment, one search
per seed); the candidate with the highest mean goodput is recommended, with a cluster file for ``tropical serve``.

This is the search DistServe runs for its placement (OSDI'24, section 4: enumerate the prefill and decode
parallelism and instance counts, simulate each, keep the best goodput per GPU), restricted to one instance size,
and what NVIDIA Dynamo's SLA planner and AIConfigurator's disaggregated search size: the prefill : decode ratio.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.snapshot import WorkerRole
from tropical_sched.policies.base import Policy, PolicyContext
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.output_length import LengthSamples
from tropical_sched.sim.experiment import Experiment
from tropical_sched.sim.goodput import (
    SearchRun,
    SearchSettings,
    _cached_inputs,
    _goodput_task,
    _jobs,
    _run_tasks,
    default_start_rate_per_s,
)

__all__ = ["PlanCandidate", "PlanResult", "candidate_splits", "cluster_yaml", "run_plan"]


def _policy(policy: str, experiment: Experiment) -> Policy:
    """A policy object, only to ask it for its roles (built with the trace's lengths, which some policies fit)."""
    trace, profile = _cached_inputs(experiment.trace, experiment.profile)
    context = PolicyContext(
        step_time=profile.step_time,
        max_model_len=profile.max_model_len,
        length_samples=LengthSamples(trace.num_prompt_tokens.tolist(), trace.num_output_tokens.tolist()),
    )
    return make_policy(policy, context, experiment.policy_options.get(policy))


def _candidate_roles(policy: str, num_instances: int, experiment: Experiment) -> dict[int, tuple[str, ...]]:
    """Each split ``policy`` runs (number of prefill instances, ascending) -> the instances' roles."""
    instance = _policy(policy, experiment)
    candidates: dict[int, tuple[str, ...]] = {}
    for num_prefill in range(num_instances):
        try:
            roles = instance.worker_roles(num_instances, num_prefill)
        except ConfigError:
            continue
        if sum(role is WorkerRole.PREFILL for role in roles) == num_prefill:
            candidates[num_prefill] = tuple(role.value for role in roles)
    if not candidates:
        raise ConfigError(f"policy {policy!r} runs on no split of {num_instances} instances")
    return candidates


def candidate_splits(policy: str, num_instances: int, experiment: Experiment) -> tuple[int, ...]:
    """The numbers of prefill instances ``policy`` can run on ``num_instances`` instances, ascending.

    Colocated policies give ``(0,)``; a split is a candidate when the policy's
    :meth:`~tropical_sched.policies.base.Policy.worker_roles` accepts it.

    Raises:
        ConfigError: the policy runs on no split of ``num_instances`` instances.
    """
    return tuple(_candidate_roles(policy, num_instances, experiment))


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanCandidate:
    """One policy at one split.

    Attributes:
        policy: the policy.
        num_prefill_workers: prefill instances (0 for colocated policies and all-multiplexing Tropical).
        roles: each instance's role, in order.
        runs: one goodput search per seed.
    """

    policy: str
    num_prefill_workers: int
    roles: tuple[str, ...]
    runs: tuple[SearchRun, ...]

    @property
    def goodput_per_s(self) -> float:
        """Mean goodput over the seeds, req/s (NaN before any search)."""
        return statistics.fmean(run.threshold for run in self.runs) if self.runs else math.nan

    @property
    def shape(self) -> str:
        """``"1P+3M"``-style label: prefill instances and the rest by role initial (``C`` colocated, ``D``
        decode, ``M`` multiplexing)."""
        rest = [r for r in self.roles if r != WorkerRole.PREFILL.value]
        label = {"colocated": "C", "decode": "D", "multiplexing": "M"}
        tail = f"{len(rest)}{label.get(rest[0], rest[0])}" if rest else ""
        return f"{self.num_prefill_workers}P+{tail}" if self.num_prefill_workers else tail


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanResult:
    """Every candidate's goodput, best first.

    Attributes:
        experiment: the setting (its ``num_workers`` is the number of instances; its rate is searched).
        settings: the search settings.
        num_gpus: GPUs in the cluster (instances x the profile's TP).
        candidates: every policy at every split it runs, by goodput, highest first (ties: fewer prefill
            instances, then the order of ``experiment.policies``).
    """

    experiment: Experiment
    settings: SearchSettings
    num_gpus: int
    candidates: tuple[PlanCandidate, ...]

    @property
    def recommendation(self) -> PlanCandidate:
        """The candidate with the highest goodput."""
        return self.candidates[0]

    @property
    def runner_up(self) -> PlanCandidate | None:
        """The best candidate of another policy (``None`` with one policy)."""
        best = self.recommendation
        others = [c for c in self.candidates[1:] if c.policy != best.policy]
        return others[0] if others else None

    def config_yaml(self, urls: Sequence[str] | None = None) -> str:
        """The recommendation as a ``tropical serve`` cluster file (:func:`cluster_yaml`)."""
        return cluster_yaml(self.experiment, self.recommendation, urls)

    def to_json(self, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready data, ``schema_version`` 1."""
        exp = self.experiment
        best = self.recommendation

        def entry(c: PlanCandidate) -> dict[str, Any]:
            return {
                "policy": c.policy,
                "prefill_workers": c.num_prefill_workers,
                "shape": c.shape,
                "goodput_per_s": c.goodput_per_s,
                "goodput_per_gpu_per_s": c.goodput_per_s / self.num_gpus,
                "goodput_per_s_by_seed": [run.threshold for run in c.runs],
            }

        runner_up = self.runner_up
        return {
            "schema_version": 1,
            "target_attainment": self.settings.target_attainment,
            "trace": exp.trace,
            "profile": exp.profile,
            "num_instances": exp.num_workers,
            "num_gpus": self.num_gpus,
            "num_requests_per_point": exp.num_requests,
            "slo": exp.slo.describe(),
            "engine": exp.describe_engine(),
            "seeds": [run.seed for run in best.runs],
            "recommendation": {
                **entry(best),
                "curve": [{"seed": run.seed, **dataclasses.asdict(point)} for run in best.runs for point in run.curve],
                "config_yaml": self.config_yaml(urls),
            },
            "runner_up": entry(runner_up) if runner_up is not None else None,
            "candidates": [entry(c) for c in self.candidates],
        }


def cluster_yaml(experiment: Experiment, candidate: PlanCandidate, urls: Sequence[str] | None = None) -> str:
    """A ``tropical serve`` cluster file for ``candidate`` (:mod:`tropical_sched.serve.config`'s schema).

    Args:
        experiment: the setting the plan ran (profile, SLOs, policy options, ``max_num_seqs``).
        candidate: the policy and roles.
        urls: the instances' base URLs, in order; ``None``: ``http://127.0.0.1:8001`` and up, to be edited.

    Raises:
        ConfigError: ``urls`` does not give one URL per instance.
    """
    roles = candidate.roles
    if urls is None:
        urls = [f"http://127.0.0.1:{8001 + i}" for i in range(len(roles))]
    if len(urls) != len(roles):
        raise ConfigError(f"urls: {len(urls)} given for {len(roles)} instances")
    slo = experiment.slo
    factor = slo.slo_scale  # the cluster file has no overall scale: fold it into each SLO
    slo_config: dict[str, float] = {}
    if slo.ttft_slo_scale is not None:
        slo_config["ttft_slo_scale"] = round(slo.ttft_slo_scale * factor, 9)
    elif slo.ttft_slo_s is not None:
        slo_config["ttft_slo_ms"] = round(slo.ttft_slo_s * factor * 1e3, 6)
    if slo.tpot_slo_scale is not None:
        slo_config["tpot_slo_scale"] = round(slo.tpot_slo_scale * factor, 9)
    elif slo.tpot_slo_s is not None:
        slo_config["tpot_slo_ms"] = round(slo.tpot_slo_s * factor * 1e3, 6)
    data: dict[str, Any] = {"policy": candidate.policy}
    options = experiment.policy_options.get(candidate.policy)
    if options:
        data["policy_options"] = dict(options)
    data["profile"] = experiment.profile
    data["slo"] = slo_config
    data["instances"] = [
        {"url": url, "role": role, "max_num_seqs": experiment.max_num_seqs}
        for url, role in zip(urls, roles, strict=True)
    ]
    goodput = f", goodput {candidate.goodput_per_s:.3f} req/s" if candidate.runs else ""
    header = (
        f"# tropical plan: {candidate.policy} at {candidate.shape}{goodput} ({experiment.trace}, "
        f"{experiment.profile})\n# replace the URLs with your instances'.\n"
    )
    return header + str(yaml.safe_dump(data, sort_keys=False))


def run_plan(
    experiment: Experiment,
    *,
    seeds: Sequence[int] = (0, 1),
    settings: SearchSettings | None = None,
    jobs: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> PlanResult:
    """Search the goodput of every policy of ``experiment`` at every split of its ``num_workers`` instances.

    Args:
        experiment: the setting; ``num_workers`` instances, ``policies`` to compare; its ``num_prefill_workers``
            must be ``None`` (the split is what is searched).
        seeds: seeds, one search each per candidate.
        settings: target, tolerance, evaluation budget and start (default: near the cluster's prefill capacity,
            the same start for every candidate).
        jobs: worker processes (default: the CPU count, at most 8).
        progress: called with 1 after every finished search.

    Returns:
        Every candidate, best first.

    Raises:
        ConfigError: a setting is invalid, or a policy runs on no split.
    """
    settings = settings or SearchSettings()
    if experiment.num_prefill_workers is not None:
        raise ConfigError(
            f"num_prefill_workers={experiment.num_prefill_workers}: plan searches the split; leave it unset"
        )
    if not seeds:
        raise ConfigError("seeds is empty")
    n = experiment.num_workers
    start = settings.initial_value or default_start_rate_per_s(experiment)
    work: list[tuple[str, int, tuple[str, ...], Experiment]] = []
    for policy in experiment.policies:
        for num_prefill, roles in _candidate_roles(policy, n, experiment).items():
            variant = dataclasses.replace(
                experiment,
                policies=(policy,),
                num_prefill_workers=num_prefill,
                policy_options={k: v for k, v in experiment.policy_options.items() if k == policy},
            )
            work.append((policy, num_prefill, roles, variant))
    tasks = [((p, k), v, p, seed) for p, k, _, v in work for seed in seeds]
    runs = _run_tasks(_goodput_task, tasks, settings, start, _jobs(jobs), progress)
    order = {policy: i for i, policy in enumerate(experiment.policies)}
    candidates = [
        PlanCandidate(policy=p, num_prefill_workers=k, roles=roles, runs=tuple(runs[p, k])) for p, k, roles, _ in work
    ]
    candidates.sort(key=lambda c: (-c.goodput_per_s, c.num_prefill_workers, order[c.policy]))
    profile = _cached_inputs(experiment.trace, experiment.profile)[1]
    if not all(math.isfinite(c.goodput_per_s) for c in candidates):
        raise ConfigError("a goodput search did not converge")
    return PlanResult(
        experiment=experiment,
        settings=settings,
        num_gpus=n * profile.tensor_parallel_size,
        candidates=tuple(candidates),
    )

"""Compare policies on one workload: what ``tropical simulate`` runs, as a library call."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tropical_sched.core.errors import ConfigError, UnknownNameError
from tropical_sched.core.slo import SloSpec
from tropical_sched.metrics.attainment import AttainmentSummary, summarize, summarize_by_class
from tropical_sched.policies.registry import make_policy, policy_names
from tropical_sched.predictors.calibration import CalibrationConfig
from tropical_sched.predictors.profile import Profile, load_profile
from tropical_sched.sim.config import ClusterConfig, DecodePlacementTime, FirstTokenAt
from tropical_sched.sim.simulator import SimulationResult, policy_context, simulate
from tropical_sched.workloads.traces import load_trace
from tropical_sched.workloads.workload import (
    ArrivalProcess,
    Overlength,
    Workload,
    make_workload,
    workload_report_counts,
)

__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_PROFILE",
    "DEFAULT_RATE_PER_S",
    "DEFAULT_TRACE",
    "Experiment",
    "ExperimentResult",
    "PolicyOutcome",
    "run_experiment",
]

DEFAULT_TRACE = "azure-conv-2023"
DEFAULT_PROFILE = "a100-llama2-70b-tp4"
DEFAULT_POLICIES = ("tropical", "vllm", "vllm-chunked", "distserve")
DEFAULT_RATE_PER_S = 2.5
"""Default request rate: the Azure conversation trace's real arrivals rescaled to 2.5 req/s (45% of its native
5.5 req/s), near the knee of 2 x Llama-2-70B TP4 on A100 (8 GPUs); at the native rate every policy is overloaded."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Experiment:
    """One comparison: a workload, a cluster, SLOs and the policies to run on them.

    Attributes:
        trace: bundled trace name or path.
        profile: bundled profile name or path.
        num_workers: workers in the cluster.
        num_prefill_workers: prefill workers for disaggregated policies; ``None`` for their default (half).
        rate_per_s: mean arrival rate, requests per second; ``None`` keeps a timed trace's real rate.
        arrival_process: ``trace``, ``poisson`` or ``gamma``; ``None``: ``trace`` when the trace has arrivals.
        burstiness_cv: coefficient of variation of Gamma inter-arrival times.
        num_requests: requests to simulate; ``None`` for the whole trace.
        overlength: ``filter`` or ``clip`` prompts beyond the model's context.
        seed: seed for sampling and arrivals.
        slo: how requests get their SLOs.
        policies: registered policy names, run in this order.
        policy_options: per policy name, options for its config.
        max_num_seqs: engine batch limit per worker.
        kv_link_bandwidth_bytes_per_s: KV transfer bandwidth; ``None`` for the profile's NVLink.
        decode_placement: when P/D requests get their decode worker: ``after-prefill`` (vLLM's protocol) or
            ``at-route`` (SGLang's), see :class:`~tropical_sched.sim.config.DecodePlacementTime`.
        first_token_at: where a P/D request's first token is counted: ``prefill-end`` or ``after-hop`` (the
            client's view), see :class:`~tropical_sched.sim.config.FirstTokenAt`.
        engine_profile: bundled profile name or path the simulated engines run; ``None``: ``profile``. The
            policies predict with ``profile`` and the SLOs come from it whatever the engines run.
        engine_time_scale: the engines' times are the engine profile's times this factor, > 0.
        engine_pd_hop_fixed_s: the engines' P/D hop, fixed part, seconds; ``None``: the engine profile's.
        engine_pd_hop_per_prompt_token_s: the hop's part per prompt token, seconds; ``None``: the profile's.
        engine_step_noise: the engines' step-to-step spread around the profile (``ClusterConfig.engine_step_noise``:
            the standard deviation of the log of a mean-1 factor on each step), in [0, 2]; its stream is seeded
            with ``seed``.
        engine_step_noise_correlation: that factor's correlation from one step to the next, in [0, 1).
        calibration: run the router's online calibration (default settings) in the simulator.
        worker_profiles: a heterogeneous cluster: one bundled profile name or path per worker (worker-id order,
            the policy's roles first to last), what that worker's engine runs and what the policy predicts it with
            (as ``instances[i].profile`` in a router's cluster file); ``None``: every worker runs ``profile`` (or
            ``engine_profile``).
    """

    trace: str = DEFAULT_TRACE
    profile: str = DEFAULT_PROFILE
    num_workers: int = 2
    num_prefill_workers: int | None = None
    rate_per_s: float | None = DEFAULT_RATE_PER_S
    arrival_process: ArrivalProcess | str | None = None
    burstiness_cv: float = 1.0
    num_requests: int | None = None
    overlength: Overlength | str = Overlength.FILTER
    seed: int = 0
    slo: SloSpec = field(default_factory=SloSpec.make)
    policies: tuple[str, ...] = DEFAULT_POLICIES
    policy_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    max_num_seqs: int = 256
    kv_link_bandwidth_bytes_per_s: float | None = None
    decode_placement: DecodePlacementTime | str = DecodePlacementTime.AFTER_PREFILL
    first_token_at: FirstTokenAt | str = FirstTokenAt.PREFILL_END
    engine_profile: str | None = None
    engine_time_scale: float = 1.0
    engine_pd_hop_fixed_s: float | None = None
    engine_pd_hop_per_prompt_token_s: float | None = None
    engine_step_noise: float = 0.0
    engine_step_noise_correlation: float = 0.0
    calibration: bool = False
    worker_profiles: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.policies:
            raise ConfigError("Experiment.policies is empty; give at least one of " + ", ".join(policy_names()))
        for name in self.policies:
            if name not in policy_names():
                raise UnknownNameError("policy", name, policy_names())
        unknown = sorted(set(self.policy_options) - set(self.policies))
        if unknown:
            raise ConfigError(f"policy options given for {unknown}, which are not among the policies run")

    @property
    def cluster(self) -> ClusterConfig:
        """The cluster settings."""
        return ClusterConfig(
            num_workers=self.num_workers,
            num_prefill_workers=self.num_prefill_workers,
            max_num_seqs=self.max_num_seqs,
            kv_link_bandwidth_bytes_per_s=self.kv_link_bandwidth_bytes_per_s,
            decode_placement=DecodePlacementTime(self.decode_placement),
            first_token_at=FirstTokenAt(self.first_token_at),
            engine_time_scale=self.engine_time_scale,
            engine_pd_hop_fixed_s=self.engine_pd_hop_fixed_s,
            engine_pd_hop_per_prompt_token_s=self.engine_pd_hop_per_prompt_token_s,
            engine_step_noise=self.engine_step_noise,
            engine_step_noise_correlation=self.engine_step_noise_correlation,
            engine_noise_seed=self.seed,
            calibration=CalibrationConfig() if self.calibration else None,
        )

    def load_worker_profiles(self) -> list[Profile] | None:
        """The per-worker profiles, loaded; ``None`` for a homogeneous cluster.

        Raises:
            ConfigError: there is not one per worker.
        """
        if self.worker_profiles is None:
            return None
        if len(self.worker_profiles) != self.num_workers:
            raise ConfigError(
                f"worker_profiles: {len(self.worker_profiles)} profiles for {self.num_workers} workers; give one per "
                "worker"
            )
        loaded = {name: load_profile(name) for name in dict.fromkeys(self.worker_profiles)}  # each file once
        return [loaded[name] for name in self.worker_profiles]

    def load_engine_profile(self) -> Profile | None:
        """The engine profile, loaded; ``None`` when the engines run ``profile``."""
        return load_profile(self.engine_profile) if self.engine_profile is not None else None

    def describe_engine(self) -> dict[str, Any]:
        """What the simulated engines run and how the policies predict them, JSON-ready."""
        return {
            "engine_profile": self.engine_profile or self.profile,
            "engine_time_scale": self.engine_time_scale,
            "engine_pd_hop_fixed_s": self.engine_pd_hop_fixed_s,
            "engine_pd_hop_per_prompt_token_s": self.engine_pd_hop_per_prompt_token_s,
            "engine_step_noise": self.engine_step_noise,
            "engine_step_noise_correlation": self.engine_step_noise_correlation,
            "first_token_at": FirstTokenAt(self.first_token_at).value,
            "calibration": self.calibration,
            "worker_profiles": list(self.worker_profiles) if self.worker_profiles is not None else None,
        }

    def make_workload(self, profile: Profile) -> Workload:
        """The experiment's workload on ``profile``'s context."""
        return make_workload(
            load_trace(self.trace),
            max_model_len=profile.max_model_len,
            num_requests=self.num_requests,
            rate_per_s=self.rate_per_s,
            arrival_process=self.arrival_process,
            burstiness_cv=self.burstiness_cv,
            overlength=self.overlength,
            seed=self.seed,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyOutcome:
    """One policy's run and its summary."""

    result: SimulationResult
    summary: AttainmentSummary


@dataclass(frozen=True, slots=True, kw_only=True)
class ExperimentResult:
    """The outcome of an :class:`Experiment`.

    Attributes:
        experiment: the inputs.
        profile: the loaded profile.
        workload: the simulated workload.
        outcomes: per policy name, in run order.
    """

    experiment: Experiment
    profile: Profile
    workload: Workload
    outcomes: dict[str, PolicyOutcome]

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready data (``schema_version`` 1; ``nan`` becomes ``None``)."""

        def clean(value: float | int) -> float | int | None:
            return None if isinstance(value, float) and math.isnan(value) else value

        exp = self.experiment
        report = self.workload.report
        return {
            "schema_version": 1,
            "trace": exp.trace,
            "profile": self.profile.name,
            "num_requests": len(self.workload),
            "rate_per_s": report.rate_per_s,
            "num_workers": exp.num_workers,
            "num_gpus": exp.num_workers * self.profile.tensor_parallel_size,
            "slo": exp.slo.describe(),
            "workload": report.describe(),
            "workload_report": workload_report_counts([report]),
            "engine": exp.describe_engine(),
            "policies": {
                name: {
                    key: clean(value)
                    for key, value in outcome.summary.as_dict().items()
                    if key not in ("num_requests",)
                }
                | self._class_json(outcome, clean)
                for name, outcome in self.outcomes.items()
            },
        }

    @staticmethod
    def _class_json(outcome: PolicyOutcome, clean: Callable[[float | int], float | int | None]) -> dict[str, Any]:
        by_class = summarize_by_class(outcome.result.records)
        if not by_class:
            return {}
        return {
            "by_slo_class": {
                name: {key: clean(value) for key, value in summary.as_dict().items()}
                for name, summary in by_class.items()
            }
        }


def run_experiment(
    experiment: Experiment,
    *,
    on_policy_start: Callable[[str, int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExperimentResult:
    """Simulate every policy of the experiment on the same workload.

    Args:
        experiment: the inputs.
        on_policy_start: called with ``(policy name, number of requests)`` before each policy runs.
        progress: called with the number of requests newly completed (see :func:`simulate`).

    Returns:
        Per-policy records and summaries.

    Raises:
        TropicalError: a name, file or setting is invalid.
    """
    profile = load_profile(experiment.profile)
    engine_profile = experiment.load_engine_profile()
    worker_profiles = experiment.load_worker_profiles()
    workload = experiment.make_workload(profile)
    context = policy_context(profile, workload)
    for name in experiment.policies:  # fail on a bad setting before any policy runs
        make_policy(name, context, experiment.policy_options.get(name)).worker_roles(
            experiment.num_workers, experiment.num_prefill_workers
        )
    outcomes = {}
    for name in experiment.policies:
        if on_policy_start is not None:
            on_policy_start(name, len(workload))
        result = simulate(
            workload,
            profile,
            name,
            cluster=experiment.cluster,
            slo=experiment.slo,
            policy_options=experiment.policy_options.get(name),
            progress=progress,
            engine_profile=engine_profile,
            worker_profiles=worker_profiles,
        )
        outcomes[name] = PolicyOutcome(result=result, summary=summarize(result.records))
    return ExperimentResult(experiment=experiment, profile=profile, workload=workload, outcomes=outcomes)

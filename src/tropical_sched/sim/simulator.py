"""The discrete-event cluster simulator.

Events are engine steps ending, KV transfers finishing and requests arriving, processed in time order from a heap
ordered by (time, sequence number), so a run is a pure function of its inputs. After every event that changes
what a router could decide (an arrival, a prefill or a request finishing, a KV transfer landing) the router's
:class:`~tropical_sched.policies.dispatcher.Dispatcher` runs the policy on a fresh cluster snapshot, then every
idle worker with work starts its next step.

Two profiles take part: the engines run the *engine* profile (what the hardware and the serving stack really do,
scaled by ``ClusterConfig.engine_time_scale``), and the policies predict with the other one (what the operator
believes; the SLOs come from it too). They are the same unless a run studies misprediction.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tropical_sched.core.decisions import DecodePlacement, RouteAction, RouteDecision
from tropical_sched.core.errors import ConfigError, SimulationError
from tropical_sched.core.request import Request, RequestRecord
from tropical_sched.core.slo import SloSpec
from tropical_sched.core.snapshot import ClusterSnapshot, WorkerRole
from tropical_sched.policies.base import Policy, PolicyContext
from tropical_sched.policies.dispatcher import Dispatcher, DispatchStats
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.calibration import InstanceCalibration
from tropical_sched.predictors.output_length import LengthSamples
from tropical_sched.predictors.profile import Profile, ServingOverheads, time_scaled
from tropical_sched.predictors.step_time import StepTimeCoefficients
from tropical_sched.sim.calibration import SimCalibration
from tropical_sched.sim.config import ClusterConfig, DecodePlacementTime, FirstTokenAt
from tropical_sched.sim.worker import Job, SimWorker, StepOutcome
from tropical_sched.workloads.workload import Workload

__all__ = [
    "SimEvent",
    "SimulationResult",
    "SimulationStats",
    "WorkerStats",
    "build_requests",
    "engine_profile_of",
    "policy_context",
    "simulate",
]

_ARRIVAL = -1
_STEP_END = 0
_TRANSFER_DONE = 1
_KIND_NAMES = {_ARRIVAL: "arrival", _STEP_END: "step_end", _TRANSFER_DONE: "kv_transfer_done"}


class SimEvent(NamedTuple):
    """One processed event, as reported to an ``on_event`` observer.

    Attributes:
        at_s: the event's time, seconds.
        kind: ``arrival``, ``step_end`` or ``kv_transfer_done``.
        kv_tokens_used: every worker's KV usage after the event, tokens.
    """

    at_s: float
    kind: str
    kv_tokens_used: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStats:
    """What one worker did.

    Attributes:
        worker_id: index.
        role: role.
        num_steps: engine steps run.
        busy_s: time spent in steps, seconds.
        max_kv_tokens_used: peak KV usage, tokens.
        num_kv_cache_tokens: capacity, tokens.
        num_preemptions: decodes preempted for lack of KV.
        calibrated_coefficients: its step-time coefficients as calibrated online by the end of the run (serving
            overheads included, as the router learns them); ``None`` with calibration off.
        calibrated_pd_hop_fixed_s: the P/D hop learned for the requests it prefilled, fixed part, seconds;
            ``None`` with calibration off.
        calibrated_pd_hop_per_prompt_token_s: that hop's part per prompt token, seconds; ``None`` when off.
        num_calibration_samples: observations its calibration used (step times and hops).
    """

    worker_id: int
    role: WorkerRole
    num_steps: int
    busy_s: float
    max_kv_tokens_used: int
    num_kv_cache_tokens: int
    num_preemptions: int
    calibrated_coefficients: StepTimeCoefficients | None = None
    calibrated_pd_hop_fixed_s: float | None = None
    calibrated_pd_hop_per_prompt_token_s: float | None = None
    num_calibration_samples: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationStats:
    """Counters of one run.

    Attributes:
        num_events: events processed.
        end_at_s: simulated time of the last event, seconds.
        cpu_s: CPU (process) time the run took, seconds.
        workers: per-worker counters.
        dispatch: the router's counters.
        toggle_flips: ``(at_s, multiplexing_on)`` per flip of Tropical's toggle (empty for other policies).
    """

    num_events: int
    end_at_s: float
    cpu_s: float
    workers: tuple[WorkerStats, ...]
    dispatch: DispatchStats
    toggle_flips: tuple[tuple[float, bool], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationResult:
    """The outcome of one simulated run.

    Attributes:
        policy: the policy's name.
        records: one record per request, in request order.
        stats: counters.
    """

    policy: str
    records: tuple[RequestRecord, ...]
    stats: SimulationStats = field(repr=False)


def policy_context(profile: Profile, workload: Workload | None = None) -> PolicyContext:
    """What a policy is built with for a run of ``workload`` on ``profile`` (the workload's lengths included, for
    policies that fit an output-length predictor from the trace)."""
    samples = (
        LengthSamples(workload.num_prompt_tokens.tolist(), workload.num_output_tokens.tolist())
        if workload is not None
        else None
    )
    return PolicyContext(step_time=profile.step_time, max_model_len=profile.max_model_len, length_samples=samples)


def build_requests(workload: Workload, profile: Profile, slo: SloSpec) -> list[Request]:
    """The workload's requests with their SLOs and SLO classes (ids ``"0"``, ``"1"``, ...)."""
    model = profile.step_time
    requests = []
    classes = slo.draw_classes(len(workload))
    for index, (arrival, prompt, slo_class) in enumerate(
        zip(workload.arrival_at_s.tolist(), workload.num_prompt_tokens.tolist(), classes, strict=True)
    ):
        requests.append(
            Request(
                request_id=str(index),
                arrival_at_s=arrival,
                num_prompt_tokens=prompt,
                slo=slo.slo_for(
                    prompt,
                    isolated_prefill_s=model.prefill_time_s,
                    isolated_decode_step_s=lambda context: model.decode_step_time_s(1, context),
                    slo_class=slo_class,
                ),
                slo_class=slo_class.name if slo_class is not None else "",
            )
        )
    return requests


def engine_profile_of(profile: Profile, cluster: ClusterConfig, engine_profile: Profile | None = None) -> Profile:
    """The profile the simulated engines run: ``engine_profile`` (default ``profile``), its times scaled by
    ``cluster.engine_time_scale`` (:func:`~tropical_sched.predictors.profile.time_scaled`), its P/D hop replaced
    by the cluster's ``engine_pd_hop_*`` where set. ``profile`` itself when nothing differs."""
    engine = engine_profile or profile
    fixed_s, per_token_s = cluster.engine_pd_hop_fixed_s, cluster.engine_pd_hop_per_prompt_token_s
    if cluster.engine_time_scale == 1.0 and fixed_s is None and per_token_s is None:
        return engine
    file = engine.file if cluster.engine_time_scale == 1.0 else time_scaled(engine.file, cluster.engine_time_scale)
    if fixed_s is not None or per_token_s is not None:
        serving = file.serving or ServingOverheads(source="none recorded in the profile")
        hop = {
            "pd_hop_fixed_s": serving.pd_hop_fixed_s if fixed_s is None else fixed_s,
            "pd_hop_per_prompt_token_s": serving.pd_hop_per_prompt_token_s if per_token_s is None else per_token_s,
        }
        source = f"{serving.source}; P/D hop set by the simulation ({hop['pd_hop_fixed_s']:g} s + "
        source += f"{hop['pd_hop_per_prompt_token_s']:g} s per prompt token)"
        file = file.model_copy(update={"serving": serving.model_copy(update={**hop, "source": source})})
    return Profile(file, engine.path)


class _Simulation:
    """One run's mutable state (use :func:`simulate`)."""

    def __init__(
        self,
        requests: list[Request],
        num_output_tokens: list[int],
        profile: Profile,
        engine: Profile,
        policy: Policy,
        cluster: ClusterConfig,
        progress: Callable[[int], None] | None,
        on_event: Callable[[SimEvent], None] | None,
        worker_profiles: Sequence[Profile] | None = None,
    ) -> None:
        self.policy = policy
        self.on_event = on_event
        self.profile = profile
        self.progress = progress
        roles = policy.worker_roles(cluster.num_workers, cluster.num_prefill_workers)
        # Per worker: the profile its engine runs, and the one the router predicts it with (its instance's own
        # ``profile``; the policy's when the cluster is homogeneous).
        believed_by_worker = list(worker_profiles) if worker_profiles is not None else [profile] * len(roles)
        if len(believed_by_worker) != len(roles):
            raise ConfigError(
                f"worker_profiles: {len(believed_by_worker)} profiles for {len(roles)} workers; give one per worker"
            )
        engines = [engine if worker_profiles is None else engine_profile_of(p, cluster) for p in believed_by_worker]
        self.workers = [
            SimWorker(
                worker_id=i,
                role=role,
                settings=policy.engine_settings(role),
                local=policy.local_scheduler(role),
                step_time=engines[i].step_time,
                num_kv_cache_tokens=cluster.num_kv_cache_tokens or engines[i].num_kv_cache_tokens,
                max_num_seqs=cluster.max_num_seqs,
                serving=engines[i].serving,
                step_noise=cluster.engine_step_noise,
                step_noise_correlation=cluster.engine_step_noise_correlation,
                noise_seed=cluster.engine_noise_seed,
            )
            for i, role in enumerate(roles)
        ]
        # A P/D request's KV moves in transfer_latency_s + transfer_s_per_token x tokens: the link, and the hop
        # the served engines add on top of it (the decode request's HTTP round trip, the connector's set-up),
        # both those of the prefill worker's engine.
        link = cluster.kv_link_bandwidth_bytes_per_s
        self._transfer = [
            (
                cluster.kv_transfer_latency_s + e.serving.pd_hop_fixed_s,
                e.kv_bytes_per_token / (link or e.default_kv_link_bandwidth_bytes_per_s)
                + e.serving.pd_hop_per_prompt_token_s,
            )
            for e in engines
        ]
        self.first_token_after_hop = cluster.first_token_at is FirstTokenAt.AFTER_HOP
        self.calibration: SimCalibration | None = None
        if cluster.calibration is not None:
            self.calibration = SimCalibration(self.workers, believed_by_worker, cluster.calibration)
        else:
            for worker, believed_profile in zip(self.workers, believed_by_worker, strict=True):
                # Without calibration a router tells the policy the hop its instance's profile records
                # (serve/state.py), and, for an instance with a profile of its own, that profile's step times.
                believed = believed_profile.serving
                model = believed_profile.step_time if believed_profile is not profile else None
                if model is not None:
                    worker.local = worker.local.with_step_time(model)
                if model is not None or believed.pd_hop_fixed_s or believed.pd_hop_per_prompt_token_s:
                    worker.set_predictions(model, believed.pd_hop_fixed_s, believed.pd_hop_per_prompt_token_s)
        self.jobs = [Job(r, n) for r, n in zip(requests, num_output_tokens, strict=True)]
        self.dispatcher = Dispatcher(policy)
        self.place_at_route = cluster.decode_placement is DecodePlacementTime.AT_ROUTE
        self._awaiting_placement: dict[str, SimWorker] = {}  # request id -> its prefill worker (at-route)
        self.heap: list[tuple[float, int, int, Any]] = []
        self.sequence = itertools.count()
        self.now_s = 0.0
        self.num_done = 0
        self.num_events = 0
        self._reported = 0
        self._jobs_by_id: dict[str, Job] = {job.request.request_id: job for job in self.jobs}
        self._snapshot_key: tuple[float, ...] = ()
        self._snapshot = ClusterSnapshot(now_s=0.0, workers=())

    # -- decisions ----------------------------------------------------------------------------------------------

    def snapshot(self) -> ClusterSnapshot:
        versions = (self.now_s, *(w.version for w in self.workers))
        if versions != self._snapshot_key:
            self._snapshot = ClusterSnapshot(now_s=self.now_s, workers=tuple(w.snapshot() for w in self.workers))
            self._snapshot_key = versions
        return self._snapshot

    def apply_route(self, request: Request, decision: RouteDecision) -> None:
        job = self._jobs_by_id[request.request_id]
        if decision.action is RouteAction.REJECT:
            self.reject(job, decision.reason)
            return
        assert decision.worker_id is not None
        worker = self.workers[decision.worker_id]
        if decision.action is RouteAction.MULTIPLEX:
            job.multiplexed = True
        if decision.action is RouteAction.PREFILL and self.place_at_route:
            # SGLang's P/D: the decode worker is chosen first; the prefill is queued once one takes it.
            self._awaiting_placement[request.request_id] = worker
            self.dispatcher.submit_decode(request)
            return
        worker.enqueue_prefill(job)

    def apply_placement(self, request: Request, placement: DecodePlacement) -> None:
        job = self._jobs_by_id[request.request_id]
        assert placement.worker_id is not None
        destination = self.workers[placement.worker_id]
        job.placed_at_s = self.now_s
        destination.reserve_incoming(job)
        prefill_worker = self._awaiting_placement.pop(request.request_id, None)
        if prefill_worker is not None:
            job.decode_destination = destination
            prefill_worker.enqueue_prefill(job)
            return
        assert job.prefill_worker_id is not None
        self._start_transfer(job, destination)

    def _start_transfer(self, job: Job, destination: SimWorker) -> None:
        assert job.prefill_worker_id is not None
        latency_s, per_token_s = self._transfer[job.prefill_worker_id]
        duration_s = latency_s + job.prefill_target * per_token_s
        heapq.heappush(
            self.heap, (self.now_s + duration_s, next(self.sequence), _TRANSFER_DONE, (job, destination, duration_s))
        )

    def _defer_first_tokens(self, outcome: StepOutcome) -> None:
        """First token after the hop: a prefill handed over to a decode worker has produced no token the client
        sees; the decoding worker samples every output token, from its first step there on."""
        for job in outcome.handoffs:
            job.first_token_at_s = None
            job.num_generated = 0
        outcome.first_tokens = [job for job in outcome.first_tokens if job.first_token_at_s is not None]

    def reject(self, job: Job, reason: str) -> None:
        job.rejected = True
        job.reject_reason = reason
        self.policy.on_first_token(job.request, math.inf, self.now_s)
        self.done(1)

    def done(self, count: int) -> None:
        self.num_done += count
        if self.progress is not None and self.num_done - self._reported >= 256:
            self.progress(self.num_done - self._reported)
            self._reported = self.num_done

    # -- event loop ---------------------------------------------------------------------------------------------

    def start_idle_workers(self) -> None:
        calibration = self.calibration
        for worker in self.workers:
            if not worker.busy and worker.has_work():
                duration_s = worker.start_step(self.now_s)
                if duration_s is not None:
                    heapq.heappush(self.heap, (self.now_s + duration_s, next(self.sequence), _STEP_END, worker))
                    if calibration is not None:
                        calibration.on_step_start(worker, duration_s)

    def run(self) -> None:
        jobs = self.jobs
        arrivals = [job.request.arrival_at_s for job in jobs]
        num_jobs = len(jobs)
        next_arrival = 0
        heap = self.heap
        policy = self.policy
        dispatcher = self.dispatcher
        on_event = self.on_event
        max_prompt_kv = min(w.kv_capacity for w in self.workers)
        calibration = self.calibration
        after_hop = self.first_token_after_hop
        while True:
            arrival_at_s = arrivals[next_arrival] if next_arrival < num_jobs else math.inf
            if heap and heap[0][0] <= arrival_at_s:
                at_s, _, kind, payload = heapq.heappop(heap)
            elif next_arrival < num_jobs:
                at_s, kind, payload = arrival_at_s, _ARRIVAL, jobs[next_arrival]
                next_arrival += 1
            else:
                break
            if at_s < self.now_s:
                raise SimulationError(f"event at {at_s} s is before the clock ({self.now_s} s)")
            self.now_s = at_s
            self.num_events += 1
            changed = True
            if kind == _STEP_END:
                outcome = payload.finish_step(at_s)
                changed = outcome.changed
                if calibration is not None:
                    calibration.on_step_end(payload, outcome)
                if after_hop and outcome.handoffs:
                    self._defer_first_tokens(outcome)
                for job in outcome.first_tokens:
                    policy.on_first_token(job.request, at_s - job.request.arrival_at_s, at_s)
                for job in outcome.finished:
                    if job.decode_destination is not None:
                        # Placed at route but done at its prefill (one output token): nothing will be transferred,
                        # so the decode slot and KV reserved for it must be given back, or they leak for good.
                        job.decode_destination.cancel_incoming(job)
                        job.decode_destination = None
                    policy.on_finished(job.request, _tpot_s(job), at_s)
                if outcome.finished:
                    self.done(len(outcome.finished))
                for job in outcome.handoffs:
                    if job.decode_destination is not None:
                        self._start_transfer(job, job.decode_destination)
                        job.decode_destination = None  # the reservation is the transfer's now
                    else:
                        dispatcher.submit_decode(job.request)
            elif kind == _TRANSFER_DONE:
                job, destination, hop_s = payload
                prefill_worker = self.workers[job.prefill_worker_id]
                prefill_worker.release_held(job)
                destination.receive(job)
                if calibration is not None:
                    calibration.on_transfer_done(job, prefill_worker, destination, hop_s)
            else:
                job = payload
                # An engine refuses a request whose KV cache can never fit (vLLM raises at admission).
                if job.request.num_prompt_tokens + job.num_output_tokens > max_prompt_kv:
                    self.reject(job, "prompt + output exceed a worker's KV-cache capacity")
                else:
                    dispatcher.submit(job.request)
            if changed and (dispatcher.num_waiting or dispatcher.num_pending_decodes):
                dispatcher.dispatch(
                    self.snapshot, self.apply_route, self.apply_placement, retry_waiting=kind != _ARRIVAL
                )
                if self._awaiting_placement and dispatcher.num_pending_decodes:
                    # At-route placement: requests routed in this round wait for their decode worker now.
                    dispatcher.dispatch(self.snapshot, self.apply_route, self.apply_placement, retry_waiting=False)
            self.start_idle_workers()
            if on_event is not None:
                on_event(SimEvent(at_s, _KIND_NAMES[kind], tuple(w.kv_used for w in self.workers)))
        if self.progress is not None and self.num_done > self._reported:
            self.progress(self.num_done - self._reported)
        if self.num_done != num_jobs:
            stuck = num_jobs - self.num_done
            raise SimulationError(
                f"simulation ended with {stuck} unfinished requests ({dispatcher.num_waiting} waiting at the router, "
                f"{dispatcher.num_pending_decodes} waiting for a decode worker): the policy never placed them"
            )


def _worker_stats(worker: SimWorker, calibration: InstanceCalibration | None) -> WorkerStats:
    stats = WorkerStats(
        worker_id=worker.worker_id,
        role=worker.role,
        num_steps=worker.num_steps,
        busy_s=worker.busy_s,
        max_kv_tokens_used=worker.max_kv_used,
        num_kv_cache_tokens=worker.kv_capacity,
        num_preemptions=worker.num_preemptions,
    )
    if calibration is None:
        return stats
    return dataclasses.replace(
        stats,
        calibrated_coefficients=calibration.step_time.coefficients,
        calibrated_pd_hop_fixed_s=calibration.pd_hop_fixed_s,
        calibrated_pd_hop_per_prompt_token_s=calibration.pd_hop_per_prompt_token_s,
        num_calibration_samples=calibration.num_samples,
    )


def _tpot_s(job: Job) -> float:
    if job.num_generated <= 1 or job.first_token_at_s is None or job.finished_at_s is None:
        return 0.0
    return (job.finished_at_s - job.first_token_at_s) / (job.num_generated - 1)


def simulate(
    workload: Workload,
    profile: Profile,
    policy: Policy | str,
    *,
    cluster: ClusterConfig | None = None,
    slo: SloSpec | None = None,
    policy_options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    on_event: Callable[[SimEvent], None] | None = None,
    engine_profile: Profile | None = None,
    worker_profiles: Sequence[Profile] | None = None,
) -> SimulationResult:
    """Simulate a workload on a cluster under one policy.

    Args:
        workload: the requests (arrivals, prompt and output lengths).
        profile: the latency profile the policies predict with and the SLOs are derived from (step times, serving
            overheads, P/D hop); also what the engines run unless ``engine_profile`` or the cluster's engine
            settings say otherwise.
        policy: a registered policy name, or a policy object (which must be fresh: policies keep state).
        cluster: cluster settings; default 2 workers.
        slo: how requests get their SLOs; default the paper's (TTFT 5x isolated prefill, TPOT 100 ms).
        policy_options: options of a policy given by name (see :func:`~tropical_sched.policies.make_policy`).
        progress: called with the number of requests newly finished or rejected, every 256 or so.
        on_event: called after every processed event (for audits and tests; slows the run down).
        engine_profile: what the simulated engines run (step times, serving overheads, P/D hop, KV capacity and
            bytes per token, link bandwidth), before ``cluster.engine_time_scale`` and the cluster's hop
            overrides; ``None``: ``profile``.
        worker_profiles: a heterogeneous cluster: one profile per worker (in worker-id order, the policy's roles
            first to last), what that worker's engine runs (before the cluster's time scale and hop overrides) and
            what the policy predicts it with, as a router configured with ``instances[i].profile``; the SLOs
            still come from ``profile``. Overrides ``engine_profile``. ``None``: homogeneous.

    Returns:
        One record per request and the run's counters. Deterministic: the same inputs give the same records.

    Raises:
        ConfigError: the policy or cluster settings are invalid.
        SimulationError: the run could not complete (e.g. the policy never placed some request).
    """
    cluster = cluster or ClusterConfig()
    slo = slo or SloSpec.make()
    if isinstance(policy, str):
        policy = make_policy(policy, policy_context(profile, workload), policy_options)
    requests = build_requests(workload, profile, slo)
    engine = engine_profile_of(profile, cluster, engine_profile)
    started = time.process_time()
    simulation = _Simulation(
        requests,
        workload.num_output_tokens.tolist(),
        profile,
        engine,
        policy,
        cluster,
        progress,
        on_event,
        worker_profiles,
    )
    simulation.run()
    cpu_s = time.process_time() - started
    records = tuple(
        RequestRecord(
            request_id=job.request.request_id,
            arrival_at_s=job.request.arrival_at_s,
            num_prompt_tokens=job.request.num_prompt_tokens,
            num_output_tokens=0 if job.rejected else job.num_generated,
            ttft_slo_s=job.request.slo.ttft_s,
            tpot_slo_s=job.request.slo.tpot_s,
            first_token_at_s=job.first_token_at_s,
            finished_at_s=job.finished_at_s,
            first_scheduled_at_s=job.first_scheduled_at_s,
            prefill_worker_id=job.prefill_worker_id,
            decode_worker_id=job.decode_worker_id,
            multiplexed=job.multiplexed,
            rejected=job.rejected,
            reject_reason=job.reject_reason,
            num_preemptions=job.num_preemptions,
            slo_class=job.request.slo_class,
        )
        for job in simulation.jobs
    )
    toggle = getattr(policy, "toggle", None)
    calibrations = simulation.calibration.instances if simulation.calibration is not None else None
    stats = SimulationStats(
        num_events=simulation.num_events,
        end_at_s=simulation.now_s,
        cpu_s=cpu_s,
        workers=tuple(
            _worker_stats(w, calibrations[w.worker_id] if calibrations is not None else None)
            for w in simulation.workers
        ),
        dispatch=simulation.dispatcher.stats,
        toggle_flips=tuple(toggle.flips) if toggle is not None else (),
    )
    return SimulationResult(policy=policy.name, records=records, stats=stats)

"""The discrete-event cluster simulator.

Events are engine steps ending, KV transfers finishing and requests arriving, processed in time order from a heap
ordered by (time, sequence number), so a run is a pure function of its inputs. After every event that changes
what a router could decide (an arrival, a prefill or a request finishing, a KV transfer landing) the router's
:class:`~tropical_sched.policies.dispatcher.Dispatcher` runs the policy on a fresh cluster snapshot, then every
idle worker with work starts its next step.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tropical_sched.core.decisions import DecodePlacement, RouteAction, RouteDecision
from tropical_sched.core.errors import SimulationError
from tropical_sched.core.request import Request, RequestRecord
from tropical_sched.core.slo import SloSpec
from tropical_sched.core.snapshot import ClusterSnapshot, WorkerRole
from tropical_sched.policies.base import Policy, PolicyContext
from tropical_sched.policies.dispatcher import Dispatcher, DispatchStats
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.output_length import LengthSamples
from tropical_sched.predictors.profile import Profile
from tropical_sched.sim.config import ClusterConfig, DecodePlacementTime
from tropical_sched.sim.worker import Job, SimWorker
from tropical_sched.workloads.workload import Workload

__all__ = [
    "SimEvent",
    "SimulationResult",
    "SimulationStats",
    "WorkerStats",
    "build_requests",
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
    """

    worker_id: int
    role: WorkerRole
    num_steps: int
    busy_s: float
    max_kv_tokens_used: int
    num_kv_cache_tokens: int
    num_preemptions: int


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


class _Simulation:
    """One run's mutable state (use :func:`simulate`)."""

    def __init__(
        self,
        requests: list[Request],
        num_output_tokens: list[int],
        profile: Profile,
        policy: Policy,
        cluster: ClusterConfig,
        progress: Callable[[int], None] | None,
        on_event: Callable[[SimEvent], None] | None,
    ) -> None:
        self.policy = policy
        self.on_event = on_event
        self.profile = profile
        self.progress = progress
        roles = policy.worker_roles(cluster.num_workers, cluster.num_prefill_workers)
        capacity = cluster.num_kv_cache_tokens or profile.num_kv_cache_tokens
        self.workers = [
            SimWorker(
                worker_id=i,
                role=role,
                settings=policy.engine_settings(role),
                local=policy.local_scheduler(role),
                step_time=profile.step_time,
                num_kv_cache_tokens=capacity,
                max_num_seqs=cluster.max_num_seqs,
            )
            for i, role in enumerate(roles)
        ]
        bandwidth = cluster.kv_link_bandwidth_bytes_per_s or profile.default_kv_link_bandwidth_bytes_per_s
        self.transfer_s_per_token = profile.kv_bytes_per_token / bandwidth
        self.transfer_latency_s = cluster.kv_transfer_latency_s
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
        duration_s = self.transfer_latency_s + job.prefill_target * self.transfer_s_per_token
        heapq.heappush(self.heap, (self.now_s + duration_s, next(self.sequence), _TRANSFER_DONE, (job, destination)))

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
        for worker in self.workers:
            if not worker.busy and worker.has_work():
                duration_s = worker.start_step(self.now_s)
                if duration_s is not None:
                    heapq.heappush(self.heap, (self.now_s + duration_s, next(self.sequence), _STEP_END, worker))

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
                job, destination = payload
                self.workers[job.prefill_worker_id].release_held(job)
                destination.receive(job)
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
) -> SimulationResult:
    """Simulate a workload on a cluster under one policy.

    Args:
        workload: the requests (arrivals, prompt and output lengths).
        profile: the workers' latency profile (step times, KV capacity, KV bytes per token).
        policy: a registered policy name, or a policy object (which must be fresh: policies keep state).
        cluster: cluster settings; default 2 workers.
        slo: how requests get their SLOs; default the paper's (TTFT 5x isolated prefill, TPOT 100 ms).
        policy_options: options of a policy given by name (see :func:`~tropical_sched.policies.make_policy`).
        progress: called with the number of requests newly finished or rejected, every 256 or so.
        on_event: called after every processed event (for audits and tests; slows the run down).

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
    started = time.process_time()
    simulation = _Simulation(
        requests, workload.num_output_tokens.tolist(), profile, policy, cluster, progress, on_event
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
    stats = SimulationStats(
        num_events=simulation.num_events,
        end_at_s=simulation.now_s,
        cpu_s=cpu_s,
        workers=tuple(
            WorkerStats(
                worker_id=w.worker_id,
                role=w.role,
                num_steps=w.num_steps,
                busy_s=w.busy_s,
                max_kv_tokens_used=w.max_kv_used,
                num_kv_cache_tokens=w.kv_capacity,
                num_preemptions=w.num_preemptions,
            )
            for w in simulation.workers
        ),
        dispatch=simulation.dispatcher.stats,
        toggle_flips=tuple(toggle.flips) if toggle is not None else (),
    )
    return SimulationResult(policy=policy.name, records=records, stats=stats)

"""Tropical's per-request decision over replicas that report their own live state: the engine-agnostic half of the
orchestrator integrations (Ray Serve's request router, :mod:`tropical_sched.integrations.ray_serve`), without
any orchestrator import.

A replica fronts one engine instance and reports, as its routing stats, :func:`replica_stats`: its role and its
engine's :class:`~tropical_sched.live_state.EngineLiveState` with the wall-clock time it was read. A router
(one per proxy or ingress process; any number of them) turns the candidates' stats into the same
:class:`~tropical_sched.core.snapshot.ClusterSnapshot` the simulator and ``tropical serve`` build, adds the
decisions it made itself since the stats were read (stats are read periodically: without them a burst between two
readings would all go to the replica that looked idlest), and asks the same policy object: ``route`` for a new
request, ``place_decode`` for the decode half of a P/D request. A router either never holds a request
(:meth:`ReplicaRouting.choose`: what the policy would hold goes to the least loaded engine's queue) or holds it as
``tropical serve`` does (:meth:`ReplicaRouting.submit` and :meth:`ReplicaRouting.dispatch`: the same
:class:`~tropical_sched.policies.dispatcher.Dispatcher`, retried in the policy's order as the state changes). The
clock is wall time (``time.time()``):
reports carry durations and the time they were read, so replicas on several nodes need clocks that agree to a few
milliseconds (NTP does).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from tropical_sched.core.decisions import DecodePlacement, RouteAction, RouteDecision
from tropical_sched.core.request import Request, Slo
from tropical_sched.core.snapshot import ClusterSnapshot, DecodeBatch, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.live_state import EngineLiveState, LiveStepTime, merge_live_state
from tropical_sched.policies.base import Policy
from tropical_sched.policies.dispatcher import Dispatcher
from tropical_sched.predictors.calibration import CalibrationConfig, HopCalibrator, observed_pd_hop_s
from tropical_sched.predictors.step_time import StepTimeModel

if TYPE_CHECKING:  # the serve package needs the serve extra; a log is only handed in
    from tropical_sched.serve.decision_log import DecisionLog

__all__ = [
    "STATS_KEY",
    "FirstTokenListener",
    "ReplicaRouting",
    "RequestFacts",
    "add_first_token_listener",
    "replica_stats",
    "tell_finished",
    "tell_first_token",
]

STATS_KEY = "tropical"
"""The key of Tropical's entry in a replica's routing stats."""

_FORGET_AFTER_S = 10.0  # own decisions older than this are dropped even if no newer report came
_REQUEST_MEMORY_S = 3600.0  # a routed request is remembered this long for the toggle's TPOT window
_MAX_LOG_ENTRIES = 65536  # decision-log lines waiting for their request's end
_IN_FLIGHT_S = 1.0  # a decision an engine that names its requests has not reported yet is on its way for this long


class RequestFacts(BaseModel):
    """What the router needs to know of a request (the ingress passes it with the call).

    Attributes:
        request_id: unique across routers (it travels to the engine, which names the request by it).
        num_prompt_tokens: >= 1.
        ttft_slo_s: > 0, seconds.
        tpot_slo_s: > 0, seconds.
        arrival_at_unix_s: when it reached the ingress, Unix seconds.
        phase: ``route`` (where its prefill runs) or ``decode`` (where it decodes after a remote prefill).
        prefill_done_at_unix_s: the decode half of P/D: when the prefill replica had its engine's answer (Unix
            seconds), or ``None``. The P/D hop the router learns starts there rather than at the decode's
            placement, so that the orchestrator's crossings between the two (the answer back to the ingress, the
            decode half's routing call) count in the hop that ``route`` predicts the first token with.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    num_prompt_tokens: int = Field(ge=1)
    ttft_slo_s: float = Field(gt=0, allow_inf_nan=False)
    tpot_slo_s: float = Field(gt=0, allow_inf_nan=False)
    arrival_at_unix_s: float = Field(allow_inf_nan=False)
    phase: Literal["route", "decode"] = "route"
    prefill_done_at_unix_s: float | None = Field(default=None, allow_inf_nan=False)

    def request(self) -> Request:
        """The request as the policy sees it (its clock: Unix seconds)."""
        return Request(
            request_id=self.request_id,
            arrival_at_s=self.arrival_at_unix_s,
            num_prompt_tokens=self.num_prompt_tokens,
            slo=Slo(ttft_s=self.ttft_slo_s, tpot_s=self.tpot_slo_s),
        )


def replica_stats(role: WorkerRole, state: EngineLiveState | None, taken_at_unix_s: float) -> dict[str, Any]:
    """A replica's routing stats (JSON-ready): its role, and its engine's live state read at ``taken_at_unix_s``
    (``None``: the engine did not answer; routers then count only their own decisions there)."""
    return {
        STATS_KEY: {
            "role": role.value,
            "state": None if state is None else state.model_dump(mode="json"),
            "taken_at_unix_s": taken_at_unix_s,
        }
    }


class FirstTokenListener(Protocol):
    """A router that wants to know the first token and the end of the requests it routed (see
    :meth:`ReplicaRouting.first_token` and :meth:`ReplicaRouting.finished`)."""

    def notify_first_token(self, request_id: str, at_unix_s: float) -> None:
        """Called from any thread; a request the router did not route is ignored."""

    def notify_finished(
        self, request_id: str, tpot_s: float, at_unix_s: float, num_output_tokens: int | None = None
    ) -> None:
        """Called from any thread when a request's stream ended whole; one the router did not route is ignored."""


_first_token_listeners: weakref.WeakSet[FirstTokenListener] = weakref.WeakSet()


def add_first_token_listener(listener: FirstTokenListener) -> None:
    """Register a router of this process for :func:`tell_first_token` (held weakly)."""
    _first_token_listeners.add(listener)


def tell_first_token(request_id: str, at_unix_s: float) -> None:
    """Tell this process's routers that a request produced its first token (the ingress that relays the answer
    sees it; the router that routed it may not: Ray Serve's router is told only when a call ends)."""
    for listener in list(_first_token_listeners):
        listener.notify_first_token(request_id, at_unix_s)


def tell_finished(request_id: str, tpot_s: float, at_unix_s: float, num_output_tokens: int | None = None) -> None:
    """Tell this process's routers that a request's stream ended whole, with its TPOT (and its number of tokens)
    as the ingress saw it."""
    for listener in list(_first_token_listeners):
        listener.notify_finished(request_id, tpot_s, at_unix_s, num_output_tokens)


def _taken_at_unix_s(stats: Mapping[str, Any]) -> float:
    """When a replica's report was read (``-inf``: it has none)."""
    return float((stats.get(STATS_KEY) or {}).get("taken_at_unix_s", -math.inf))


@dataclass(slots=True)
class _Decided:
    request_id: str
    at_unix_s: float
    prefill: PrefillState | None = None  # a route decision: the prefill it queued
    num_context_tokens: int = 0  # a decode placement: the decode it added
    tpot_slo_s: float = math.inf
    first_token_at_unix_s: float | None = None  # a decode's first token, when the router was told of it


@dataclass(slots=True)
class _HopWatch:
    """A P/D request between its prefill replica and its first token: what its hop's observation needs."""

    prefill_replica_id: str
    num_prompt_tokens: int
    at_unix_s: float  # the route decision
    decode_decided_at_unix_s: float | None = None
    prefill_done_at_unix_s: float | None = None  # when the prefill replica had the engine's answer, if told
    num_decoding: int = 0  # decodes on the decoding replica at placement
    num_decoding_context_tokens: int = 0  # their context tokens


@dataclass
class ReplicaRouting:
    """One router's decisions over replicas (see the module docstring).

    Args:
        policy: the policy that decides (its roles: the replicas').
        num_kv_cache_tokens: KV capacity assumed for a replica whose engine reports none.
        max_num_seqs: the engines' batch limit.
        step_time: the step-time model the policy predicts with; with ``hop_calibration``, the first decode step
            is taken out of an observed P/D hop with it. A replica whose report carries its engine's own model
            (:attr:`~tropical_sched.live_state.EngineLiveState.step_time`) is predicted with that one, in this
            model's valid range.
        hop_calibration: learn each prefill replica's P/D hop online from the first tokens the router is told of
            (:meth:`first_token`), as ``tropical serve`` does from the tokens it relays (the same
            :class:`~tropical_sched.predictors.calibration.HopCalibrator`); ``None``: the prior hop throughout.
            Through an orchestrator the hop is the orchestrator's too (Ray Serve: the answer crossing back to the
            ingress, and the decode half crossing to its replica), which no offline profile holds.
        hop_prior_fixed_s: the hop's fixed part before any observation (the profile's ``serving``), seconds.
        hop_prior_per_token_s: its part per prompt token before any observation, seconds per token.
        decision_log: where to write one line per request it routed, when the request finishes
            (:mod:`~tropical_sched.serve.decision_log`, as ``tropical serve --decision-log`` does; times are Unix
            seconds, workers are replica ids); ``None``: no log.
    """

    policy: Policy
    num_kv_cache_tokens: int
    max_num_seqs: int = 256
    step_time: StepTimeModel | None = None
    hop_calibration: CalibrationConfig | None = None
    hop_prior_fixed_s: float = 0.0
    hop_prior_per_token_s: float = 0.0
    decision_log: DecisionLog | None = None
    _log_entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> its log line so far
    _hops: dict[str, HopCalibrator] = field(default_factory=dict)  # prefill replica id -> its hop
    _hop_watch: dict[str, _HopWatch] = field(default_factory=dict)  # request id -> its P/D hop under way
    _routed: dict[str, tuple[Request, bool]] = field(default_factory=dict)  # id -> (request, first token seen)
    _decided: dict[str, list[_Decided]] = field(default_factory=dict)
    _ended: dict[str, dict[str, float]] = field(default_factory=dict)  # replica id -> request id -> when
    _engine_models: dict[str, StepTimeModel] = field(default_factory=dict)  # replica id -> the step-time model
    # its latest report carries
    _dispatcher: Dispatcher = field(init=False)

    def __post_init__(self) -> None:
        self._dispatcher = Dispatcher(self.policy)

    def snapshot(self, replicas: Sequence[tuple[str, Mapping[str, Any]]], now_unix_s: float) -> ClusterSnapshot:
        """The cluster from the replicas' ``(id, routing stats)``, worker ``i`` being ``replicas[i]``, plus this
        router's decisions since each replica's stats were read. A replica without Tropical stats counts as an
        available multiplexing worker with only this router's decisions on it.

        Raises:
            ValueError: a replica's stats are malformed (pydantic's ``ValidationError``).
        """
        workers = []
        for index, (replica_id, stats) in enumerate(replicas):
            entry = stats.get(STATS_KEY) or {}
            role = WorkerRole(entry.get("role", WorkerRole.MULTIPLEXING.value))
            raw = entry.get("state")
            state = (
                EngineLiveState.model_validate(raw)
                if raw is not None
                else EngineLiveState(num_kv_tokens_capacity=self.num_kv_cache_tokens)
            )
            taken_at_s = _taken_at_unix_s(stats)
            state, own = self._current(replica_id, state, taken_at_s)
            hop = self._hops.get(replica_id)
            own_prefills = [d.prefill for d in own if d.prefill is not None]
            placed = [d for d in own if d.prefill is None]
            contexts = tuple(d.num_context_tokens for d in placed)
            # The router sees none of its own decodes' tokens: each counts as if its last token came now (its
            # TPOT slack one full SLO, as a report taken now would show a decode keeping its pace). Counted with
            # the one token of the decision, its slack would fall below zero one TPOT SLO later and bar
            # multiplexing on the replica until a report names it (a stats period or two).
            own_decodes = DecodeBatch(
                request_ids=tuple(f"own-d{i}" for i in range(len(placed))),
                first_token_at_s=(now_unix_s,) * len(placed),
                num_generated_tokens=(1,) * len(placed),
                tpot_slo_s=tuple(d.tpot_slo_s for d in placed),
                num_context_tokens=contexts,
            )
            own_kv = sum(p.num_prompt_tokens for p in own_prefills) + sum(contexts)
            prefills, decodes, kv_used = merge_live_state(
                state,
                min(taken_at_s, now_unix_s) if math.isfinite(taken_at_s) else now_unix_s,
                now_unix_s,
                own_prefills,
                own_decodes,
                own_kv,
                sort_key=self.policy.local_scheduler(role).prefill_sort_key,
            )
            workers.append(
                WorkerSnapshot(
                    worker_id=index,
                    role=role,
                    prefills=prefills,
                    decodes=decodes,
                    num_kv_tokens_used=min(kv_used, state.num_kv_tokens_capacity),
                    num_kv_tokens_capacity=state.num_kv_tokens_capacity,
                    max_num_seqs=self.max_num_seqs,
                    sees_step_in_flight=False,  # reports and own decisions, not the engine's steps
                    step_time=self._engine_model(replica_id, state.step_time),
                    pd_hop_fixed_s=hop.fixed_s if hop is not None else self.hop_prior_fixed_s,
                    pd_hop_per_prompt_token_s=hop.per_prompt_token_s if hop is not None else self.hop_prior_per_token_s,
                )
            )
        return ClusterSnapshot(now_s=now_unix_s, workers=tuple(workers))

    def _engine_model(self, replica_id: str, reported: LiveStepTime | None) -> StepTimeModel | None:
        """The step-time model a replica's report carries (its engine's calibrated one), or ``None`` (the
        policy's); needs :attr:`step_time` for the valid range."""
        if reported is None or self.step_time is None:
            return None
        model = reported.model_kept(self.step_time, self._engine_models.get(replica_id))
        self._engine_models[replica_id] = model
        return model

    def choose(
        self, replicas: Sequence[tuple[str, Mapping[str, Any]]], facts: RequestFacts, now_unix_s: float
    ) -> list[int] | None:
        """Indices into ``replicas``, most preferred first, for one request: the policy's choice first, then the
        other replicas of the role it needs (fallbacks if that one is full); ``[]``: none can take it.

        ``route`` may answer a prefill replica (P/D) or a multiplexing one; REJECT ranks every replica that
        could prefill it (an orchestrator's router cannot answer the client; the engine-side scheduler may still
        reject it). When the policy would hold the request (WAIT, or no decode slot yet): the replicas that could
        take it, least loaded first (fewest outstanding prompt tokens for a prefill, least decode context for a
        decode), so that it waits in an engine's queue instead (to hold it: :meth:`submit`). The decision is
        remembered until a report read after it comes.

        A replica that has not reported Tropical stats yet (one just started) is left out: its role is unknown,
        and taken for a multiplexing one it could be sent the decode half of a P/D request while it is a prefill
        instance. With no replica reported yet: ``None`` (ask again shortly).
        """
        reported = [i for i, (_, stats) in enumerate(replicas) if STATS_KEY in stats]
        if len(reported) < len(replicas):
            if not reported:
                return None
            order = self.choose([replicas[i] for i in reported], facts, now_unix_s)
            return None if order is None else [reported[i] for i in order]
        self._forget(replicas, now_unix_s)
        cluster = self.snapshot(replicas, now_unix_s)
        request = facts.request()
        chosen: int | None
        if facts.phase == "decode":
            self._note_prefill_done(facts)
            placement = self.policy.place_decode(request, cluster)
            chosen = placement.worker_id
            runs = [w.worker_id for w in cluster.workers if w.role.runs_decodes]
            decided = _Decided(
                facts.request_id,
                now_unix_s,
                num_context_tokens=facts.num_prompt_tokens + 1,
                tpot_slo_s=facts.tpot_slo_s,
            )
            if chosen is None and runs:
                runs.sort(key=lambda i: (cluster.workers[i].decodes.total_context_tokens, i))
                chosen = runs[0]
            if chosen is not None:
                self._log_placement(facts.request_id, replicas[chosen][0], placement.reason, now_unix_s)
        else:
            self._log_arrival(facts)
            decision = self.policy.route(request, cluster)
            chosen = decision.worker_id
            runs = [w.worker_id for w in cluster.workers if w.role.runs_prefills]
            decided = _Decided(facts.request_id, now_unix_s, prefill=PrefillState.from_request(request))
            if decision.action is RouteAction.WAIT and runs:
                runs.sort(key=lambda i: (cluster.workers[i].num_outstanding_prompt_tokens, i))
                chosen = runs[0]
            if chosen is not None:
                self._log_route(request.request_id, decision, replicas[chosen][0], cluster.workers[chosen], now_unix_s)
        if chosen is None:
            return runs
        return self._record(replicas, cluster, chosen, runs, decided)

    def _record(
        self,
        replicas: Sequence[tuple[str, Mapping[str, Any]]],
        cluster: ClusterSnapshot,
        chosen: int,
        runs: list[int],
        decided: _Decided,
    ) -> list[int]:
        """Remember a decision on ``replicas[chosen]``; the order to try: it, then the others of its role."""
        replica_id = replicas[chosen][0]
        self._decided.setdefault(replica_id, []).append(decided)
        worker = cluster.workers[chosen]
        role = worker.role
        if self.hop_calibration is not None:
            self._watch_hop(replica_id, worker, decided)
        return [chosen, *(i for i in runs if i != chosen and cluster.workers[i].role is role)]

    def _note_prefill_done(self, facts: RequestFacts) -> None:
        """Where the decode half of a P/D request says its prefill ended, its hop starts there (and its
        decision-log line says so)."""
        entry = self._log_entries.get(facts.request_id)
        if entry is not None:
            entry["prefill_done_at_s"] = facts.prefill_done_at_unix_s
        watch = self._hop_watch.get(facts.request_id)
        if watch is not None and facts.prefill_done_at_unix_s is not None:
            watch.prefill_done_at_unix_s = facts.prefill_done_at_unix_s

    def _watch_hop(self, replica_id: str, worker: WorkerSnapshot, decided: _Decided) -> None:
        """Note what a P/D hop's observation needs: the prefill replica, then where and when the decode half went."""
        prefill = decided.prefill
        if prefill is not None:
            if worker.role is WorkerRole.PREFILL:
                self._hop_watch[decided.request_id] = _HopWatch(
                    replica_id, prefill.num_prompt_tokens, decided.at_unix_s
                )
            return
        watch = self._hop_watch.get(decided.request_id)
        if watch is None:
            return
        watch.decode_decided_at_unix_s = decided.at_unix_s
        watch.num_decoding = len(worker.decodes)
        watch.num_decoding_context_tokens = worker.decodes.total_context_tokens

    @property
    def num_held(self) -> int:
        """Requests submitted and not decided yet (waiting for a prefill replica or a decode slot)."""
        return self._dispatcher.num_waiting + self._dispatcher.num_pending_decodes

    def submit(self, facts: RequestFacts) -> None:
        """Hold a request until :meth:`dispatch` decides it (``phase`` ``decode``: it waits for a decode slot).
        A new one is remembered, for :meth:`first_token` and :meth:`finished`, until :meth:`finished` or for
        ``_REQUEST_MEMORY_S`` (a caller of :meth:`choose` alone keeps no such memory)."""
        request = facts.request()
        if facts.phase == "decode":
            self._note_prefill_done(facts)
            self._dispatcher.submit_decode(request)
        else:
            self._routed.setdefault(facts.request_id, (request, False))
            self._log_arrival(facts)
            self._dispatcher.submit(request)

    def cancel(self, request_id: str) -> bool:
        """Forget a held request (its caller went away). Returns whether it was held."""
        return self._dispatcher.cancel(request_id)

    def dispatch(
        self, replicas: Sequence[tuple[str, Mapping[str, Any]]], now_unix_s: float, *, retry_waiting: bool = True
    ) -> dict[str, list[int]]:
        """Decide the held requests that can be decided now, as ``tropical serve`` does: pending decode halves
        oldest first, new requests, then (``retry_waiting``) those held before in the policy's order, with the
        :class:`~tropical_sched.policies.dispatcher.Dispatcher` (call it when a report comes, a request ends, and
        every few tens of milliseconds while any is held: slack changes with time).

        Returns:
            For each decided request id, indices into ``replicas`` as :meth:`choose` gives them (``[]``: no
            replica of the role it needs). Replicas that have not reported yet are left out; none reported:
            nothing is decided.

        Raises:
            ValueError: a replica's stats are malformed (pydantic's ``ValidationError``).
        """
        reported = [i for i, (_, stats) in enumerate(replicas) if STATS_KEY in stats]
        if not reported or not self.num_held:
            return {}
        views = [replicas[i] for i in reported]
        self._forget(views, now_unix_s)
        cache: list[ClusterSnapshot] = []

        def snapshot() -> ClusterSnapshot:
            if not cache:
                cache.append(self.snapshot(views, now_unix_s))
            return cache[0]

        decided: dict[str, list[int]] = {}

        def apply_route(request: Request, decision: RouteDecision) -> None:
            cluster = snapshot()
            runs = [w.worker_id for w in cluster.workers if w.role.runs_prefills]
            if decision.worker_id is None:  # REJECT: any replica that could prefill it (see choose)
                decided[request.request_id] = [reported[i] for i in runs]
                return
            order = self._record(
                views,
                cluster,
                decision.worker_id,
                runs,
                _Decided(request.request_id, now_unix_s, prefill=PrefillState.from_request(request)),
            )
            self._log_route(
                request.request_id,
                decision,
                views[decision.worker_id][0],
                cluster.workers[decision.worker_id],
                now_unix_s,
            )
            cache.clear()
            decided[request.request_id] = [reported[i] for i in order]

        def apply_placement(request: Request, placement: DecodePlacement) -> None:
            cluster = snapshot()
            runs = [w.worker_id for w in cluster.workers if w.role.runs_decodes]
            assert placement.worker_id is not None  # the dispatcher applies only placements that name a worker
            context = _Decided(
                request.request_id,
                now_unix_s,
                num_context_tokens=request.num_prompt_tokens + 1,
                tpot_slo_s=request.slo.tpot_s,
            )
            order = self._record(views, cluster, placement.worker_id, runs, context)
            self._log_placement(request.request_id, views[placement.worker_id][0], placement.reason, now_unix_s)
            cache.clear()
            decided[request.request_id] = [reported[i] for i in order]

        self._dispatcher.dispatch(snapshot, apply_route, apply_placement, retry_waiting=retry_waiting)
        return decided

    def ended(self, replica_id: str, request_id: str, at_unix_s: float) -> None:
        """A call this router sent to a replica ended (the orchestrator says so: Ray Serve's
        ``on_request_completed``): the prefill half of P/D is done, or the request finished there. Its decision
        stops counting, and so does its entry in the replica's reports taken before ``at_unix_s`` (a report is up
        to one stats period old: the prefill replica would look busy that long after it is free)."""
        self._decided[replica_id] = [d for d in self._decided.get(replica_id, []) if d.request_id != request_id]
        self._ended.setdefault(replica_id, {})[request_id] = at_unix_s

    def first_token(self, request_id: str, at_unix_s: float) -> None:
        """A request this router sent to a multiplexing replica produced its first token: its prefill there is
        done and it decodes there. Reports taken before ``at_unix_s`` still show the prefill (a multiplexing
        worker takes one prefill at a time, so it would look busy for up to one stats period more); from now on
        the request counts as a decode until a report names it, or a report taken after now does not (it ended).
        The policy is told the request's TTFT (``Policy.on_first_token``: the attainment toggle's TTFT window).

        A P/D request's first token (from its decoding replica) is an observation of its prefill replica's hop
        with ``hop_calibration``: the time since the decode half was placed (since its prefill replica had the
        engine's answer, when the decode half's facts say when: ``prefill_done_at_unix_s``), less the first decode
        step there and,
        when that replica was decoding, half a step (the step in flight the request waits for, on average), as
        ``tropical serve`` observes it. Unknown ids are ignored."""
        entry = self._log_entries.get(request_id)
        if entry is not None and entry["first_token_at_s"] is None:
            entry["first_token_at_s"] = at_unix_s
        routed = self._routed.get(request_id)
        if routed is not None and not routed[1]:  # the toggle's TTFT window, as tropical serve feeds it
            request = routed[0]
            self._routed[request_id] = (request, True)
            self.policy.on_first_token(request, at_unix_s - request.arrival_at_s, at_unix_s)
        watch = self._hop_watch.pop(request_id, None)
        if watch is not None and watch.decode_decided_at_unix_s is not None and self.hop_calibration is not None:
            hop = self._hops.get(watch.prefill_replica_id)
            if hop is None:
                hop = HopCalibrator(self.hop_prior_fixed_s, self.hop_prior_per_token_s, self.hop_calibration)
                self._hops[watch.prefill_replica_id] = hop
            started_at_s = watch.decode_decided_at_unix_s
            if watch.prefill_done_at_unix_s is not None:
                started_at_s = min(started_at_s, watch.prefill_done_at_unix_s)
            waited_s = at_unix_s - started_at_s
            hop.observe(
                watch.num_prompt_tokens,
                waited_s
                if self.step_time is None
                else observed_pd_hop_s(
                    self.step_time,
                    waited_s=waited_s,
                    num_decoding=watch.num_decoding,
                    num_decoding_context_tokens=watch.num_decoding_context_tokens,
                    num_prompt_tokens=watch.num_prompt_tokens,
                ),
            )
        for replica_id, decisions in self._decided.items():
            for index, decided in enumerate(decisions):
                if decided.request_id != request_id:
                    continue
                prefill = decided.prefill
                if prefill is None:  # the decode half of P/D: it reached its engine
                    decided.first_token_at_unix_s = at_unix_s
                    return
                decisions[index] = _Decided(
                    request_id,
                    at_unix_s,
                    num_context_tokens=prefill.num_prompt_tokens + 1,
                    tpot_slo_s=prefill.tpot_slo_s if prefill.tpot_slo_s is not None else math.inf,
                    first_token_at_unix_s=at_unix_s,
                )
                self._ended.setdefault(replica_id, {})[request_id] = at_unix_s
                return

    def finished(self, request_id: str, tpot_s: float, at_unix_s: float, num_output_tokens: int | None = None) -> None:
        """A request this router routed streamed its last token (``num_output_tokens`` of them, if known), with
        ``tpot_s`` its mean TPOT (seconds, 0 for one token): the policy is told (``Policy.on_finished``: the
        attainment toggle's TPOT window), as ``tropical serve`` tells it, and its line goes to the decision log.
        Unknown ids are ignored."""
        routed = self._routed.pop(request_id, None)
        if routed is not None:
            self.policy.on_finished(routed[0], tpot_s, at_unix_s)
        entry = self._log_entries.pop(request_id, None)
        if entry is not None and self.decision_log is not None:
            from tropical_sched.serve.decision_log import complete_entry  # a log is handed in: the serve extra is here

            complete_entry(
                entry, outcome="ok", num_output_tokens=num_output_tokens, last_token_at_s=at_unix_s, tpot_s=tpot_s
            )
            self.decision_log.write(entry)

    def _log_arrival(self, facts: RequestFacts) -> None:
        """Start a request's decision-log line (with a log, for a request not seen before)."""
        if self.decision_log is None or facts.request_id in self._log_entries:
            return
        while len(self._log_entries) >= _MAX_LOG_ENTRIES:  # requests whose end never came: oldest first
            del self._log_entries[next(iter(self._log_entries))]
        from tropical_sched.serve.decision_log import new_entry  # a log is handed in: the serve extra is here

        self._log_entries[facts.request_id] = new_entry(
            request_id=facts.request_id,
            arrival_at_s=facts.arrival_at_unix_s,
            num_prompt_tokens=facts.num_prompt_tokens,
            ttft_slo_s=facts.ttft_slo_s,
            tpot_slo_s=facts.tpot_slo_s,
        )

    def _log_route(
        self, request_id: str, decision: RouteDecision, replica_id: str, worker: WorkerSnapshot, now_unix_s: float
    ) -> None:
        """Where a request's prefill went, in its decision-log line (a WAIT sent to the least loaded engine
        counts as the route of that engine's role)."""
        entry = self._log_entries.get(request_id)
        if entry is None:
            return
        route = decision.action.value if decision.action.needs_worker else ""
        if not route:
            route = RouteAction.PREFILL.value if worker.role is WorkerRole.PREFILL else RouteAction.MULTIPLEX.value
        entry.update(
            route=route,
            routed_at_s=now_unix_s,
            worker=replica_id,
            reason=decision.reason,
            predicted=dict(decision.predicted),
        )

    def _log_placement(self, request_id: str, replica_id: str, reason: str, now_unix_s: float) -> None:
        """Where a P/D request's decode half went, in its decision-log line."""
        entry = self._log_entries.get(request_id)
        if entry is not None:
            entry.update(decode_worker=replica_id, decode_placed_at_s=now_unix_s, decode_reason=reason)

    def _current(
        self, replica_id: str, state: EngineLiveState, taken_at_s: float
    ) -> tuple[EngineLiveState, list[_Decided]]:
        """A replica's report less the requests that ended (or moved on from their prefill) after it was taken,
        and this router's decisions there that the report does not hold yet.

        A decision counts until a report names its request, or it ended. An engine whose reports name requests
        (or that reports nothing running) has not got a decision it does not name yet: it is still crossing to it
        (a few milliseconds through Ray), for up to ``_IN_FLIGHT_S``, or until a report taken after its first
        token (the engine had it then: not named, it has finished). With reports that name nothing, a decision
        counts until a report read after it.
        """
        ended = self._ended.get(replica_id, {})
        if ended:
            state = state.without({request_id for request_id, at_s in ended.items() if at_s > taken_at_s})
        named = {p.request_id for p in state.prefills} | {d.request_id for d in state.decodes}
        names_requests = (named - {None}) or not (state.prefills or state.decodes)
        own = [
            d
            for d in self._decided.get(replica_id, [])
            if d.request_id not in named
            and (d.at_unix_s > taken_at_s or (names_requests and taken_at_s - d.at_unix_s < _IN_FLIGHT_S))
            and (d.first_token_at_unix_s is None or not names_requests or d.first_token_at_unix_s >= taken_at_s)
        ]
        return state, own

    def _forget(self, replicas: Sequence[tuple[str, Mapping[str, Any]]], now_unix_s: float) -> None:
        """Drop decisions and ends older than ``_FORGET_AFTER_S``, and those of replicas that are gone."""
        present = {replica_id for replica_id, _ in replicas}
        for replica_id in list(self._decided):
            kept = [d for d in self._decided[replica_id] if now_unix_s - d.at_unix_s < _FORGET_AFTER_S]
            if kept and replica_id in present:
                self._decided[replica_id] = kept
            else:
                del self._decided[replica_id]
        stale = [r for r, (q, _) in self._routed.items() if now_unix_s - q.arrival_at_s >= _REQUEST_MEMORY_S]
        for request_id in stale:
            del self._routed[request_id]
        for request_id in [r for r, w in self._hop_watch.items() if now_unix_s - w.at_unix_s >= _FORGET_AFTER_S]:
            del self._hop_watch[request_id]
        for replica_id in list(self._ended):
            ended = {r: at for r, at in self._ended[replica_id].items() if now_unix_s - at < _FORGET_AFTER_S}
            if ended and replica_id in present:
                self._ended[replica_id] = ended
            else:
                del self._ended[replica_id]

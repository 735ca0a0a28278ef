"""Tropical's per-request decision over replicas that report their own live state: the engine-agnostic half of the
orchestrator integrations (Ray Serve's request router, :mod:`tropical_sched.integrations.ray_serve`), without
any orchestrator import.

A replica fronts one engine instance and reports, as its routing stats, :func:`replica_stats`: its role and its
engine's :class:`~tropical_sched.live_state.EngineLiveState` with the wall-clock time it was read. A router
(one per proxy or ingress process; any number of them) turns the candidates' stats into the same
:class:`~tropical_sched.core.snapshot.ClusterSnapshot` the simulator and ``tropical serve`` build, adds the
decisions it made itself since the stats were read (stats are read periodically: without them a burst between two
readings would all go to the replica that looked idlest), and asks the same policy object: ``route`` for a new
request, ``place_decode`` for the decode half of a P/D request. The clock is wall time (``time.time()``):
reports carry durations and the time they were read, so replicas on several nodes need clocks that agree to a few
milliseconds (NTP does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tropical_sched.core.decisions import RouteAction
from tropical_sched.core.request import Request, Slo
from tropical_sched.core.snapshot import ClusterSnapshot, DecodeBatch, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.live_state import EngineLiveState, merge_live_state
from tropical_sched.policies.base import Policy

__all__ = ["STATS_KEY", "ReplicaRouting", "RequestFacts", "replica_stats"]

STATS_KEY = "tropical"
"""The key of Tropical's entry in a replica's routing stats."""

_FORGET_AFTER_S = 10.0  # own decisions older than this are dropped even if no newer report came


class RequestFacts(BaseModel):
    """What the router needs to know of a request (the ingress passes it with the call).

    Attributes:
        request_id: unique across routers (it travels to the engine, which names the request by it).
        num_prompt_tokens: >= 1.
        ttft_slo_s: > 0, seconds.
        tpot_slo_s: > 0, seconds.
        arrival_at_unix_s: when it reached the ingress, Unix seconds.
        phase: ``route`` (where its prefill runs) or ``decode`` (where it decodes after a remote prefill).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    num_prompt_tokens: int = Field(ge=1)
    ttft_slo_s: float = Field(gt=0, allow_inf_nan=False)
    tpot_slo_s: float = Field(gt=0, allow_inf_nan=False)
    arrival_at_unix_s: float = Field(allow_inf_nan=False)
    phase: Literal["route", "decode"] = "route"

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


def _taken_at_unix_s(stats: Mapping[str, Any]) -> float:
    """When a replica's report was read (``-inf``: it has none)."""
    return float((stats.get(STATS_KEY) or {}).get("taken_at_unix_s", -math.inf))


@dataclass(slots=True)
class _Decided:
    at_unix_s: float
    prefill: PrefillState | None = None  # a route decision: the prefill it queued
    num_context_tokens: int = 0  # a decode placement: the decode it added
    tpot_slo_s: float = math.inf


@dataclass
class ReplicaRouting:
    """One router's decisions over replicas (see the module docstring).

    Args:
        policy: the policy that decides (its roles: the replicas').
        num_kv_cache_tokens: KV capacity assumed for a replica whose engine reports none.
        max_num_seqs: the engines' batch limit.
        hold_waits: hold a request the policy would hold (see :meth:`choose`). Off for Ray Serve, whose router
            retries each held request on its own with a growing backoff, the requests behind it waiting too: a
            request sent to an engine's queue is served sooner than one held there.
    """

    policy: Policy
    num_kv_cache_tokens: int
    max_num_seqs: int = 256
    hold_waits: bool = False
    _decided: dict[str, list[_Decided]] = field(default_factory=dict)

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
            own = [d for d in self._decided.get(replica_id, []) if d.at_unix_s > taken_at_s]
            own_prefills = [d.prefill for d in own if d.prefill is not None]
            placed = [d for d in own if d.prefill is None]
            contexts = tuple(d.num_context_tokens for d in placed)
            own_decodes = DecodeBatch(
                request_ids=tuple(f"own-d{i}" for i in range(len(placed))),
                first_token_at_s=tuple(d.at_unix_s for d in placed),
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
                )
            )
        return ClusterSnapshot(now_s=now_unix_s, workers=tuple(workers))

    def choose(
        self, replicas: Sequence[tuple[str, Mapping[str, Any]]], facts: RequestFacts, now_unix_s: float
    ) -> list[int] | None:
        """Indices into ``replicas``, most preferred first, for one request: the policy's choice first, then the
        other replicas of the role it needs (fallbacks if that one is full); ``[]``: none can take it.

        ``route`` may answer a prefill replica (P/D) or a multiplexing one; REJECT ranks every replica that
        could prefill it (an orchestrator's router cannot answer the client; the engine-side scheduler may still
        reject it). When the policy would hold the request (WAIT, or no decode slot yet): with ``hold_waits``,
        ``None`` (ask again shortly); without, the replicas that could take it, least loaded first (fewest
        outstanding prompt tokens for a prefill, least decode context for a decode), so that it waits in an
        engine's queue instead. The decision is remembered until a report read after it comes.

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
            chosen = self.policy.place_decode(request, cluster).worker_id
            runs = [w.worker_id for w in cluster.workers if w.role.runs_decodes]
            decided = _Decided(now_unix_s, num_context_tokens=facts.num_prompt_tokens + 1, tpot_slo_s=facts.tpot_slo_s)
            if chosen is None and runs and not self.hold_waits:
                runs.sort(key=lambda i: (cluster.workers[i].decodes.total_context_tokens, i))
                chosen = runs[0]
        else:
            decision = self.policy.route(request, cluster)
            chosen = decision.worker_id
            runs = [w.worker_id for w in cluster.workers if w.role.runs_prefills]
            decided = _Decided(now_unix_s, prefill=PrefillState.from_request(request))
            if decision.action is RouteAction.WAIT and runs and not self.hold_waits:
                runs.sort(key=lambda i: (cluster.workers[i].num_outstanding_prompt_tokens, i))
                chosen = runs[0]
            elif decision.action is RouteAction.WAIT:
                return None
        if chosen is None:
            return None if facts.phase == "decode" and self.hold_waits else runs
        self._decided.setdefault(replicas[chosen][0], []).append(decided)
        role = cluster.workers[chosen].role
        return [chosen, *(i for i in runs if i != chosen and cluster.workers[i].role is role)]

    def _forget(self, replicas: Sequence[tuple[str, Mapping[str, Any]]], now_unix_s: float) -> None:
        taken = {replica_id: _taken_at_unix_s(stats) for replica_id, stats in replicas}
        for replica_id in list(self._decided):
            kept = [
                d
                for d in self._decided[replica_id]
                if d.at_unix_s > taken.get(replica_id, -math.inf) and now_unix_s - d.at_unix_s < _FORGET_AFTER_S
            ]
            if kept:
                self._decided[replica_id] = kept
            else:
                del self._decided[replica_id]

"""Tropical's decision over replicas that report their live state (the orchestrator-facing half, no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

from tropical_sched.core import WorkerRole
from tropical_sched.integrations.replica_routing import STATS_KEY, ReplicaRouting, RequestFacts, replica_stats
from tropical_sched.live_state import EngineLiveState, LiveDecode, LivePrefill
from tropical_sched.policies.base import PolicyContext
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors import load_profile

PROFILE = load_profile("a100-llama2-70b-tp4")
NOW = 1_000_000.0


def _routing(**options: Any) -> ReplicaRouting:
    context = PolicyContext(step_time=PROFILE.step_time, max_model_len=PROFILE.max_model_len)
    return ReplicaRouting(make_policy("tropical", context, options), PROFILE.num_kv_cache_tokens)


def _facts(n: int = 500, *, phase: str = "route", request_id: str = "r1") -> RequestFacts:
    return RequestFacts(
        request_id=request_id,
        num_prompt_tokens=n,
        ttft_slo_s=5.0,
        tpot_slo_s=0.1,
        arrival_at_unix_s=NOW,
        phase=phase,  # type: ignore[arg-type]
    )


def _state(num_decodes: int = 0, *, num_queued_prompt_tokens: int = 0, tpot_s: float = 0.1) -> EngineLiveState:
    prefills = (
        (LivePrefill(num_prompt_tokens=num_queued_prompt_tokens, num_computed_tokens=0, waited_s=0.0, ttft_slo_s=5.0),)
        if num_queued_prompt_tokens
        else ()
    )
    decodes = tuple(
        LiveDecode(num_context_tokens=1000, num_generated_tokens=50, decoding_for_s=50 * 0.03, tpot_slo_s=tpot_s)
        for _ in range(num_decodes)
    )
    return EngineLiveState(prefills=prefills, decodes=decodes, num_kv_tokens_capacity=PROFILE.num_kv_cache_tokens)


def test_stats_round_trip_and_build_the_cluster() -> None:
    stats = replica_stats(WorkerRole.MULTIPLEXING, _state(3, num_queued_prompt_tokens=700), NOW - 0.2)
    cluster = _routing().snapshot([("a", stats), ("b", {})], NOW)
    first, second = cluster.workers
    assert first.role is WorkerRole.MULTIPLEXING
    assert len(first.decodes) == 3
    assert first.num_outstanding_prompt_tokens == 700
    # carried forward by the report's age: 1.5 s of decoding as of NOW - 0.2
    assert first.decodes.first_token_at_s[0] == pytest.approx(NOW - 1.5)
    assert second.role is WorkerRole.MULTIPLEXING
    assert len(second.decodes) == 0


def test_a_burst_between_two_reports_spreads_over_the_replicas() -> None:
    """Stats come every 100 ms or so: the router's own decisions since the last report count, so a burst of
    prefills does not all go to the replica that looked idlest."""
    routing = _routing()
    replicas = [(name, replica_stats(WorkerRole.MULTIPLEXING, _state(2), NOW - 0.05)) for name in ("m0", "m1", "m2")]
    chosen = [routing.choose(replicas, _facts(3000, request_id=f"r{i}"), NOW + i * 1e-3) for i in range(5)]
    firsts = [order[0] for order in chosen if order]
    assert sorted(firsts[:3]) == [0, 1, 2]  # one each
    # the policy would hold the next ones: they go to the least loaded replicas' queues, one each again
    assert sorted(firsts) == [0, 0, 1, 1, 2]
    holding = _routing()
    holding.hold_waits = True
    held = [holding.choose(replicas, _facts(3000, request_id=f"r{i}"), NOW + i * 1e-3) for i in range(5)]
    assert held[3:] == [None, None]  # held: asked again as reports come
    # a report read after the decisions replaces them
    fresh = [(name, replica_stats(WorkerRole.MULTIPLEXING, _state(2), NOW + 1.0)) for name, _ in replicas]
    assert routing.snapshot(fresh, NOW + 1.0).workers[firsts[0]].num_outstanding_prompt_tokens == 0


def test_p_d_routes_to_a_prefill_replica_and_places_the_decode_on_slack() -> None:
    """Prefill-first: a new request goes to the prefill replica; its decode half goes to the multiplexing replica
    with TPOT slack, not to the one whose decodes are at their SLO."""
    routing = _routing(route_order="prefill-first")
    replicas = [
        ("p", replica_stats(WorkerRole.PREFILL, _state(), NOW)),
        ("tight", replica_stats(WorkerRole.MULTIPLEXING, _state(60, tpot_s=0.031), NOW)),
        ("loose", replica_stats(WorkerRole.MULTIPLEXING, _state(2), NOW)),
    ]
    order = routing.choose(replicas, _facts(800), NOW)
    assert order is not None
    assert order[0] == 0
    placed = routing.choose(replicas, _facts(800, phase="decode"), NOW)
    assert placed is not None
    assert placed[0] == 2
    assert 0 not in placed  # a prefill replica never decodes


def test_the_role_a_decision_needs_is_the_only_fallback() -> None:
    routing = _routing()
    replicas = [
        ("p", replica_stats(WorkerRole.PREFILL, _state(), NOW)),
        ("m0", replica_stats(WorkerRole.MULTIPLEXING, _state(), NOW)),
        ("m1", replica_stats(WorkerRole.MULTIPLEXING, _state(), NOW)),
    ]
    order = routing.choose(replicas, _facts(100), NOW)
    assert order is not None
    roles = {replicas[i][1][STATS_KEY]["role"] for i in order}
    assert len(roles) == 1


def test_a_replica_that_has_not_reported_its_role_is_never_chosen() -> None:
    """A replica whose first stats have not come yet (just started) has no known role: a prefill replica taken
    for a multiplexing one would get the decode half of a P/D request (seen as a flaky Ray Serve test)."""
    routing = _routing(route_order="prefill-first")
    p = ("p", replica_stats(WorkerRole.PREFILL, _state(), NOW))
    m = ("m", replica_stats(WorkerRole.MULTIPLEXING, _state(), NOW))
    silent = ("new", {})
    placed = routing.choose([silent, m], _facts(800, phase="decode"), NOW)
    assert placed == [1]
    order = routing.choose([p, silent, m], _facts(800), NOW)
    assert order is not None
    assert 1 not in order
    assert order[0] == 0  # prefill-first still finds the prefill replica behind the silent one
    assert routing.choose([silent, ("also new", {})], _facts(800), NOW) is None


def test_malformed_stats_are_refused_naming_the_field() -> None:
    bad = {STATS_KEY: {"role": "multiplexing", "state": {"num_kv_tokens_capacity": -1}, "taken_at_unix_s": NOW}}
    with pytest.raises(ValueError, match="num_kv_tokens_capacity"):
        _routing().snapshot([("a", bad)], NOW)

"""Tropical's decision over replicas that report their live state (the orchestrator-facing half, no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

from tropical_sched.core import WorkerRole
from tropical_sched.integrations.replica_routing import STATS_KEY, ReplicaRouting, RequestFacts, replica_stats
from tropical_sched.live_state import EngineLiveState, LiveDecode, LivePrefill, LiveStepTime
from tropical_sched.policies.base import PolicyContext
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors import load_profile
from tropical_sched.predictors.calibration import CalibrationConfig

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
    # reports and its own decisions: the router cannot see the engines' steps (predictions count their rest)
    assert not first.sees_step_in_flight
    assert not second.sees_step_in_flight


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
    # a report read after the decisions replaces them
    fresh = [(name, replica_stats(WorkerRole.MULTIPLEXING, _state(2), NOW + 1.0)) for name, _ in replicas]
    assert routing.snapshot(fresh, NOW + 1.0).workers[firsts[0]].num_outstanding_prompt_tokens == 0


def test_held_requests_are_decided_in_the_policys_order_as_reports_come() -> None:
    """With submit/dispatch a request the policy holds waits at the router (as in tropical serve) and is decided
    when a report shows room, the ones it can place first; a cancelled one is forgotten."""
    routing = _routing()
    busy = [(name, replica_stats(WorkerRole.MULTIPLEXING, _state(2), NOW - 0.05)) for name in ("m0", "m1", "m2")]
    for i in range(5):
        routing.submit(_facts(3000, request_id=f"r{i}"))
    decided = routing.dispatch(busy, NOW, retry_waiting=False)
    assert sorted(order[0] for order in decided.values()) == [0, 1, 2]  # one each, then the policy holds
    assert routing.num_held == 2
    held = {f"r{i}" for i in range(5)} - set(decided)
    assert routing.dispatch(busy, NOW + 0.02) == {}  # nothing changed: still held
    first, second = sorted(held)
    assert routing.cancel(first)
    assert routing.num_held == 1
    idle = [(name, replica_stats(WorkerRole.MULTIPLEXING, _state(0), NOW + 5.0)) for name, _ in busy]
    assert set(routing.dispatch(idle, NOW + 5.0)) == {second}
    assert routing.num_held == 0
    assert routing.dispatch(idle, NOW + 5.0) == {}


def test_a_held_decode_half_waits_for_kv_room_then_goes_where_it_is() -> None:
    routing = _routing(route_order="prefill-first")
    p = ("p", replica_stats(WorkerRole.PREFILL, _state(), NOW))
    full_state = _state(2).model_copy(update={"num_kv_tokens_used": PROFILE.num_kv_cache_tokens})
    full = ("full", replica_stats(WorkerRole.MULTIPLEXING, full_state, NOW))
    routing.submit(_facts(800, phase="decode"))
    assert routing.dispatch([p, full], NOW) == {}  # no KV room: held, not sent to the full replica's queue
    assert routing.choose([p, full], _facts(800, phase="decode"), NOW) == [1]  # choose would have sent it there
    loose = ("loose", replica_stats(WorkerRole.MULTIPLEXING, _state(2), NOW + 0.1))
    assert routing.dispatch([p, full, loose], NOW + 0.1) == {"r1": [2, 1]}
    assert routing.dispatch([("silent", {})], NOW) == {}  # nothing reported: nothing decided


def _named_prefill(request_id: str, n: int = 3000) -> LivePrefill:
    return LivePrefill(request_id=request_id, num_prompt_tokens=n, num_computed_tokens=0, waited_s=0.0, ttft_slo_s=5.0)


def test_a_decision_counts_until_a_report_names_it_or_the_call_ends() -> None:
    """Through Ray a request takes milliseconds to reach its engine: a report taken meanwhile does not hold it,
    and the router keeps counting it. A report that names it takes over; when the call ends (the prefill half of
    P/D is done), neither the decision nor a report read before the end counts it any more."""
    routing = _routing(route_order="prefill-first")
    capacity = PROFILE.num_kv_cache_tokens

    def prefill_replica(taken_at: float, *prefills: LivePrefill) -> tuple[str, dict[str, Any]]:
        kv = sum(x.num_prompt_tokens for x in prefills)
        state = EngineLiveState(prefills=prefills, num_kv_tokens_used=kv, num_kv_tokens_capacity=capacity)
        return ("p", replica_stats(WorkerRole.PREFILL, state, taken_at))

    m = ("m", replica_stats(WorkerRole.MULTIPLEXING, _state(), NOW))
    order = routing.choose([prefill_replica(NOW - 0.1), m], _facts(3000), NOW)
    assert order is not None
    assert order[0] == 0
    # a report taken just after the decision, before the request got there: still counted, once
    before_arrival = routing.snapshot([prefill_replica(NOW + 0.005), m], NOW + 0.01).workers[0]
    assert before_arrival.num_outstanding_prompt_tokens == 3000
    # a report that names it: counted once, from the report
    named = routing.snapshot([prefill_replica(NOW + 0.02, _named_prefill("r1")), m], NOW + 0.03).workers[0]
    assert named.num_outstanding_prompt_tokens == 3000
    # the call ended: a report read before that no longer counts it, nor its KV
    routing.ended("p", "r1", NOW + 0.5)
    stale = routing.snapshot([prefill_replica(NOW + 0.4, _named_prefill("r1"), _named_prefill("x", 100)), m], NOW + 0.5)
    assert stale.workers[0].num_outstanding_prompt_tokens == 100
    assert stale.workers[0].num_kv_tokens_used == 100
    # and a decision whose engine never names it stops counting after a report read well after it
    routing.choose([prefill_replica(NOW + 0.4), m], _facts(2000, request_id="r2"), NOW + 0.6)
    late = routing.snapshot([prefill_replica(NOW + 0.6 + 2.0), m], NOW + 2.7).workers[0]
    assert late.num_outstanding_prompt_tokens == 0


def test_a_multiplexed_first_token_ends_its_prefill_at_once() -> None:
    """A multiplexing worker takes one prefill at a time: once told of the first token, the router counts the
    request as a decode there and drops the prefill from a report taken before it."""
    routing = _routing(route_order="multiplex-first")
    capacity = PROFILE.num_kv_cache_tokens
    m = ("m", replica_stats(WorkerRole.MULTIPLEXING, _state(2), NOW - 0.05))
    order = routing.choose([m], _facts(300), NOW)
    assert order == [0]
    assert routing.snapshot([m], NOW + 0.01).workers[0].num_outstanding_prompt_tokens == 300
    routing.first_token("r1", NOW + 0.1)
    named = EngineLiveState(
        prefills=(_named_prefill("r1", 300),), num_kv_tokens_used=300, num_kv_tokens_capacity=capacity
    )
    stale = routing.snapshot([("m", replica_stats(WorkerRole.MULTIPLEXING, named, NOW + 0.05))], NOW + 0.12)
    worker = stale.workers[0]
    assert worker.num_outstanding_prompt_tokens == 0
    assert len(worker.decodes) == 1
    assert worker.decodes.num_context_tokens == (301,)
    # a report taken after the first token that does not name it: it has finished there
    done = EngineLiveState(prefills=(_named_prefill("x", 50),), num_kv_tokens_used=50, num_kv_tokens_capacity=capacity)
    later = routing.snapshot([("m", replica_stats(WorkerRole.MULTIPLEXING, done, NOW + 0.2))], NOW + 0.21)
    assert len(later.workers[0].decodes) == 0


def _hop_learning_cluster() -> tuple[ReplicaRouting, list[tuple[str, dict[str, Any]]]]:
    """A router that learns the P/D hop (prefill first), over an idle prefill replica ``p`` and an idle
    multiplexing replica ``m``."""
    context = PolicyContext(step_time=PROFILE.step_time, max_model_len=PROFILE.max_model_len)
    routing = ReplicaRouting(
        make_policy("tropical", context, {"route_order": "prefill-first"}),
        PROFILE.num_kv_cache_tokens,
        step_time=PROFILE.step_time,
        hop_calibration=CalibrationConfig(min_samples=5),
    )
    replicas = [
        ("p", replica_stats(WorkerRole.PREFILL, _state(), NOW)),
        ("m", replica_stats(WorkerRole.MULTIPLEXING, _state(), NOW)),
    ]
    return routing, replicas


def test_the_p_d_hop_is_learned_from_first_tokens() -> None:
    """Through an orchestrator the hop holds its crossings: learned per prefill replica from the time between
    placing the decode half and its first token, less the first decode step, and carried in the snapshot."""
    routing, replicas = _hop_learning_cluster()
    assert routing.snapshot(replicas, NOW).workers[0].pd_hop_s(500) == 0.0  # the prior
    first_step_s = PROFILE.step_time.decode_step_time_s(1, 501)
    for i in range(12):
        at = NOW + i
        assert routing.choose(replicas, _facts(500, request_id=f"r{i}"), at) == [0]
        routing.ended("p", f"r{i}", at + 0.2)
        assert routing.choose(replicas, _facts(500, phase="decode", request_id=f"r{i}"), at + 0.2) == [1]
        routing.first_token(f"r{i}", at + 0.2 + 0.15 + first_step_s)
        routing.ended("m", f"r{i}", at + 0.9)
    hop_s = routing.snapshot(replicas, NOW + 12).workers[0].pd_hop_s(500)
    assert hop_s == pytest.approx(0.15, rel=0.2)
    assert routing.snapshot(replicas, NOW + 12).workers[1].pd_hop_s(500) == 0.0  # only prefill replicas hop


@pytest.mark.parametrize("via", ["choose", "submit"])
def test_the_p_d_hop_starts_where_the_prefill_replica_had_the_answer(via: str) -> None:
    """The decode half's facts say when its prefill replica had the engine's answer: the crossings between that and
    the decode's placement (the answer back to the ingress, the decode half's routing call) are part of the hop the
    router learns, whichever way the decode half is placed."""
    routing, replicas = _hop_learning_cluster()
    first_step_s = PROFILE.step_time.decode_step_time_s(1, 501)
    for i in range(12):
        at = NOW + i
        assert routing.choose(replicas, _facts(500, request_id=f"r{i}"), at) == [0]
        routing.ended("p", f"r{i}", at + 0.3)
        decode = _facts(500, phase="decode", request_id=f"r{i}").model_copy(update={"prefill_done_at_unix_s": at + 0.2})
        if via == "choose":
            assert routing.choose(replicas, decode, at + 0.3) == [1]
        else:
            routing.submit(decode)
            assert routing.dispatch(replicas, at + 0.3) == {f"r{i}": [1]}
        routing.first_token(f"r{i}", at + 0.3 + 0.15 + first_step_s)
        routing.ended("m", f"r{i}", at + 0.9)
    # 0.1 s from the prefill replica's answer to the placement, 0.15 s from there to the first decode step
    assert routing.snapshot(replicas, NOW + 12).workers[0].pd_hop_s(500) == pytest.approx(0.25, rel=0.2)
    with pytest.raises(ValueError, match="prefill_done_at_unix_s"):
        RequestFacts.model_validate({**_facts().model_dump(), "prefill_done_at_unix_s": float("nan")})


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


def test_first_tokens_and_ends_feed_the_policys_toggle_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through an orchestrator the router sees no token: the ingress tells it a request's first token and end,
    and the policy gets them as tropical serve gives them (the attainment toggle's TTFT and TPOT windows)."""
    routing = _routing()
    seen: list[tuple[str, str, float]] = []
    monkeypatch.setattr(
        routing.policy, "on_first_token", lambda r, ttft_s, now_s: seen.append(("ttft", r.request_id, ttft_s))
    )
    monkeypatch.setattr(
        routing.policy, "on_finished", lambda r, tpot_s, now_s: seen.append(("tpot", r.request_id, tpot_s))
    )
    m = ("m", replica_stats(WorkerRole.MULTIPLEXING, _state(), NOW))
    routing.submit(_facts(100))
    assert set(routing.dispatch([m], NOW)) == {"r1"}
    routing.first_token("r1", NOW + 0.25)
    routing.first_token("r1", NOW + 0.3)  # told twice (two routers' ingress): counted once
    routing.finished("r1", 0.04, NOW + 2.0)
    routing.finished("r1", 0.04, NOW + 2.0)
    routing.first_token("unknown", NOW)
    assert seen == [("ttft", "r1", pytest.approx(0.25)), ("tpot", "r1", 0.04)]


def test_a_replica_is_predicted_with_the_step_time_model_its_report_carries() -> None:
    context = PolicyContext(step_time=PROFILE.step_time, max_model_len=PROFILE.max_model_len)
    routing = ReplicaRouting(
        make_policy("tropical", context, {}), PROFILE.num_kv_cache_tokens, step_time=PROFILE.step_time
    )
    reported = LiveStepTime.from_model(PROFILE.step_time.scaled(3.0))
    state = _state(2).model_copy(update={"step_time": reported})
    replicas = [
        ("a", replica_stats(WorkerRole.MULTIPLEXING, state, NOW)),
        ("b", replica_stats(WorkerRole.MULTIPLEXING, _state(2), NOW)),
    ]
    first, second = routing.snapshot(replicas, NOW).workers
    assert first.step_time is not None
    assert LiveStepTime.from_model(first.step_time) == reported
    assert first.step_time.valid_range == PROFILE.step_time.valid_range
    assert second.step_time is None  # the policy's own
    assert routing.snapshot(replicas, NOW + 0.1).workers[0].step_time is first.step_time  # kept while unchanged


@pytest.mark.parametrize("via", ["choose", "submit"])
def test_the_decision_log_holds_each_request_routed_through_the_replicas(via: str, tmp_path: Any) -> None:
    """With a decision log, every request this router routed gets its line when the ingress says it finished:
    its route and replicas, the policy's reason, the prefill's answer and the decode's placement for P/D, and the
    TTFT and TPOT the ingress saw against its SLOs, as ``tropical serve --decision-log`` writes them."""
    from tropical_sched.serve.decision_log import DecisionLog, read_decision_log

    routing, replicas = _hop_learning_cluster()
    routing.decision_log = DecisionLog(tmp_path / "decisions.jsonl")
    route, decode = _facts(500), _facts(500, phase="decode").model_copy(update={"prefill_done_at_unix_s": NOW + 0.2})
    if via == "choose":
        assert routing.choose(replicas, route, NOW) == [0]
        assert routing.choose(replicas, decode, NOW + 0.3) == [1]
    else:
        routing.submit(route)
        assert routing.dispatch(replicas, NOW) == {"r1": [0]}
        routing.submit(decode)
        assert routing.dispatch(replicas, NOW + 0.3) == {"r1": [1]}
    routing.first_token("r1", NOW + 0.5)
    routing.finished("r1", 0.2, NOW + 2.5, num_output_tokens=11)  # TPOT over its 0.1 s SLO
    routing.finished("unknown", 0.01, NOW)
    routing.decision_log.close()
    (entry,) = read_decision_log(tmp_path / "decisions.jsonl")
    assert (entry["route"], entry["worker"], entry["decode_worker"]) == ("prefill", "p", "m")
    assert entry["reason"]
    assert entry["decode_reason"]
    assert (entry["routed_at_s"], entry["prefill_done_at_s"], entry["decode_placed_at_s"]) == (
        NOW,
        NOW + 0.2,
        NOW + 0.3,
    )
    assert entry["ttft_s"] == pytest.approx(0.5)
    assert (entry["tpot_s"], entry["num_output_tokens"], entry["met_ttft"], entry["met_tpot"]) == (0.2, 11, True, False)


def test_without_a_decision_log_nothing_is_kept_per_request() -> None:
    routing = _routing()
    m = ("m", replica_stats(WorkerRole.MULTIPLEXING, _state(), NOW))
    routing.submit(_facts(100))
    routing.dispatch([m], NOW)
    assert routing._log_entries == {}

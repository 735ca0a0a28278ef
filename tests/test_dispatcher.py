"""The router queue: routing order, bounded retries, FIFO decode placement."""

from __future__ import annotations

from tests.conftest import make_cluster, make_request, make_worker
from tropical_sched.core import (
    ClusterSnapshot,
    DecodePlacement,
    Request,
    RouteAction,
    RouteDecision,
    Slo,
    WorkerRole,
)
from tropical_sched.policies import Dispatcher


class ScriptedPolicy:
    """Routes request ids in ``accept`` to worker 0 and keeps the rest waiting; places decodes in ``place``."""

    name = "scripted"

    def __init__(self, accept: set[str] = frozenset(), place: set[str] = frozenset()) -> None:
        self.accept = set(accept)
        self.place = set(place)
        self.asked: list[str] = []

    def waiting_sort_key(self, request: Request) -> float:
        return float(request.num_prompt_tokens)

    def route(self, request: Request, cluster: ClusterSnapshot) -> RouteDecision:
        self.asked.append(request.request_id)
        if request.request_id in self.accept:
            return RouteDecision(action=RouteAction.PREFILL, worker_id=0, reason="scripted")
        return RouteDecision(action=RouteAction.WAIT, worker_id=None, reason="scripted")

    def place_decode(self, request: Request, cluster: ClusterSnapshot) -> DecodePlacement:
        self.asked.append(f"place:{request.request_id}")
        worker = 1 if request.request_id in self.place else None
        return DecodePlacement(worker_id=worker, reason="scripted")


CLUSTER = make_cluster(make_worker(0, WorkerRole.PREFILL), make_worker(1, WorkerRole.MULTIPLEXING))


def _run(dispatcher: Dispatcher, **kwargs: bool) -> tuple[list[str], list[str]]:
    routed: list[str] = []
    placed: list[str] = []
    dispatcher.dispatch(
        lambda: CLUSTER,
        lambda request, decision: routed.append(request.request_id),
        lambda request, placement: placed.append(request.request_id),
        **kwargs,
    )
    return routed, placed


def test_new_requests_are_routed_in_arrival_order_and_waiters_retried_in_policy_order() -> None:
    policy = ScriptedPolicy(accept={"b"})
    dispatcher = Dispatcher(policy)
    for rid, tokens in (("a", 300), ("b", 200), ("c", 100)):
        dispatcher.submit(make_request(request_id=rid, num_prompt_tokens=tokens))
    routed, _ = _run(dispatcher, retry_waiting=False)
    assert routed == ["b"]
    assert policy.asked == ["a", "b", "c"]
    assert dispatcher.num_waiting == 2
    policy.asked.clear()
    policy.accept = {"a", "c"}
    routed, _ = _run(dispatcher)
    assert routed == ["c", "a"]  # shortest prompt first (the policy's key)
    assert dispatcher.num_waiting == 0
    assert dispatcher.stats.by_action == {"wait": 2, "prefill": 3}


def test_a_round_stops_after_max_consecutive_waits() -> None:
    policy = ScriptedPolicy(accept={"z"})
    dispatcher = Dispatcher(policy, max_consecutive_waits=3)
    for i in range(10):
        dispatcher.submit(make_request(request_id=str(i), num_prompt_tokens=10 + i))
    dispatcher.submit(make_request(request_id="z", num_prompt_tokens=1000))
    _run(dispatcher, retry_waiting=False)
    policy.asked.clear()
    routed, _ = _run(dispatcher)
    assert routed == []
    assert policy.asked == ["0", "1", "2"]


def test_decodes_are_placed_oldest_first_and_the_head_blocks() -> None:
    policy = ScriptedPolicy(place={"x", "z"})
    dispatcher = Dispatcher(policy)
    for rid in ("x", "y", "z"):
        dispatcher.submit_decode(make_request(request_id=rid))
    _, placed = _run(dispatcher)
    assert placed == ["x"]
    assert dispatcher.num_pending_decodes == 2
    policy.place.add("y")
    _, placed = _run(dispatcher)
    assert placed == ["y", "z"]
    assert dispatcher.num_pending_decodes == 0


def _waiting_at(now_s: float, dispatcher: Dispatcher) -> list[str]:
    """Retry every waiting request at ``now_s`` (none is placed) and return the order the policy was asked in."""
    policy = dispatcher.policy
    assert isinstance(policy, ScriptedPolicy)
    policy.asked.clear()
    cluster = make_cluster(make_worker(0, WorkerRole.PREFILL), now_s=now_s)
    dispatcher.dispatch(lambda: cluster, lambda request, decision: None, lambda request, placement: None)
    return list(policy.asked)


def _queue(dispatcher: Dispatcher) -> None:
    # shortest prompt first is the policy's order; "short" missed its TTFT deadline at 1 s, "mid" misses it at 3 s
    for rid, tokens, arrival_at_s, ttft_s in (
        ("long", 900, 0.5, 4.0),
        ("short", 100, 0.0, 1.0),
        ("mid", 500, 1.0, 2.0),
    ):
        dispatcher.submit(
            make_request(
                request_id=rid, num_prompt_tokens=tokens, arrival_at_s=arrival_at_s, slo=Slo(ttft_s=ttft_s, tpot_s=0.1)
            )
        )
    _run(dispatcher, retry_waiting=False)


def test_requests_past_their_ttft_deadline_are_retried_after_the_others_each_part_in_policy_order() -> None:
    dispatcher = Dispatcher(ScriptedPolicy(), max_consecutive_waits=10)
    _queue(dispatcher)
    assert _waiting_at(0.5, dispatcher) == ["short", "mid", "long"]  # none is late yet: the policy's order
    assert _waiting_at(2.0, dispatcher) == ["mid", "long", "short"]
    assert _waiting_at(3.5, dispatcher) == ["long", "short", "mid"]
    # a request that arrives now is put in the policy's order, and the next round partitions again
    dispatcher.submit(
        make_request(request_id="tiny", num_prompt_tokens=10, arrival_at_s=3.5, slo=Slo(ttft_s=1.0, tpot_s=0.1))
    )
    _run(dispatcher, retry_waiting=False)
    assert _waiting_at(3.6, dispatcher) == ["tiny", "long", "short", "mid"]
    assert _waiting_at(10.0, dispatcher) == ["tiny", "short", "mid", "long"]  # all late: the policy's order


def test_late_requests_last_off_keeps_the_policys_order() -> None:
    dispatcher = Dispatcher(ScriptedPolicy(), max_consecutive_waits=10, late_requests_last=False)
    _queue(dispatcher)
    assert _waiting_at(2.0, dispatcher) == ["short", "mid", "long"]


def test_a_round_that_stops_early_reaches_the_late_requests_last() -> None:
    dispatcher = Dispatcher(ScriptedPolicy(), max_consecutive_waits=2)
    _queue(dispatcher)
    assert _waiting_at(2.0, dispatcher) == ["mid", "long"]

"""The router queue: routing order, bounded retries, FIFO decode placement."""

from __future__ import annotations

from tests.conftest import make_cluster, make_request, make_worker
from tropical_sched.core import ClusterSnapshot, DecodePlacement, Request, RouteAction, RouteDecision, WorkerRole
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

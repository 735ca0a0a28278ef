"""The router's queue: requests that wait for a worker, and prefilled requests that wait for a decode slot.

Engine-agnostic and synchronous. The simulator and the router service both own one, call :meth:`Dispatcher.dispatch`
whenever cluster state changes, and apply the decisions it hands back.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from tropical_sched.core.decisions import DecodePlacement, RouteAction, RouteDecision
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Request
from tropical_sched.core.snapshot import ClusterSnapshot
from tropical_sched.policies.base import Policy

__all__ = ["DispatchStats", "Dispatcher"]


@dataclass(slots=True)
class DispatchStats:
    """Counters of a dispatcher's work.

    Attributes:
        num_route_calls: calls to ``Policy.route``.
        num_place_calls: calls to ``Policy.place_decode``.
        by_action: decisions returned, by action (``RouteAction.value`` -> count).
    """

    num_route_calls: int = 0
    num_place_calls: int = 0
    by_action: dict[str, int] = field(default_factory=dict)


class Dispatcher:
    """Routes requests with a policy, holding those told to wait and retrying them when state changes.

    Waiting requests are retried in the policy's ``waiting_sort_key`` order (ties by arrival), those still within
    their TTFT deadline first: a request whose deadline has passed has missed its SLO whatever happens next, and
    placed first it would push the ones behind it past theirs (with ``late_requests_last``, the default). One
    round stops after ``max_consecutive_waits`` WAIT answers in a row, which bounds the router's work per state
    change when a long queue builds up under overload: the policy's order puts the most placeable requests first.
    Prefilled requests waiting for a decode worker are placed first, oldest first.

    Args:
        policy: the policy that decides.
        max_consecutive_waits: WAIT answers in a row that end a round, >= 1.
        late_requests_last: retry requests past their TTFT deadline after the others; ``False``: the policy's
            order alone.
    """

    def __init__(self, policy: Policy, *, max_consecutive_waits: int = 8, late_requests_last: bool = True) -> None:
        if max_consecutive_waits < 1:
            raise ConfigError(f"max_consecutive_waits must be >= 1, got {max_consecutive_waits!r}")
        self.policy = policy
        self._max_waits = max_consecutive_waits
        self._late_last = late_requests_last
        self._waiting: list[tuple[float, int, Request]] = []  # sorted by (policy key, arrival sequence)
        self._new: list[Request] = []  # submitted, not yet routed once
        self._pending_decodes: list[Request] = []  # FIFO of prefilled requests without a decode worker
        self._sequence = itertools.count()
        self.stats = DispatchStats()

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a prefill worker (including submitted ones not routed yet)."""
        return len(self._waiting) + len(self._new)

    @property
    def num_pending_decodes(self) -> int:
        """Prefilled requests waiting for a decode worker."""
        return len(self._pending_decodes)

    def submit(self, request: Request) -> None:
        """Queue a new request; it is routed at the next :meth:`dispatch`, before any retry."""
        self._new.append(request)

    def submit_decode(self, request: Request) -> None:
        """Queue a request whose prefill finished remotely; it is placed at the next :meth:`dispatch`."""
        self._pending_decodes.append(request)

    def cancel(self, request_id: str) -> bool:
        """Forget a request that is still waiting (for a prefill worker or a decode slot).

        Returns:
            Whether it was waiting.
        """
        for index, request in enumerate(self._new):
            if request.request_id == request_id:
                del self._new[index]
                return True
        for index, (_, _, request) in enumerate(self._waiting):
            if request.request_id == request_id:
                del self._waiting[index]
                return True
        for index, request in enumerate(self._pending_decodes):
            if request.request_id == request_id:
                del self._pending_decodes[index]
                return True
        return False

    def _count(self, action: str) -> None:
        self.stats.by_action[action] = self.stats.by_action.get(action, 0) + 1

    def dispatch(
        self,
        snapshot: Callable[[], ClusterSnapshot],
        apply_route: Callable[[Request, RouteDecision], None],
        apply_placement: Callable[[Request, DecodePlacement], None],
        *,
        retry_waiting: bool = True,
    ) -> None:
        """Place pending decodes, route new requests, then retry waiting ones; apply each decision at once.

        Args:
            snapshot: returns the cluster as it is now (called again after every applied decision).
            apply_route: carries out a PREFILL, MULTIPLEX, COLOCATED or REJECT decision.
            apply_placement: carries out a decode placement that names a worker.
            retry_waiting: also retry the requests already waiting. Pass ``False`` when the only change is new
                arrivals: the waiting requests were refused in the same state, so only the new ones are routed.
        """
        policy = self.policy
        # Decodes are placed in FIFO order, as a decode instance admits transferred requests: when the oldest
        # cannot be placed, the round stops (no overtaking, and no rescanning a long backlog on every event).
        num_placed = 0
        for request in self._pending_decodes:
            self.stats.num_place_calls += 1
            placement = policy.place_decode(request, snapshot())
            if placement.worker_id is None:
                break
            apply_placement(request, placement)
            num_placed += 1
        if num_placed:
            del self._pending_decodes[:num_placed]

        new, self._new = self._new, []
        for request in new:
            if not self._route(request, snapshot, apply_route):
                bisect.insort(self._waiting, (policy.waiting_sort_key(request), next(self._sequence), request))
        if not retry_waiting or not self._waiting:
            return
        partitioned = False
        if self._late_last:
            now_s = snapshot().now_s
            on_time: list[tuple[float, int, Request]] = []
            late: list[tuple[float, int, Request]] = []
            for entry in self._waiting:  # stable: each part keeps the policy's order
                (on_time if entry[2].ttft_deadline_at_s >= now_s else late).append(entry)
            if late:
                self._waiting = on_time + late
                partitioned = True
        index = 0
        consecutive_waits = 0
        while index < len(self._waiting):
            request = self._waiting[index][2]
            if self._route(request, snapshot, apply_route):
                consecutive_waits = 0
                del self._waiting[index]
                continue
            consecutive_waits += 1
            if consecutive_waits >= self._max_waits:
                break
            index += 1
        if partitioned:  # back to the policy's order, which insort relies on (sequence numbers are unique)
            self._waiting.sort()

    def _route(
        self,
        request: Request,
        snapshot: Callable[[], ClusterSnapshot],
        apply_route: Callable[[Request, RouteDecision], None],
    ) -> bool:
        """Route one request; returns whether it left the router (placed or rejected)."""
        self.stats.num_route_calls += 1
        decision = self.policy.route(request, snapshot())
        self._count(decision.action.value)
        if decision.action is RouteAction.WAIT:
            return False
        apply_route(request, decision)
        return True

"""Decisions returned by policies. Each one explains itself: a ``reason`` and the predicted figures behind it."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from tropical_sched.core.errors import ConfigError

__all__ = ["DecodePlacement", "RouteAction", "RouteDecision"]


class RouteAction(str, enum.Enum):
    """Where a request's prefill goes."""

    PREFILL = "prefill"
    """Prefill on a prefill worker; the decode is placed once the first token is out."""
    MULTIPLEX = "multiplex"
    """Prefill (chunked, inside decode steps) and decode on one multiplexing worker: no KV transfer."""
    COLOCATED = "colocated"
    """Serve entirely on a colocated worker."""
    WAIT = "wait"
    """No worker can take it now; keep it at the router and ask again when state changes."""
    REJECT = "reject"
    """Decline it (its SLO is unattainable); the client gets an error at once."""

    @property
    def needs_worker(self) -> bool:
        """Whether a decision with this action names a worker."""
        return self in (RouteAction.PREFILL, RouteAction.MULTIPLEX, RouteAction.COLOCATED)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteDecision:
    """Where to run one request's prefill.

    Attributes:
        action: what to do.
        worker_id: the chosen worker; set exactly when ``action.needs_worker``.
        reason: one sentence on why, for logs and tests.
        predicted: the predicted figures behind the decision, keyed by name with units (e.g.
            ``"predicted_ttft_s"``, ``"min_tpot_slack_s"``). Read-only by convention.

    Raises:
        ConfigError: ``worker_id`` does not match ``action``.
    """

    action: RouteAction
    worker_id: int | None
    reason: str
    predicted: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action.needs_worker != (self.worker_id is not None):
            raise ConfigError(f"RouteDecision.worker_id={self.worker_id!r} does not fit action {self.action.value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodePlacement:
    """Where a request decodes after a remote prefill.

    Attributes:
        worker_id: the decoding worker, or ``None`` to keep the KV cache where it is and ask again later.
        reason: one sentence on why.
        predicted: the predicted figures behind the decision (e.g. ``"decode_step_s"``).
    """

    worker_id: int | None
    reason: str
    predicted: Mapping[str, float] = field(default_factory=dict)

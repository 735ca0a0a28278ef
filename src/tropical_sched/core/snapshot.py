"""Frozen views of workers and of the cluster, as a policy sees them at one instant.

The simulator, the router service and the engine adapters all build these from their own state and hand them to
the same policy objects; a policy never touches live state. Running decodes are stored column-wise
(:class:`DecodeBatch`) because policies read them as vectors (the smallest TPOT slack, the total context) and a
cluster snapshot is rebuilt for every routing decision.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Request

if TYPE_CHECKING:  # core stays free of runtime imports beyond itself
    from tropical_sched.predictors.step_time import StepTimeModel

__all__ = [
    "ClusterSnapshot",
    "DecodeBatch",
    "DecodeView",
    "PrefillState",
    "WorkerRole",
    "WorkerSnapshot",
]


class WorkerRole(str, enum.Enum):
    """What a worker (one model instance, possibly several GPUs under tensor parallelism) does.

    Roles are virtual (design doc section 2): every worker runs the same engine; the role only decides which
    requests the router sends it.
    """

    PREFILL = "prefill"
    """Runs prefills only and hands the KV cache to a decoding worker (P/D disaggregation)."""
    MULTIPLEXING = "multiplexing"
    """Decodes, and may also run a routed prefill as chunks inside its decode steps (Tropical)."""
    DECODE = "decode"
    """Decodes only (DistServe's decode instances)."""
    COLOCATED = "colocated"
    """Prefills and decodes its own requests (vLLM, Sarathi-Serve)."""

    @property
    def runs_prefills(self) -> bool:
        """Whether the router may send prefills to a worker of this role."""
        return self is not WorkerRole.DECODE

    @property
    def runs_decodes(self) -> bool:
        """Whether a worker of this role keeps decodes (its own, or ones whose KV cache is moved to it)."""
        return self is not WorkerRole.PREFILL


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefillState:
    """A prefill that waits or runs on a worker (or waits at the router).

    Attributes:
        request_id: the request's id.
        arrival_at_s: the request's arrival time, seconds.
        num_prompt_tokens: tokens to prefill in total (prompt, plus generated tokens after a recompute).
        num_computed_tokens: tokens already prefilled, 0 <= value <= ``num_prompt_tokens``.
        ttft_slo_s: the request's TTFT target, seconds.
        num_scheduled_tokens: tokens being computed in the engine step in flight (done when it ends, see
            :attr:`WorkerSnapshot.busy_until_s`); still counted as remaining.
        tpot_slo_s: the request's TPOT target once it decodes, seconds; ``None`` if the caller does not know it.
    """

    request_id: str
    arrival_at_s: float
    num_prompt_tokens: int
    num_computed_tokens: int
    ttft_slo_s: float
    num_scheduled_tokens: int = 0
    tpot_slo_s: float | None = None

    @classmethod
    def from_request(cls, request: Request) -> PrefillState:
        """A request whose prefill has not started."""
        return cls(
            request_id=request.request_id,
            arrival_at_s=request.arrival_at_s,
            num_prompt_tokens=request.num_prompt_tokens,
            num_computed_tokens=0,
            ttft_slo_s=request.slo.ttft_s,
            tpot_slo_s=request.slo.tpot_s,
        )

    @property
    def ttft_deadline_at_s(self) -> float:
        """Latest acceptable first-token time, seconds."""
        return self.arrival_at_s + self.ttft_slo_s

    @property
    def num_remaining_tokens(self) -> int:
        """Prompt tokens still to prefill."""
        return self.num_prompt_tokens - self.num_computed_tokens


@dataclass(frozen=True, slots=True)
class DecodeView:
    """One running decode, read from a :class:`DecodeBatch` (a convenience for iteration)."""

    request_id: str
    first_token_at_s: float
    num_generated_tokens: int
    tpot_slo_s: float
    num_context_tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeBatch:
    """The running decodes of one worker, column-wise: entry ``i`` of every column is the same request.

    Attributes:
        request_ids: ids, shape (B,).
        first_token_at_s: when each request's first token was produced, seconds, shape (B,).
        num_generated_tokens: output tokens produced so far, counting the first, >= 1, shape (B,).
        tpot_slo_s: each request's TPOT target, seconds, shape (B,).
        num_context_tokens: tokens in each request's KV cache (prompt + generated), shape (B,).

    Raises:
        ConfigError: the columns differ in length.
    """

    request_ids: tuple[str, ...] = ()
    first_token_at_s: tuple[float, ...] = ()
    num_generated_tokens: tuple[int, ...] = ()
    tpot_slo_s: tuple[float, ...] = ()
    num_context_tokens: tuple[int, ...] = ()
    total_context_tokens: int = field(init=False, default=0)
    """Sum of the context tokens of all decodes (what a decode step attends to); derived."""

    def __post_init__(self) -> None:
        n = len(self.request_ids)
        for name in ("first_token_at_s", "num_generated_tokens", "tpot_slo_s", "num_context_tokens"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"DecodeBatch.{name} has {len(getattr(self, name))} entries, request_ids has {n}")
        object.__setattr__(self, "total_context_tokens", sum(self.num_context_tokens))

    def __len__(self) -> int:
        return len(self.request_ids)

    def __iter__(self) -> Iterator[DecodeView]:
        return map(
            DecodeView,
            self.request_ids,
            self.first_token_at_s,
            self.num_generated_tokens,
            self.tpot_slo_s,
            self.num_context_tokens,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSnapshot:
    """One worker at one instant.

    Attributes:
        worker_id: index of the worker in the cluster, >= 0.
        role: what the worker does.
        prefills: prefills queued or running on the worker, in the order the worker will run them.
        decodes: running decodes, including decodes whose KV cache is on its way to this worker.
        num_kv_tokens_used: KV-cache tokens held (decodes, partial prefills, KV awaiting transfer).
        num_kv_tokens_capacity: KV-cache capacity in tokens.
        max_num_seqs: the most sequences the engine batches in one step.
        is_available: False while the worker is marked down (router service) or draining.
        busy_until_s: when the engine step in flight ends, if known; nothing can be reordered before then.
            ``None``: idle, or unknown.
        sees_step_in_flight: whether the builder of the snapshot sees the engine's steps (the simulator does:
            ``busy_until_s`` ``None`` then means no step in flight). ``False``: a router reading what it sent and
            the engine's reports, which cannot tell when the step in flight ends; a prediction behind the worker's
            prefills then counts the expected rest of one
            (:func:`~tropical_sched.core.slack.expected_step_in_flight_s`).
        step_time: the step-time model of this worker as calibrated online from what it was seen doing;
            ``None``: predict it with the policy's own model (the offline profile).
        pd_hop_fixed_s: learned cost of the P/D hop of a request prefilled on this worker, beyond its prefill
            (KV transfer set-up and wait, the second HTTP round trip; the decoding instance's first step is not
            part of it), seconds, >= 0.
        pd_hop_per_prompt_token_s: the hop's cost per prompt token (the KV cache moved), seconds per token, >= 0.
    """

    worker_id: int
    role: WorkerRole
    prefills: tuple[PrefillState, ...]
    decodes: DecodeBatch
    num_kv_tokens_used: int
    num_kv_tokens_capacity: int
    max_num_seqs: int
    is_available: bool = True
    busy_until_s: float | None = None
    sees_step_in_flight: bool = True
    step_time: StepTimeModel | None = None
    pd_hop_fixed_s: float = 0.0
    pd_hop_per_prompt_token_s: float = 0.0
    num_outstanding_prompt_tokens: int = field(init=False, default=0)
    """Prompt tokens still to prefill on this worker; derived from ``prefills``."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "num_outstanding_prompt_tokens",
            sum(p.num_prompt_tokens - p.num_computed_tokens for p in self.prefills),
        )

    @property
    def num_executing_tokens(self) -> int:
        """Outstanding prompt tokens plus decode context tokens: the load measure of the baselines' balancer."""
        return self.num_outstanding_prompt_tokens + self.decodes.total_context_tokens

    @property
    def num_free_kv_tokens(self) -> int:
        """KV-cache tokens not in use."""
        return self.num_kv_tokens_capacity - self.num_kv_tokens_used

    @property
    def kv_usage_fraction(self) -> float:
        """KV-cache usage in [0, 1]."""
        return self.num_kv_tokens_used / self.num_kv_tokens_capacity if self.num_kv_tokens_capacity else 1.0

    @property
    def is_idle(self) -> bool:
        """No prefill queued or running (decodes may still run)."""
        return not self.prefills

    def pd_hop_s(self, num_prompt_tokens: int) -> float:
        """Learned cost of the P/D hop of a request of ``num_prompt_tokens`` prefilled here, seconds:
        ``pd_hop_fixed_s + pd_hop_per_prompt_token_s * num_prompt_tokens`` (0 until something was learned)."""
        return self.pd_hop_fixed_s + self.pd_hop_per_prompt_token_s * num_prompt_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSnapshot:
    """All workers at one instant.

    Attributes:
        now_s: the instant, seconds on the scheduler's clock.
        workers: one snapshot per worker, indexed by ``worker_id``.
    """

    now_s: float
    workers: tuple[WorkerSnapshot, ...]

    def with_role(self, role: WorkerRole) -> tuple[WorkerSnapshot, ...]:
        """The available workers of one role, in ``worker_id`` order."""
        return tuple(w for w in self.workers if w.role is role and w.is_available)

"""The router's live view of its instances, turned into the snapshots the policy reads."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tropical_sched.core.request import Request
from tropical_sched.core.snapshot import DecodeBatch, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.policies.base import LocalScheduler
from tropical_sched.serve.config import InstanceConfig

__all__ = ["Instance", "Phase", "Tracked"]


class Phase(str, enum.Enum):
    """Where a request is."""

    ROUTING = "routing"
    """At the router, waiting for a prefill decision."""
    PREFILL = "prefill"
    """Sent to an instance; no token yet."""
    AWAITING_DECODE = "awaiting-decode"
    """Prefilled remotely; its KV cache is (being) moved to the decoding instance; no token yet."""
    DECODE = "decode"
    """Producing tokens."""


@dataclass(slots=True, eq=False)
class Tracked:
    """One request through the router.

    Attributes:
        request: the request as the policy sees it (``arrival_at_s`` on the router's clock).
        phase: where it is.
        instance: index of the instance it counts on, if any.
        route: how its prefill was routed (``prefill``, ``multiplex``, ``colocated``), "" until decided.
        prefill_done_at_s: when a remote prefill returned.
        first_token_at_s: when the client-visible first token arrived.
        last_token_at_s: when the latest token arrived.
        num_generated_tokens: tokens streamed so far.
        attempts: times it was routed (retries after failures that produced no token).
    """

    request: Request
    phase: Phase = Phase.ROUTING
    instance: int | None = None
    route: str = ""
    prefill_done_at_s: float | None = None
    first_token_at_s: float | None = None
    last_token_at_s: float | None = None
    num_generated_tokens: int = 0
    attempts: int = 0
    predicted: dict[str, float] = field(default_factory=dict)


class Instance:
    """One engine instance as the router tracks it.

    Args:
        index: its worker id.
        config: its configuration.
        local: the engine-local scheduler of its role (orders its prefills in snapshots).
        num_kv_cache_tokens: its KV capacity.
    """

    def __init__(self, index: int, config: InstanceConfig, local: LocalScheduler, num_kv_cache_tokens: int) -> None:
        self.index = index
        self.config = config
        self.url = config.url.rstrip("/")
        self.role: WorkerRole = config.role
        self.local = local
        self.capacity = num_kv_cache_tokens
        self.healthy = True
        self.prefills: dict[str, Tracked] = {}  # request id -> request without a token yet
        self.decodes: dict[str, Tracked] = {}  # request id -> request producing (or about to produce) tokens
        self.engine_kv_usage_fraction: float | None = None  # last value read from the engine's /metrics
        self.engine_num_requests: int | None = None  # running + waiting, as the engine reports
        self.served_models: tuple[str, ...] = ()  # model ids its /v1/models lists (empty until read)
        self.max_model_len: int | None = None  # context limit its /v1/models reports, tokens
        self.version = 0
        self._snapshot: WorkerSnapshot | None = None
        self._snapshot_version = -1

    @property
    def num_in_flight(self) -> int:
        """Requests counted on this instance."""
        return len(self.prefills) + len(self.decodes)

    def add_prefill(self, tracked: Tracked) -> None:
        """Count a request whose prefill was sent here."""
        self.prefills[tracked.request.request_id] = tracked
        tracked.instance = self.index
        self.version += 1

    def add_decode(self, tracked: Tracked) -> None:
        """Count a request that decodes here (moved from prefills if it prefilled here)."""
        self.prefills.pop(tracked.request.request_id, None)
        self.decodes[tracked.request.request_id] = tracked
        tracked.instance = self.index
        self.version += 1

    def remove(self, tracked: Tracked) -> None:
        """Stop counting a request."""
        request_id = tracked.request.request_id
        self.prefills.pop(request_id, None)
        self.decodes.pop(request_id, None)
        if tracked.instance == self.index:
            tracked.instance = None
        self.version += 1

    def snapshot(self) -> WorkerSnapshot:
        """The instance as the policy sees it (cached until it changes).

        Prefills show no computed tokens (the router cannot see inside a prefill); decodes show the tokens
        streamed so far. KV usage is the router's count, or the engine's reported usage if that is higher (other
        clients, or the router's estimate drifting low).
        """
        if self._snapshot is not None and self._snapshot_version == self.version:
            return self._snapshot
        prefills = sorted(
            (PrefillState.from_request(t.request) for t in self.prefills.values()),
            key=self.local.prefill_sort_key,
        )
        decodes = list(self.decodes.values())
        generated = tuple(max(t.num_generated_tokens, 1) for t in decodes)
        context = tuple(t.request.num_prompt_tokens + g for t, g in zip(decodes, generated, strict=True))
        kv_used = sum(p.num_prompt_tokens for p in prefills) + sum(context)
        if self.engine_kv_usage_fraction is not None:
            kv_used = max(kv_used, int(self.engine_kv_usage_fraction * self.capacity))
        self._snapshot = WorkerSnapshot(
            worker_id=self.index,
            role=self.role,
            prefills=tuple(prefills),
            decodes=DecodeBatch(
                request_ids=tuple(t.request.request_id for t in decodes),
                first_token_at_s=tuple(
                    t.first_token_at_s if t.first_token_at_s is not None else (t.prefill_done_at_s or 0.0)
                    for t in decodes
                ),
                num_generated_tokens=generated,
                tpot_slo_s=tuple(t.request.slo.tpot_s for t in decodes),
                num_context_tokens=context,
            ),
            num_kv_tokens_used=min(kv_used, self.capacity),
            num_kv_tokens_capacity=self.capacity,
            max_num_seqs=self.config.max_num_seqs,
            is_available=self.healthy,
        )
        self._snapshot_version = self.version
        return self._snapshot

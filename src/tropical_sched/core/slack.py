"""TTFT and TPOT slack, and the predicted first token behind a queue: the one definition every caller uses.

Slack is time a request can still afford to lose before it misses its SLO (design doc section 4). Negative slack
means the SLO is already lost (or will be, if the prediction holds). The router's policies, the simulator and the
engine-side adapters all predict a prefill's first token behind a worker's queue with
:func:`predicted_queue_finish` (design doc section 3: queueing is not regressed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tropical_sched.core.snapshot import DecodeBatch, PrefillState

if TYPE_CHECKING:  # core stays free of runtime imports beyond itself
    from tropical_sched.predictors.step_time import StepTimeModel

__all__ = [
    "QueueFinish",
    "decode_first_token_wait_s",
    "expected_step_in_flight_s",
    "min_tpot_slack_s",
    "num_behind_tpot_pace",
    "predicted_queue_finish",
    "queued_prefill_s",
    "tpot_slack_s",
    "ttft_slack_s",
]


def ttft_slack_s(
    *,
    arrival_at_s: float,
    ttft_slo_s: float,
    now_s: float,
    remaining_prefill_s: float,
    queue_ahead_s: float = 0.0,
) -> float:
    """TTFT slack of a request at ``now_s`` (design doc section 4).

    ``arrival + ttft_slo - now - queue_ahead - remaining_prefill``: the time left after the work queued ahead of
    the request and its own remaining prefill, if both ran from now on as predicted.

    Args:
        arrival_at_s: arrival time, seconds.
        ttft_slo_s: TTFT target, seconds, > 0.
        now_s: the current time, seconds.
        remaining_prefill_s: predicted time of the request's own remaining prefill, seconds, >= 0.
        queue_ahead_s: predicted time of the prefills that run before it, seconds, >= 0.

    Returns:
        Slack in seconds; negative when the TTFT SLO is predicted to be missed.
    """
    return arrival_at_s + ttft_slo_s - now_s - queue_ahead_s - remaining_prefill_s


def tpot_slack_s(*, first_token_at_s: float, num_generated_tokens: int, tpot_slo_s: float, now_s: float) -> float:
    """TPOT slack of a decoding request at ``now_s`` (design doc section 4).

    ``first_token_at + tpot_slo * max(1, n_generated) - now``: the time left before the next token is due for
    the request's running mean TPOT to stay within its SLO. It is the stall the request can absorb right now.

    Args:
        first_token_at_s: when the first token was produced, seconds.
        num_generated_tokens: tokens produced so far, counting the first.
        tpot_slo_s: TPOT target, seconds, > 0.
        now_s: the current time, seconds.

    Returns:
        Slack in seconds; negative when the next token is already late.
    """
    return first_token_at_s + tpot_slo_s * max(1, num_generated_tokens) - now_s


def min_tpot_slack_s(decodes: DecodeBatch, now_s: float, *, margin_fraction: float = 0.0) -> float:
    """Smallest TPOT slack over a decode batch, less a margin of each request's own TPOT SLO.

    Computes ``min_r (tpot_slack_r(now) - margin_fraction * tpot_slo_r)``: the longest stall every decode in the
    batch can absorb while still keeping ``margin_fraction`` of its TPOT SLO in reserve (design doc section 5,
    rule 2, with the prototype's ``slack_margin``).

    Args:
        decodes: the running decodes.
        now_s: the current time, seconds.
        margin_fraction: reserve per request, as a fraction of its TPOT SLO, >= 0.

    Returns:
        Seconds; ``inf`` for an empty batch.
    """
    best = math.inf
    for first_at, num_generated, slo in zip(
        decodes.first_token_at_s, decodes.num_generated_tokens, decodes.tpot_slo_s, strict=True
    ):
        slack = first_at + slo * (num_generated if num_generated > 1 else 1) - now_s - margin_fraction * slo
        if slack < best:
            best = slack
    return best


def num_behind_tpot_pace(decodes: DecodeBatch, now_s: float, *, pace_fraction: float = 1.0) -> int:
    """How many decodes of a batch are behind their TPOT pace: their next token already late for their running
    mean TPOT to stay within ``pace_fraction`` of their TPOT SLO (with 1, negative :func:`tpot_slack_s`).

    Args:
        decodes: the running decodes.
        now_s: the current time, seconds.
        pace_fraction: the pace, as a fraction of each decode's TPOT SLO, > 0.

    Returns:
        A count in ``[0, len(decodes)]``.
    """
    return sum(
        1
        for first_at, num_generated, slo in zip(
            decodes.first_token_at_s, decodes.num_generated_tokens, decodes.tpot_slo_s, strict=True
        )
        if tpot_slack_s(
            first_token_at_s=first_at, num_generated_tokens=num_generated, tpot_slo_s=pace_fraction * slo, now_s=now_s
        )
        < 0
    )


def queued_prefill_s(prefill: PrefillState, step_time: StepTimeModel, chunk_tokens: int | None = None) -> float:
    """Predicted prefill time a queued or running prefill still needs once the engine step in flight ends.

    The tokens of the step in flight (``num_scheduled_tokens``) count as done: that step's time is the worker's
    ``busy_until_s``, not part of the prefill's remaining time (design doc section 3, "remaining prefill").

    Args:
        prefill: the prefill.
        step_time: the worker's step-time model.
        chunk_tokens: the worker's chunk size, tokens; ``None`` runs the rest in one step.

    Returns:
        Seconds, >= 0.
    """
    return step_time.remaining_prefill_time_s(
        prefill.num_prompt_tokens, prefill.num_computed_tokens + prefill.num_scheduled_tokens, chunk_tokens
    )


def expected_step_in_flight_s(
    prefills: Sequence[PrefillState], step_time: StepTimeModel, chunk_tokens: int | None = None
) -> float:
    """Expected rest of the engine step in flight on a worker with ``prefills``, for a caller that cannot see the
    engine's step boundaries (a router reading reports; the simulator knows ``busy_until_s`` exactly).

    The step in flight is taken to be the first prefill's next chunk (its scheduled tokens, if the report names
    them), and a request arriving at a random time during it waits half of it on average. Without this a live
    router predicted a small prompt's first token on a busy prefill worker too early by about half a prefill
    (``benchmarks/ray_serve.py`` decision logs: P/D first tokens over their prediction by 0.12-0.18 s at the
    median, multiplexed ones by -0.07-0.06 s).

    Args:
        prefills: the worker's prefills in the order it runs them; empty: no step in flight, 0.
        step_time: the worker's step-time model.
        chunk_tokens: the worker's chunk size, tokens; ``None``: whole prefills.

    Returns:
        Seconds, >= 0.
    """
    if not prefills:
        return 0.0
    head = prefills[0]
    left = head.num_prompt_tokens - head.num_computed_tokens
    chunk = head.num_scheduled_tokens or (left if chunk_tokens is None else min(chunk_tokens, left))
    return 0.5 * step_time.prefill_chunk_time_s(head.num_computed_tokens, chunk)


def decode_first_token_wait_s(
    step_time: StepTimeModel, *, num_decoding: int, num_decoding_context_tokens: int, num_prompt_tokens: int
) -> float:
    """Expected time from a P/D request's arrival at a decoding instance to its first token there: half the step
    in flight, when the instance is decoding (on average the request waits that long for the next step), then
    the first decode step of its ``num_decoding`` decodes and this one.

    Both halves of the P/D hop use it: a router takes it out of an observed hop
    (:func:`~tropical_sched.predictors.calibration.observed_pd_hop_s`) and adds it back when it predicts a P/D
    first token, on the decoding instance the request would likely go to.

    Args:
        step_time: the decoding instance's step-time model.
        num_decoding: decodes running there, >= 0.
        num_decoding_context_tokens: their context tokens, >= 0.
        num_prompt_tokens: the arriving request's prompt length, tokens, >= 1.

    Returns:
        Seconds, >= 0.
    """
    first_step_s = step_time.decode_step_time_s(num_decoding + 1, num_decoding_context_tokens + num_prompt_tokens + 1)
    return first_step_s + step_time.decode_step_time_s(num_decoding, num_decoding_context_tokens) / 2


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueFinish:
    """When a new prefill queued on a worker is predicted to produce its first token (:func:`predicted_queue_finish`).

    Attributes:
        finish_at_s: the predicted first-token time, seconds: ``now + ahead_s + own_s + after_prefill_s``.
        ahead_s: predicted time from now until its prefill starts: the rest of the step in flight, then the prefills
            the worker runs before it, safety factor included, seconds, >= 0.
        own_s: its own predicted remaining prefill, safety factor included, seconds, >= 0.
        after_prefill_s: time a policy adds between the prefill's end and the first token it counts (Tropical: the
            P/D hop; SCORPIO: its TTFT-guard margin), seconds, >= 0.
        broken_request_id: the first queued prefill, in the worker's order, that was predicted to meet its TTFT
            deadline without the new one and to miss it with the new one ahead; ``None`` if there is none.
    """

    finish_at_s: float
    ahead_s: float
    own_s: float
    after_prefill_s: float = 0.0
    broken_request_id: str | None = None

    @property
    def breaks_none(self) -> bool:
        """Whether every queued prefill that was going to meet its TTFT deadline still meets it."""
        return self.broken_request_id is None


def predicted_queue_finish(
    prefills: Sequence[PrefillState],
    new: PrefillState,
    now_s: float,
    step_time: StepTimeModel,
    *,
    chunk_tokens: int | None = None,
    sort_key: Callable[[PrefillState], float] | None = None,
    safety_factor: float = 1.0,
    busy_until_s: float | None = None,
    in_flight_first: bool = False,
    after_prefill_s: float = 0.0,
) -> QueueFinish:
    """Predicted first-token time of ``new`` if it joined a worker's prefill queue now (design doc section 3).

    Queueing is not regressed: the worker runs its prefills one after another in its own order, so ``new`` starts
    once the step in flight (until ``busy_until_s``) and every prefill ahead of it are done. Each prefill costs its
    remaining prefill after the step in flight (:func:`queued_prefill_s`, in chunks of ``chunk_tokens``) times
    ``safety_factor`` (the prototype uses 1.02). ``new`` goes before the first queued prefill whose ``sort_key`` is
    larger than its own (ties keep the queued one ahead), or last without a ``sort_key``. The queued prefills
    behind it are checked in order: the first one that was going to meet its TTFT deadline and no longer does is
    reported (a prefill that was already going to miss it does not count).

    Args:
        prefills: the worker's queued and running prefills, in the order the worker runs them.
        new: the prefill to add (usually :meth:`PrefillState.from_request`).
        now_s: the current time, seconds.
        step_time: the worker's step-time model.
        chunk_tokens: the worker's prefill chunk size, tokens; ``None`` for whole prefills.
        sort_key: the worker's queue order (lower runs first), e.g. its local scheduler's ``prefill_sort_key``.
        safety_factor: multiplier on every predicted prefill time, >= 1.
        busy_until_s: when the engine step in flight ends, seconds; ``None``: no step in flight, or unknown.
        in_flight_first: keep every prefill with tokens in the step in flight (``num_scheduled_tokens > 0``)
            ahead of ``new`` whatever its key: an engine that finishes a started prefill before starting another.
            ``False``: ``new`` may overtake it at the next chunk boundary (shortest-remaining-first preemption).
        after_prefill_s: time from the end of ``new``'s prefill to the first token the caller counts (a P/D hop,
            a guard's margin), seconds, >= 0; it does not delay the queued prefills.

    Returns:
        The prediction.
    """
    # Nothing overtakes the step in flight: the queue starts when it ends.
    ahead_s = max(busy_until_s - now_s, 0.0) if busy_until_s is not None else 0.0
    own_s = queued_prefill_s(new, step_time, chunk_tokens) * safety_factor
    key = sort_key(new) if sort_key is not None else math.inf
    start_s = math.nan
    inserted = False
    for queued in prefills:
        if (
            not inserted
            and sort_key is not None
            and key < sort_key(queued)
            and not (in_flight_first and queued.num_scheduled_tokens)
        ):
            inserted = True
            start_s = ahead_s
            ahead_s += own_s
        ahead_s += queued_prefill_s(queued, step_time, chunk_tokens) * safety_factor
        if inserted:
            deadline = queued.ttft_deadline_at_s
            finish_with = now_s + ahead_s
            if finish_with > deadline and finish_with - own_s <= deadline:
                return QueueFinish(
                    finish_at_s=now_s + (start_s + own_s) + after_prefill_s,
                    ahead_s=start_s,
                    own_s=own_s,
                    after_prefill_s=after_prefill_s,
                    broken_request_id=queued.request_id,
                )
    finish_at_s = now_s + ahead_s + own_s if not inserted else now_s + (start_s + own_s)
    return QueueFinish(
        finish_at_s=finish_at_s + after_prefill_s,
        ahead_s=ahead_s if not inserted else start_s,
        own_s=own_s,
        after_prefill_s=after_prefill_s,
    )

"""TTFT and TPOT slack: the one definition every policy uses (design doc section 4).

Slack is time a request can still afford to lose before it misses its SLO. Negative slack means the SLO is
already lost (or will be, if the prediction holds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tropical_sched.core.snapshot import DecodeBatch, PrefillState

__all__ = [
    "min_tpot_slack_s",
    "predicted_prefill_finish_at_s",
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


def predicted_prefill_finish_at_s(
    prefills: Sequence[PrefillState],
    now_s: float,
    remaining_prefill_s: Callable[[PrefillState], float],
    *,
    safety_factor: float = 1.0,
) -> list[float]:
    """Predicted first-token time of each prefill in a queue that runs them one after another.

    Queueing is not regressed (design doc section 3): the finish time of entry ``i`` is ``now`` plus the
    predicted remaining prefill times of entries ``0..i``, times ``safety_factor`` (the prototype uses 1.02).

    Args:
        prefills: the queue, in the order the worker runs it.
        now_s: the current time, seconds.
        remaining_prefill_s: predictor of one entry's remaining prefill time, seconds.
        safety_factor: multiplier on every predicted time, >= 1.

    Returns:
        One finish time per entry, seconds, non-decreasing.
    """
    finish_at_s = []
    elapsed_s = 0.0
    for prefill in prefills:
        elapsed_s += remaining_prefill_s(prefill) * safety_factor
        finish_at_s.append(now_s + elapsed_s)
    return finish_at_s

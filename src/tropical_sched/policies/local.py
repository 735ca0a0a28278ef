"""Engine-local schedulers: how one worker orders its waiting prefills and caps prefill tokens per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from tropical_sched.core.slack import min_tpot_slack_s
from tropical_sched.core.snapshot import DecodeBatch, PrefillState
from tropical_sched.predictors.step_time import StepTimeModel

__all__ = ["FcfsScheduler", "RunsEveryDecode", "ShortestRemainingPrefillFirst", "SlackCappedScheduler"]


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

    def prefill_token_cap(self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int) -> int | None:
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

    def prefill_token_cap(self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int) -> int | None:
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

    Attributes:
        step_time: the latency predictor.
        min_chunk_tokens: smallest chunk allowed whatever the slack, tokens, >= 0.
        margin_fraction: slack kept in reserve, as a fraction of each decode's TPOT SLO, >= 0.
    """

    step_time: StepTimeModel
    min_chunk_tokens: int = 32
    margin_fraction: float = 0.0
    caps_prefill_tokens: ClassVar[bool] = True

    def prefill_sort_key(self, prefill: PrefillState) -> float:
        """Arrival time: earliest first."""
        return prefill.arrival_at_s

    def prefill_token_cap(self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int) -> int | None:
        """Largest chunk whose mixed step fits the smallest TPOT slack; ``None`` without decodes."""
        if not len(decodes):
            return None
        budget_s = min_tpot_slack_s(decodes, now_s, margin_fraction=self.margin_fraction)
        tokens = self.step_time.max_chunk_tokens_within(
            budget_s,
            num_decode_seqs=len(decodes),
            num_decode_context_tokens=decodes.total_context_tokens,
            num_prefix_tokens=num_prefix_tokens,
        )
        return max(tokens, self.min_chunk_tokens)

    def with_step_time(self, step_time: StepTimeModel) -> SlackCappedScheduler:
        """The same cap computed with ``step_time``."""
        return replace(self, step_time=step_time)

"""The live state an engine reports about itself, so that several routers (or router replicas) decide from one view.

A router that counts only what it dispatched itself sees a fraction of each engine's work as soon as a second
router shares the engines: both then take the same idle-looking instance, and both overcommit the TPOT slack of
the same decodes. Here each engine reports what it runs, whoever sent it: its queued and running prefills, its
running decodes with their TPOT SLOs, and its KV-cache usage; every router builds its
:class:`~tropical_sched.core.snapshot.WorkerSnapshot` of that engine from the report, plus what it sent itself
after the report was taken (:func:`merge_live_state`).

Times in a report are durations measured on the engine when it took the report (how long a prefill has waited,
how long a decode has streamed), not timestamps: engines and routers need no common clock. The router places them
on its own clock at the moment the report was taken, which it takes to be the middle of the request that fetched
it.

Served at ``GET /v1/tropical/state`` by the fake engine, and by vLLM and SGLang with the Tropical adapters
(:mod:`tropical_sched.adapters.live_state`); a Ray Serve replica reports the same document as its routing stats.
A report may carry the engine's own (calibrated) step-time model, which routers then predict that engine with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tropical_sched.core.errors import DataFormatError
from tropical_sched.core.locate import validation_message
from tropical_sched.core.snapshot import DecodeBatch, PrefillState, WorkerSnapshot
from tropical_sched.predictors.step_time import StepTimeCoefficients, StepTimeModel

__all__ = [
    "LIVE_STATE_PATH",
    "EngineLiveState",
    "LiveDecode",
    "LivePrefill",
    "LiveStepTime",
    "merge_live_state",
    "parse_live_state",
]

LIVE_STATE_PATH = "/v1/tropical/state"
"""Where an engine serves its :class:`EngineLiveState` (``GET``, JSON)."""

_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Count = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LivePrefill(_Strict):
    """A prefill queued or running on the engine.

    Attributes:
        request_id: the id the router gave the request (vLLM: ``vllm_xargs.tropical_request_id``), or ``None``.
        num_prompt_tokens: tokens to prefill in total, >= 1.
        num_computed_tokens: tokens prefilled so far, 0 <= value <= ``num_prompt_tokens``.
        waited_s: time since the request reached the engine, seconds, >= 0.
        ttft_slo_s: its TTFT SLO as the engine has it (the budget left when it left the router), seconds, > 0.
        tpot_slo_s: its TPOT SLO, seconds, > 0; ``None`` if the engine was not told.
    """

    request_id: str | None = None
    num_prompt_tokens: Annotated[int, Field(ge=1)]
    num_computed_tokens: _Count
    waited_s: _Seconds
    ttft_slo_s: _PositiveSeconds
    tpot_slo_s: _PositiveSeconds | None = None


class LiveDecode(_Strict):
    """A decode running on the engine (or whose KV cache is on its way there).

    Attributes:
        request_id: the id the router gave the request, or ``None``.
        num_context_tokens: tokens in its KV cache (prompt + generated), >= 1.
        num_generated_tokens: output tokens so far, counting the first, >= 1.
        decoding_for_s: time since its first token, seconds, >= 0.
        tpot_slo_s: its TPOT SLO, seconds, > 0.
    """

    request_id: str | None = None
    num_context_tokens: Annotated[int, Field(ge=1)]
    num_generated_tokens: Annotated[int, Field(ge=1)]
    decoding_for_s: _Seconds
    tpot_slo_s: _PositiveSeconds


class LiveStepTime(_Strict):
    """The engine's step-time model as it predicts with it now (its online calibration's, where it runs one):
    the coefficients of :class:`~tropical_sched.predictors.step_time.StepTimeCoefficients`, each in seconds per
    unit of its feature, >= 0."""

    const_s: _Seconds
    per_batched_token_s: _Seconds
    per_prefill_seq_s: _Seconds
    per_prefill_attention_pair_s: _Seconds
    per_decode_seq_s: _Seconds
    per_decode_context_token_s: _Seconds

    @classmethod
    def from_model(cls, model: StepTimeModel) -> LiveStepTime:
        """The coefficients of ``model``."""
        return cls(**dataclasses.asdict(model.coefficients))

    def model(self, like: StepTimeModel) -> StepTimeModel:
        """A step-time model with these coefficients and the valid range of ``like`` (the profile the engine
        started from), named ``"<like's name> (engine-calibrated)"``."""
        return StepTimeModel(
            StepTimeCoefficients(**self.model_dump()),
            like.valid_range,
            f"{like.name} (engine-calibrated)",
            warned_like=like,
        )

    def model_kept(self, like: StepTimeModel, kept: StepTimeModel | None) -> StepTimeModel:
        """:meth:`model`, or ``kept`` when it already has these coefficients (a router keeps the same model
        object while an engine's model stays the same: the model's memo of queued prefills carries over)."""
        if kept is not None and LiveStepTime.from_model(kept) == self:
            return kept
        return self.model(like)


class EngineLiveState(_Strict):
    """What an engine runs, as it reports it (JSON at :data:`LIVE_STATE_PATH`).

    Attributes:
        schema_version: 1.
        prefills: queued and running prefills, in the order the engine will run them.
        decodes: running decodes.
        num_kv_tokens_used: KV-cache tokens held, >= 0.
        num_kv_tokens_capacity: KV-cache capacity in tokens, >= 1.
        step_time: the step-time model the engine predicts with (its calibrated one), or ``None``: routers then
            predict its steps with their own model of it.
    """

    schema_version: Literal[1] = 1
    prefills: tuple[LivePrefill, ...] = ()
    decodes: tuple[LiveDecode, ...] = ()
    num_kv_tokens_used: _Count = 0
    num_kv_tokens_capacity: Annotated[int, Field(ge=1)]
    step_time: LiveStepTime | None = None

    @classmethod
    def from_snapshot(
        cls,
        snapshot: WorkerSnapshot,
        now_s: float,
        seconds_per_unit: float = 1.0,
        router_ids: Mapping[str, str] | None = None,
    ) -> EngineLiveState:
        """The report of an engine that keeps its state as a snapshot (the fake engine, a simulated worker).

        Args:
            snapshot: the engine's snapshot.
            now_s: the engine's clock now, in the snapshot's time unit.
            seconds_per_unit: wall seconds per unit of the snapshot's clock (the fake engine's ``time_scale``);
                durations are reported in wall seconds, SLOs as they are.
            router_ids: the router's id of each engine request id that came with one.
        """
        ids = router_ids or {}
        prefills = tuple(
            LivePrefill(
                request_id=ids.get(p.request_id),
                num_prompt_tokens=p.num_prompt_tokens,
                num_computed_tokens=p.num_computed_tokens,
                waited_s=max(now_s - p.arrival_at_s, 0.0) * seconds_per_unit,
                ttft_slo_s=p.ttft_slo_s,
                tpot_slo_s=p.tpot_slo_s,
            )
            for p in snapshot.prefills
        )
        d = snapshot.decodes
        decodes = tuple(
            LiveDecode(
                request_id=ids.get(d.request_ids[i]),
                num_context_tokens=max(d.num_context_tokens[i], 1),
                num_generated_tokens=max(d.num_generated_tokens[i], 1),
                decoding_for_s=max(now_s - d.first_token_at_s[i], 0.0) * seconds_per_unit,
                tpot_slo_s=d.tpot_slo_s[i],
            )
            for i in range(len(d))
        )
        return cls(
            prefills=prefills,
            decodes=decodes,
            num_kv_tokens_used=snapshot.num_kv_tokens_used,
            num_kv_tokens_capacity=snapshot.num_kv_tokens_capacity,
            step_time=LiveStepTime.from_model(snapshot.step_time) if snapshot.step_time is not None else None,
        )

    def foreign(self, own_prefix: str) -> EngineLiveState:
        """The report without the requests whose ``request_id`` starts with ``own_prefix`` (a router's own: every
        id it gives starts with its prefix; it sees them more freshly itself, including one that ended after the
        report was taken); KV usage is then that of the rest (prompt tokens of the prefills, context of the
        decodes), counted as the router counts its own."""
        prefills = tuple(p for p in self.prefills if p.request_id is None or not p.request_id.startswith(own_prefix))
        decodes = tuple(d for d in self.decodes if d.request_id is None or not d.request_id.startswith(own_prefix))
        kv = sum(p.num_prompt_tokens for p in prefills) + sum(d.num_context_tokens for d in decodes)
        return self.model_copy(update={"prefills": prefills, "decodes": decodes, "num_kv_tokens_used": kv})

    def aged(self, age_s: float) -> EngineLiveState:
        """The report as it would read ``age_s`` seconds after it was taken, with nothing having run meanwhile: every
        prefill has waited and every decode has streamed ``age_s`` longer (an engine that serves a report taken
        earlier, e.g. written at its last step, serves it aged by the time since). ``age_s <= 0``: the report."""
        if age_s <= 0:
            return self
        return self.model_copy(
            update={
                "prefills": tuple(p.model_copy(update={"waited_s": p.waited_s + age_s}) for p in self.prefills),
                "decodes": tuple(
                    d.model_copy(update={"decoding_for_s": d.decoding_for_s + age_s}) for d in self.decodes
                ),
            }
        )

    def without(self, request_ids: Set[str]) -> EngineLiveState:
        """The report without the requests named in ``request_ids`` (they ended, or moved on, after it was taken);
        their KV tokens (prompt tokens of a prefill, context of a decode) are taken off the engine's KV usage.
        Returns the report itself when it names none of them."""
        prefills = tuple(p for p in self.prefills if p.request_id not in request_ids)
        decodes = tuple(d for d in self.decodes if d.request_id not in request_ids)
        if len(prefills) == len(self.prefills) and len(decodes) == len(self.decodes):
            return self
        freed = sum(p.num_prompt_tokens for p in self.prefills if p.request_id in request_ids) + sum(
            d.num_context_tokens for d in self.decodes if d.request_id in request_ids
        )
        kv = max(self.num_kv_tokens_used - freed, 0)
        return self.model_copy(update={"prefills": prefills, "decodes": decodes, "num_kv_tokens_used": kv})

    def prefill_states(self, taken_at_s: float, prefix: str = "live") -> tuple[PrefillState, ...]:
        """The prefills as the policy sees them, on a clock where the report was taken at ``taken_at_s``
        (ids ``{prefix}-p{i}``: the engine's own ids are not the router's)."""
        return tuple(
            PrefillState(
                request_id=f"{prefix}-p{i}",
                arrival_at_s=taken_at_s - p.waited_s,
                num_prompt_tokens=p.num_prompt_tokens,
                num_computed_tokens=min(p.num_computed_tokens, p.num_prompt_tokens),
                ttft_slo_s=p.ttft_slo_s,
                tpot_slo_s=p.tpot_slo_s,
            )
            for i, p in enumerate(self.prefills)
        )

    def decode_columns(
        self, taken_at_s: float, prefix: str = "live"
    ) -> tuple[tuple[str, ...], tuple[float, ...], tuple[int, ...], tuple[float, ...], tuple[int, ...]]:
        """The decodes as :class:`~tropical_sched.core.snapshot.DecodeBatch` columns (ids, first-token times,
        generated tokens, TPOT SLOs, context tokens) on a clock where the report was taken at ``taken_at_s``."""
        decodes = self.decodes
        return (
            tuple(f"{prefix}-d{i}" for i in range(len(decodes))),
            tuple(taken_at_s - d.decoding_for_s for d in decodes),
            tuple(d.num_generated_tokens for d in decodes),
            tuple(d.tpot_slo_s for d in decodes),
            tuple(d.num_context_tokens for d in decodes),
        )


def parse_live_state(content: bytes | str, source: str) -> EngineLiveState:
    """An engine's report from its JSON.

    Raises:
        DataFormatError: it is not a valid :class:`EngineLiveState` (the message names ``source``, the field and
            the value).
    """
    try:
        return EngineLiveState.model_validate_json(content)
    except ValidationError as exc:
        _, message = validation_message(exc.errors(), exc.error_count())  # type: ignore[arg-type]
        raise DataFormatError(source, None, message) from None


def merge_live_state(
    state: EngineLiveState,
    taken_at_s: float,
    now_s: float,
    own_prefills: Sequence[PrefillState],
    own_decodes: DecodeBatch,
    own_kv_tokens: int,
    sort_key: Callable[[PrefillState], float] | None = None,
) -> tuple[tuple[PrefillState, ...], DecodeBatch, int]:
    """One engine's prefills, decodes and KV tokens used, from its report and this router's own requests there.

    ``state`` holds what the router cannot see: other routers' requests (:meth:`EngineLiveState.foreign` takes the
    router's own out of a report that carries their ids; a report without ids holds only what was there when it
    was taken, and the router's own are then those it sent after). The report's decodes are carried forward to
    ``now_s`` at the pace they kept (their first token moved by the report's age): a decode's achieved TPOT is what
    its slack is priced from, and read against a token count that stopped at the report it would look slower with
    every millisecond until the next one, which would turn the policy away from multiplexing for no reason.
    Prefills keep their arrival (their TTFT deadline is absolute) and the progress the report saw.

    The prefills come out in the order the engine runs them, which is what the policy's queue predictions
    (:func:`~tropical_sched.core.slack.predicted_queue_finish`) walk: with ``sort_key`` (the worker's local
    scheduler's ``prefill_sort_key``, e.g. shortest remaining prefill first on a prefill worker) the report's and the
    router's own are merged by it, ties keeping the report's first; without it the router's own follow the
    report's (an engine that queues newcomers behind what it has). Left concatenated on a shortest-first engine,
    a new prompt was placed before the first longer prefill of the report and every shorter prefill of the
    router's own counted behind it: a router's prediction then depended on how much of the queue was its own (with
    two routers on the same queue, 0.6-1.3 s against 1.5-4 s for the same long prompts).

    Args:
        state: what the engine reported, less the router's own requests.
        taken_at_s: when it was taken, on the router's clock, seconds.
        now_s: the router's clock now, seconds, >= ``taken_at_s`` (an earlier value is taken as ``taken_at_s``).
        own_prefills: the router's own prefills on the engine, in order.
        own_decodes: its own decodes there.
        own_kv_tokens: the KV tokens those hold.
        sort_key: the engine's queue order (lower runs first); ``None``: the router's own after the report's.

    Returns:
        ``(prefills, decodes, num_kv_tokens_used)``: the prefills of both in the engine's order, the decodes of
        both, and the report's KV usage plus the router's.
    """
    prefills = state.prefill_states(taken_at_s) + tuple(own_prefills)
    if sort_key is not None:
        prefills = tuple(sorted(prefills, key=sort_key))  # stable: the report's first on ties
    ids, first, generated, tpot, context = state.decode_columns(max(now_s, taken_at_s))
    decodes = DecodeBatch(
        request_ids=ids + own_decodes.request_ids,
        first_token_at_s=first + own_decodes.first_token_at_s,
        num_generated_tokens=generated + own_decodes.num_generated_tokens,
        tpot_slo_s=tpot + own_decodes.tpot_slo_s,
        num_context_tokens=context + own_decodes.num_context_tokens,
    )
    return prefills, decodes, state.num_kv_tokens_used + own_kv_tokens

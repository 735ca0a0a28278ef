"""The engine-side half of a policy, on duck-typed engine requests (no engine import: tested without one).

Both adapters run the same code. A request provides ``request_id``, ``arrival_time`` (seconds on the ``clock``
the :class:`EngineSide` is given), ``num_prompt_tokens``, ``num_computed_tokens``, ``num_output_tokens`` and
``num_tokens``: vLLM's ``Request`` has them as they are; the SGLang adapter wraps its ``Req`` in a view. Each
adapter says where the router's SLOs arrive (``tropical_ttft_slo_ms`` / ``tropical_tpot_slo_ms``): vLLM's
``sampling_params.extra_args``, SGLang's ``sampling_params.custom_params``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.locate import validation_message
from tropical_sched.core.slack import QueueFinish, predicted_queue_finish
from tropical_sched.core.snapshot import DecodeBatch, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.policies.base import FirstTokenPredictor, LocalScheduler, Policy, PolicyContext
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.calibration import StepTimeCalibrator
from tropical_sched.predictors.profile import load_profile
from tropical_sched.predictors.step_time import StepTimeModel, split_step
from tropical_sched.serve.engines import REQUEST_ID_KEY

__all__ = ["EngineSide", "EngineSideConfig", "classify_step", "parse_engine_side_section"]

_NO_SEQUENCE_LIMIT = 1 << 30  # an engine-side snapshot's max_num_seqs: the engine enforces its own


class EngineSideConfig(BaseModel):
    """What the engine-side half needs to know about its engine.

    Attributes:
        role: the instance's role in the deployment (as in the router's cluster file).
        policy: the registered policy whose engine-local half runs here.
        policy_options: options of that policy.
        profile: latency profile for the slack-based prefill cap and the attainability check (name or file).
        default_ttft_slo_ms: TTFT SLO of requests that carry none (``tropical_ttft_slo_ms``).
        default_tpot_slo_ms: TPOT SLO of requests that carry none (``tropical_tpot_slo_ms``).
        reject_unattainable: reject, with an error to the client, a request whose predicted first token (by the
            policy's routing rule, on this engine's queue and step-time model: :meth:`EngineSide.unattainable_reason`)
            is later than its TTFT deadline when it arrives. Off by default: the router already rejects by the same
            rule before sending.
        online_calibration: refit the step-time model from this engine's own steps as they run (every step's
            composition and duration, :class:`~tropical_sched.predictors.calibration.StepTimeCalibrator`: starts
            at ``profile``, corrections clamped, old steps forgotten, outliers resisted), and predict with it.
        calibration_refresh_steps: observed steps between two refreshes of the model the predictions use.
        live_state_interval_s: how often, at most, the engine writes its live state for ``GET /v1/tropical/state``
            while it runs and a router reads it, seconds, >= 0 (and at once when a request arrives or leaves;
            :mod:`tropical_sched.adapters.live_state`); ``None``: never.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: WorkerRole = WorkerRole.COLOCATED
    policy: str = "tropical"
    policy_options: dict[str, Any] = Field(default_factory=dict)
    profile: str = "a100-llama2-70b-tp4"
    default_ttft_slo_ms: Annotated[float, Field(gt=0)] = 10_000.0
    default_tpot_slo_ms: Annotated[float, Field(gt=0)] = 100.0
    reject_unattainable: bool = False
    online_calibration: bool = True
    calibration_refresh_steps: Annotated[int, Field(ge=1)] = 32
    live_state_interval_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = 0.05


def classify_step(
    num_scheduled_tokens: Mapping[str, int],
    num_computed_tokens_before: Mapping[str, int],
    num_prompt_tokens: Mapping[str, int],
) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """``(num_decode_seqs, num_decode_context_tokens, prefill_chunks)`` of one engine step, the arguments of
    :meth:`EngineSide.observe_step` (the split is :func:`~tropical_sched.predictors.step_time.split_step`'s).

    Raises:
        KeyError: a scheduled request is missing from one of the other mappings.
    """
    chunks, contexts = split_step(num_scheduled_tokens, num_computed_tokens_before, num_prompt_tokens)
    return len(contexts), sum(contexts), chunks


def parse_engine_side_section(section: Any, source: str) -> EngineSideConfig:
    """Validate the ``tropical`` configuration section of an engine (``None``: defaults).

    Args:
        section: the parsed section (a mapping).
        source: where it came from, for messages (``--additional-config tropical``, ``$TROPICAL_SGLANG_CONFIG``).

    Raises:
        ConfigError: the section is malformed (the message names the source, the field and the value).
    """
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: must be an object, got {type(section).__name__}")
    try:
        return EngineSideConfig.model_validate(section)
    except ValidationError as exc:
        _, message = validation_message(exc.errors(), exc.error_count())  # type: ignore[arg-type]
        raise ConfigError(f"{source}.{message.removeprefix('field ')}") from None


class EngineSide:
    """The policy's engine-local half, applied to an engine's request objects.

    Args:
        config: the engine-side configuration.
        slo_args: where a request carries the router's SLOs: returns a mapping with (optionally)
            ``tropical_ttft_slo_ms`` and ``tropical_tpot_slo_ms``.
        source: where ``config`` came from, for error messages.
        clock: seconds, monotonic; tests pass a fake one.

    Raises:
        ConfigError: the role is not one of the policy's, or the profile cannot be loaded.
    """

    def __init__(
        self,
        config: EngineSideConfig,
        slo_args: Callable[[Any], Mapping[str, Any]],
        *,
        source: str = "tropical",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._slo_args = slo_args
        self.profile = load_profile(config.profile)
        self._step_time = self.profile.step_time
        policy: Policy = make_policy(
            config.policy,
            PolicyContext(step_time=self.profile.step_time, max_model_len=self.profile.max_model_len),
            config.policy_options,
        )
        roles = set(policy.worker_roles(4, None))
        if config.role not in roles:
            raise ConfigError(
                f"{source}.role = {config.role.value!r}: policy {config.policy!r} has the roles "
                f"{sorted(r.value for r in roles)}"
            )
        self.policy = policy
        self.local: LocalScheduler = policy.local_scheduler(config.role)
        self._clock = clock
        self._first_token_at: dict[str, float] = {}  # request id -> when its first output token was seen (s)
        self.num_capped_steps = 0
        self.num_requests_seen = 0
        self.num_decode_skips = 0
        self.num_rejected = 0
        self.calibrator = StepTimeCalibrator(self.profile.step_time) if config.online_calibration else None
        self.num_steps_observed = 0

    def now_s(self) -> float:
        """The engine side's clock (seconds)."""
        return self._clock()

    @property
    def step_time(self) -> StepTimeModel:
        """The step-time model of every engine-side prediction (the prefill cap, the unattainable check): the
        profile's until :meth:`set_step_time` replaces it."""
        return self._step_time

    def set_step_time(self, model: StepTimeModel) -> None:
        """Predict with ``model`` from now on (e.g. the engine's step-time model as calibrated online).

        The local scheduler is rebuilt around it (:meth:`LocalScheduler.with_step_time`), keeping its per-request
        state.
        """
        self._step_time = model
        self.local = self.local.with_step_time(model)

    def observe_step(
        self,
        *,
        num_decode_seqs: int,
        num_decode_context_tokens: int,
        prefill_chunks: Iterable[tuple[int, int]] = (),
        duration_s: float,
    ) -> bool:
        """Take in one step the engine ran (its composition and wall time) for the online calibration; every
        ``calibration_refresh_steps`` steps, predict with the refitted model (:meth:`set_step_time`). Does nothing
        with ``online_calibration`` off.

        Returns:
            Whether the model the predictions use changed.
        """
        if self.calibrator is None:
            return False
        chunks = tuple(prefill_chunks)
        if not num_decode_seqs and not chunks:
            return False
        self.calibrator.observe_step(
            num_decode_seqs=num_decode_seqs,
            num_decode_context_tokens=num_decode_context_tokens,
            prefill_chunks=chunks,
            observed_s=duration_s,
        )
        self.num_steps_observed += 1
        if self.num_steps_observed % self.config.calibration_refresh_steps == 0:
            model = self.calibrator.model
            if model is not self._step_time:  # a new local scheduler per refresh, not per step
                self.set_step_time(model)
                return True
        return False

    def describe_calibration(self) -> str:
        """One line on the calibrated model against the profile (for the engine's log)."""
        profile, now = self.profile.step_time, self._step_time
        decode_ms = now.decode_step_time_s(1, 512) * 1e3
        return (
            f"{self.num_steps_observed} steps observed; decode step at batch 1 {decode_ms:.2f} ms "
            f"(profile {profile.decode_step_time_s(1, 512) * 1e3:.2f}), prefill of 1,024 tokens "
            f"{now.prefill_time_s(1024) * 1e3:.1f} ms (profile {profile.prefill_time_s(1024) * 1e3:.1f})"
        )

    def slo_ms(self, request: Any) -> tuple[float, float]:
        """(TTFT, TPOT) SLO of a request in ms: what the router sent with it, else the defaults."""
        extra = self._slo_args(request) or {}
        return (
            float(extra.get("tropical_ttft_slo_ms", self.config.default_ttft_slo_ms)),
            float(extra.get("tropical_tpot_slo_ms", self.config.default_tpot_slo_ms)),
        )

    def router_request_id(self, request: Any) -> str | None:
        """The id the router gave a request (``tropical_request_id`` beside its SLOs), or ``None``."""
        value = (self._slo_args(request) or {}).get(REQUEST_ID_KEY)
        return value if isinstance(value, str) else None

    def prefill_state(self, request: Any) -> PrefillState:
        """A request waiting for (or in) its prefill, as the policy sees it."""
        ttft_ms, tpot_ms = self.slo_ms(request)
        return PrefillState(
            request_id=request.request_id,
            arrival_at_s=float(request.arrival_time),
            num_prompt_tokens=int(request.num_prompt_tokens),
            num_computed_tokens=min(int(request.num_computed_tokens), int(request.num_prompt_tokens)),
            ttft_slo_s=ttft_ms / 1e3,
            tpot_slo_s=tpot_ms / 1e3,
        )

    def sort_key(self, request: Any) -> float:
        """The waiting-queue key of a request (lower runs first), from the local scheduler."""
        self.num_requests_seen += 1
        return float(self.local.prefill_sort_key(self.prefill_state(request)))

    def worker_snapshot(self, queued: Iterable[Any], running: Iterable[Any] = ()) -> WorkerSnapshot:
        """This engine as the policy sees a worker: its prefills in the order it runs them and its decodes.

        The partial prefills among ``running`` come first (the engine continues them), then ``queued`` in the local
        scheduler's order (stable). ``step_time`` is :attr:`step_time`. The engine side does not track the KV cache
        or the step in flight: the snapshot has no ``busy_until_s``, an empty KV cache of the profile's capacity and
        no sequence limit, which the first-token rules do not read.

        Args:
            queued: requests waiting for their prefill.
            running: the running requests (decodes, and prefills the engine has started).
        """
        running = list(running)
        partial = [self.prefill_state(r) for r in running if r.num_computed_tokens < r.num_prompt_tokens]
        waiting = sorted((self.prefill_state(r) for r in queued), key=self.local.prefill_sort_key)
        return WorkerSnapshot(
            worker_id=0,
            role=self.config.role,
            prefills=(*partial, *waiting),
            decodes=self.decode_batch(running),
            num_kv_tokens_used=0,
            num_kv_tokens_capacity=self.profile.num_kv_cache_tokens,
            max_num_seqs=_NO_SEQUENCE_LIMIT,
            step_time=self._step_time,
        )

    def predicted_first_token(self, request: Any, queued: Iterable[Any], running: Iterable[Any] = ()) -> QueueFinish:
        """When a newly arrived request is predicted to produce its first token on this engine.

        The policy's own routing rule when it has one (:class:`~tropical_sched.policies.base.FirstTokenPredictor`:
        Tropical, SCORPIO), on :meth:`worker_snapshot`, so the engine predicts what the router predicts for this
        worker; else :func:`~tropical_sched.core.slack.predicted_queue_finish` in the local scheduler's order, in
        chunks of the policy's token budget when it asks for chunked prefill. Both use :attr:`step_time`.

        Args:
            request: the arriving request.
            queued: the requests already waiting for their prefill on this engine.
            running: the running requests, if the caller has them (their partial prefills run first; a
                multiplexing worker's decodes bound its chunks).
        """
        now_s = self._clock()
        worker = self.worker_snapshot(queued, running)
        new = self.prefill_state(request)
        if isinstance(self.policy, FirstTokenPredictor):
            return self.policy.predicted_first_token(worker, new, now_s)
        settings = self.policy.engine_settings(self.config.role)
        return predicted_queue_finish(
            worker.prefills,
            new,
            now_s,
            self._step_time,
            chunk_tokens=settings.max_num_batched_tokens if settings.enable_chunked_prefill else None,
            sort_key=self.local.prefill_sort_key,
        )

    def unattainable_reason(self, request: Any, queued: Iterable[Any], running: Iterable[Any] = ()) -> str | None:
        """Why a newly arrived request cannot meet its TTFT SLO here, or ``None`` (also when
        ``reject_unattainable`` is off).

        It cannot when its predicted first token (:meth:`predicted_first_token`: the router's rule for this
        worker, on this engine's queue and model) is later than its TTFT deadline (arrival + TTFT SLO).

        Args:
            request: the arriving request.
            queued: the requests already waiting for their prefill on this engine.
            running: the running requests, if the caller has them.
        """
        if not self.config.reject_unattainable:
            return None
        state = self.prefill_state(request)
        finish = self.predicted_first_token(request, queued, running)
        if finish.finish_at_s <= state.ttft_deadline_at_s:
            return None
        self.num_rejected += 1
        waited_s = max(0.0, self._clock() - state.arrival_at_s)
        return (
            f"SLO unattainable: predicted TTFT {(finish.finish_at_s - state.arrival_at_s) * 1e3:.1f} ms (waited "
            f"{waited_s * 1e3:.1f} ms, {finish.ahead_s * 1e3:.1f} ms of work ahead, {finish.own_s * 1e3:.1f} ms of "
            f"its own prefill, {finish.after_prefill_s * 1e3:.1f} ms after it) exceeds the TTFT SLO "
            f"{state.ttft_slo_s * 1e3:.1f} ms"
        )

    def observe_outputs(self, requests: Iterable[Any]) -> None:
        """After a step: note when each request's first output token appeared (its TPOT clock starts there)."""
        now = self._clock()
        for request in requests:
            if request.num_output_tokens > 0 and request.request_id not in self._first_token_at:
                self._first_token_at[request.request_id] = now

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop finished requests."""
        for request_id in request_ids:
            self._first_token_at.pop(request_id, None)

    def decode_batch(self, running: Iterable[Any]) -> DecodeBatch:
        """The running requests that are decoding (prompt fully computed), as a :class:`DecodeBatch`."""
        now = self._clock()
        decodes = [r for r in running if r.num_computed_tokens >= r.num_prompt_tokens]
        return DecodeBatch(
            request_ids=tuple(r.request_id for r in decodes),
            first_token_at_s=tuple(self._first_token_at.get(r.request_id, now) for r in decodes),
            num_generated_tokens=tuple(max(int(r.num_output_tokens), 1) for r in decodes),
            tpot_slo_s=tuple(self.slo_ms(r)[1] / 1e3 for r in decodes),
            num_context_tokens=tuple(int(r.num_tokens) for r in decodes),
        )

    def prefill_token_cap(self, running: list[Any], waiting_head: Any | None) -> tuple[int, int] | None:
        """The per-step prefill cap on a multiplexing worker, or ``None`` when there is nothing to cap.

        Returns:
            ``(number of running decodes, most prefill tokens this step)``.
        """
        if not self.local.caps_prefill_tokens:
            return None
        partial = next((r for r in running if r.num_computed_tokens < r.num_prompt_tokens), None)
        first_prefill = partial if partial is not None else waiting_head
        if first_prefill is None:
            return None
        decodes = self.decode_batch(running)
        if not len(decodes):
            return None
        cap = self.local.prefill_token_cap(
            now_s=self._clock(),
            decodes=decodes,
            num_prefix_tokens=int(first_prefill.num_computed_tokens),
            prefill=self.prefill_state(first_prefill),
        )
        if cap is None:
            return None
        self.num_capped_steps += 1
        return len(decodes), cap

    def decodes_to_skip(self, running: list[Any], num_waiting: int) -> list[Any]:
        """The running decodes that sit this step out (SCORPIO's credit-based batching, Tempo's pacing).

        Args:
            running: vLLM's running requests.
            num_waiting: requests in the waiting queue.

        Returns:
            The requests to leave out of this step; empty when the policy runs every decode.
        """
        if not self.local.selects_decodes:
            return []
        decodes = [r for r in running if r.num_computed_tokens >= r.num_prompt_tokens]
        if not decodes:
            return []
        flags = self.local.select_decodes(
            now_s=self._clock(), decodes=self.decode_batch(decodes), num_waiting_prefills=num_waiting
        )
        skipped = [request for request, runs in zip(decodes, flags, strict=True) if not runs]
        self.num_decode_skips += len(skipped)
        return skipped

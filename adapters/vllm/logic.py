"""The engine-side decisions, on duck-typed vLLM requests (no vLLM import, so they are tested without it).

A vLLM ``Request`` provides ``request_id``, ``arrival_time`` (wall-clock seconds), ``num_prompt_tokens``,
``num_computed_tokens``, ``num_output_tokens``, ``num_tokens`` and ``sampling_params.extra_args`` (where the
router's SLOs arrive as ``tropical_ttft_slo_ms`` / ``tropical_tpot_slo_ms``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from tropical_sched.adapters.vllm.config import EngineSideConfig
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.snapshot import DecodeBatch, PrefillState
from tropical_sched.policies.base import LocalScheduler, PolicyContext
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.profile import load_profile

__all__ = ["EngineSide"]


def _extra_args(request: Any) -> dict[str, Any]:
    params = getattr(request, "sampling_params", None)
    return dict(getattr(params, "extra_args", None) or {})


class EngineSide:
    """The policy's engine-local half, applied to vLLM's request objects.

    Args:
        config: the engine-side configuration.
        clock: seconds, monotonic; tests pass a fake one.
    """

    def __init__(self, config: EngineSideConfig, clock: Any = time.monotonic) -> None:
        self.config = config
        self.profile = load_profile(config.profile)
        policy = make_policy(
            config.policy,
            PolicyContext(step_time=self.profile.step_time, max_model_len=self.profile.max_model_len),
            config.policy_options,
        )
        roles = set(policy.worker_roles(4, None))
        if config.role not in roles:
            raise ConfigError(
                f"--additional-config tropical.role = {config.role.value!r}: policy {config.policy!r} has the roles "
                f"{sorted(r.value for r in roles)}"
            )
        self.local: LocalScheduler = policy.local_scheduler(config.role)
        self._clock = clock
        self._first_token_at: dict[str, float] = {}  # request id -> when its first output token was seen (s)
        self.num_capped_steps = 0
        self.num_requests_seen = 0
        self.num_decode_skips = 0

    def slo_ms(self, request: Any) -> tuple[float, float]:
        """(TTFT, TPOT) SLO of a request in ms: from the router's ``vllm_xargs``, else the defaults."""
        extra = _extra_args(request)
        return (
            float(extra.get("tropical_ttft_slo_ms", self.config.default_ttft_slo_ms)),
            float(extra.get("tropical_tpot_slo_ms", self.config.default_tpot_slo_ms)),
        )

    def sort_key(self, request: Any) -> float:
        """The waiting-queue key of a request (lower runs first), from the local scheduler."""
        self.num_requests_seen += 1
        ttft_ms, tpot_ms = self.slo_ms(request)
        state = PrefillState(
            request_id=request.request_id,
            arrival_at_s=float(request.arrival_time),
            num_prompt_tokens=int(request.num_prompt_tokens),
            num_computed_tokens=min(int(request.num_computed_tokens), int(request.num_prompt_tokens)),
            ttft_slo_s=ttft_ms / 1e3,
            tpot_slo_s=tpot_ms / 1e3,
        )
        return float(self.local.prefill_sort_key(state))

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
            now_s=self._clock(), decodes=decodes, num_prefix_tokens=int(first_prefill.num_computed_tokens)
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

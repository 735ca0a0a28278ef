"""The engine-side configuration, read from vLLM's ``--additional-config '{"tropical": {...}}'`` (no vLLM import)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.locate import validation_message
from tropical_sched.core.snapshot import WorkerRole

__all__ = ["EngineSideConfig", "parse_engine_side_config"]


class EngineSideConfig(BaseModel):
    """What the Tropical scheduler class needs to know about its engine.

    Attributes:
        role: the instance's role in the deployment (as in the router's cluster file).
        policy: the registered policy whose engine-local half runs here.
        policy_options: options of that policy.
        profile: latency profile for the slack-based prefill cap (name or file).
        default_ttft_slo_ms: TTFT SLO of requests that carry none (``vllm_xargs.tropical_ttft_slo_ms``).
        default_tpot_slo_ms: TPOT SLO of requests that carry none (``vllm_xargs.tropical_tpot_slo_ms``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: WorkerRole = WorkerRole.COLOCATED
    policy: str = "tropical"
    policy_options: dict[str, Any] = Field(default_factory=dict)
    profile: str = "a100-llama2-70b-tp4"
    default_ttft_slo_ms: Annotated[float, Field(gt=0)] = 10_000.0
    default_tpot_slo_ms: Annotated[float, Field(gt=0)] = 100.0


def parse_engine_side_config(additional_config: dict[str, Any] | None) -> EngineSideConfig:
    """The ``tropical`` section of vLLM's ``additional_config`` (defaults if absent).

    Raises:
        ConfigError: the section is malformed (the message names the field and value).
    """
    section = (additional_config or {}).get("tropical", {})
    if not isinstance(section, dict):
        raise ConfigError(f"--additional-config: 'tropical' must be an object, got {type(section).__name__}")
    try:
        return EngineSideConfig.model_validate(section)
    except ValidationError as exc:
        _, message = validation_message(exc.errors(), exc.error_count())  # type: ignore[arg-type]
        raise ConfigError(f"--additional-config tropical.{message.removeprefix('field ')}") from None

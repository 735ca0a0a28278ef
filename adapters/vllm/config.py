"""The engine-side configuration, read from vLLM's ``--additional-config '{"tropical": {...}}'`` (no vLLM import)."""

from __future__ import annotations

from typing import Any

from tropical_sched.adapters.engine_side import EngineSideConfig, parse_engine_side_section

__all__ = ["EngineSideConfig", "parse_engine_side_config"]


def parse_engine_side_config(additional_config: dict[str, Any] | None) -> EngineSideConfig:
    """The ``tropical`` section of vLLM's ``additional_config`` (defaults if absent).

    Raises:
        ConfigError: the section is malformed (the message names the field and value).
    """
    return parse_engine_side_section((additional_config or {}).get("tropical"), "--additional-config tropical")

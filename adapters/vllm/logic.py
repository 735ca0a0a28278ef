"""The engine-side decisions on vLLM's request objects (no vLLM import, so they are tested without it).

A vLLM ``Request`` already has the fields :class:`~tropical_sched.adapters.engine_side.EngineSide` reads
(its ``arrival_time`` is wall-clock seconds, so the engine side runs on the wall clock, ``time.time``: a prefill's
TTFT deadline is its arrival plus its TTFT SLO on that clock); the router's SLOs arrive in
``sampling_params.extra_args`` (``vllm_xargs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tropical_sched.adapters.engine_side import EngineSide, EngineSideConfig

__all__ = ["EngineSide", "make_engine_side", "vllm_slo_args"]


def vllm_slo_args(request: Any) -> dict[str, Any]:
    """The ``vllm_xargs`` a vLLM request arrived with (where the router puts its SLOs)."""
    params = getattr(request, "sampling_params", None)
    return dict(getattr(params, "extra_args", None) or {})


def make_engine_side(config: EngineSideConfig, clock: Callable[[], float] = time.time) -> EngineSide:
    """The engine-side half for a vLLM engine (``clock``: vLLM's, the wall clock its ``arrival_time`` is on)."""
    return EngineSide(config, vllm_slo_args, source="--additional-config tropical", clock=clock)

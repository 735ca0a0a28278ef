"""The engine-side decisions on SGLang's request objects (no SGLang import, so they are tested without it).

SGLang's ``Req`` is read through :class:`SglangRequestView`, which gives it the fields
:class:`~tropical_sched.adapters.engine_side.EngineSide` reads. The router's SLOs arrive in
``sampling_params.custom_params`` (``tropical_ttft_slo_ms`` / ``tropical_tpot_slo_ms``); the engine-side
configuration in the environment variable ``TROPICAL_SGLANG_CONFIG`` (JSON, or ``@`` and a file path), which
reaches SGLang's spawned scheduler processes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tropical_sched.adapters.engine_side import EngineSide, EngineSideConfig, parse_engine_side_section
from tropical_sched.core.errors import ConfigError

__all__ = [
    "ARRIVAL_ATTR",
    "CONFIG_ENV",
    "SglangRequestView",
    "batch_composition",
    "is_local_request",
    "make_engine_side",
    "order_waiting_queue",
    "prefill_token_cap",
    "read_config_from_env",
    "sglang_slo_args",
    "views",
]

CONFIG_ENV = "TROPICAL_SGLANG_CONFIG"
"""The environment variable with the engine-side configuration (JSON object, or ``@path/to/file.json``)."""

ARRIVAL_ATTR = "_tropical_arrival_s"
"""Attribute the plug-in sets on a ``Req`` when it reaches the scheduler (``time.monotonic()`` seconds)."""


def read_config_from_env(environ: Mapping[str, str] | None = None) -> EngineSideConfig | None:
    """The engine-side configuration from ``$TROPICAL_SGLANG_CONFIG``, or ``None`` when it is not set.

    Raises:
        ConfigError: the value is not JSON, the file cannot be read, or a field is invalid (names it).
    """
    raw = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if raw is None or not raw.strip():
        return None
    source = f"${CONFIG_ENV}"
    if raw.startswith("@"):
        path = raw[1:]
        source = f"{path} (${CONFIG_ENV})"
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read: {exc}") from None
    try:
        section = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    return parse_engine_side_section(section, source)


def sglang_slo_args(request: Any) -> Mapping[str, Any]:
    """The ``custom_params`` an SGLang request arrived with (where the router puts its SLOs)."""
    params = getattr(request, "sampling_params", None)
    custom = getattr(params, "custom_params", None)
    return custom if isinstance(custom, dict) else {}


class SglangRequestView:
    """An SGLang ``Req`` with the fields :class:`EngineSide` reads.

    Args:
        req: the request (``rid``, ``origin_input_ids``, ``output_ids``, ``kv.kv_committed_len`` or
            ``prefix_indices``, ``sampling_params.custom_params``).
        now_s: the clock value to use as arrival for a request the plug-in has not stamped.
    """

    __slots__ = ("_now_s", "req")

    def __init__(self, req: Any, now_s: float) -> None:
        self.req = req
        self._now_s = now_s

    @property
    def request_id(self) -> str:
        return str(self.req.rid)

    @property
    def arrival_time(self) -> float:
        return float(getattr(self.req, ARRIVAL_ATTR, self._now_s))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.req.origin_input_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.req.output_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose KV is in the cache: ``kv.kv_committed_len`` (0.5.2x), else the matched prefix."""
        committed = getattr(getattr(self.req, "kv", None), "kv_committed_len", None)
        if committed is None:
            committed = len(getattr(self.req, "prefix_indices", ()) or ())
        return int(committed)

    @property
    def sampling_params(self) -> Any:
        return self.req.sampling_params


def make_engine_side(config: EngineSideConfig, clock: Callable[[], float] = time.monotonic) -> EngineSide:
    """The engine-side half for an SGLang engine."""
    return EngineSide(config, sglang_slo_args, source=f"${CONFIG_ENV}", clock=clock)


def views(side: EngineSide, reqs: Iterable[Any]) -> list[SglangRequestView]:
    """Views of SGLang requests on the engine side's clock."""
    now = side.now_s()
    return [SglangRequestView(req, now) for req in reqs]


def order_waiting_queue(side: EngineSide, waiting_queue: list[Any]) -> None:
    """Sort SGLang's waiting queue in place by the policy's prefill order (stable: ties keep SGLang's order)."""
    if len(waiting_queue) < 2:
        return
    now = side.now_s()
    keys = {id(req): side.sort_key(SglangRequestView(req, now)) for req in waiting_queue}
    waiting_queue.sort(key=lambda req: keys[id(req)])


def prefill_token_cap(side: EngineSide, running_reqs: Iterable[Any], head: Any | None) -> int | None:
    """The most prefill tokens the next step may take beside the running decodes, or ``None`` for no cap.

    Args:
        side: the engine side.
        running_reqs: SGLang's running batch (decoding requests).
        head: the prefill that runs next (the partially prefilled ``chunked_req``, else the head of the waiting
            queue), or ``None``.
    """
    if head is None:
        return None
    now = side.now_s()
    capped = side.prefill_token_cap([SglangRequestView(r, now) for r in running_reqs], SglangRequestView(head, now))
    return None if capped is None else capped[1]


def is_local_request(req: Any) -> bool:
    """Whether a request on a multiplexing worker is to be prefilled there (it carries no ``bootstrap_room``:
    the router sent it without a remote prefill)."""
    return getattr(req, "bootstrap_room", None) is None


def batch_composition(batch: Any) -> tuple[int, int, tuple[tuple[int, int], ...]] | None:
    """``(num_decode_seqs, num_decode_context_tokens, prefill_chunks)`` of an SGLang ``ScheduleBatch``, the
    features the step-time model prices; ``None`` for a batch that runs no forward pass of its own (idle,
    prebuilt: KV that arrived from a prefill instance) or whose shape is unknown.

    Decode batches count each request's sequence length as its context. Extend batches (prefill chunks, and
    mixed ones) list ``prefix_lens`` / ``extend_lens`` per request; in a mixed batch the running decodes are the
    ones in ``decoding_reqs`` (one new token each).
    """
    mode = getattr(batch, "forward_mode", None)
    reqs = list(getattr(batch, "reqs", None) or ())
    if mode is None or not reqs:
        return None
    if mode.is_decode():
        context = getattr(batch, "seq_lens_sum", None)
        if not isinstance(context, int):
            context = sum(len(r.origin_input_ids) + len(r.output_ids) for r in reqs)
        return len(reqs), int(context), ()
    if not mode.is_extend():
        return None
    prefix_lens = getattr(batch, "prefix_lens", None)
    extend_lens = getattr(batch, "extend_lens", None)
    if prefix_lens is None or extend_lens is None or len(prefix_lens) != len(reqs) or len(extend_lens) != len(reqs):
        return None
    decoding = {id(r) for r in (getattr(batch, "decoding_reqs", None) or ())}
    chunks: list[tuple[int, int]] = []
    num_decodes = context_tokens = 0
    for req, prefix, extend in zip(reqs, prefix_lens, extend_lens, strict=True):
        if id(req) in decoding:
            num_decodes += 1
            context_tokens += int(prefix) + int(extend)
        elif extend > 0:
            chunks.append((int(prefix), int(extend)))
    if not num_decodes and not chunks:
        return None
    return num_decodes, context_tokens, tuple(chunks)

"""How the router shapes upstream requests for each engine (P/D parameters, SLOs, streaming).

Two P/D protocols:

* **vLLM** (sequential): the prefill instance runs with ``kv_transfer_params={"do_remote_decode": true}`` and
  answers with the parameters the decoding instance needs; the router places the decode after the prefill.
* **SGLang** (concurrent): the router picks the decoding instance first and sends the same request, with the
  prefill instance's ``bootstrap_host`` / ``bootstrap_port`` and a fresh ``bootstrap_room``, to both at once; the
  two engines meet at the prefill's bootstrap server, and the prefill waits until the decode side has reserved
  KV space. The decode half's stream is the answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from tropical_sched.core.request import Slo
from tropical_sched.serve.config import Engine, InstanceConfig

__all__ = [
    "REQUEST_ID_KEY",
    "EngineDialect",
    "LoadReading",
    "LoadSource",
    "SglangDialect",
    "VllmDialect",
    "dialect_for",
    "prometheus_load",
    "sglang_loads",
]

LoadReading = tuple[float | None, float | None]
"""An engine's own view of its load: (KV-cache usage fraction, requests running + waiting); ``None`` where it
does not say."""


class LoadSource(NamedTuple):
    """Where an engine reports its load: a ``GET`` path and the parser of its body (raises ``ValueError`` on a
    body of the wrong shape)."""

    path: str
    parse: Callable[[bytes], LoadReading]


def prometheus_load(text: str) -> LoadReading:
    """(KV-cache usage fraction, requests running + waiting) from an engine's Prometheus ``/metrics`` text
    (vLLM's or SGLang's names; samples of one name are summed over their labels).

    Raises:
        ValueError: the text is not in the Prometheus exposition format.
    """
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    for usage_name, running_name, waiting_name in (
        ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"),
        ("sglang:token_usage", "sglang:num_running_reqs", "sglang:num_queue_reqs"),
    ):
        running, waiting = values.get(running_name), values.get(waiting_name)
        usage = values.get(usage_name)
        if usage is not None or running is not None:
            total = running + waiting if running is not None and waiting is not None else None
            return usage, total
    return None, None


def sglang_loads(payload: Any) -> LoadReading:
    """(KV-cache usage fraction, requests running + waiting) from SGLang's ``GET /v1/loads`` body, summed over
    its data-parallel ranks (``loads[].num_used_tokens`` / ``max_total_num_tokens``, ``num_running_reqs``,
    ``num_waiting_reqs``, and on a decode instance the requests whose KV cache is being received).

    Raises:
        ValueError: the body is not shaped like ``/v1/loads``.
    """
    loads = payload.get("loads") if isinstance(payload, dict) else None
    if not isinstance(loads, list) or not loads:
        raise ValueError("GET /v1/loads: expected a non-empty 'loads' list")
    used = capacity = requests = 0.0
    for rank in loads:
        if not isinstance(rank, dict):
            raise ValueError("GET /v1/loads: every entry of 'loads' must be an object")
        used += float(rank.get("num_used_tokens", 0))
        capacity += float(rank.get("max_total_num_tokens", 0))
        requests += float(rank.get("num_running_reqs", 0)) + float(rank.get("num_waiting_reqs", 0))
        disaggregation = rank.get("disaggregation")
        if isinstance(disaggregation, dict):
            requests += sum(
                float(disaggregation.get(key, 0) or 0)
                for key in ("decode_prealloc_queue_reqs", "decode_transfer_queue_reqs")
            )
    return (used / capacity if capacity > 0 else None), requests


_PROMETHEUS = LoadSource("/metrics", lambda content: prometheus_load(content.decode("utf-8", errors="replace")))
_SGLANG_LOADS = LoadSource("/v1/loads", lambda content: sglang_loads(json.loads(content)))

_STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


class EngineDialect(Protocol):
    """Engine-specific parts of the requests the router sends."""

    def handoff(self, prefill_instance: InstanceConfig) -> dict[str, Any] | None:
        """For concurrent P/D engines, the parameters that pair a prefill with its decode (sent to both before
        either answers); ``None`` for sequential ones (their decode half needs the prefill's response)."""
        ...

    def generation_body(
        self, body: dict[str, Any], slo: Slo, transfer: dict[str, Any] | None, *, request_id: str | None = None
    ) -> dict[str, Any]:
        """The body of the request that streams tokens back (multiplexed, colocated, or the decode half of P/D).

        Args:
            body: the client's body.
            slo: the request's SLOs (they travel to the engine-side scheduler).
            transfer: what pairs the decode half with its prefill (the prefill's response or the handoff).
            request_id: the router's id of the request, which travels with the SLOs (``tropical_request_id``)
                so that the engine's live state names it (:mod:`tropical_sched.live_state`).
        """
        ...

    def prefill_body(
        self, body: dict[str, Any], slo: Slo, handoff: dict[str, Any] | None, *, request_id: str | None = None
    ) -> dict[str, Any]:
        """The body of the prefill half of P/D (prefill only, keep the KV cache for a remote decoder)."""
        ...

    def transfer_params(self, response: dict[str, Any]) -> dict[str, Any]:
        """What the decode half needs from the prefill half's response (sequential engines)."""
        ...

    def load_sources(self) -> tuple[LoadSource, ...]:
        """Where the engine reports its own load, in the order to ask (the first that answers 200 is read)."""
        ...


class VllmDialect:
    """vLLM: ``kv_transfer_params`` for P/D (NIXL, ExampleConnector and Tropical's connector), SLOs in
    ``vllm_xargs`` (read by the Tropical scheduler class as ``tropical_ttft_slo_ms`` / ``tropical_tpot_slo_ms``),
    and continuous usage statistics so that every streamed chunk carries the token count."""

    @staticmethod
    def _slo_xargs(body: dict[str, Any], slo: Slo, request_id: str | None) -> dict[str, Any]:
        xargs = dict(body.get("vllm_xargs") or {})
        xargs["tropical_ttft_slo_ms"] = round(slo.ttft_s * 1e3, 3)
        xargs["tropical_tpot_slo_ms"] = round(slo.tpot_s * 1e3, 3)
        if request_id is not None:
            xargs[REQUEST_ID_KEY] = request_id
        return xargs

    def handoff(self, prefill_instance: InstanceConfig) -> dict[str, Any] | None:
        """See :class:`EngineDialect` (vLLM's P/D is sequential: ``None``)."""
        return None

    def generation_body(
        self, body: dict[str, Any], slo: Slo, transfer: dict[str, Any] | None, *, request_id: str | None = None
    ) -> dict[str, Any]:
        """See :class:`EngineDialect`."""
        upstream = dict(body)
        upstream["stream"] = True
        upstream["stream_options"] = _STREAM_OPTIONS
        upstream["vllm_xargs"] = self._slo_xargs(body, slo, request_id)
        if transfer is not None:
            upstream["kv_transfer_params"] = transfer
        return upstream

    def prefill_body(
        self, body: dict[str, Any], slo: Slo, handoff: dict[str, Any] | None, *, request_id: str | None = None
    ) -> dict[str, Any]:
        """See :class:`EngineDialect` (vLLM's P/D proxy protocol: one token, no streaming)."""
        upstream = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens", "n")}
        upstream["stream"] = False
        upstream["max_tokens"] = 1
        upstream.pop("max_completion_tokens", None)
        upstream["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
        upstream["vllm_xargs"] = self._slo_xargs(body, slo, request_id)
        return upstream

    def transfer_params(self, response: dict[str, Any]) -> dict[str, Any]:
        """The prefill response's ``kv_transfer_params``."""
        params = response.get("kv_transfer_params")
        if not isinstance(params, dict):
            raise ValueError("the prefill instance returned no kv_transfer_params (is a KV connector configured?)")
        return params

    def load_sources(self) -> tuple[LoadSource, ...]:
        """``/metrics`` (``vllm:kv_cache_usage_perc``, ``vllm:num_requests_running`` / ``_waiting``)."""
        return (_PROMETHEUS,)


class SglangDialect:
    """SGLang: ``bootstrap_host`` / ``bootstrap_port`` / ``bootstrap_room`` for P/D (any transfer backend:
    Mooncake, NIXL, ``mooncake_tcp``), SLOs in ``custom_params`` (read by the Tropical plug-in as
    ``tropical_ttft_slo_ms`` / ``tropical_tpot_slo_ms``), continuous usage statistics in the stream.

    Args:
        rng: source of bootstrap rooms (tests pass a seeded one).
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.SystemRandom()

    @staticmethod
    def _with_slo(body: dict[str, Any], slo: Slo, request_id: str | None) -> dict[str, Any]:
        upstream = dict(body)
        custom = dict(body.get("custom_params") or {})
        custom["tropical_ttft_slo_ms"] = round(slo.ttft_s * 1e3, 3)
        custom["tropical_tpot_slo_ms"] = round(slo.tpot_s * 1e3, 3)
        if request_id is not None:
            custom[REQUEST_ID_KEY] = request_id
        upstream["custom_params"] = custom
        return upstream

    def handoff(self, prefill_instance: InstanceConfig) -> dict[str, Any] | None:
        """See :class:`EngineDialect`: the prefill's bootstrap address and a fresh room (0 <= room < 2**63)."""
        return {
            "bootstrap_host": urlsplit(prefill_instance.url).hostname,
            "bootstrap_port": prefill_instance.bootstrap_port,
            "bootstrap_room": self._rng.randrange(2**63),
        }

    def generation_body(
        self, body: dict[str, Any], slo: Slo, transfer: dict[str, Any] | None, *, request_id: str | None = None
    ) -> dict[str, Any]:
        """See :class:`EngineDialect`."""
        upstream = self._with_slo(body, slo, request_id)
        upstream["stream"] = True
        upstream["stream_options"] = _STREAM_OPTIONS
        if transfer is not None:
            upstream.update(transfer)
        return upstream

    def prefill_body(
        self, body: dict[str, Any], slo: Slo, handoff: dict[str, Any] | None, *, request_id: str | None = None
    ) -> dict[str, Any]:
        """See :class:`EngineDialect`: the same request with the handoff, not streamed (SGLang's prefill server
        generates one token whatever ``max_tokens`` says)."""
        if handoff is None:
            raise ValueError("SGLang's prefill half needs the bootstrap handoff")
        upstream = self._with_slo(body, slo, request_id)
        upstream["stream"] = False
        upstream.pop("stream_options", None)
        upstream.update(handoff)
        return upstream

    def transfer_params(self, response: dict[str, Any]) -> dict[str, Any]:
        """Not used: SGLang's decode half is paired by the handoff, not by the prefill's response."""
        raise ValueError("SGLang's P/D is concurrent: the decode half is paired by the handoff")

    def load_sources(self) -> tuple[LoadSource, ...]:
        """``/v1/loads`` (SGLang 0.5.9+; summed over data-parallel ranks), else ``/metrics``
        (``sglang:token_usage``, ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``; needs
        ``--enable-metrics``)."""
        return (_SGLANG_LOADS, _PROMETHEUS)


REQUEST_ID_KEY = "tropical_request_id"
"""Where the router's request id travels to the engine, beside the SLOs (vLLM: ``vllm_xargs``, SGLang:
``custom_params``): an engine that reports its live state names the request by it."""


def dialect_for(engine: Engine) -> EngineDialect:
    """The dialect of an engine."""
    if engine is Engine.SGLANG:
        return SglangDialect()
    return VllmDialect()

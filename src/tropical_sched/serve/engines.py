"""How the router shapes upstream requests for each engine (P/D parameters, SLOs, streaming)."""

from __future__ import annotations

from typing import Any, Protocol

from tropical_sched.core.request import Slo
from tropical_sched.serve.config import Engine

__all__ = ["EngineDialect", "VllmDialect", "dialect_for"]


class EngineDialect(Protocol):
    """Engine-specific parts of the requests the router sends."""

    def generation_body(self, body: dict[str, Any], slo: Slo, transfer: dict[str, Any] | None) -> dict[str, Any]:
        """The body of the request that streams tokens back (multiplexed, colocated, or the decode half of P/D).

        Args:
            body: the client's body.
            slo: the request's SLOs (they travel to the engine-side scheduler).
            transfer: what the prefill instance returned for the KV transfer, for the decode half of P/D.
        """
        ...

    def prefill_body(self, body: dict[str, Any], slo: Slo) -> dict[str, Any]:
        """The body of the prefill half of P/D (prefill only, keep the KV cache for a remote decoder)."""
        ...

    def transfer_params(self, response: dict[str, Any]) -> dict[str, Any]:
        """What the decode half needs from the prefill half's response."""
        ...


class VllmDialect:
    """vLLM: ``kv_transfer_params`` for P/D (NIXL, ExampleConnector and Tropical's connector), SLOs in
    ``vllm_xargs`` (read by the Tropical scheduler class as ``tropical_ttft_slo_ms`` / ``tropical_tpot_slo_ms``),
    and continuous usage statistics so that every streamed chunk carries the token count."""

    @staticmethod
    def _slo_xargs(body: dict[str, Any], slo: Slo) -> dict[str, Any]:
        xargs = dict(body.get("vllm_xargs") or {})
        xargs["tropical_ttft_slo_ms"] = round(slo.ttft_s * 1e3, 3)
        xargs["tropical_tpot_slo_ms"] = round(slo.tpot_s * 1e3, 3)
        return xargs

    def generation_body(self, body: dict[str, Any], slo: Slo, transfer: dict[str, Any] | None) -> dict[str, Any]:
        """See :class:`EngineDialect`."""
        upstream = dict(body)
        upstream["stream"] = True
        upstream["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        upstream["vllm_xargs"] = self._slo_xargs(body, slo)
        if transfer is not None:
            upstream["kv_transfer_params"] = transfer
        return upstream

    def prefill_body(self, body: dict[str, Any], slo: Slo) -> dict[str, Any]:
        """See :class:`EngineDialect` (vLLM's P/D proxy protocol: one token, no streaming)."""
        upstream = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens", "n")}
        upstream["stream"] = False
        upstream["max_tokens"] = 1
        upstream.pop("max_completion_tokens", None)
        upstream["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
        upstream["vllm_xargs"] = self._slo_xargs(body, slo)
        return upstream

    def transfer_params(self, response: dict[str, Any]) -> dict[str, Any]:
        """The prefill response's ``kv_transfer_params``."""
        params = response.get("kv_transfer_params")
        if not isinstance(params, dict):
            raise ValueError("the prefill instance returned no kv_transfer_params (is a KV connector configured?)")
        return params


def dialect_for(engine: Engine) -> EngineDialect:
    """The dialect of an engine."""
    return VllmDialect()

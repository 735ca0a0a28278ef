"""The router's Prometheus metrics, in base units (seconds, fractions, totals)."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RouterMetrics"]

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100)
_TPOT_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
_SLACK_BUCKETS_S = (-10, -1, -0.1, 0, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60)


class RouterMetrics:
    """Metrics of one router, in their own registry (so several routers can live in one process).

    Args:
        window: requests in the rolling SLO-attainment gauges.
    """

    def __init__(self, window: int = 200) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tropical_router_requests",
            "Requests by route (prefill, multiplex, colocated, none) and outcome.",
            ["route", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "tropical_router_time_to_first_token_seconds",
            "TTFT seen by the router.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tpot = Histogram(
            "tropical_router_time_per_output_token_seconds",
            "Mean TPOT per request.",
            buckets=_TPOT_BUCKETS_S,
            registry=r,
        )
        self.attainment = Gauge(
            "tropical_router_slo_attainment",
            f"SLO attainment over the last {window} finished requests (ttft, tpot, joint).",
            ["slo"],
            registry=r,
        )
        self.predicted_ttft_slack = Histogram(
            "tropical_router_predicted_ttft_slack_seconds",
            "Predicted TTFT slack of each routing decision.",
            buckets=_SLACK_BUCKETS_S,
            registry=r,
        )
        self.predicted_tpot_slack = Histogram(
            "tropical_router_predicted_tpot_slack_seconds",
            "Smallest predicted TPOT slack of the decodes a multiplexed prefill joins.",
            buckets=_SLACK_BUCKETS_S,
            registry=r,
        )
        self.multiplexing = Gauge(
            "tropical_router_multiplexing_enabled", "1 while the toggle allows multiplexing.", registry=r
        )
        self.waiting = Gauge("tropical_router_requests_waiting", "Requests held at the router.", registry=r)
        self.in_flight = Gauge(
            "tropical_router_requests_in_flight", "Requests on an instance.", ["instance"], registry=r
        )
        self.instance_up = Gauge(
            "tropical_router_instance_up", "1 while the instance answers.", ["instance", "role"], registry=r
        )
        self.engine_kv_usage = Gauge(
            "tropical_router_engine_kv_cache_usage", "KV-cache usage the engine reports.", ["instance"], registry=r
        )
        self._window: deque[tuple[bool, bool]] = deque(maxlen=window)
        self.multiplexing.set(1)

    def observe_finished(self, met_ttft: bool, met_tpot: bool) -> None:
        """Record one finished (or failed) request in the rolling attainment gauges."""
        self._window.append((met_ttft, met_tpot))
        n = len(self._window)
        self.attainment.labels("ttft").set(sum(t for t, _ in self._window) / n)
        self.attainment.labels("tpot").set(sum(p for _, p in self._window) / n)
        self.attainment.labels("joint").set(sum(t and p for t, p in self._window) / n)

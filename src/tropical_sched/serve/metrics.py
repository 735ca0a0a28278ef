"""The router's Prometheus metrics, in base units (seconds, fractions, totals)."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tropical_sched.predictors.calibration import InstanceCalibration
from tropical_sched.predictors.step_time import FEATURE_NAMES

__all__ = ["RouterMetrics"]

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100)
_TPOT_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
_SLACK_BUCKETS_S = (-10, -1, -0.1, 0, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60)
# (observed - predicted) / predicted: -0.5 is twice too slow a prediction, 1 is half the observed time.
_RELATIVE_ERROR_BUCKETS = (-0.9, -0.5, -0.25, -0.1, -0.05, 0, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


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
        self.ttft_error = Histogram(
            "tropical_router_ttft_relative_prediction_error",
            "(observed - predicted) / predicted TTFT, predicted when the request was routed.",
            buckets=_RELATIVE_ERROR_BUCKETS,
            registry=r,
        )
        self.tpot_error = Histogram(
            "tropical_router_tpot_relative_prediction_error",
            "(observed - predicted) / predicted mean TPOT, predicted when the decoding instance was chosen.",
            buckets=_RELATIVE_ERROR_BUCKETS,
            registry=r,
        )
        self.step_coefficient = Gauge(
            "tropical_router_calibrated_step_time_coefficient",
            "Calibrated step-time coefficient of the instance, seconds per unit of the term's feature.",
            ["instance", "term"],
            registry=r,
        )
        self.step_ratio = Gauge(
            "tropical_router_calibrated_step_time_ratio",
            "Calibrated / offline step-time coefficient of the instance.",
            ["instance", "term"],
            registry=r,
        )
        self.pd_hop = Gauge(
            "tropical_router_calibrated_pd_hop",
            "Learned P/D hop of requests prefilled on the instance: fixed (seconds) and per_prompt_token (seconds "
            "per token).",
            ["instance", "term"],
            registry=r,
        )
        self.calibration_samples = Gauge(
            "tropical_router_calibration_observations",
            "Observations the instance's calibration uses (step, hop) and has rejected as outliers (rejected).",
            ["instance", "kind"],
            registry=r,
        )
        self.round_trip = Gauge(
            "tropical_router_instance_round_trip_seconds",
            "The instance's bare HTTP round trip: the least of its last 8 GET /health (taken out of lone prefills).",
            ["instance"],
            registry=r,
        )
        self._window: deque[tuple[bool, bool]] = deque(maxlen=window)
        self._met = [0, 0, 0]  # requests in the window that met their TTFT, TPOT, both
        self.multiplexing.set(1)

    def show_calibration(self, instance: str, calibration: InstanceCalibration) -> None:
        """Set the calibration gauges of one instance (called when the metrics are read, not per observation)."""
        coefficients = calibration.step_time.coefficients.as_tuple()
        ratios = calibration.step.ratios if calibration.step.num_samples >= calibration.config.min_samples else None
        for index, term in enumerate(FEATURE_NAMES):
            self.step_coefficient.labels(instance, term).set(coefficients[index])
            self.step_ratio.labels(instance, term).set(ratios[index] if ratios else 1.0)
        self.pd_hop.labels(instance, "fixed").set(calibration.pd_hop_fixed_s)
        self.pd_hop.labels(instance, "per_prompt_token").set(calibration.pd_hop_per_prompt_token_s)
        self.calibration_samples.labels(instance, "step").set(calibration.step.num_samples)
        self.calibration_samples.labels(instance, "hop").set(calibration.hop.num_samples)
        self.calibration_samples.labels(instance, "rejected").set(
            calibration.step.num_rejected + calibration.hop.num_rejected
        )

    def observe_prediction_error(self, which: str, predicted_s: float, observed_s: float) -> None:
        """Record ``(observed - predicted) / predicted`` of ``which`` (``ttft`` or ``tpot``); a prediction that is not
        positive and finite is skipped."""
        if predicted_s > 0 and predicted_s != float("inf"):
            histogram = self.ttft_error if which == "ttft" else self.tpot_error
            histogram.observe((observed_s - predicted_s) / predicted_s)

    def observe_finished(self, met_ttft: bool, met_tpot: bool) -> None:
        """Record one finished (or failed) request in the rolling attainment gauges (O(1): running counts)."""
        window = self._window
        if len(window) == window.maxlen:
            old_ttft, old_tpot = window[0]
            self._met[0] -= old_ttft
            self._met[1] -= old_tpot
            self._met[2] -= old_ttft and old_tpot
        window.append((met_ttft, met_tpot))
        self._met[0] += met_ttft
        self._met[1] += met_tpot
        self._met[2] += met_ttft and met_tpot
        n = len(window)
        for slo, met in zip(("ttft", "tpot", "joint"), self._met, strict=True):
            self.attainment.labels(slo).set(met / n)

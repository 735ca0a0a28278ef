"""The router's HTTP surface: OpenAI-compatible endpoints, request validation and SLO headers, and the answer
shaped as the client asked (a stream of events, or one JSON body).

It is an ``aiohttp.web`` application (the same library as the router's upstream client), served on uvloop: on the
router's hot path it costs less than half the CPU of uvicorn and starlette (``benchmarks/router_overhead.py``;
docs/router.md, "Overhead").

Everything a client can get wrong is answered here with a 4xx that names the field and the value, before the
request reaches the policy; what happens to a valid request is the router's (:class:`~tropical_sched.serve.router.
Router`). Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus) and ``GET /v1/tropical/profile``.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tropical_sched.core.request import Slo
from tropical_sched.core.slo import SloSpec
from tropical_sched.predictors.step_time import StepTimeModel
from tropical_sched.serve.openai import (
    DONE,
    BadRequest,
    PayloadTooLarge,
    StreamEvent,
    aggregate_events,
    error_body,
    parse_json_body,
)
from tropical_sched.serve.upstream import HttpError, TransportFailure

if TYPE_CHECKING:
    from tropical_sched.serve.router import Router

__all__ = [
    "MAX_REQUEST_BODY_BYTES",
    "MAX_REQUEST_HEADER_BYTES",
    "ROUTE_HEADER",
    "RUNNER_OPTIONS",
    "SLO_HEADERS",
    "SLO_HEADER_RANGE_MS",
    "RouterApp",
    "parse_slo_headers",
    "request_slo",
    "shape_events",
]

SLO_HEADERS = {
    "ttft": ("x-slo-ttft-ms", "x-llm-d-slo-ttft-ms"),
    "tpot": ("x-slo-tpot-ms", "x-llm-d-slo-tpot-ms"),
}
"""Per-request SLO headers, in milliseconds (ours first, then llm-d's)."""

SLO_HEADER_RANGE_MS = {"ttft": (1.0, 3_600_000.0), "tpot": (1.0, 600_000.0)}
"""Accepted SLO header values, ms (inclusive): a TTFT SLO from 1 ms to 1 h, a TPOT SLO from 1 ms to 10 min.
Outside that range a value is a client's mistake (or an attack on the engines' arithmetic), not an SLO."""

ROUTE_HEADER = "x-tropical-route"
"""Response header naming the path a request's prefill took: ``prefill`` (P/D), ``multiplex``, ``colocated``."""

MAX_REQUEST_BODY_BYTES = 32 << 20
"""Largest request body accepted (413 beyond): a 128k-token prompt as token ids is about 1 MB."""

MAX_REQUEST_HEADER_BYTES = 64 << 10
"""Largest total size of a request's headers (431 beyond)."""

MAX_HEADER_FIELD_BYTES = 2 << 20
"""Largest single header line the HTTP parser reads; beyond :data:`MAX_REQUEST_HEADER_BYTES` and up to this, the
router answers 431 naming the size, beyond it the parser answers 400."""


RUNNER_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "handler_cancellation": True,
        "max_field_size": MAX_HEADER_FIELD_BYTES,
        "max_line_size": MAX_HEADER_FIELD_BYTES,
        "access_log": None,
    }
)
"""Keyword arguments of ``aiohttp.web.AppRunner`` (and ``run_app``) that the router's application is served with:
a client that disconnects cancels its handler, headers up to :data:`MAX_HEADER_FIELD_BYTES` reach the router's
checks, no access log."""


def _json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _error_response(message: str, kind: str, status: int) -> web.Response:
    return _json_response(error_body(message, kind, status), status)


def shape_events(batch: list[StreamEvent], *, include_usage: bool, continuous: bool) -> bytes:
    """Engine events as the client asked for them, as server-sent events: usage-only events only with
    ``include_usage``, per-chunk usage only with ``continuous`` (stripped in place otherwise), errors always; the
    rest of each event's bytes as the engine sent them."""
    parts = []
    for event in batch:
        if event.is_error:
            data = event.payload
        elif not event.has_choices:  # the final usage chunk
            if not include_usage:
                continue
            data = event.payload
        else:
            data = event.payload if continuous else event.without_usage()
        parts.append(b"data: " + data + b"\n\n")
    return b"".join(parts)


def request_slo(spec: SloSpec, step_time: StepTimeModel, num_prompt_tokens: int, headers: Mapping[str, str]) -> Slo:
    """A request's SLOs: its SLO headers (:func:`parse_slo_headers`), else the defaults ``spec`` sets for its
    prompt length from ``step_time`` (the profile: isolated prefill, one lone decode step).

    Raises:
        BadRequest: an SLO header is malformed or out of range.
    """
    default = spec.slo_for(
        num_prompt_tokens,
        isolated_prefill_s=step_time.prefill_time_s,
        isolated_decode_step_s=lambda context: step_time.decode_step_time_s(1, context),
    )
    return parse_slo_headers(headers, default)


def parse_slo_headers(headers: Mapping[str, str], default: Slo) -> Slo:
    """The request's SLOs: its headers (``x-slo-ttft-ms``, ``x-slo-tpot-ms``, or llm-d's
    ``x-llm-d-slo-*-ms``), else ``default``.

    Raises:
        BadRequest: a header is not a number of milliseconds within :data:`SLO_HEADER_RANGE_MS` (the message
            names it and the value).
    """
    values = {"ttft": default.ttft_s, "tpot": default.tpot_s}
    for key, names in SLO_HEADERS.items():
        low_ms, high_ms = SLO_HEADER_RANGE_MS[key]
        for name in names:
            raw = headers.get(name)
            if raw is None:
                continue
            shown = raw if len(raw) <= 40 else raw[:40] + "..."
            try:
                value_ms = float(raw)
            except ValueError:
                raise BadRequest(f"header {name} = {shown!r} is not a number of milliseconds") from None
            if not (math.isfinite(value_ms) and low_ms <= value_ms <= high_ms):
                raise BadRequest(f"header {name} = {shown!r} must be between {low_ms:g} and {high_ms:g} milliseconds")
            values[key] = value_ms / 1e3
            break
    return Slo(ttft_s=values["ttft"], tpot_s=values["tpot"])


class RouterApp:
    """The HTTP application of a :class:`~tropical_sched.serve.router.Router` (``router.app`` is its ``web``, an
    ``aiohttp.web.Application``; :meth:`serve` runs it).

    A client that disconnects cancels its handler (aiohttp's ``handler_cancellation``), which aborts its
    upstream request wherever it is.

    Args:
        router: the router whose requests this surface takes and answers.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self.web = web.Application(client_max_size=MAX_REQUEST_BODY_BYTES)
        self.web.add_routes(
            [
                web.post("/v1/completions", self._completions),
                web.post("/v1/chat/completions", self._chat_completions),
                web.get("/health", self._health),
                web.get("/metrics", self._metrics),
                web.get("/v1/models", self._models),
                web.get("/v1/tropical/profile", self._profile_endpoint),
            ]
        )
        self.web.on_startup.append(self._start)
        self.web.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        await self.router.start()

    async def _stop(self, app: web.Application) -> None:
        await self.router.stop()

    # -- endpoints ----------------------------------------------------------------------------------------------

    async def _health(self, http: web.Request) -> web.Response:
        instances = [
            {"url": i.url, "role": i.role.value, "healthy": i.healthy, "in_flight": i.num_in_flight}
            for i in self.router.instances
        ]
        ok = any(i.healthy for i in self.router.instances)
        return _json_response(
            {"status": "ok" if ok else "no healthy instance", "instances": instances}, 200 if ok else 503
        )

    async def _metrics(self, http: web.Request) -> web.Response:
        metrics = self.router.metrics
        for instance in self.router.instances:
            metrics.round_trip.labels(instance.url).set(instance.round_trip_s)
            if instance.calibration is not None:
                metrics.show_calibration(instance.url, instance.calibration)
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, http: web.Request) -> web.Response:
        for instance in self.router.instances:
            if instance.healthy:
                try:
                    response = await self.router.upstream.get(instance, "/v1/models", 5.0)
                except TransportFailure:
                    continue
                return web.Response(body=response.content, status=response.status_code, content_type="application/json")
        return _error_response("no healthy instance", "ServiceUnavailable", 503)

    async def _profile_endpoint(self, http: web.Request) -> web.Response:
        """``GET /v1/tropical/profile[?instance=URL][&calibrated=false]``: the latency profile the router predicts
        with, in the profile-file schema, so that ``tropical simulate --profile`` and ``tropical replay`` can load
        it. Without ``instance``: the router's own offline profile (the one default SLOs are set from). With it:
        that instance's profile as calibrated online (learned coefficients, the learned P/D hop in ``serving``),
        or its offline profile with ``calibrated=false`` or while calibration is off. 404 names an unknown
        instance; 400 a ``calibrated`` that is not a boolean."""
        router = self.router
        url = http.query.get("instance")
        if url is None:
            return _json_response(router.profile.file.model_dump(mode="json"))
        instance = next((i for i in router.instances if i.url == url.rstrip("/")), None)
        if instance is None:
            message = f"query instance = {url!r} is not one of {[i.url for i in router.instances]}"
            return _error_response(message, "NotFoundError", 404)
        raw = http.query.get("calibrated", "true").lower()
        if raw not in ("true", "false", "1", "0"):
            return _error_response(f"query calibrated = {raw!r} must be true or false", "BadRequestError", 400)
        profile = router.profile_named(instance.config.profile)
        if instance.calibration is None or raw in ("false", "0"):
            return _json_response(profile.file.model_dump(mode="json"))
        calibrated = instance.calibration.profile_file(profile.file, f"router, instance {instance.url}")
        return _json_response(calibrated.model_dump(mode="json"))

    async def _completions(self, http: web.Request) -> web.StreamResponse:
        return await self._serve(http, chat=False)

    async def _chat_completions(self, http: web.Request) -> web.StreamResponse:
        return await self._serve(http, chat=True)

    # -- validation ---------------------------------------------------------------------------------------------

    async def _read_body(self, http: web.Request) -> dict[str, Any]:
        """The request's JSON body, read up to :data:`MAX_REQUEST_BODY_BYTES` (headers checked first).

        Raises:
            BadRequest: the headers or body are too large, or the body is not a UTF-8 JSON object.
        """
        header_bytes = sum(len(name) + len(value) for name, value in http.raw_headers)
        if header_bytes > MAX_REQUEST_HEADER_BYTES:
            raise PayloadTooLarge(
                f"request headers of {header_bytes} bytes exceed the limit of {MAX_REQUEST_HEADER_BYTES}", status=431
            )
        declared = http.content_length
        if declared is not None and declared > MAX_REQUEST_BODY_BYTES:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {MAX_REQUEST_BODY_BYTES}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in http.content.iter_any():
            size += len(chunk)
            if size > MAX_REQUEST_BODY_BYTES:
                raise PayloadTooLarge(f"request body exceeds the limit of {MAX_REQUEST_BODY_BYTES} bytes")
            chunks.append(chunk)
        return parse_json_body(b"".join(chunks))

    # -- one request --------------------------------------------------------------------------------------------

    async def _serve(self, http: web.Request, *, chat: bool) -> web.StreamResponse:
        router = self.router
        try:
            body = await self._read_body(http)
        except BadRequest as exc:
            router.metrics.requests.labels("none", "invalid").inc()
            return _error_response(str(exc), exc.kind, exc.status)
        try:
            tracked, events = await router.submit(body, chat=chat, headers=http.headers)
        except (BadRequest, HttpError) as exc:
            return _error_response(str(exc), exc.kind, exc.status)
        # A client that goes away cancels this handler: closing ``events`` then aborts the request wherever it is.
        try:
            try:
                first = await events.__anext__()
            except HttpError as exc:
                return _error_response(str(exc), exc.kind, exc.status)
            except StopAsyncIteration:
                first = []
            headers = {ROUTE_HEADER: tracked.route or "none"}
            if body.get("stream"):
                return await self._relay(http, headers, first, events, body.get("stream_options") or {})
            status, payload = await aggregate_events(first, events, chat)
            return _json_response(payload, status, headers)
        finally:
            await events.aclose()

    @staticmethod
    async def _relay(
        http: web.Request,
        headers: dict[str, str],
        first: list[StreamEvent],
        batches: AsyncIterator[list[StreamEvent]],
        options: dict[str, Any],
    ) -> web.StreamResponse:
        """Stream events to the client as they came (each batch in one write), shaped as it asked: usage only
        where requested, the bytes of each event otherwise as the engine sent them."""
        shape = {
            "include_usage": bool(options.get("include_usage")),
            "continuous": bool(options.get("continuous_usage_stats")),
        }
        response = web.StreamResponse(headers=headers)
        response.content_type = "text/event-stream"
        await response.prepare(http)
        data = shape_events(first, **shape)
        if data:
            await response.write(data)
        async for batch in batches:
            data = shape_events(batch, **shape)
            if data:
                await response.write(data)
        await response.write_eof(DONE)  # with the end of the chunked body: one write
        return response

"""The router's HTTP surface: OpenAI-compatible endpoints, request validation and SLO headers, and the answer
shaped as the client asked (a stream of events, or one JSON body).

Everything a client can get wrong is answered here with a 4xx that names the field and the value, before the
request reaches the policy; what happens to a valid request is the router's (:class:`~tropical_sched.serve.router.
Router`). Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus) and ``GET /v1/tropical/profile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tropical_sched.core.request import Request, Slo
from tropical_sched.serve.openai import (
    DONE,
    BadRequest,
    GenerationBody,
    PayloadTooLarge,
    UnknownModel,
    chunk_delta,
    error_body,
    parse_json_body,
    prompt_token_count,
    sse,
    validate_body,
)
from tropical_sched.serve.upstream import HttpError, TransportFailure

if TYPE_CHECKING:
    from tropical_sched.serve.router import Router

__all__ = [
    "MAX_REQUEST_BODY_BYTES",
    "MAX_REQUEST_HEADER_BYTES",
    "ROUTE_HEADER",
    "SLO_HEADERS",
    "SLO_HEADER_RANGE_MS",
    "RouterApp",
    "parse_slo_headers",
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

_T = TypeVar("_T")
_DISCONNECTED = object()


def parse_slo_headers(headers: Headers | dict[str, str], default: Slo) -> Slo:
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
    """The ASGI application of a :class:`~tropical_sched.serve.router.Router` (``router.app`` is its ``asgi``).

    Args:
        router: the router whose requests this surface takes and answers.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self._slo_spec = router.config.slo.spec()
        self._next_id = 0
        self.asgi = Starlette(
            routes=[
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
                Route("/health", self._health),
                Route("/metrics", self._metrics),
                Route("/v1/models", self._models),
                Route("/v1/tropical/profile", self._profile_endpoint),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.router.start()
        try:
            yield
        finally:
            await self.router.stop()

    # -- endpoints ----------------------------------------------------------------------------------------------

    async def _health(self, http: HttpRequest) -> Response:
        instances = [
            {"url": i.url, "role": i.role.value, "healthy": i.healthy, "in_flight": i.num_in_flight}
            for i in self.router.instances
        ]
        ok = any(i.healthy for i in self.router.instances)
        return JSONResponse(
            {"status": "ok" if ok else "no healthy instance", "instances": instances}, status_code=200 if ok else 503
        )

    async def _metrics(self, http: HttpRequest) -> Response:
        metrics = self.router.metrics
        for instance in self.router.instances:
            metrics.round_trip.labels(instance.url).set(instance.round_trip_s)
            if instance.calibration is not None:
                metrics.show_calibration(instance.url, instance.calibration)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _models(self, http: HttpRequest) -> Response:
        for instance in self.router.instances:
            if instance.healthy:
                with contextlib.suppress(TransportFailure):
                    response = await self.router.upstream.get(instance, "/v1/models", 5.0)
                    return Response(response.content, status_code=response.status_code, media_type="application/json")
        return JSONResponse(error_body("no healthy instance", "ServiceUnavailable", 503), status_code=503)

    async def _profile_endpoint(self, http: HttpRequest) -> Response:
        """``GET /v1/tropical/profile[?instance=URL][&calibrated=false]``: the latency profile the router predicts
        with, in the profile-file schema, so that ``tropical simulate --profile`` and ``tropical replay`` can load
        it. Without ``instance``: the router's own offline profile (the one default SLOs are set from). With it:
        that instance's profile as calibrated online (learned coefficients, the learned P/D hop in ``serving``),
        or its offline profile with ``calibrated=false`` or while calibration is off. 404 names an unknown
        instance; 400 a ``calibrated`` that is not a boolean."""
        router = self.router
        url = http.query_params.get("instance")
        if url is None:
            return JSONResponse(router.profile.file.model_dump(mode="json"))
        instance = next((i for i in router.instances if i.url == url.rstrip("/")), None)
        if instance is None:
            message = f"query instance = {url!r} is not one of {[i.url for i in router.instances]}"
            return JSONResponse(error_body(message, "NotFoundError", 404), status_code=404)
        raw = http.query_params.get("calibrated", "true").lower()
        if raw not in ("true", "false", "1", "0"):
            message = f"query calibrated = {raw!r} must be true or false"
            return JSONResponse(error_body(message, "BadRequestError", 400), status_code=400)
        profile = router.profile_named(instance.config.profile)
        if instance.calibration is None or raw in ("false", "0"):
            return JSONResponse(profile.file.model_dump(mode="json"))
        calibrated = instance.calibration.profile_file(profile.file, f"router, instance {instance.url}")
        return JSONResponse(calibrated.model_dump(mode="json"))

    async def _completions(self, http: HttpRequest) -> Response:
        return await self._serve(http, chat=False)

    async def _chat_completions(self, http: HttpRequest) -> Response:
        return await self._serve(http, chat=True)

    # -- validation ---------------------------------------------------------------------------------------------

    async def _read_body(self, http: HttpRequest) -> dict[str, Any]:
        """The request's JSON body, read up to :data:`MAX_REQUEST_BODY_BYTES` (headers checked first).

        Raises:
            BadRequest: the headers or body are too large, or the body is not a UTF-8 JSON object.
        """
        header_bytes = sum(len(name) + len(value) for name, value in http.headers.raw)
        if header_bytes > MAX_REQUEST_HEADER_BYTES:
            raise PayloadTooLarge(
                f"request headers of {header_bytes} bytes exceed the limit of {MAX_REQUEST_HEADER_BYTES}", status=431
            )
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_REQUEST_BODY_BYTES:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {MAX_REQUEST_BODY_BYTES}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > MAX_REQUEST_BODY_BYTES:
                raise PayloadTooLarge(f"request body exceeds the limit of {MAX_REQUEST_BODY_BYTES} bytes")
            chunks.append(chunk)
        return parse_json_body(b"".join(chunks))

    async def _tokenize(self, body: dict[str, Any], chat: bool) -> int | None:
        """The exact prompt length from a healthy instance's ``POST /tokenize`` (``prompt_tokens: tokenize``),
        or ``None`` (token-id prompt, estimate configured, or no instance answered: the router then estimates)."""
        config = self.router.config
        if config.prompt_tokens != "tokenize" or (not chat and isinstance(body.get("prompt"), list)):
            return None
        payload: dict[str, Any] = {key: body[key] for key in ("model", "messages" if chat else "prompt") if key in body}
        if "model" not in payload and config.model:
            payload["model"] = config.model
        return await self.router.upstream.count_tokens(self.router.instances, payload)

    def _new_request(
        self,
        http: HttpRequest,
        body: dict[str, Any],
        typed: GenerationBody,
        chat: bool,
        num_prompt_tokens: int | None = None,
    ) -> Request:
        """Check a client's request against the served models and context and build the request the policy sees.

        Args:
            http: the HTTP request (its SLO headers).
            body: the client's body.
            typed: the same body, validated (:func:`~tropical_sched.serve.openai.validate_body`).
            chat: chat completions rather than completions.
            num_prompt_tokens: the exact prompt length if it was tokenized; else it is counted from the body.

        Raises:
            BadRequest: a field or header is malformed or out of range, the model is unknown, or the prompt and
                ``max_tokens`` cannot fit the served model's context (the message names the field and value).
        """
        router = self.router
        served = router.served_models()
        if typed.model is not None and served and typed.model not in served:
            raise UnknownModel(
                f"field model = {typed.model!r}: the model does not exist here (served: {sorted(served)})"
            )
        counted, exact = prompt_token_count(body, chat=chat, chars_per_token=router.config.chars_per_token)
        if num_prompt_tokens is None:
            num_prompt_tokens = counted
        else:
            exact = True
        max_tokens = typed.num_max_tokens
        max_model_len = router.max_model_len()
        if max_tokens is not None and max_tokens >= max_model_len:
            raise BadRequest(
                f"field max_tokens = {max_tokens}: leaves no room for the prompt in the model's context of "
                f"{max_model_len} tokens"
            )
        if exact and num_prompt_tokens + (max_tokens or 1) > max_model_len:
            raise BadRequest(
                f"field prompt: {num_prompt_tokens} prompt tokens + max_tokens {max_tokens or 1} exceed the model's "
                f"context of {max_model_len} tokens"
            )
        model = router.profile.step_time
        default = self._slo_spec.slo_for(
            num_prompt_tokens,
            isolated_prefill_s=model.prefill_time_s,
            isolated_decode_step_s=lambda context: model.decode_step_time_s(1, context),
        )
        slo = parse_slo_headers(http.headers, default)
        self._next_id += 1
        return Request(
            request_id=f"trop-{self._next_id}",
            arrival_at_s=router.now_s(),
            num_prompt_tokens=num_prompt_tokens,
            slo=slo,
            max_output_tokens=max_tokens,
        )

    # -- one request --------------------------------------------------------------------------------------------

    async def _serve(self, http: HttpRequest, *, chat: bool) -> Response:
        router = self.router
        try:
            body = await self._read_body(http)
            typed = validate_body(body, chat=chat)  # before a tokenizer sees it
            request = self._new_request(http, body, typed, chat, await self._tokenize(body, chat))
        except BadRequest as exc:
            router.metrics.requests.labels("none", "invalid").inc()
            return JSONResponse(error_body(str(exc), exc.kind, exc.status), status_code=exc.status)
        if router.config.model and "model" not in body:
            body["model"] = router.config.model
        if router.dispatcher.num_waiting >= router.config.max_waiting_requests:
            router.metrics.requests.labels("none", "rejected").inc()
            return JSONResponse(
                error_body("too many requests waiting at the router", "ServiceUnavailable", 503), status_code=503
            )
        tracked, events = router.admit(request, body, chat)
        wants_stream = bool(body.get("stream"))
        try:
            primed = await self._until_disconnect(http, events.__anext__())
        except HttpError as exc:
            await events.aclose()
            return JSONResponse(error_body(str(exc), exc.kind, exc.status), status_code=exc.status)
        except StopAsyncIteration:
            primed = None
        if primed is _DISCONNECTED:
            await events.aclose()
            return Response(status_code=499)
        first = primed if isinstance(primed, dict) else None
        headers = {ROUTE_HEADER: tracked.route or "none"}
        options = body.get("stream_options") or {}
        if wants_stream:
            return StreamingResponse(
                self._relay(first, events, options), media_type="text/event-stream", headers=headers
            )
        result = await self._until_disconnect(http, self._aggregate(first, events, chat))
        if not isinstance(result, tuple):
            await events.aclose()
            return Response(status_code=499)
        status, payload = result
        return JSONResponse(payload, status_code=status, headers=headers)

    async def _until_disconnect(self, http: HttpRequest, awaitable: Awaitable[_T]) -> _T | object:
        """Await ``awaitable`` unless the client disconnects first (then cancel it and return a marker)."""
        work = asyncio.ensure_future(awaitable)
        watch = asyncio.ensure_future(_wait_disconnect(http))
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            watch.cancel()
            return work.result()
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        return _DISCONNECTED

    @staticmethod
    async def _relay(
        first: dict[str, Any] | None, events: AsyncGenerator[dict[str, Any], None], options: dict[str, Any]
    ) -> AsyncIterator[bytes]:
        """Stream events to the client, shaped as it asked (usage only where requested)."""
        continuous = bool(options.get("continuous_usage_stats"))
        include_usage = bool(options.get("include_usage"))

        def shaped(event: dict[str, Any]) -> bytes | None:
            if "error" in event:
                return sse(event)
            if not event.get("choices"):
                return sse(event) if include_usage else None
            if not continuous and "usage" in event:
                event = {k: v for k, v in event.items() if k != "usage"}
            return sse(event)

        try:
            if first is not None:
                data = shaped(first)
                if data:
                    yield data
            async for event in events:
                data = shaped(event)
                if data:
                    yield data
            yield DONE
        finally:
            await events.aclose()  # on a client disconnect this aborts the upstream request

    @staticmethod
    async def _aggregate(
        first: dict[str, Any] | None, events: AsyncIterator[dict[str, Any]], chat: bool
    ) -> tuple[int, dict[str, Any]]:
        """Collect a stream into one completion body."""
        parts: list[str] = []
        finish = None
        usage = None
        head: dict[str, Any] = {}

        async def consume() -> AsyncIterator[dict[str, Any]]:
            if first is not None:
                yield first
            async for event in events:
                yield event

        async for event in consume():
            if "error" in event:
                return event["error"].get("code", 502), event
            head = head or event
            delta = chunk_delta(event, 0)
            parts.append(delta.text)
            finish = delta.finish_reason or finish
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
        text = "".join(parts)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        )
        return 200, {
            "id": head.get("id", ""),
            "object": "chat.completion" if chat else "text_completion",
            "created": head.get("created", int(time.time())),
            "model": head.get("model", ""),
            "choices": [choice],
            "usage": usage,
        }


async def _wait_disconnect(http: HttpRequest) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return

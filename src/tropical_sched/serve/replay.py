"""Replay a workload against any OpenAI-compatible endpoint and measure what clients see.

Each request is sent at its arrival time with its SLOs as headers (``x-slo-ttft-ms``, ``x-slo-tpot-ms``), streams
its answer, and is recorded exactly like a simulated one (:class:`~tropical_sched.core.request.RequestRecord`), so
the same summaries, tables and JSON apply: this is how the router is compared with an existing set-up, and how the
simulator is checked against a real engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx
import numpy as np

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Request, RequestRecord
from tropical_sched.serve.openai import chunk_delta, iter_sse
from tropical_sched.workloads.workload import Workload

if TYPE_CHECKING:
    from tropical_sched.serve.config import RouterConfig
    from tropical_sched.serve.router import Router

__all__ = ["EndpointInfo", "ReplaySettings", "probe_endpoint", "replay", "replay_sync"]

ROUTE_HEADER = "x-tropical-route"  # the router names each request's route (tropical_sched.serve.router)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplaySettings:
    """How to send the requests.

    Attributes:
        url: the endpoint's base URL (router or engine), e.g. ``http://127.0.0.1:8000``.
        extra_urls: more endpoints; request ``i`` goes to ``(url, *extra_urls)[i % n]``: client-side round robin,
            for comparing a router with the same engines served plainly.
        endpoint: ``completions`` (``/v1/completions``) or ``chat`` (``/v1/chat/completions``).
        model: the ``model`` field; ``None`` leaves it out (the router fills it in; vLLM needs it).
        prompt_format: ``tokens`` sends token ids (exact prompt lengths; completions only), ``text`` sends words
            sized by ``chars_per_token``.
        vocab_size: token ids are drawn from ``[10, vocab_size)``.
        chars_per_token: characters per token for text prompts.
        send_slo_headers: attach each request's SLOs as headers.
        timeout_s: per-request timeout, seconds.
        seed: seed of the prompt contents.
    """

    url: str
    extra_urls: tuple[str, ...] = ()
    endpoint: Literal["completions", "chat"] = "completions"
    model: str | None = None
    prompt_format: Literal["tokens", "text"] = "tokens"
    vocab_size: int = 256
    chars_per_token: float = 4.0
    send_slo_headers: bool = True
    timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_format == "tokens" and self.endpoint == "chat":
            raise ConfigError("prompt_format='tokens' needs endpoint='completions' (chat takes text messages)")
        if self.vocab_size <= 10:
            raise ConfigError(f"vocab_size must be > 10, got {self.vocab_size!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointInfo:
    """What the endpoints say about themselves before a replay.

    Attributes:
        max_model_len: the smallest context limit their ``/v1/models`` report (vLLM and SGLang list
            ``max_model_len``), tokens; ``None`` if none reports one.
        model: the first model id listed, if any.
        router_profile: the profile file (JSON) a Tropical router predicts with
            (``GET /v1/tropical/profile``); ``None`` for plain engines.
    """

    max_model_len: int | None
    model: str | None
    router_profile: str | None


def probe_endpoint(urls: Sequence[str], timeout_s: float = 10.0) -> EndpointInfo:
    """Ask each endpoint for its models and context limit, and the first for the router's profile.

    Endpoints that do not answer are skipped (the replay reports their failures).
    """
    limits: list[int] = []
    model = None
    router_profile = None
    with httpx.Client(timeout=timeout_s) as client:
        for url in urls:
            base = url.rstrip("/")
            try:
                response = client.get(base + "/v1/models")
                data = response.json().get("data") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                data = None
            for entry in data if isinstance(data, list) else []:
                if isinstance(entry, dict):
                    if model is None and isinstance(entry.get("id"), str):
                        model = entry["id"]
                    if isinstance(entry.get("max_model_len"), int):
                        limits.append(entry["max_model_len"])
        try:
            response = client.get(urls[0].rstrip("/") + "/v1/tropical/profile")
            if response.status_code == 200 and response.headers.get("content-type", "").startswith("application/json"):
                router_profile = response.text
        except httpx.HTTPError:
            pass
    return EndpointInfo(max_model_len=min(limits) if limits else None, model=model, router_profile=router_profile)


def _url(settings: ReplaySettings, index: int) -> str:
    if not settings.extra_urls:
        return settings.url
    return (settings.url, *settings.extra_urls)[index % (1 + len(settings.extra_urls))]


def _prompt(settings: ReplaySettings, index: int, num_tokens: int) -> Any:
    rng = np.random.default_rng([settings.seed, index])
    if settings.prompt_format == "tokens":
        return rng.integers(10, settings.vocab_size, size=num_tokens).tolist()
    words = max(1, round(num_tokens * settings.chars_per_token / 4))
    return " ".join(f"w{n:02d}" for n in rng.integers(0, 100, size=words))  # 4 characters per word with spaces


async def _one(
    client: httpx.AsyncClient,
    settings: ReplaySettings,
    request: Request,
    num_output_tokens: int,
    index: int,
    start: float,
    router: Router | None = None,
) -> RequestRecord:
    prompt = _prompt(settings, index, request.num_prompt_tokens)
    body: dict[str, Any] = {
        "max_tokens": num_output_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "temperature": 0,
    }
    if settings.model:
        body["model"] = settings.model
    if settings.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    headers = {}
    if settings.send_slo_headers:
        headers = {
            "x-slo-ttft-ms": f"{request.slo.ttft_s * 1e3:.3f}",
            "x-slo-tpot-ms": f"{request.slo.tpot_s * 1e3:.3f}",
        }
    delay = start + request.arrival_at_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    sent_at = time.monotonic() - start
    first_at = last_at = None
    tokens = 0
    reason = ""
    route = ""

    def count(event: dict[str, Any]) -> str:
        """Count an event's tokens (their times since the start); what went wrong, if it reports an error."""
        nonlocal first_at, last_at, tokens
        if "error" in event:
            return f"stream error: {event['error']}"
        delta = chunk_delta(event, tokens)
        if delta.num_tokens:
            now = time.monotonic() - start
            first_at = first_at if first_at is not None else now
            last_at = now
            tokens += delta.num_tokens
        return ""

    if router is not None:
        route, reason = await _through_router(router, body, headers, settings, count)
    else:
        try:
            async with client.stream(
                "POST", _url(settings, index).rstrip("/") + path, json=body, headers=headers, timeout=settings.timeout_s
            ) as response:
                route = response.headers.get(ROUTE_HEADER, "")
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    reason = f"HTTP {response.status_code}: {text}"
                else:
                    async for event in iter_sse(response):
                        reason = count(event)
                        if reason:
                            break
        except (httpx.HTTPError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
    failed = bool(reason) or first_at is None
    multiplexed = route == "multiplex"
    return RequestRecord(
        request_id=request.request_id,
        arrival_at_s=sent_at,
        num_prompt_tokens=request.num_prompt_tokens,
        num_output_tokens=0 if failed else tokens,
        ttft_slo_s=request.slo.ttft_s,
        tpot_slo_s=request.slo.tpot_s,
        first_token_at_s=None if failed else first_at,
        finished_at_s=None if failed else last_at,
        multiplexed=multiplexed and not failed,
        rejected=failed,
        reject_reason=reason or ("no token" if failed else ""),
        slo_class=request.slo_class,
    )


async def _through_router(
    router: Router,
    body: dict[str, Any],
    headers: dict[str, str],
    settings: ReplaySettings,
    count: Callable[[dict[str, Any]], str],
) -> tuple[str, str]:
    """One request through a router in this process (:meth:`Router.submit`), its events handed to ``count`` as
    the HTTP path hands them; ``(route, what went wrong or "")``. An error the router would answer with a status
    reads as that answer does over HTTP (``HTTP 400: ...``)."""
    from tropical_sched.serve.openai import BadRequest
    from tropical_sched.serve.upstream import HttpError

    route = reason = ""
    try:
        async with asyncio.timeout(settings.timeout_s):
            tracked, events = await router.submit(body, chat=settings.endpoint == "chat", headers=headers)
            try:
                async for batch in events:
                    route = route or tracked.route
                    for event in batch:
                        reason = count(event.json())
                        if reason:
                            return route, reason
            finally:
                await events.aclose()
    except (BadRequest, HttpError) as exc:
        reason = f"HTTP {exc.status}: {exc}"
    except (TimeoutError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    return route, reason


async def replay(
    workload: Workload,
    requests: Sequence[Request],
    settings: ReplaySettings,
    *,
    progress: Callable[[int], None] | None = None,
    router: Router | None = None,
) -> list[RequestRecord]:
    """Send every request at its arrival time and record what came back.

    Failed requests (an HTTP error, a broken stream, no token) are recorded as rejected, with the reason, so they
    count against attainment.

    Args:
        workload: output lengths come from here (sent as ``max_tokens`` with ``ignore_eos``).
        requests: the requests with their SLOs (from :func:`~tropical_sched.sim.simulator.build_requests`).
        settings: endpoint and prompt settings (``url`` and ``extra_urls`` are not used with ``router``).
        progress: called with 1 per finished request.
        router: a started router in this process (:meth:`Router.submit`): each request goes through it, without
            HTTP between this client and the router, and the engines' events reach the client where the router
            reads them (a client embedding the router, as client-side round robin embeds its choice).

    Returns:
        One record per request, in request order; times are seconds since the replay started.
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    async with httpx.AsyncClient(limits=limits, timeout=settings.timeout_s) as client:
        start = time.monotonic()

        async def run(index: int, request: Request) -> RequestRecord:
            num_output_tokens = int(workload.num_output_tokens[index])
            record = await _one(client, settings, request, num_output_tokens, index, start, router)
            if progress is not None:
                progress(1)
            return record

        return list(await asyncio.gather(*(run(i, r) for i, r in enumerate(requests))))


def replay_sync(
    workload: Workload,
    requests: Sequence[Request],
    settings: ReplaySettings,
    progress: Callable[[int], None] | None = None,
    *,
    router_config: RouterConfig | None = None,
) -> list[RequestRecord]:
    """:func:`replay` from synchronous code; with ``router_config``, through a router built from it in this
    process (started and probed before the first request, stopped after the last).

    Raises:
        ConfigError: ``router_config`` cannot run (its policy on its roles, or a profile that does not load).
    """
    if router_config is None:
        return asyncio.run(replay(workload, requests, settings, progress=progress))
    config = router_config

    async def through_router() -> list[RequestRecord]:
        from tropical_sched.serve.router import Router

        router = Router(config)
        await router.start()
        try:
            await router.probe_instances()
            return await replay(workload, requests, settings, progress=progress, router=router)
        finally:
            await router.stop()

    return asyncio.run(through_router())

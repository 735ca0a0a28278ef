"""The router's calls to its engines: one pooled HTTP client, each instance's dialect, and the errors a call ends with.

What a call sends is the engine's dialect (:mod:`tropical_sched.serve.engines`: vLLM's sequential P/D,
SGLang's concurrent one, where the SLOs travel); this module sends it and reads the answer: a stream of
events for the half that generates, one JSON body for a P/D prefill, an engine's count of a prompt's tokens.
Errors come back as :class:`HttpError` (ends the client's request with that status) or
:class:`UpstreamFailed` (a 5xx: this attempt failed, the request may be retried elsewhere); failures below HTTP
are httpx's ``TransportError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.engines import EngineDialect, dialect_for
from tropical_sched.serve.openai import iter_sse
from tropical_sched.serve.state import Instance, Tracked

__all__ = ["ConcurrentPrefill", "HttpError", "Upstream", "UpstreamFailed", "until_failed"]


class HttpError(Exception):
    """Ends a request with an HTTP error status and an OpenAI-style body.

    Args:
        status: the HTTP status, 4xx or 5xx.
        message: what went wrong, for the client.
        kind: the OpenAI error ``type``.
    """

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class UpstreamFailed(Exception):
    """An instance answered a request with a server error (5xx): the attempt failed and may be retried
    (elsewhere, if the policy so decides); the instance stays in routing."""


class Upstream:
    """The HTTP client the router calls its instances with, and each instance's dialect.

    Args:
        config: the cluster configuration (instances, request timeout).
        transport: an httpx transport (tests); default real sockets.
    """

    def __init__(self, config: RouterConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._config = config
        self._transport = transport
        self._dialects = [dialect_for(instance.engine) for instance in config.instances]
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        """Open the connection pool (in the application's lifespan, on its event loop)."""
        timeout = httpx.Timeout(connect=5.0, read=self._config.request_timeout_s, write=30.0, pool=30.0)
        # Idle upstream connections are dropped after 2 s, before the engines' servers drop them (uvicorn's
        # keep-alive timeout, which vLLM and SGLang keep at 5 s): reusing a connection the server is closing at
        # that moment fails the request with a connection error before any response.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024, keepalive_expiry=2.0)
        self._client = httpx.AsyncClient(transport=self._transport, timeout=timeout, limits=limits)

    async def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            await self._client.aclose()

    @property
    def client(self) -> httpx.AsyncClient:
        """The pooled client (between :meth:`start` and :meth:`close`)."""
        assert self._client is not None, "Upstream.start() was not called"
        return self._client

    def dialect(self, instance: Instance) -> EngineDialect:
        """The dialect of ``instance``'s engine."""
        return self._dialects[instance.index]

    async def get(self, instance: Instance, path: str, timeout_s: float) -> httpx.Response:
        """``GET`` a path of ``instance`` (probes, models, loads).

        Raises:
            httpx.HTTPError: the call failed below HTTP or timed out.
        """
        return await self.client.get(instance.url + path, timeout=timeout_s)

    @contextlib.asynccontextmanager
    async def generation(
        self, instance: Instance, path: str, body: dict[str, Any]
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Send the half of a request that generates, and yield its stream of events (open while the context is).

        Raises:
            HttpError: the instance answered 4xx.
            UpstreamFailed: it answered 5xx.
            httpx.TransportError: the call failed below HTTP.
        """
        async with self.client.stream("POST", instance.url + path, json=body) as response:
            if response.status_code != 200:
                await self.raise_for_status(instance, response)
            yield iter_sse(response)

    async def post(self, instance: Instance, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send a request that answers with one JSON body (a P/D prefill half) and return that body.

        Raises:
            HttpError, UpstreamFailed, httpx.TransportError: as :meth:`generation`.
            ValueError: the body is not JSON.
        """
        response = await self.client.post(instance.url + path, json=body)
        if response.status_code != 200:
            await self.raise_for_status(instance, response)
        result = response.json()
        if not isinstance(result, dict):
            raise ValueError(f"{instance.url}{path} answered {type(result).__name__}, not a JSON object")
        return result

    @staticmethod
    async def raise_for_status(instance: Instance, response: httpx.Response) -> None:
        """Turn an error answer into :class:`HttpError` (4xx, the engine's message kept) or
        :class:`UpstreamFailed` (5xx)."""
        content = await response.aread()
        try:
            message = json.loads(content).get("error", {}).get("message", content.decode(errors="replace"))
        except (ValueError, AttributeError):
            message = content.decode(errors="replace")
        if 400 <= response.status_code < 500:
            raise HttpError(response.status_code, f"{instance.url}: {message}", "UpstreamBadRequest")
        raise UpstreamFailed(f"HTTP {response.status_code}: {message}")

    async def count_tokens(self, instances: list[Instance], payload: dict[str, Any]) -> int | None:
        """A prompt's token count from the first healthy instance that answers ``POST /tokenize`` (vLLM and
        SGLang answer ``{"count": N, ...}``), or ``None``."""
        for instance in instances:
            if not instance.healthy:
                continue
            try:
                response = await self.client.post(instance.url + "/tokenize", json=payload, timeout=5.0)
                count = response.json().get("count") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            if isinstance(count, int) and count >= 0:
                return max(count, 1)
        return None


class ConcurrentPrefill:
    """The prefill half of a concurrent P/D request (SGLang), running while the decode half streams.

    Args:
        instance: the prefill instance.
        task: the prefill call.
    """

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


async def until_failed(
    events: AsyncIterator[dict[str, Any]], prefill: ConcurrentPrefill | None
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

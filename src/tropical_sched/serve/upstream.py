"""The router's calls to its engines: one pooled HTTP client, each instance's dialect, and the errors a call ends with.

What a call sends is the engine's dialect (:mod:`tropical_sched.serve.engines`: vLLM's sequential P/D,
SGLang's concurrent one, where the SLOs travel); this module sends it and reads the answer: a stream of
events for the half that generates, one JSON body for a P/D prefill, an engine's count of a prompt's tokens.
Errors come back as :class:`HttpError` (ends the client's request with that status), :class:`UpstreamFailed`
(a 5xx: this attempt failed, the request may be retried elsewhere) or :class:`TransportFailure` (below HTTP:
refused, reset, timed out).

The client is aiohttp's: on the router's hot path (every request's upstream call and its streamed events) it
spends about half the CPU of httpx's (``benchmarks/router_overhead.py``; docs/router.md, "Router overhead").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.engines import EngineDialect, dialect_for
from tropical_sched.serve.openai import StreamEvent, check_event_stream, sse_payload_batches
from tropical_sched.serve.state import Instance, Tracked

__all__ = [
    "Answer",
    "ConcurrentPrefill",
    "HttpError",
    "TransportFailure",
    "Upstream",
    "UpstreamFailed",
    "until_failed",
]


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


class TransportFailure(Exception):
    """A call failed below HTTP.

    Args:
        message: what failed.
        instance_down: the connection was refused or could not be opened in time: the instance is down. Otherwise
            (a connection reset or closed under a request, which a keep-alive race also causes, or a read timeout)
            a health probe decides.
    """

    def __init__(self, message: str, *, instance_down: bool) -> None:
        super().__init__(message)
        self.instance_down = instance_down


@dataclass(frozen=True)
class Answer:
    """A whole answer: its status and body."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        """The body as JSON.

        Raises:
            ValueError: it is not JSON.
        """
        return json.loads(self.content)


def _failure(instance: Instance, exc: BaseException) -> TransportFailure:
    down = isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
    return TransportFailure(f"{instance.url}: {exc!r}", instance_down=down)


_BELOW_HTTP = (aiohttp.ClientError, asyncio.TimeoutError)


class Upstream:
    """The HTTP client the router calls its instances with, and each instance's dialect.

    Args:
        config: the cluster configuration (instances, request timeout).
    """

    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        self._dialects = [dialect_for(instance.engine) for instance in config.instances]
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        """Open the connection pool (in the application's lifespan, on its event loop)."""
        # Idle upstream connections are dropped after 2 s, before the engines' servers drop them (uvicorn's
        # keep-alive timeout, which vLLM and SGLang keep at 5 s): reusing a connection the server is closing at
        # that moment fails the request with a connection error before any response.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=self._config.request_timeout_s)
        # read_bufsize bounds one line of an event stream at twice it: 1 MiB, far above any event an engine sends.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, read_bufsize=1 << 19
        )

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled client (between :meth:`start` and :meth:`close`)."""
        assert self._session is not None, "Upstream.start() was not called"
        return self._session

    def dialect(self, instance: Instance) -> EngineDialect:
        """The dialect of ``instance``'s engine."""
        return self._dialects[instance.index]

    async def get(self, instance: Instance, path: str, timeout_s: float) -> Answer:
        """``GET`` a path of ``instance`` (probes, models, loads), read whole.

        Raises:
            TransportFailure: the call failed below HTTP or took longer than ``timeout_s``.
        """
        try:
            async with self.session.get(
                instance.url + path, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                return Answer(response.status, await response.read())
        except _BELOW_HTTP as exc:
            raise _failure(instance, exc) from None

    @contextlib.asynccontextmanager
    async def generation(
        self, instance: Instance, path: str, body: dict[str, Any]
    ) -> AsyncIterator[AsyncIterator[list[StreamEvent]]]:
        """Send the half of a request that generates, and yield its stream of events, in batches: the events each
        network read completed, as soon as it did (open while the context is; leaving it early closes the
        connection, which aborts the request in the engine).

        Raises:
            HttpError: the instance answered 4xx.
            UpstreamFailed: it answered 5xx.
            TransportFailure: the call failed below HTTP.
            ValueError: the answer is not an event stream, or an event is not JSON.
        """
        try:
            async with self.session.post(instance.url + path, json=body) as response:
                if response.status != 200:
                    await self.raise_for_status(instance, response)
                check_event_stream(response.headers.get("content-type", ""))
                yield _guarded(instance, response.content.iter_any())
        except _BELOW_HTTP as exc:
            raise _failure(instance, exc) from None

    async def post(self, instance: Instance, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send a request that answers with one JSON body (a P/D prefill half) and return that body.

        Raises:
            HttpError, UpstreamFailed, TransportFailure: as :meth:`generation`.
            ValueError: the body is not a JSON object.
        """
        try:
            async with self.session.post(instance.url + path, json=body) as response:
                if response.status != 200:
                    await self.raise_for_status(instance, response)
                result = json.loads(await response.read())
        except _BELOW_HTTP as exc:
            raise _failure(instance, exc) from None
        if not isinstance(result, dict):
            raise ValueError(f"{instance.url}{path} answered {type(result).__name__}, not a JSON object")
        return result

    @staticmethod
    async def raise_for_status(instance: Instance, response: aiohttp.ClientResponse) -> None:
        """Turn an error answer into :class:`HttpError` (4xx, the engine's message kept) or
        :class:`UpstreamFailed` (5xx)."""
        content = await response.read()
        try:
            message = json.loads(content).get("error", {}).get("message", content.decode(errors="replace"))
        except (ValueError, AttributeError):
            message = content.decode(errors="replace")
        if 400 <= response.status < 500:
            raise HttpError(response.status, f"{instance.url}: {message}", "UpstreamBadRequest")
        raise UpstreamFailed(f"HTTP {response.status}: {message}")

    async def count_tokens(self, instances: list[Instance], payload: dict[str, Any]) -> int | None:
        """A prompt's token count from the first healthy instance that answers ``POST /tokenize`` (vLLM and
        SGLang answer ``{"count": N, ...}``), or ``None``."""
        for instance in instances:
            if not instance.healthy:
                continue
            try:
                async with self.session.post(
                    instance.url + "/tokenize", json=payload, timeout=aiohttp.ClientTimeout(total=5.0)
                ) as response:
                    answer = json.loads(await response.read()) if response.status == 200 else None
                count = answer.get("count") if isinstance(answer, dict) else None
            except (*_BELOW_HTTP, ValueError):
                continue
            if isinstance(count, int) and count >= 0:
                return max(count, 1)
        return None


async def _guarded(instance: Instance, chunks: AsyncIterator[bytes]) -> AsyncIterator[list[StreamEvent]]:
    """The events of a response body read in ``chunks``, a batch per read, with a failure below HTTP while reading
    raised as :class:`TransportFailure`.

    Raises:
        ValueError: an event is not a JSON object.
    """
    try:
        async for batch in sse_payload_batches(chunks):
            yield [StreamEvent(payload) for payload in batch]
    except _BELOW_HTTP as exc:
        raise _failure(instance, exc) from None


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


def until_failed(
    batches: AsyncIterator[list[StreamEvent]], prefill: ConcurrentPrefill | None
) -> AsyncIterator[list[StreamEvent]]:
    """The decode half's batches of events (``batches`` itself without a concurrent prefill); raises the prefill
    half's error as soon as it fails (the decode half would otherwise wait for KV that never comes)."""
    if prefill is None:
        return batches
    return _until_failed(batches, prefill)


async def _until_failed(
    batches: AsyncIterator[list[StreamEvent]], prefill: ConcurrentPrefill
) -> AsyncIterator[list[StreamEvent]]:
    iterator = batches.__aiter__()
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
            batch = await following
        except StopAsyncIteration:
            return
        yield batch

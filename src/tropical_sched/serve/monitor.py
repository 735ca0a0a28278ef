"""The router's watch over its instances: health probes, what each serves, and the load each reports.

An instance is marked down when its ``GET /health`` fails or a call to it is refused, and back up when the probe
answers 200 again; a healthy instance's ``/v1/models`` gives its model names and context limit; its own load
(KV-cache usage, requests running and waiting) is read where its dialect says
(:meth:`~tropical_sched.serve.engines.EngineDialect.load_sources`). The probe's round trip is kept per instance:
the calibration takes it out of a lone prefill's time. With ``live_state_interval_s`` set, each engine's live
state (:mod:`tropical_sched.live_state`) is read as often: what it runs for every router.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from tropical_sched.core.errors import DataFormatError
from tropical_sched.live_state import LIVE_STATE_PATH, parse_live_state
from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.metrics import RouterMetrics
from tropical_sched.serve.state import Instance
from tropical_sched.serve.upstream import TransportFailure, Upstream

__all__ = ["EngineMonitor"]

_PROBE_TIMEOUT_S = 2.0


class EngineMonitor:
    """Health and load of the router's instances, kept on their :class:`~tropical_sched.serve.state.Instance`.

    Args:
        config: the cluster configuration (probe and load intervals).
        instances: the instances, in configuration order.
        upstream: the client to call them with.
        metrics: the router's metrics (``instance_up``, ``engine_kv_usage``).
        now_s: the router's clock.
        on_healthy: called when an instance comes back (the router dispatches what waits).
        own_request_prefix: what every request id of this router starts with (its requests are taken out of
            live-state reports).
    """

    def __init__(
        self,
        config: RouterConfig,
        instances: Sequence[Instance],
        upstream: Upstream,
        metrics: RouterMetrics,
        now_s: Callable[[], float],
        on_healthy: Callable[[], None],
        own_request_prefix: str = "",
    ) -> None:
        self._config = config
        self._instances = instances
        self._upstream = upstream
        self._metrics = metrics
        self._now_s = now_s
        self._on_healthy = on_healthy
        self._own_request_prefix = own_request_prefix
        self._background_tasks: set[asyncio.Future[None]] = set()

    def tasks(self) -> list[asyncio.Task[None]]:
        """Start the periodic probes (and load readings, unless their interval is 0); the caller cancels them."""
        tasks = [asyncio.create_task(self._watch_health())]
        if self._config.metrics_interval_s > 0:
            tasks.append(asyncio.create_task(self._watch_engine_metrics()))
        if self._config.live_state_interval_s > 0:
            tasks.append(asyncio.create_task(self._watch_live_state()))
        return tasks

    async def read_live_state(self, instance: Instance) -> None:
        """Read an instance's live state; without one (down, no such endpoint, a malformed answer) the router's
        own counts stand alone for it until the next reading."""
        if not instance.healthy:
            instance.set_live_state(None, self._now_s())
            return
        sent_at_s = self._now_s()
        try:
            response = await self._upstream.get(instance, LIVE_STATE_PATH, _PROBE_TIMEOUT_S)
            state = (
                parse_live_state(response.content, instance.url + LIVE_STATE_PATH)
                if response.status_code == 200
                else None
            )
        except (TransportFailure, DataFormatError):
            state = None
        # Taken, as far as the router can tell, halfway through the call.
        instance.set_live_state(state, (sent_at_s + self._now_s()) / 2, self._own_request_prefix)

    async def _watch_live_state(self) -> None:
        while True:
            await asyncio.gather(*(self.read_live_state(instance) for instance in self._instances))
            self._on_healthy()  # waiting requests are decided again on the new view
            await asyncio.sleep(self._config.live_state_interval_s)

    def cancel_background(self) -> None:
        """Cancel the probes started by :meth:`on_transport_error`."""
        for task in self._background_tasks:
            task.cancel()

    def set_health(self, instance: Instance, healthy: bool) -> None:
        """Mark ``instance`` up or down (its snapshot changes; coming back dispatches what waits)."""
        if instance.healthy != healthy:
            instance.healthy = healthy
            instance.version += 1
            self._metrics.instance_up.labels(instance.url, instance.role.value).set(1 if healthy else 0)
            if healthy:
                self._on_healthy()

    async def probe(self, instance: Instance) -> None:
        """``GET /health``; on a healthy instance whose models are not known yet, also ``GET /v1/models``. Its
        round trip is kept (the least of the recent ones) to take the HTTP round trip out of a lone prefill's
        time."""
        try:
            sent_at_s = self._now_s()
            response = await self._upstream.get(instance, "/health", _PROBE_TIMEOUT_S)
            if response.status_code == 200:
                instance.note_round_trip(self._now_s() - sent_at_s)
            self.set_health(instance, response.status_code == 200)
        except TransportFailure:
            self.set_health(instance, False)
        if instance.healthy and not instance.served_models:
            await self._read_models(instance)

    async def _read_models(self, instance: Instance) -> None:
        """Learn an instance's model names and context limit from its ``/v1/models`` (vLLM and SGLang list
        ``data[].id`` and ``data[].max_model_len``); an instance that does not answer is asked again later."""
        try:
            response = await self._upstream.get(instance, "/v1/models", _PROBE_TIMEOUT_S)
            data = response.json().get("data") if response.status_code == 200 else None
        except (TransportFailure, ValueError, AttributeError):
            return
        if not isinstance(data, list):
            return
        names = tuple(str(m["id"]) for m in data if isinstance(m, dict) and isinstance(m.get("id"), str))
        limits = [m["max_model_len"] for m in data if isinstance(m, dict) and isinstance(m.get("max_model_len"), int)]
        instance.served_models = names
        if limits:
            instance.max_model_len = min(limits)

    def on_transport_error(self, instance: Instance, exc: TransportFailure) -> None:
        """An upstream call to ``instance`` failed below HTTP. A refused or timed-out connection means the
        instance is down; other failures (a connection closed under a request, which a keep-alive race also
        causes) trigger a health probe at once, which decides."""
        if exc.instance_down:
            self.set_health(instance, False)
        else:
            self._background(self.probe(instance))

    def _background(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(instance) for instance in self._instances))
            await asyncio.sleep(self._config.health_interval_s)

    async def read_engine_load(self, instance: Instance) -> None:
        """Read a healthy instance's own view of its load (KV-cache usage, requests running + waiting) from the
        first of its dialect's load sources that answers 200; nothing changes when none does."""
        if not instance.healthy:
            return
        reading = None
        try:
            for source in self._upstream.dialect(instance).load_sources():
                response = await self._upstream.get(instance, source.path, _PROBE_TIMEOUT_S)
                if response.status_code == 200:
                    reading = source.parse(response.content)
                    break
        except (TransportFailure, ValueError):
            return
        if reading is None:
            return
        usage, num_requests = reading
        if usage is not None and usage != instance.engine_kv_usage_fraction:
            instance.engine_kv_usage_fraction = usage
            instance.version += 1
            self._metrics.engine_kv_usage.labels(instance.url).set(usage)
        if num_requests is not None:
            instance.engine_num_requests = int(num_requests)

    async def _watch_engine_metrics(self) -> None:
        while True:
            await asyncio.gather(*(self.read_engine_load(instance) for instance in self._instances))
            await asyncio.sleep(self._config.metrics_interval_s)

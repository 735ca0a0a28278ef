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

The service has four rooms: :mod:`~tropical_sched.serve.app` (the HTTP surface, request validation, SLO
headers), :mod:`~tropical_sched.serve.upstream` (the calls to the engines, in each one's dialect of
:mod:`~tropical_sched.serve.engines`), :mod:`~tropical_sched.serve.monitor` (health probes and the engines' own
load), and this module: the cluster's state, the dispatch of every decision to the policy, a request's path
through the cluster (P/D or direct, with its retries), and what the online calibration observes.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from tropical_sched.core.decisions import DecodePlacement, RouteAction, RouteDecision
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Request, Slo
from tropical_sched.core.snapshot import ClusterSnapshot
from tropical_sched.policies.base import PolicyContext
from tropical_sched.policies.dispatcher import Dispatcher
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.calibration import InstanceCalibration, observed_pd_hop_s
from tropical_sched.predictors.profile import Profile, load_profile
from tropical_sched.predictors.step_time import StepTimeModel
from tropical_sched.serve.app import (
    MAX_REQUEST_BODY_BYTES,
    MAX_REQUEST_HEADER_BYTES,
    ROUTE_HEADER,
    SLO_HEADER_RANGE_MS,
    SLO_HEADERS,
    RouterApp,
    parse_slo_headers,
    request_slo,
)
from tropical_sched.serve.config import InstanceConfig, RouterConfig
from tropical_sched.serve.decision_log import DecisionLog, complete_entry, new_entry
from tropical_sched.serve.metrics import RouterMetrics
from tropical_sched.serve.monitor import EngineMonitor
from tropical_sched.serve.openai import (
    BadRequest,
    GenerationBody,
    StreamEvent,
    UnknownModel,
    error_body,
    prompt_token_count,
    validate_body,
)
from tropical_sched.serve.state import Instance, Phase, Tracked
from tropical_sched.serve.upstream import (
    ConcurrentPrefill,
    HttpError,
    TransportFailure,
    Upstream,
    UpstreamFailed,
    until_failed,
)

__all__ = [
    "MAX_REQUEST_BODY_BYTES",
    "MAX_REQUEST_HEADER_BYTES",
    "ROUTE_HEADER",
    "SLO_HEADERS",
    "SLO_HEADER_RANGE_MS",
    "Router",
    "parse_slo_headers",
]

_TICK_S = 0.02  # how often requests waiting at the router are retried while any wait
_SNAPSHOT_TTL_S = 0.01  # token counts in snapshots are at most this old
# A queued P/D prefill counts as queued at the previous return on its instance only if it was sent this much before
# the router saw that return: a request and a response each take about a millisecond between router and engine.
_RETURN_TRANSIT_MARGIN_S = 0.005


class Router:
    """The router service (see the module docstring). ``router.app`` is the HTTP application (``aiohttp.web``).

    Args:
        config: the cluster configuration.

    Raises:
        ConfigError: the policy cannot run on the configured roles, or a profile cannot be loaded.
    """

    def __init__(self, config: RouterConfig) -> None:
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
                instance.num_kv_cache_tokens or self.profile_named(instance.profile).num_kv_cache_tokens,
                calibration=self._calibration(instance),
                serving=self.profile_named(instance.profile).serving,
                step_time=self._own_step_time(instance),
                prior_step_time=self.profile_named(instance.profile).step_time,
            )
            for index, instance in enumerate(config.instances)
        ]
        self.dispatcher = Dispatcher(self.policy)
        self.metrics = RouterMetrics()
        self.upstream = Upstream(config)
        self._started = time.monotonic()
        self._tracked: dict[str, Tracked] = {}  # request id -> request not finished yet
        self.request_id_prefix = f"trop-{secrets.token_hex(4)}-"
        """What every request id of this router starts with (ids differ between routers that share engines)."""
        self.monitor = EngineMonitor(
            config, self.instances, self.upstream, self.metrics, self.now_s, self._dispatch, self.request_id_prefix
        )
        self._route_waiters: dict[str, asyncio.Future[RouteDecision]] = {}
        self._placement_waiters: dict[str, asyncio.Future[DecodePlacement]] = {}
        self._snapshot_key: tuple[float, ...] = ()
        self._snapshot: ClusterSnapshot | None = None
        self._snapshot_refreshed_at_s = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.decision_log = DecisionLog(config.decision_log) if config.decision_log else None
        """Where every finished request's line goes (``config.decision_log``); ``None``: nowhere."""
        for instance in self.instances:
            self.metrics.instance_up.labels(instance.url, instance.role.value).set(1)
            self.metrics.in_flight.labels(instance.url).set(0)
        self._slo_spec = config.slo.spec()
        self._next_request_number = 0
        self.app = RouterApp(self).web

    # -- set-up -------------------------------------------------------------------------------------------------

    def profile_named(self, name: str | None) -> Profile:
        """A profile by its name in the configuration (``None``: the router's own), loaded once."""
        key = name or self.config.profile
        if key not in self._profiles:
            self._profiles[key] = load_profile(key)
        return self._profiles[key]

    def _own_step_time(self, instance: InstanceConfig) -> StepTimeModel | None:
        """The step-time model of an instance's own profile, when it is not the policy's (heterogeneous clusters)."""
        if instance.profile is None or instance.profile == self.config.profile:
            return None
        return self.profile_named(instance.profile).step_time

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
            self.profile_named(instance.profile), settings.config(), max_chunk_tokens=chunk
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

    async def start(self) -> None:
        """Open the upstream connections and start the periodic work (retries of waiting requests, health probes,
        engine load readings); the application's lifespan calls it."""
        self.upstream.start()
        self._tasks = [asyncio.create_task(self._tick()), *self.monitor.tasks()]

    async def stop(self) -> None:
        """Stop the periodic work and close the upstream connections."""
        for task in self._tasks:
            task.cancel()
        self.monitor.cancel_background()
        await self.upstream.close()
        if self.decision_log is not None:
            self.decision_log.close()

    async def probe_instances(self) -> None:
        """Probe every instance once now (``GET /health``, and ``GET /v1/models`` for its model names and context
        limit), as the periodic health check does: a router embedded in a client (:meth:`submit`) calls this after
        :meth:`start`, before its first request, so that requests are checked against the engines' context."""
        await asyncio.gather(*(self.monitor.probe(instance) for instance in self.instances))

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
            self._snapshot = ClusterSnapshot(now_s=now, workers=tuple(i.snapshot(now) for i in self.instances))
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
        tracked.routed_at_s = self.now_s()
        tracked.reason = decision.reason
        tracked.decision_predicted = dict(decision.predicted)
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
        tracked.decode_placed_at_s = self.now_s()
        tracked.decode_reason = placement.reason
        tracked.decode_instance = placement.worker_id
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
            instance.num_decoding + 1, instance.decoding_context_tokens + request.num_prompt_tokens + 1
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

    # -- what the HTTP surface asks --------------------------------------------------------------------------

    def served_models(self) -> set[str]:
        """Model names the instances serve (their ``/v1/models``, and the configured ``model``); empty while
        unknown, in which case any name is passed on to the engine to judge."""
        names = {name for instance in self.instances for name in instance.served_models}
        if self.config.model:
            names.add(self.config.model)
        return names

    def max_model_len(self) -> int:
        """The context limit requests are checked against: the smallest one an instance reports
        (``/v1/models`` ``max_model_len``), else the profile's."""
        reported = [i.max_model_len for i in self.instances if i.max_model_len is not None]
        return min(reported) if reported else self.profile.max_model_len

    async def submit(
        self, body: dict[str, Any], *, chat: bool = False, headers: Mapping[str, str] | None = None
    ) -> tuple[Tracked, AsyncGenerator[list[StreamEvent], None]]:
        """Check a client's request and admit it: what ``POST /v1/completions`` (``chat=False``) and ``POST
        /v1/chat/completions`` (``chat=True``) do with a body, without HTTP. The HTTP surface calls it; so does
        a Python client or gateway that embeds the router (``tropical validate --router-config``), which then
        carries the engines' bytes itself and puts no relay between them and its client.

        Args:
            body: the OpenAI request body (a JSON object); ``model`` is filled in from the configuration if
                absent. The router always streams from the engines; the events come back as they came.
            chat: chat completions rather than completions.
            headers: the request's headers, lower-case names (SLO headers: ``x-slo-ttft-ms``,
                ``x-slo-tpot-ms``, or llm-d's ``x-llm-d-slo-*-ms``); ``None``: none (default SLOs from the
                configuration).

        Returns:
            ``(tracked, events)`` as :meth:`admit` returns them: the first ``__anext__`` of ``events`` routes the
            request (``tracked.route`` names its path after it); closing ``events`` aborts it.

        Raises:
            BadRequest: a field or header is malformed or out of range, the model is unknown, or the prompt and
                ``max_tokens`` cannot fit the served model's context (``status`` 4xx; the message names the
                field and the value).
            HttpError: 503, ``config.max_waiting_requests`` requests already wait at the router.
        """
        try:
            typed = validate_body(body, chat=chat)  # before a tokenizer sees it
            request = self._new_request(body, typed, chat, headers or {}, await self._tokenize(body, chat))
        except BadRequest:
            self.metrics.requests.labels("none", "invalid").inc()
            raise
        if self.config.model and "model" not in body:
            body["model"] = self.config.model
        if self.dispatcher.num_waiting >= self.config.max_waiting_requests:
            self.metrics.requests.labels("none", "rejected").inc()
            raise HttpError(503, "too many requests waiting at the router", "ServiceUnavailable")
        return self.admit(request, body, chat)

    async def _tokenize(self, body: dict[str, Any], chat: bool) -> int | None:
        """The exact prompt length from a healthy instance's ``POST /tokenize`` (``prompt_tokens: tokenize``),
        or ``None`` (token-id prompt, estimate configured, or no instance answered: the router then estimates)."""
        if self.config.prompt_tokens != "tokenize" or (not chat and isinstance(body.get("prompt"), list)):
            return None
        payload: dict[str, Any] = {key: body[key] for key in ("model", "messages" if chat else "prompt") if key in body}
        if "model" not in payload and self.config.model:
            payload["model"] = self.config.model
        return await self.upstream.count_tokens(self.instances, payload)

    def _new_request(
        self,
        body: dict[str, Any],
        typed: GenerationBody,
        chat: bool,
        headers: Mapping[str, str],
        num_prompt_tokens: int | None = None,
    ) -> Request:
        """Check a client's request against the served models and context and build the request the policy sees.

        Args:
            body: the client's body.
            typed: the same body, validated (:func:`~tropical_sched.serve.openai.validate_body`).
            chat: chat completions rather than completions.
            headers: the request's headers (its SLO headers).
            num_prompt_tokens: the exact prompt length if it was tokenized; else it is counted from the body.

        Raises:
            BadRequest: a field or header is malformed or out of range, the model is unknown, or the prompt and
                ``max_tokens`` cannot fit the served model's context (the message names the field and value).
        """
        served = self.served_models()
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
        max_model_len = self.max_model_len()
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
        slo = request_slo(self._slo_spec, self.profile.step_time, num_prompt_tokens, headers)
        self._next_request_number += 1
        return Request(
            request_id=f"{self.request_id_prefix}{self._next_request_number}",
            arrival_at_s=self.now_s(),
            num_prompt_tokens=num_prompt_tokens,
            slo=slo,
            max_output_tokens=max_tokens,
        )

    def admit(
        self, request: Request, body: dict[str, Any], chat: bool
    ) -> tuple[Tracked, AsyncGenerator[list[StreamEvent], None]]:
        """Take a validated request and return the generator of its upstream events, in batches (the events of one
        network read; tracking and routing start at its first ``__anext__``; closing it aborts the request wherever
        it is)."""
        tracked = Tracked(request=request)
        return tracked, self._events(tracked, body, chat)

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
                    raise HttpError(503, "timed out waiting for an instance", "ServiceUnavailable")
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
                    raise HttpError(503, f"no healthy instance can {step} this request", "ServiceUnavailable")
        finally:
            waiters.pop(request.request_id, None)
            self.dispatcher.cancel(request.request_id)

    def _can_serve(self, placement: bool) -> bool:
        """Whether some healthy instance could take a request's next step (its decode, or its prefill)."""
        if placement:
            return any(i.healthy and i.role.runs_decodes for i in self.instances)
        return any(i.healthy and i.role.runs_prefills for i in self.instances)

    async def _events(
        self, tracked: Tracked, body: dict[str, Any], chat: bool
    ) -> AsyncGenerator[list[StreamEvent], None]:
        """Route the request and yield the upstream stream's events in batches (those of one network read, as they
        came), retrying while it has produced no token.

        Every exit (finished, failed, rejected, client gone) leaves the request counted nowhere.
        """
        request = tracked.request
        path = "/v1/chat/completions" if chat else "/v1/completions"
        outcome = "aborted"
        self._tracked[request.request_id] = tracked  # here, not in admit(): a stream closed unstarted leaves nothing
        try:
            while True:
                tracked.attempts += 1
                decision: RouteDecision = await self._await_decision(tracked, placement=False)
                if decision.action is RouteAction.REJECT:
                    outcome = "rejected"
                    self.policy.on_first_token(request, math.inf, self.now_s())
                    raise HttpError(503, f"rejected: {decision.reason}", "SLOUnattainable")
                assert decision.worker_id is not None
                target = self.instances[decision.worker_id]
                prefill: ConcurrentPrefill | None = None
                tracked.decode_sent_at_s = tracked.sent_at_s = None
                tracked.prefill_instance = None
                try:
                    transfer = None
                    # One TTFT budget for both halves of a P/D request (SGLang sends them at once).
                    engine_slo = self._engine_slo(request)
                    if decision.action is RouteAction.PREFILL:
                        handoff = self.upstream.dialect(target).handoff(target.config)
                        if handoff is None:  # sequential P/D (vLLM): the decode is placed after the prefill
                            transfer = await self._remote_prefill(tracked, target, body, path, None, engine_slo)
                        placement: DecodePlacement = await self._await_decision(tracked, placement=True)
                        assert placement.worker_id is not None
                        if handoff is not None:  # concurrent P/D (SGLang): both halves start now
                            tracked.prefill_done_at_s = self.now_s()
                            transfer = handoff
                            prefill = ConcurrentPrefill(
                                target,
                                asyncio.create_task(
                                    self._remote_prefill(tracked, target, body, path, handoff, engine_slo)
                                ),
                            )
                        target = self.instances[placement.worker_id]
                        tracked.decode_sent_at_s = self.now_s()
                    else:
                        self._note_sent(tracked, target)
                    upstream = self.upstream.dialect(target).generation_body(
                        body, engine_slo, transfer, request_id=request.request_id
                    )
                    async with self.upstream.generation(target, path, upstream) as stream:
                        async for batch in until_failed(stream, prefill):
                            for event in batch:
                                num_new_tokens = event.num_new_tokens(tracked.num_generated_tokens)
                                if num_new_tokens:
                                    self._on_tokens(tracked, target, num_new_tokens)
                            yield batch
                    outcome = "ok"
                    return
                except HttpError:
                    outcome = "error"
                    raise
                except (TransportFailure, UpstreamFailed, ValueError) as exc:
                    if prefill is not None and prefill.failed:
                        target = prefill.instance
                    # A 5xx (UpstreamFailed) fails this attempt only: one client's request must never take an
                    # instance out of routing. Only failures below HTTP, or the health probe, mark it down.
                    if isinstance(exc, TransportFailure):
                        self.monitor.on_transport_error(target, exc)
                    self._untrack(tracked)
                    tracked.first_token_at_s = None
                    if tracked.num_generated_tokens == 0 and tracked.attempts <= self.config.max_retries:
                        continue
                    outcome = "error"
                    message = f"instance {target.url} failed after {tracked.num_generated_tokens} tokens: {exc!r}"
                    if tracked.num_generated_tokens == 0:
                        raise HttpError(502, message, "UpstreamError") from None
                    yield [StreamEvent.from_json(error_body(message, "UpstreamError", 502))]
                    return
                finally:
                    if prefill is not None:
                        await prefill.close(tracked)
                        self._count_in_flight(prefill.instance.index)
        finally:
            self._finish(tracked, outcome)

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
        dialect = self.upstream.dialect(instance)
        upstream = dialect.prefill_body(body, slo, handoff, request_id=tracked.request.request_id)
        self._note_sent(tracked, instance)
        answer = await self.upstream.post(instance, path, upstream)
        transfer = handoff if handoff is not None else dialect.transfer_params(answer)
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
            or instance.num_decoding
            or instance.foreign_num_prefills
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
        sole = others[0] if len(others) == 1 and not instance.decodes and instance.no_other_work else None
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
            and instance.no_other_work
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
        num_prompt_tokens = tracked.request.num_prompt_tokens
        hop_s = observed_pd_hop_s(
            self._step_time(instance),
            waited_s=now - tracked.decode_sent_at_s,
            num_decoding=instance.num_decoding,
            num_decoding_context_tokens=instance.decoding_context_tokens,
            num_prompt_tokens=num_prompt_tokens,
        )
        prefiller.observe_pd_hop(num_prompt_tokens=num_prompt_tokens, hop_s=hop_s)

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
        if self.decision_log is not None:
            self.decision_log.write(self._decision_entry(tracked, outcome))
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

    def _decision_entry(self, tracked: Tracked, outcome: str) -> dict[str, Any]:
        """The request's line in the decision log (fields: :mod:`~tropical_sched.serve.decision_log`)."""
        request = tracked.request
        n = tracked.num_generated_tokens
        first_at, last_at = tracked.first_token_at_s, tracked.last_token_at_s
        tpot_s = None
        if outcome == "ok" and first_at is not None:
            tpot_s = (last_at - first_at) / (n - 1) if n > 1 and last_at is not None else 0.0
        pd = tracked.route == RouteAction.PREFILL.value
        worker = tracked.prefill_instance if pd else tracked.instance
        entry = new_entry(
            request_id=request.request_id,
            arrival_at_s=request.arrival_at_s,
            num_prompt_tokens=request.num_prompt_tokens,
            ttft_slo_s=request.slo.ttft_s,
            tpot_slo_s=request.slo.tpot_s,
        )
        entry.update(
            route=tracked.route,
            attempts=tracked.attempts,
            routed_at_s=tracked.routed_at_s,
            worker=self.instances[worker].url if worker is not None else None,
            reason=tracked.reason,
            predicted={**tracked.decision_predicted, **{k: v for k, v in tracked.predicted.items() if k == "tpot_s"}},
            first_token_at_s=first_at,
        )
        if pd:
            entry.update(
                prefill_done_at_s=tracked.prefill_done_at_s,
                decode_worker=self.instances[tracked.decode_instance].url
                if tracked.decode_instance is not None
                else None,
                decode_placed_at_s=tracked.decode_placed_at_s,
                decode_reason=tracked.decode_reason,
            )
        return complete_entry(entry, outcome=outcome, num_output_tokens=n, last_token_at_s=last_at, tpot_s=tpot_s)

    @property
    def num_tracked(self) -> int:
        """Requests not finished yet (waiting at the router or on an instance)."""
        return len(self._tracked)

    @property
    def num_counted_on_instances(self) -> int:
        """Requests counted on some instance."""
        return sum(i.num_in_flight for i in self.instances)

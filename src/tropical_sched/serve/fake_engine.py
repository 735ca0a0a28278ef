"""A fake OpenAI-compatible LLM engine whose step times come from a latency profile.

It runs the simulator's engine model (:class:`~tropical_sched.sim.worker.SimWorker`: continuous batching,
chunked prefill, KV-cache accounting) in real time, optionally sped up, behind vLLM's HTTP surface: completions
and chat completions (streaming or not), ``/health``, ``/metrics`` with vLLM's gauge names, and vLLM's P/D
``kv_transfer_params`` (``do_remote_decode``: prefill only and hand back transfer parameters;
``do_remote_prefill``: skip the prefill and decode, after an optional P/D hop delay that stands for the KV
transfer). Text is deterministic per prompt: the same prompt gives the same tokens on every path, like greedy
decoding.

For tests and benchmarks of the router, where a real engine is too slow or absent. Not a model server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tropical_sched.core.request import Request, Slo
from tropical_sched.core.snapshot import WorkerRole
from tropical_sched.live_state import LIVE_STATE_PATH, EngineLiveState
from tropical_sched.policies.base import EngineSettings, LocalScheduler, PolicyContext
from tropical_sched.policies.local import FcfsScheduler
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.profile import Profile
from tropical_sched.serve.engines import REQUEST_ID_KEY
from tropical_sched.serve.openai import DONE, BadRequest, error_body, now_unix_s, prompt_token_count, sse
from tropical_sched.sim.worker import Job, SimWorker

__all__ = ["FakeEngine", "FakeEngineStats"]


@dataclass
class FakeEngineStats:
    """What a fake engine has seen (for tests).

    Attributes:
        num_requests: requests received.
        num_remote_prefills: requests that arrived with ``do_remote_prefill`` (decoded from transferred KV).
        num_remote_decodes: requests that arrived with ``do_remote_decode`` (prefilled for another instance).
        num_aborted: requests whose client went away before the end.
        xargs: the ``vllm_xargs`` of every request, in arrival order.
    """

    num_requests: int = 0
    num_remote_prefills: int = 0
    num_remote_decodes: int = 0
    num_aborted: int = 0
    xargs: list[dict[str, Any]] = field(default_factory=list)


class FakeEngine:
    """An OpenAI-compatible fake engine (see the module docstring).

    Args:
        profile: the latency profile whose step-time model prices every step.
        time_scale: wall seconds per simulated second (0.1 runs ten times faster than the profiled GPU).
        max_num_seqs: batch limit.
        max_num_batched_tokens: token budget per step (chunked prefill).
        num_kv_cache_tokens: KV capacity; default the profile's.
        engine_id: reported in ``kv_transfer_params``.
        model: the served model name.
        chars_per_token: how text prompts are counted.
        policy: a registered policy whose engine-local half (prefill order, per-step prefill cap, budgets) the
            engine runs for ``role``, as the Tropical vLLM scheduler class does; ``None``: vLLM's default (FCFS,
            chunked prefill with ``max_num_batched_tokens``).
        role: the engine's role under ``policy``.
        max_model_len: the context limit it reports on ``/v1/models`` and enforces, tokens; default the profile's.
        pd_hop_fixed_s: a ``do_remote_prefill`` request waits this long (engine seconds, so wall seconds times
            ``time_scale``) plus ``pd_hop_per_prompt_token_s`` per prompt token before it joins the decodes, as
            its KV cache would take to arrive; >= 0.
        pd_hop_per_prompt_token_s: the hop's part per prompt token, seconds per token, >= 0.

    Raises:
        ValueError: a hop term is negative or not finite.
    """

    def __init__(
        self,
        profile: Profile,
        *,
        time_scale: float = 1.0,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        num_kv_cache_tokens: int | None = None,
        engine_id: str = "fake",
        model: str = "fake-model",
        chars_per_token: float = 4.0,
        policy: str | None = None,
        role: WorkerRole = WorkerRole.COLOCATED,
        max_model_len: int | None = None,
        pd_hop_fixed_s: float = 0.0,
        pd_hop_per_prompt_token_s: float = 0.0,
    ) -> None:
        for name, value in (
            ("pd_hop_fixed_s", pd_hop_fixed_s),
            ("pd_hop_per_prompt_token_s", pd_hop_per_prompt_token_s),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        self.pd_hop_fixed_s = pd_hop_fixed_s
        self.pd_hop_per_prompt_token_s = pd_hop_per_prompt_token_s
        self.time_scale = time_scale
        self.engine_id = engine_id
        self.model = model
        self.chars_per_token = chars_per_token
        self._max_model_len = max_model_len or profile.max_model_len
        self.stats = FakeEngineStats()
        self.fail_after_tokens: int | None = None
        """Fault injection: drop every stream after this many tokens (``None``: never)."""
        self.failure: BaseException | None = None
        """Why the engine loop stopped, if it did (then every stream breaks and ``/health`` answers 500)."""
        self.fail_with_status: int | None = None
        """Fault injection: answer every generation request with this HTTP status (``None``: never)."""
        settings = EngineSettings(enable_chunked_prefill=True, max_num_batched_tokens=max_num_batched_tokens)
        local: LocalScheduler = FcfsScheduler()
        if policy is not None:
            engine_policy = make_policy(
                policy, PolicyContext(step_time=profile.step_time, max_model_len=profile.max_model_len)
            )
            role = WorkerRole(role)  # a role given by name ("prefill") would otherwise match no role in the policy
            settings, local = engine_policy.engine_settings(role), engine_policy.local_scheduler(role)
        self._worker = SimWorker(
            worker_id=0,
            role=WorkerRole.COLOCATED,  # it decodes what it prefills, and whatever it receives
            settings=settings,
            local=local,
            step_time=profile.step_time,
            num_kv_cache_tokens=num_kv_cache_tokens or profile.num_kv_cache_tokens,
            max_num_seqs=max_num_seqs,
            report_tokens=True,
        )
        self._streams: dict[str, asyncio.Queue[int | None]] = {}  # request id -> token counts, None at the end
        self._router_ids: dict[str, str] = {}  # request id -> the router's id of it (tropical_request_id)
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/health", self._health),
                Route("/metrics", self._metrics),
                Route("/v1/models", self._models),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route(LIVE_STATE_PATH, self._live_state),
            ],
            lifespan=self._lifespan,
        )

    # -- engine loop --------------------------------------------------------------------------------------------

    def _now(self) -> float:
        return (asyncio.get_running_loop().time() - self._started_at) / self.time_scale

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._wake = asyncio.Event()
        self._started_at = asyncio.get_running_loop().time()
        self._loop_task = asyncio.create_task(self._run())
        try:
            yield
        finally:
            self._loop_task.cancel()

    async def _run(self) -> None:
        """The engine loop. If it fails (a bug, or a warning turned into an error), the engine dies as a real one
        would: every stream breaks and ``/health`` answers 500 from then on, instead of requests waiting for steps
        that never come."""
        try:
            await self._steps()
        except Exception as exc:
            self.failure = exc
            for queue in list(self._streams.values()):
                queue.put_nowait(-1)
            raise

    async def _steps(self) -> None:
        assert self._wake is not None
        worker = self._worker
        while True:
            duration = worker.start_step(self._now()) if worker.has_work() else None
            if duration is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(duration * self.time_scale)
            outcome = worker.finish_step(self._now())
            for job in outcome.tokens:
                queue = self._streams.get(job.request.request_id)
                if queue is not None and not job.aborted:
                    queue.put_nowait(1)
            for job in outcome.finished:
                queue = self._streams.get(job.request.request_id)
                if queue is not None:
                    queue.put_nowait(None)

    def _receive(self, job: Job) -> None:
        """The KV cache of a ``do_remote_prefill`` request arrived: it joins the decodes (or, if its client left
        during the hop, its reserved KV is freed)."""
        if job.aborted:
            self._worker.cancel_incoming(job)
            return
        self._worker.receive(job)
        assert self._wake is not None
        self._wake.set()

    # -- requests -----------------------------------------------------------------------------------------------

    async def _health(self, request: HttpRequest) -> Response:
        if self.failure is not None:
            return PlainTextResponse(f"engine loop failed: {self.failure!r}", status_code=500)
        return PlainTextResponse("")

    async def _models(self, request: HttpRequest) -> Response:
        model = {"id": self.model, "object": "model", "max_model_len": self._max_model_len}
        return JSONResponse({"object": "list", "data": [model]})

    async def _tokenize(self, http: HttpRequest) -> Response:
        """vLLM's ``POST /tokenize``: the prompt's (or messages') token count, as this engine counts it."""
        try:
            body = await http.json()
            count, _ = prompt_token_count(body, chat="messages" in body, chars_per_token=self.chars_per_token)
        except (ValueError, BadRequest, AttributeError) as exc:
            return JSONResponse(error_body(str(exc), "BadRequestError", 400), status_code=400)
        return JSONResponse({"count": count, "max_model_len": self._max_model_len, "tokens": []})

    async def _metrics(self, request: HttpRequest) -> Response:
        worker = self._worker
        waiting = sum(1 for _, _, job in worker.prefills if job.num_computed == 0)
        running = len(worker.decodes) + worker.num_partial_prefills
        text = (
            f'vllm:num_requests_running{{model_name="{self.model}"}} {running}\n'
            f'vllm:num_requests_waiting{{model_name="{self.model}"}} {waiting}\n'
            f'vllm:kv_cache_usage_perc{{model_name="{self.model}"}} {worker.kv_used / worker.kv_capacity}\n'
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def _live_state(self, request: HttpRequest) -> Response:
        """``GET /v1/tropical/state``: what the engine runs (:class:`~tropical_sched.live_state.EngineLiveState`),
        durations in wall seconds, requests named by the router's ids where they came with one."""
        state = EngineLiveState.from_snapshot(self._worker.snapshot(), self._now(), self.time_scale, self._router_ids)
        return Response(state.model_dump_json(), media_type="application/json")

    async def _completions(self, request: HttpRequest) -> Response:
        return await self._serve(request, chat=False)

    async def _chat(self, request: HttpRequest) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, http: HttpRequest, *, chat: bool) -> Response:
        if self.failure is not None:
            message = f"fake engine loop failed: {self.failure!r}"
            return JSONResponse(error_body(message, "InternalServerError", 500), status_code=500)
        if self.fail_with_status is not None:
            message = f"fake engine fault injection: HTTP {self.fail_with_status}"
            return JSONResponse(
                error_body(message, "InternalServerError", self.fail_with_status), self.fail_with_status
            )
        try:
            body = await http.json()
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            num_prompt_tokens, _ = prompt_token_count(body, chat=chat, chars_per_token=self.chars_per_token)
            asked = body.get("max_tokens") or body.get("max_completion_tokens")
            # vLLM's default: whatever the context leaves (capped at 16 here, to keep fake answers short).
            max_tokens = int(asked) if asked is not None else max(min(16, self._max_model_len - num_prompt_tokens), 1)
            if max_tokens < 1:
                raise BadRequest(f"field 'max_tokens' must be >= 1, got {max_tokens}")
        except (ValueError, BadRequest) as exc:
            return JSONResponse(error_body(str(exc), "BadRequestError", 400), status_code=400)
        kv_params = body.get("kv_transfer_params") or {}
        remote_decode = bool(kv_params.get("do_remote_decode"))
        remote_prefill = bool(kv_params.get("do_remote_prefill"))
        if remote_decode:
            max_tokens = 1
        worker = self._worker
        if num_prompt_tokens + max_tokens > self._max_model_len:
            message = (
                f"This model's maximum context length is {self._max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} in the "
                "completion)."
            )
            return JSONResponse(error_body(message, "BadRequestError", 400), status_code=400)
        if num_prompt_tokens + max_tokens > worker.kv_capacity:
            message = f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the KV cache"
            return JSONResponse(error_body(message, "BadRequestError", 400), status_code=400)
        self.stats.num_requests += 1
        self.stats.num_remote_prefills += remote_prefill
        self.stats.num_remote_decodes += remote_decode
        self.stats.xargs.append(dict(body.get("vllm_xargs") or {}))

        request_id = f"cmpl-{self.engine_id}-{next(self._ids)}"
        xargs = body.get("vllm_xargs") or {}
        slo = Slo(
            ttft_s=float(xargs.get("tropical_ttft_slo_ms", 1e12)) / 1e3,
            tpot_s=float(xargs.get("tropical_tpot_slo_ms", 1e12)) / 1e3,
        )
        now = self._now()
        job = Job(
            Request(request_id=request_id, arrival_at_s=now, num_prompt_tokens=num_prompt_tokens, slo=slo),
            max_tokens,
        )
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        self._streams[request_id] = queue
        router_id = xargs.get(REQUEST_ID_KEY)
        if isinstance(router_id, str):
            self._router_ids[request_id] = router_id
        if remote_prefill:
            # The KV cache arrives from the prefill instance (after the hop): decode from the start, no prefill
            # here. Its first token is the one its first decode step here produces (the first the client sees, as
            # vLLM's engine counts it); until then its TPOT clock counts from its arrival here, as the router counts
            # its own from its prefill's end.
            job.placed_at_s = now
            worker.reserve_incoming(job)
            hop_s = self.pd_hop_fixed_s + self.pd_hop_per_prompt_token_s * num_prompt_tokens
            if hop_s > 0:
                asyncio.get_running_loop().call_later(hop_s * self.time_scale, self._receive, job)
            else:
                self._receive(job)
        else:
            worker.enqueue_prefill(job)
        assert self._wake is not None
        self._wake.set()

        seed = zlib.crc32(repr(body.get("messages") if chat else body.get("prompt")).encode())
        transfer = None
        if remote_decode:
            transfer = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_engine_id": self.engine_id,
                "remote_request_id": request_id,
                "remote_num_tokens": num_prompt_tokens,
            }
        stream_options = body.get("stream_options") or {}
        tokens = self._tokens(request_id, queue, job)
        if body.get("stream"):
            return StreamingResponse(
                self._stream(tokens, request_id, chat, seed, num_prompt_tokens, stream_options),
                media_type="text/event-stream",
            )
        text_parts = [self._word(seed, index) async for index in tokens]
        usage = {
            "prompt_tokens": num_prompt_tokens,
            "completion_tokens": len(text_parts),
            "total_tokens": num_prompt_tokens + len(text_parts),
        }
        text = "".join(text_parts)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            if chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        )
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": now_unix_s(),
                "model": self.model,
                "choices": [choice],
                "usage": usage,
                "kv_transfer_params": transfer,
            }
        )

    @staticmethod
    def _word(seed: int, index: int) -> str:
        return f" w{(seed + 7 * index) % 97}"

    async def _tokens(self, request_id: str, queue: asyncio.Queue[int | None], job: Job) -> AsyncIterator[int]:
        """Token indices as the engine produces them; aborts the job if the consumer goes away."""
        produced = 0
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if item < 0:
                    raise ConnectionResetError(f"fake engine loop failed: {self.failure!r}")
                if self.fail_after_tokens is not None and produced >= self.fail_after_tokens:
                    raise ConnectionResetError("fake engine fault injection")
                yield produced
                produced += 1
        finally:
            self._streams.pop(request_id, None)
            self._router_ids.pop(request_id, None)
            if job.finished_at_s is None and not job.aborted:
                self.stats.num_aborted += 1
                self._worker.abort(job)
                assert self._wake is not None
                self._wake.set()

    async def _stream(
        self,
        tokens: AsyncIterator[int],
        request_id: str,
        chat: bool,
        seed: int,
        num_prompt_tokens: int,
        stream_options: dict[str, Any],
    ) -> AsyncIterator[bytes]:
        continuous = bool(stream_options.get("continuous_usage_stats"))
        produced = 0
        async for index in tokens:
            produced += 1
            word = self._word(seed, index)
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": word} if index == 0 else {"content": word},
                    "finish_reason": None,
                }
                if chat
                else {"index": 0, "text": word, "logprobs": None, "finish_reason": None}
            )
            chunk: dict[str, Any] = {
                "id": request_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": now_unix_s(),
                "model": self.model,
                "choices": [choice],
            }
            if continuous:
                chunk["usage"] = {
                    "prompt_tokens": num_prompt_tokens,
                    "completion_tokens": produced,
                    "total_tokens": num_prompt_tokens + produced,
                }
            yield sse(chunk)
        final = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": now_unix_s(),
            "model": self.model,
            "choices": [
                {"index": 0, "delta": {}, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
            ],
        }
        yield sse(final)
        if stream_options.get("include_usage"):
            yield sse(
                {
                    "id": request_id,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": now_unix_s(),
                    "model": self.model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": num_prompt_tokens,
                        "completion_tokens": produced,
                        "total_tokens": num_prompt_tokens + produced,
                    },
                }
            )
        yield DONE

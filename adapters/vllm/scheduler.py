"""Tropical's engine-local scheduling as a vLLM scheduler class (``--scheduler-cls``).

* The waiting queue is ordered by the policy's local scheduler: shortest remaining prefill first on prefill
  workers, arrival order elsewhere (a :class:`KeyedRequestQueue` replaces vLLM's FCFS deque).
* On multiplexing workers every step's prefill tokens are capped so that the predicted step time stays within
  the smallest TPOT slack of the running decodes (design doc section 7): for the duration of ``schedule()`` the
  token budget becomes ``decodes + cap`` and ``long_prefill_token_threshold`` becomes ``cap``, so a partial
  prefill listed before the decodes cannot take their tokens.
* Policies that select decodes (``scorpio``'s credit-based batching, ``tempo``'s pacing) leave the decodes that
  sit a step out off the running list for that ``schedule()`` call; they keep their KV cache and rejoin after.
* Live state: after every step (at most every ``live_state_interval_s``, and at once when a request arrives or
  leaves) the engine's report is written where the API server's ``--middleware
  tropical_sched.adapters.live_state.LiveStateMiddleware`` serves it at ``GET /v1/tropical/state``
  (:mod:`tropical_sched.adapters.live_state`); P/D decodes waiting for their KV cache count as decodes.
* Online calibration: every step's composition (read from its ``SchedulerOutput``) and wall time (from the start
  of ``schedule()`` to the end of ``update_from_output()``: scheduling, the forward pass, sampling, output
  processing) refit the engine's step-time model, which the cap then predicts with
  (:meth:`~tropical_sched.adapters.engine_side.EngineSide.observe_step`).
* Step log (diagnosis, off by default): with ``$TROPICAL_STEP_LOG`` set to a path prefix, the engine core appends
  every step to ``<prefix>.<pid>.jsonl``, one JSON object per line: ``started_at_s`` (``time.perf_counter``),
  ``duration_s`` (as the calibration times it), ``num_decode_seqs``, ``num_decode_context_tokens``,
  ``prefill_chunks`` (``[num_prefix_tokens, num_chunk_tokens]`` each) and ``prefill_token_cap`` (the cap this step
  ran under, ``null`` when none). ``benchmarks/step_log.py`` sets a log against a profile's predictions.

``make_scheduler`` picks ``AsyncScheduler`` as the base when vLLM runs with async scheduling (its default on GPUs)
and ``Scheduler`` otherwise (the CPU platform forces synchronous scheduling).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from tropical_sched.adapters.engine_side import classify_step
from tropical_sched.adapters.live_state import LiveStateWriter, engine_live_state, live_state_file
from tropical_sched.adapters.vllm.config import parse_engine_side_config
from tropical_sched.adapters.vllm.logic import make_engine_side
from tropical_sched.adapters.vllm.version import check_vllm_version

__all__ = ["KeyedRequestQueue", "TropicalAsyncScheduler", "TropicalScheduler", "make_scheduler"]

logger = logging.getLogger("vllm.tropical_sched")  # under vLLM's logger, so its handlers print it

STEP_LOG_ENV = "TROPICAL_STEP_LOG"
"""Environment variable: the path prefix of the engine core's step log (see the module's docstring)."""


class KeyedRequestQueue(RequestQueue):
    """A waiting queue ordered by a key computed when a request enters it (ties: arrival, then entry order).

    Args:
        key: request -> sort key (lower runs first).
    """

    def __init__(self, key: Any) -> None:
        self._key = key
        self._heap: list[tuple[float, float, int, Request]] = []
        self._sequence = itertools.count()

    def add_request(self, request: Request) -> None:
        heapq.heappush(self._heap, (self._key(request), request.arrival_time, next(self._sequence), request))

    def pop_request(self) -> Request:
        if not self._heap:
            raise IndexError("pop from an empty queue")
        return heapq.heappop(self._heap)[3]

    def peek_request(self) -> Request:
        if not self._heap:
            raise IndexError("peek at an empty queue")
        return self._heap[0][3]

    def prepend_request(self, request: Request) -> None:
        self.add_request(request)  # ordered by key: there is no front to prepend to

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.add_request(request)

    def remove_request(self, request: Request) -> None:
        self.remove_requests([request])

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = {id(r) for r in requests}
        self._heap = [entry for entry in self._heap if id(entry[3]) not in gone]
        heapq.heapify(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return iter([entry[3] for entry in sorted(self._heap, key=lambda e: e[:3])])


class _TropicalMixin:
    """Adds a policy's engine-local half to a vLLM scheduler: the waiting-queue order, the per-step prefill cap,
    and (for policies that select decodes) which running decodes join each step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        config = parse_engine_side_config(self.vllm_config.additional_config)  # type: ignore[attr-defined]
        self.tropical = make_engine_side(config)
        if self.waiting:  # type: ignore[has-type]
            raise RuntimeError("the waiting queue must be empty when the Tropical scheduler starts")
        self.waiting = KeyedRequestQueue(self.tropical.sort_key)
        # id(SchedulerOutput) -> (when its schedule() started, its composition, its prefill cap): the async
        # scheduler plans step n + 1 before step n's output returns, so several can be pending.
        self._pending_steps: dict[int, tuple[float, tuple[int, int, tuple[tuple[int, int], ...]], int | None]] = {}
        self._step_cap: int | None = None  # the prefill cap of the schedule() call in progress
        prefix = os.environ.get(STEP_LOG_ENV)
        self._step_log = open(f"{prefix}.{os.getpid()}.jsonl", "a", buffering=1) if prefix else None  # noqa: SIM115
        self._calibration_logged_at_s = -math.inf
        interval_s = config.live_state_interval_s
        # The engine core is a child of the API server, which serves the file.
        self._live_state = None if interval_s is None else LiveStateWriter(live_state_file(os.getppid()), interval_s)
        if self._live_state is not None:
            self._live_state.remove()  # a previous engine's
        logger.info(
            "tropical scheduler active: role=%s policy=%s profile=%s base=%s",
            config.role.value,
            config.policy,
            config.profile,
            type(self).__mro__[2].__name__,
        )

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        started_at_s = time.perf_counter()
        self._step_cap = None
        output = self._schedule_selected(*args, **kwargs)
        if self.tropical.calibrator is not None or self._step_log is not None:
            self._note_step(output, started_at_s)
        return output

    def _schedule_selected(self, *args: Any, **kwargs: Any) -> Any:
        running = self.running  # type: ignore[has-type]
        skipped = self.tropical.decodes_to_skip(running, len(self.waiting))
        if not skipped:
            return self._schedule_capped(*args, **kwargs)
        # Decodes that sit this step out leave the running list for the call and go back after it, keeping their
        # KV cache; vLLM schedules what it sees.
        left_out = {id(r) for r in skipped}
        self.running = [r for r in running if id(r) not in left_out]
        try:
            return self._schedule_capped(*args, **kwargs)
        finally:
            self.running.extend(skipped)

    def _note_step(self, output: Any, started_at_s: float) -> None:
        """Remember a scheduled step's composition until its output comes back (``schedule()`` has already added
        the step's tokens to each request's computed tokens)."""
        scheduled = getattr(output, "num_scheduled_tokens", None)
        if not scheduled:
            return
        requests = self.requests  # type: ignore[attr-defined]
        present = {rid: n for rid, n in scheduled.items() if rid in requests}
        composition = classify_step(
            present,
            {rid: requests[rid].num_computed_tokens - n for rid, n in present.items()},
            {rid: requests[rid].num_prompt_tokens for rid in present},
        )
        if len(self._pending_steps) > 64:  # outputs that never came back (an aborted step): forget them
            self._pending_steps.clear()
        self._pending_steps[id(output)] = (started_at_s, composition, self._step_cap)

    def _schedule_capped(self, *args: Any, **kwargs: Any) -> Any:
        waiting_head = self.waiting.peek_request() if self.waiting else None
        capped = self.tropical.prefill_token_cap(self.running, waiting_head)  # type: ignore[attr-defined]
        if capped is None:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        num_decodes, cap = capped
        self._step_cap = cap
        budget = self.max_num_scheduled_tokens  # type: ignore[has-type]
        scheduler_config = self.scheduler_config  # type: ignore[attr-defined]
        threshold = scheduler_config.long_prefill_token_threshold
        self.max_num_scheduled_tokens = min(budget, num_decodes + cap)
        scheduler_config.long_prefill_token_threshold = cap if threshold <= 0 else min(threshold, cap)
        try:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.max_num_scheduled_tokens = budget
            scheduler_config.long_prefill_token_threshold = threshold

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        pending = self._pending_steps.pop(id(scheduler_output), None)
        if pending is not None:
            started_at_s, (num_decodes, context_tokens, chunks), cap = pending
            now_s = time.perf_counter()
            if self._step_log is not None:
                step = {
                    "started_at_s": round(started_at_s, 6),
                    "duration_s": round(now_s - started_at_s, 6),
                    "num_decode_seqs": num_decodes,
                    "num_decode_context_tokens": context_tokens,
                    "prefill_chunks": [list(chunk) for chunk in chunks],
                    "prefill_token_cap": cap,
                    # what the engine side predicts for this step with the model it holds as the step's output returns
                    "predicted_s": round(
                        self.tropical.step_time.step_time_s(
                            num_decode_seqs=num_decodes, num_decode_context_tokens=context_tokens, prefill_chunks=chunks
                        ),
                        6,
                    ),
                }
                self._step_log.write(json.dumps(step) + "\n")
            refreshed = self.tropical.observe_step(
                num_decode_seqs=num_decodes,
                num_decode_context_tokens=context_tokens,
                prefill_chunks=chunks,
                duration_s=now_s - started_at_s,
            )
            if refreshed and now_s - self._calibration_logged_at_s >= 30.0:
                self._calibration_logged_at_s = now_s
                logger.info("tropical online calibration: %s", self.tropical.describe_calibration())
        requests = self.requests  # type: ignore[attr-defined]
        self.tropical.observe_outputs(
            requests[request_id] for request_id in scheduler_output.num_scheduled_tokens if request_id in requests
        )
        self.tropical.forget(request_id for request_id in scheduler_output.finished_req_ids)
        if self._live_state is not None:
            self._write_live_state()
        return outputs

    def _write_live_state(self) -> None:
        assert self._live_state is not None
        waiting = list(self.waiting)
        running = list(self.running)  # type: ignore[has-type]
        self._live_state.maybe_write(
            (r.request_id for r in (*waiting, *running)), lambda: self._live_report(waiting, running)
        )

    def _live_report(self, waiting: list[Request], running: list[Request]) -> Any:
        """The engine's report (built only when it is written: :meth:`LiveStateWriter.maybe_write`)."""
        incoming, queued = [], []
        for request in waiting:
            remote = (getattr(request, "kv_transfer_params", None) or {}).get("do_remote_prefill")
            (incoming if remote else queued).append(request)
        capacity = int(self.cache_config.num_gpu_blocks or 0) * int(self.block_size)  # type: ignore[attr-defined]
        return engine_live_state(
            self.tropical,
            queued,
            running,
            incoming=incoming,
            num_kv_tokens_used=round(self.kv_cache_manager.usage * capacity),  # type: ignore[attr-defined]
            num_kv_tokens_capacity=capacity,
        )

    def shutdown(self) -> None:
        if self._live_state is not None:
            self._live_state.remove()
        if self._step_log is not None:
            self._step_log.close()
        super().shutdown()  # type: ignore[misc]


class TropicalScheduler(_TropicalMixin, Scheduler):
    """vLLM's synchronous ``Scheduler`` with Tropical's engine-local policy."""


class TropicalAsyncScheduler(_TropicalMixin, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` (its GPU default) with Tropical's engine-local policy."""


def make_scheduler(**kwargs: Any) -> Scheduler:
    """The ``--scheduler-cls`` entry point: the async variant when vLLM schedules asynchronously."""
    vllm_config = kwargs["vllm_config"]
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        return TropicalAsyncScheduler(**kwargs)
    return TropicalScheduler(**kwargs)

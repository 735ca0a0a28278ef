"""The ``sglang.srt.plugins`` entry point: installs Tropical's engine-side policy in SGLang's scheduler.

SGLang calls :func:`register` in every process it starts (launcher, scheduler, detokenizer). Where
``$TROPICAL_SGLANG_CONFIG`` is unset it does nothing (the plug-in is loaded by every SGLang on the machine);
where it is set, it checks SGLang and registers hooks through SGLang's ``HookRegistry``:

* prefill order: after ``SchedulePolicy.calc_priority`` the waiting queue is re-sorted by the policy's key
  (Tropical: earliest TTFT deadline; the stable sort keeps SGLang's order on ties);
* per-step prefill cap from TPOT slack on multiplexing workers: the ``PrefillAdder`` that
  ``Scheduler.get_prefill_adder_class`` returns (>= 0.5.22; the class itself before) clamps its token budgets to
  the cap that ``Scheduler.get_new_batch_prefill`` computed from the running decodes;
* rejection (``reject_unattainable``): ``Scheduler._add_request_to_queue`` aborts a request whose predicted TTFT
  exceeds its SLO with HTTP 503 and the reason;
* the multiplexing worker (role ``multiplexing``): a decode-mode instance that also prefills requests that come
  without ``bootstrap_room``. ``_handle_generate_request`` admits them as a colocated instance would, they wait
  in a queue of their own, and ``get_next_disagg_decode_batch_to_run`` runs SGLang's colocated scheduling step
  (``get_next_batch_to_run``: chunked prefill, mixed chunks, the merge into the running batch) on that queue
  after merging the requests whose KV cache arrived. No kernel or SGLang source is changed.

* live state: after every batch (at most every ``live_state_interval_s``, and at once when a request comes or
  goes) the scheduler writes the engine's report, and the HTTP server answers ``GET /v1/tropical/state`` with it
  (:mod:`tropical_sched.adapters.live_state`; the middleware is added to SGLang's FastAPI app when the plug-in
  loads in the launcher, before it serves). A decode-mode server counts the requests whose KV cache is
  on its way or has arrived as decodes.

``TROPICAL_SGLANG_CPU_PD_FIX=1`` (independent of the configuration) turns off the Mooncake sender's
pinned-memory index path, which needs CUDA, so that P/D over ``mooncake_tcp`` runs on SGLang's CPU engine
(tests and CPU trials; see docs/sglang.md).

Checks fail the scheduler process at start with the reason (SGLang then exits): a missing hook, a role that does
not match ``--disaggregation-mode``, or a multiplexing worker with the overlap scheduler on.

Importing this module is cheap (SGLang imports it in every process, configured or not): the policy code
(``tropical_sched.adapters.sglang.logic`` and what it imports: the policies, the profiles, numpy) is imported by
:func:`register` once a configuration is set, and by the hooks, which run only after that.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from tropical_sched.adapters.sglang.version import UnsupportedSglangError, check_sglang_version

if TYPE_CHECKING:
    from tropical_sched.adapters.engine_side import EngineSide

__all__ = ["CPU_PD_FIX_ENV", "SglangHooks", "detect_hooks", "register"]

logger = logging.getLogger("sglang.tropical_sched")

_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
_POLICY_MODULE = "sglang.srt.managers.schedule_policy"
_DECODE_MIXIN = "sglang.srt.disaggregation.decode.SchedulerDisaggregationDecodeMixin"
_LOCAL_QUEUE_ATTR = "_tropical_local_queue"
_LIVE_STATE_ATTR = "_tropical_live_state"
_HTTP_SERVER = "sglang.srt.entrypoints.http_server"
CPU_PD_FIX_ENV = "TROPICAL_SGLANG_CPU_PD_FIX"
_CONFIG_ENV = "TROPICAL_SGLANG_CONFIG"  # logic.CONFIG_ENV, repeated to keep this import light (tested)

_side: EngineSide | None = None
_current_cap: int | None = None  # set around get_new_batch_prefill, read by the capped PrefillAdder (one thread)


@dataclass(frozen=True)
class SglangHooks:
    """Which of SGLang's plug-in points the installed version has.

    Attributes:
        prefill_adder_method: ``Scheduler.get_prefill_adder_class`` (>= 0.5.22); else the adder class is replaced.
        multiplexing: what the multiplexing worker needs (``get_next_batch_to_run(running_batch, last_batch)``,
            ``get_new_prebuilt_batch`` and ``get_next_disagg_decode_batch_to_run``, >= 0.5.16).
        missing: required names that are absent (empty when the adapter can run).
    """

    prefill_adder_method: bool
    multiplexing: bool
    missing: tuple[str, ...]


def detect_hooks() -> SglangHooks:
    """Inspect the installed SGLang's scheduler classes (imports SGLang)."""
    import inspect

    from sglang.srt.disaggregation.decode import SchedulerDisaggregationDecodeMixin
    from sglang.srt.managers import schedule_policy
    from sglang.srt.managers.scheduler import Scheduler

    required = {
        "SchedulePolicy.calc_priority": hasattr(schedule_policy.SchedulePolicy, "calc_priority"),
        "PrefillAdder": hasattr(schedule_policy, "PrefillAdder"),
        "Scheduler._add_request_to_queue": hasattr(Scheduler, "_add_request_to_queue"),
        "Scheduler.get_new_batch_prefill": hasattr(Scheduler, "get_new_batch_prefill"),
        "Scheduler.process_batch_result": hasattr(Scheduler, "process_batch_result"),
        "Scheduler.send_abort_output": hasattr(Scheduler, "send_abort_output"),
    }
    next_batch = getattr(Scheduler, "get_next_batch_to_run", None)
    multiplexing = (
        next_batch is not None
        and "last_batch" in inspect.signature(next_batch).parameters
        and hasattr(SchedulerDisaggregationDecodeMixin, "get_next_disagg_decode_batch_to_run")
        and hasattr(SchedulerDisaggregationDecodeMixin, "get_new_prebuilt_batch")
        and hasattr(Scheduler, "_handle_generate_request")
    )
    return SglangHooks(
        prefill_adder_method=hasattr(Scheduler, "get_prefill_adder_class"),
        multiplexing=multiplexing,
        missing=tuple(name for name, present in required.items() if not present),
    )


def register() -> None:
    """Install the hooks (see the module docstring) when ``$TROPICAL_SGLANG_CONFIG`` is set.

    Raises:
        SystemExit: the configuration is invalid, or this SGLang lacks what the configured role needs (SGLang
            catches plug-in exceptions and would carry on without Tropical; exiting makes the failure visible at
            start, with the reason).
    """
    global _side
    if os.environ.get(CPU_PD_FIX_ENV) == "1":
        _apply_cpu_pd_fix()
    if not os.environ.get(_CONFIG_ENV, "").strip():  # what read_config_from_env takes as unset, without its imports
        logger.debug("tropical-sched: $%s is not set; SGLang runs without Tropical", _CONFIG_ENV)
        return
    from tropical_sched.adapters.sglang.logic import make_engine_side, read_config_from_env
    from tropical_sched.core.errors import TropicalError
    from tropical_sched.core.snapshot import WorkerRole

    try:
        config = read_config_from_env()
        if config is None:
            return
        version = check_sglang_version()
        hooks = detect_hooks()
        if hooks.missing:
            raise UnsupportedSglangError(
                f"SGLang {version} lacks {', '.join(hooks.missing)}, which tropical-sched's adapter hooks"
            )
        if config.role is WorkerRole.MULTIPLEXING and not hooks.multiplexing:
            raise UnsupportedSglangError(
                f"SGLang {version} has not the decode-mode scheduler methods the multiplexing worker hooks "
                "(get_next_batch_to_run(running_batch, last_batch), get_next_disagg_decode_batch_to_run; SGLang "
                ">= 0.5.16)"
            )
        _side = make_engine_side(config)
    except (TropicalError, UnsupportedSglangError) as exc:
        logger.error("tropical-sched: %s", exc)
        raise SystemExit(f"tropical-sched: {exc}") from None

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{_SCHEDULER}.__init__", _after_scheduler_init, HookType.AFTER)
    HookRegistry.register(f"{_POLICY_MODULE}.SchedulePolicy.calc_priority", _after_calc_priority, HookType.AFTER)
    HookRegistry.register(f"{_SCHEDULER}._add_request_to_queue", _around_add_request_to_queue, HookType.AROUND)
    HookRegistry.register(f"{_SCHEDULER}.process_batch_result", _after_process_batch_result, HookType.AFTER)
    if _side.local.caps_prefill_tokens:
        HookRegistry.register(f"{_SCHEDULER}.get_new_batch_prefill", _around_get_new_batch_prefill, HookType.AROUND)
        if hooks.prefill_adder_method:
            HookRegistry.register(f"{_SCHEDULER}.get_prefill_adder_class", _capped_adder_class, HookType.REPLACE)
        else:
            HookRegistry.register(f"{_POLICY_MODULE}.PrefillAdder", _capped_adder_class(None), HookType.REPLACE)
    if config.role is WorkerRole.MULTIPLEXING:
        HookRegistry.register(f"{_SCHEDULER}._handle_generate_request", _around_handle_generate, HookType.AROUND)
        HookRegistry.register(
            f"{_DECODE_MIXIN}.get_next_disagg_decode_batch_to_run", _around_decode_next_batch, HookType.AROUND
        )
    if config.live_state_interval_s is not None:
        _serve_live_state()
    logger.info(
        "tropical-sched: policy %s, role %s, on SGLang %s (prefill cap: %s, multiplexing: %s)",
        config.policy,
        config.role.value,
        version,
        _side.local.caps_prefill_tokens,
        config.role is WorkerRole.MULTIPLEXING,
    )


def _serve_live_state() -> None:
    """In the HTTP server's process (the launcher: no multiprocessing parent; it loads plug-ins before it imports
    its FastAPI app, which it serves right after): answer ``GET /v1/tropical/state`` from the file the scheduler
    writes. In SGLang's spawned processes (scheduler, detokenizer): nothing."""
    import importlib
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return
    app = getattr(importlib.import_module(_HTTP_SERVER), "app", None)
    if app is None:
        logger.warning("tropical-sched: %s has no app; GET /v1/tropical/state not served", _HTTP_SERVER)
        return
    from tropical_sched.adapters.live_state import LiveStateMiddleware

    try:
        app.add_middleware(LiveStateMiddleware)
    except RuntimeError as exc:  # the app already serves: no middleware can be added
        logger.warning("tropical-sched: GET /v1/tropical/state not served: %s", exc)


def _apply_cpu_pd_fix() -> None:
    """Send KV page indices from host memory without CUDA events (SGLang's CPU engine has no CUDA)."""
    try:
        from sglang.srt.disaggregation.mooncake.conn import MooncakeKVSender
    except ImportError as exc:  # mooncake not installed: nothing to fix
        logger.warning("tropical-sched: %s=1 but the Mooncake backend does not import: %s", CPU_PD_FIX_ENV, exc)
        return
    MooncakeKVSender.supports_host_tensor_indices = False


def _engine_side() -> EngineSide:
    assert _side is not None, "tropical-sched hooks run only after register()"
    return _side


# -- start-up check ---------------------------------------------------------------------------------------------


def _after_scheduler_init(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """Check the role against SGLang's mode; a mismatch stops the scheduler process with the reason."""
    from sglang.srt.disaggregation.utils import DisaggregationMode

    from tropical_sched.adapters.sglang.logic import CONFIG_ENV
    from tropical_sched.core.snapshot import WorkerRole

    role = _engine_side().config.role
    mode = scheduler.disaggregation_mode
    expected = {
        WorkerRole.PREFILL: DisaggregationMode.PREFILL,
        WorkerRole.MULTIPLEXING: DisaggregationMode.DECODE,
        WorkerRole.DECODE: DisaggregationMode.DECODE,
        WorkerRole.COLOCATED: DisaggregationMode.NULL,
    }[role]
    if mode != expected:
        raise RuntimeError(
            f"tropical-sched: ${CONFIG_ENV} role {role.value!r} needs --disaggregation-mode {expected.value}, "
            f"this server runs {mode.value}"
        )
    if role is WorkerRole.MULTIPLEXING:
        if getattr(scheduler, "enable_overlap", False):
            raise RuntimeError(
                "tropical-sched: a multiplexing worker needs --disable-overlap-schedule (its local prefills run "
                "in SGLang's normal decode loop)"
            )
        setattr(scheduler, _LOCAL_QUEUE_ATTR, [])
    interval_s = _engine_side().config.live_state_interval_s
    if interval_s is not None:
        from tropical_sched.adapters.live_state import LiveStateWriter, live_state_file

        writer = LiveStateWriter(live_state_file(os.getppid()), interval_s)  # the HTTP server is the parent
        writer.remove()  # a previous server's
        setattr(scheduler, _LIVE_STATE_ATTR, writer)
    return None


# -- prefill order, cap, rejection ------------------------------------------------------------------------------


def _after_calc_priority(result: Any, policy: Any, waiting_queue: list[Any], *args: Any, **kwargs: Any) -> Any:
    from tropical_sched.adapters.sglang.logic import order_waiting_queue

    order_waiting_queue(_engine_side(), waiting_queue)
    return result


def _prefill_head(scheduler: Any) -> Any | None:
    if scheduler.chunked_req is not None:
        return scheduler.chunked_req
    return scheduler.waiting_queue[0] if scheduler.waiting_queue else None


def _around_get_new_batch_prefill(original: Any, scheduler: Any, running_batch: Any, *args: Any, **kw: Any) -> Any:
    global _current_cap
    from tropical_sched.adapters.sglang.logic import prefill_token_cap

    side = _engine_side()
    reqs = list(getattr(running_batch, "reqs", None) or ())
    _current_cap = prefill_token_cap(side, reqs, _prefill_head(scheduler)) if reqs else None
    try:
        return original(scheduler, running_batch, *args, **kw)
    finally:
        _current_cap = None


_adder_class: type | None = None


def _capped_adder_class(scheduler: Any) -> type:
    """SGLang's ``PrefillAdder`` with its token budgets clamped to the current cap (a subclass, built once)."""
    global _adder_class
    if _adder_class is None:
        from sglang.srt.managers.schedule_policy import PrefillAdder

        class TropicalPrefillAdder(PrefillAdder):  # type: ignore[misc, valid-type]
            """Clamps ``rem_input_tokens`` and ``rem_chunk_tokens`` to Tropical's per-step prefill cap."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                cap = _current_cap
                if cap is not None:
                    self.rem_input_tokens = min(self.rem_input_tokens, cap)
                    if self.rem_chunk_tokens is not None:
                        self.rem_chunk_tokens = min(self.rem_chunk_tokens, cap)

        _adder_class = TropicalPrefillAdder
    return _adder_class


def _abort(scheduler: Any, req: Any, message: str) -> None:
    from sglang.srt.managers.scheduler import _make_abort_req

    finished_reason = {"type": "abort", "status_code": HTTPStatus.SERVICE_UNAVAILABLE, "message": message}
    scheduler.send_abort_output(_make_abort_req(req, finished_reason=finished_reason), req)
    scheduler._release_aborted_request(req)
    logger.info("tropical-sched: rejected %s: %s", req.rid, message)


def _around_add_request_to_queue(original: Any, scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    retracted = bool(args[0] if args else kwargs.get("is_retracted", False))
    if retracted:
        return original(scheduler, req, *args, **kwargs)
    from tropical_sched.adapters.sglang.logic import ARRIVAL_ATTR, SglangRequestView, is_local_request, views
    from tropical_sched.core.snapshot import WorkerRole

    side = _engine_side()
    setattr(req, ARRIVAL_ATTR, side.now_s())
    local_queue = getattr(scheduler, _LOCAL_QUEUE_ATTR, None)
    if local_queue is not None and is_local_request(req):
        # A multiplexing worker's own prefill: it waits in the local queue, not in the KV-transfer queues.
        queued = [*local_queue, *([scheduler.chunked_req] if scheduler.chunked_req is not None else [])]
        reason = side.unattainable_reason(SglangRequestView(req, side.now_s()), views(side, queued))
        if reason is not None:
            return _abort(scheduler, req, reason)
        local_queue.append(req)
        req.time_stats.set_wait_queue_entry_time()
        return None
    if side.config.role is not WorkerRole.DECODE and local_queue is None:
        reason = side.unattainable_reason(SglangRequestView(req, side.now_s()), views(side, scheduler.waiting_queue))
        if reason is not None:
            return _abort(scheduler, req, reason)
    return original(scheduler, req, *args, **kwargs)


def _after_process_batch_result(result: Any, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    """Note first tokens (the TPOT clock of each decode starts there) and forget finished requests."""
    from tropical_sched.adapters.sglang.logic import SglangRequestView

    side = _engine_side()
    now = side.now_s()
    reqs = list(getattr(batch, "reqs", None) or ())
    side.observe_outputs(SglangRequestView(req, now) for req in reqs)
    side.forget(str(req.rid) for req in reqs if req.finished())
    _observe_step(scheduler, batch, side)
    writer = getattr(scheduler, _LIVE_STATE_ATTR, None)
    if writer is not None:
        _write_live_state(scheduler, side, writer)
    return result


def _queued(scheduler: Any, attr: str) -> list[Any]:
    """The requests of one of a decode-mode scheduler's KV queues (entries hold them as ``.req``)."""
    queue = getattr(getattr(scheduler, attr, None), "queue", None) or ()
    return [getattr(entry, "req", entry) for entry in queue]


def _write_live_state(scheduler: Any, side: EngineSide, writer: Any) -> None:
    """The engine's report after a batch: its prefills (the local queue of a multiplexing worker, else the waiting
    queue, and the prefill in chunks), its running requests, and on a decode-mode server the requests whose KV
    cache is on its way or has arrived, as decodes; KV usage from the token pool."""
    from sglang.srt.disaggregation.utils import DisaggregationMode

    from tropical_sched.adapters.live_state import engine_live_state
    from tropical_sched.adapters.sglang.logic import views

    local = getattr(scheduler, _LOCAL_QUEUE_ATTR, None)
    decode_mode = scheduler.disaggregation_mode == DisaggregationMode.DECODE
    running = [r for r in (getattr(scheduler.running_batch, "reqs", None) or ()) if not r.finished()]
    chunked = scheduler.chunked_req
    if chunked is not None and all(r is not chunked for r in running):
        running.append(chunked)
    if local is not None:
        queued = list(local)
    else:
        queued = [] if decode_mode else list(scheduler.waiting_queue)
    incoming = []
    if decode_mode:
        incoming = [
            *_queued(scheduler, "disagg_decode_prealloc_queue"),
            *_queued(scheduler, "disagg_decode_transfer_queue"),
            *scheduler.waiting_queue,  # KV arrived, about to join the running batch
        ]
    capacity = int(scheduler.max_total_num_tokens)
    used = capacity - int(scheduler.token_to_kv_pool_allocator.available_size())
    writer.maybe_write(
        (str(r.rid) for r in (*queued, *running, *incoming)),
        lambda: engine_live_state(
            side,
            views(side, queued),
            views(side, running),
            incoming=views(side, incoming),
            num_kv_tokens_used=used,
            num_kv_tokens_capacity=capacity,
        ),
    )


def _observe_step(scheduler: Any, batch: Any, side: EngineSide) -> None:
    """Feed the online calibration with the batch just processed: its composition and the time from its launch
    (``run_batch`` stamps ``batch.launch_ts``) to the end of its result processing. With the overlap scheduler
    the next batch runs meanwhile, so that time is not the batch's own: no observation then."""
    from tropical_sched.adapters.sglang.logic import batch_composition

    launched_at = getattr(batch, "launch_ts", None)
    if side.calibrator is None or getattr(scheduler, "enable_overlap", False) or not isinstance(launched_at, float):
        return
    composition = batch_composition(batch)
    if composition is None:
        return
    num_decodes, context_tokens, chunks = composition
    if (
        side.observe_step(
            num_decode_seqs=num_decodes,
            num_decode_context_tokens=context_tokens,
            prefill_chunks=chunks,
            duration_s=time.monotonic() - launched_at,
        )
        and side.num_steps_observed % 1024 == side.config.calibration_refresh_steps
    ):
        logger.info("tropical-sched online calibration: %s", side.describe_calibration())


# -- the multiplexing worker ------------------------------------------------------------------------------------


def _around_handle_generate(original: Any, scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    """Admit a request without ``bootstrap_room`` as a colocated instance would (SGLang's decode mode answers it
    with HTTP 400); it reaches :func:`_around_add_request_to_queue`, which queues it locally."""
    from tropical_sched.adapters.sglang.logic import is_local_request

    if not is_local_request(recv_req):
        return original(scheduler, recv_req, *args, **kwargs)
    from sglang.srt.disaggregation.utils import DisaggregationMode

    mode = scheduler.disaggregation_mode
    scheduler.disaggregation_mode = DisaggregationMode.NULL
    try:
        return original(scheduler, recv_req, *args, **kwargs)
    finally:
        scheduler.disaggregation_mode = mode


def _around_decode_next_batch(original: Any, scheduler: Any, running_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """The decode loop's next batch, with the multiplexing worker's own prefills.

    With no local work this is SGLang's decode step. Otherwise the requests whose KV cache arrived join the
    running batch first (as SGLang's decode mode does), then SGLang's colocated step runs with the local queue
    as its waiting queue: it merges the last local prefill into the running batch, schedules the next prefill
    chunk under the Tropical cap (mixed with the decodes under ``--enable-mixed-chunk``), or else a decode step.
    """
    local_queue: list[Any] = getattr(scheduler, _LOCAL_QUEUE_ATTR)
    last_batch = scheduler.last_batch
    last_was_prefill = last_batch is not None and last_batch.forward_mode.is_extend()
    if not local_queue and scheduler.chunked_req is None and not last_was_prefill:
        return original(scheduler, running_batch, *args, **kwargs)
    prebuilt = scheduler.get_new_prebuilt_batch(running_batch)
    if prebuilt:
        scheduler.batch_result_processor.process_batch_result_prebuilt(prebuilt)
        prebuilt.filter_batch()
        if not prebuilt.is_empty():
            if running_batch.is_empty():
                running_batch = prebuilt
            else:
                running_batch.merge_batch(prebuilt)
    transferred, scheduler.waiting_queue = scheduler.waiting_queue, local_queue
    try:
        return scheduler.get_next_batch_to_run(running_batch, last_batch)
    finally:
        setattr(scheduler, _LOCAL_QUEUE_ATTR, scheduler.waiting_queue)
        scheduler.waiting_queue = transferred

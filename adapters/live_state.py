"""An engine's live state (``GET /v1/tropical/state``) from inside vLLM or SGLang, with no engine import.

The engine's scheduler knows what it runs; its API server, in another process, answers HTTP. The scheduler writes
its :class:`~tropical_sched.live_state.EngineLiveState` to a file (:class:`LiveStateWriter`: at most every
``interval_s``, and at once when a request arrives or leaves, while a router has read it within the last few
seconds), replaced atomically; an ASGI middleware in the API server (:class:`LiveStateMiddleware`, vLLM's
``--middleware``) serves that file, its durations aged by the time since it was written, so that a report taken at
the engine's last step reads as of the moment it is served.

Where the file is: ``$TROPICAL_LIVE_STATE_FILE`` if set (in both processes), else
``/dev/shm/tropical-live-state-<API server pid>.json`` (the temporary directory where there is no ``/dev/shm``):
the scheduler runs in a child process of the API server (vLLM's engine core, SGLang's scheduler), so it names the
file by its parent's pid and the middleware by its own.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tropical_sched.adapters.engine_side import EngineSide
from tropical_sched.live_state import LIVE_STATE_PATH, EngineLiveState, LiveDecode
from tropical_sched.serve.openai import error_body

__all__ = [
    "LIVE_STATE_FILE_ENV",
    "LiveStateMiddleware",
    "LiveStateWriter",
    "engine_live_state",
    "live_state_file",
]

LIVE_STATE_FILE_ENV = "TROPICAL_LIVE_STATE_FILE"
"""Environment variable naming the live-state file (both the engine's scheduler and its API server read it)."""


def live_state_file(api_server_pid: int) -> Path:
    """The live-state file of the engine whose API server runs as ``api_server_pid``: in ``/dev/shm`` (memory,
    no disk write per report) where there is one, else the temporary directory; ``$TROPICAL_LIVE_STATE_FILE``
    when set."""
    explicit = os.environ.get(LIVE_STATE_FILE_ENV)
    if explicit:
        return Path(explicit)
    directory = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    return directory / f"tropical-live-state-{api_server_pid}.json"


def engine_live_state(
    engine_side: EngineSide,
    queued: Iterable[Any],
    running: Iterable[Any],
    *,
    incoming: Iterable[Any] = (),
    num_kv_tokens_used: int,
    num_kv_tokens_capacity: int,
) -> EngineLiveState:
    """The report of an engine, from its requests as :class:`EngineSide` reads them.

    Args:
        engine_side: the engine's Tropical half (its clock, SLOs and local order).
        queued: requests waiting for their prefill.
        running: running requests (decodes, and prefills the engine has started).
        incoming: P/D decodes whose KV cache is on its way (reported as decodes that have just started: one
            token, no time streamed, their prompt as context).
        num_kv_tokens_used: KV-cache tokens the engine holds, >= 0.
        num_kv_tokens_capacity: its KV-cache capacity in tokens, >= 1.

    Requests are named by the router's id (``tropical_request_id`` beside the SLOs) where they came with one.
    """
    queued, running, incoming = list(queued), list(running), list(incoming)
    router_ids: dict[str, str] = {}
    for request in (*queued, *running, *incoming):
        router_id = engine_side.router_request_id(request)
        if router_id is not None:
            router_ids[request.request_id] = router_id
    state = EngineLiveState.from_snapshot(
        engine_side.worker_snapshot(queued, running), engine_side.now_s(), router_ids=router_ids
    )
    arriving = tuple(
        LiveDecode(
            request_id=router_ids.get(r.request_id),
            num_context_tokens=max(int(r.num_prompt_tokens) + 1, 1),
            num_generated_tokens=1,
            decoding_for_s=0.0,
            tpot_slo_s=engine_side.slo_ms(r)[1] / 1e3,
        )
        for r in incoming
    )
    return state.model_copy(
        update={
            "decodes": state.decodes + arriving,
            "num_kv_tokens_used": max(int(num_kv_tokens_used), 0),
            "num_kv_tokens_capacity": max(int(num_kv_tokens_capacity), 1),
        }
    )


def _wanted_file(path: Path) -> Path:
    """The file whose time says when a router last asked for the report at ``path`` (the middleware touches it)."""
    return path.with_name(path.name + ".wanted")


class LiveStateWriter:
    """Writes an engine's report to its live-state file, replaced atomically, while someone reads it.

    The middleware touches ``<file>.wanted`` on every read; with no read for ``reader_timeout_s`` the writer stops
    writing (an engine no router asks costs nothing) and removes the file, so that the first read after a pause
    gets 404 rather than an old report, and the next read, one engine step later, a fresh one.

    Args:
        path: the file.
        interval_s: the most time between two reports while the engine runs and is read, seconds, >= 0.
        reader_timeout_s: how long after the last read the writer keeps writing, seconds, > 0.
        clock: seconds, monotonic (tests pass a fake one).
        wall_clock: seconds on the clock of file times (tests pass a fake one).
    """

    def __init__(
        self,
        path: Path,
        interval_s: float = 0.05,
        *,
        reader_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_s >= 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s!r}")
        if not reader_timeout_s > 0:
            raise ValueError(f"reader_timeout_s must be > 0, got {reader_timeout_s!r}")
        self.path = path
        self.interval_s = interval_s
        self.reader_timeout_s = reader_timeout_s
        self._wanted = _wanted_file(path)
        self._clock = clock
        self._wall_clock = wall_clock
        self._checked_at_s = -float("inf")
        self._requests: frozenset[str] | None = None
        self._file_exists = False
        self.num_writes = 0

    def _read_lately(self) -> bool:
        try:
            read_at_s = os.stat(self._wanted).st_mtime
        except FileNotFoundError:
            return False
        return self._wall_clock() - read_at_s <= self.reader_timeout_s

    def maybe_write(self, request_ids: Iterable[str], report: Callable[[], EngineLiveState]) -> bool:
        """Write ``report()`` if ``interval_s`` has passed since the last write (or check) or the engine's requests
        (``request_ids``) changed since, and a router read the file within ``reader_timeout_s``; returns whether
        it wrote."""
        now_s = self._clock()
        requests = frozenset(request_ids)
        if requests == self._requests and now_s - self._checked_at_s < self.interval_s:
            return False
        self._checked_at_s = now_s
        if not self._read_lately():  # checked again in interval_s, or when a request comes or goes
            self._requests = requests
            if self._file_exists:
                self.path.unlink(missing_ok=True)
                self._file_exists = False
            return False
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(report().model_dump_json())
        os.replace(temporary, self.path)
        self._requests, self._file_exists = requests, True
        self.num_writes += 1
        return True

    def remove(self) -> None:
        """Delete the file and its read marker (the engine shuts down: a later API server must not serve a stale
        report)."""
        self.path.unlink(missing_ok=True)
        self._wanted.unlink(missing_ok=True)
        self._file_exists = False


class LiveStateMiddleware:
    """ASGI middleware that answers ``GET /v1/tropical/state`` from the engine's live-state file, aged by the time
    since it was written (vLLM: ``--middleware tropical_sched.adapters.live_state.LiveStateMiddleware``; the
    SGLang plug-in adds it itself). 404 with a message while there is none (the engine runs without the Tropical
    scheduler, or has not stepped since it was asked), 405 for another method. Every other request goes on to the
    engine's own routes untouched (a pure ASGI middleware: streamed answers pass through as they are).

    Args:
        app: the ASGI application it wraps.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != LIVE_STATE_PATH:
            await self.app(scope, receive, send)
            return
        await _live_state_response(scope["method"])(scope, receive, send)


def _live_state_response(method: str) -> Any:
    from starlette.responses import JSONResponse, Response

    if method != "GET":
        message = f"{LIVE_STATE_PATH} answers GET only, got {method}"
        return JSONResponse(error_body(message, "MethodNotAllowed", 405), status_code=405)
    path = live_state_file(os.getpid())
    _wanted_file(path).touch()  # the scheduler writes while someone reads
    try:
        with path.open("rb") as file:  # the file's own time: it may be replaced while this reads
            written_at_s = os.fstat(file.fileno()).st_mtime
            text = file.read()
    except FileNotFoundError:
        message = (
            f"no live state at {path}: the engine runs without the Tropical scheduler, or has not stepped since "
            "it was last asked (it writes the report while it is read; ask again)"
        )
        return JSONResponse(error_body(message, "NotFoundError", 404), status_code=404)
    state = EngineLiveState.model_validate_json(text).aged(time.time() - written_at_s)
    return Response(state.model_dump_json(), media_type="application/json")

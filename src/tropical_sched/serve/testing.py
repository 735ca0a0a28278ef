"""Run HTTP apps (the router's aiohttp application, the fake engines' ASGI ones) on 127.0.0.1 in background
threads, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from aiohttp import web

__all__ = ["ServerProcess", "ServerThread", "free_port", "wait_until_healthy"]


def wait_until_healthy(url: str, process: subprocess.Popen[Any], log: Path, timeout_s: float = 600) -> None:
    """Wait until a server process answers ``GET {url}/health`` with 200 (engines started by tests and benchmarks).

    Raises:
        RuntimeError: the process exited first (the message ends with its log's last 3,000 characters).
        TimeoutError: it did not answer within ``timeout_s`` (same message tail).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{url}: the server exited with {process.returncode}; {log}:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not start in {timeout_s:g} s; {log}:\n{log.read_text(errors='replace')[-3000:]}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _WebServer:
    """An ``aiohttp.web`` application served on its own event loop (run in the server thread)."""

    def __init__(self, app: web.Application, port: int) -> None:
        self.app = app
        self.port = port
        self.started = False
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        from tropical_sched.serve.app import RUNNER_OPTIONS

        runner = web.AppRunner(self.app, shutdown_timeout=1.0, **RUNNER_OPTIONS)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._stopping = asyncio.Event()
            self.started = True
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        if self._stopping is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._stopping.set)


class ServerThread:
    """An HTTP app served on 127.0.0.1 in a daemon thread: an ``aiohttp.web`` application (the router's) with
    aiohttp, an ASGI one (the fake engines') with uvicorn.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``url`` is set once started.

    Args:
        app: the application.
        port: the port; default a free one.
    """

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: _WebServer | uvicorn.Server
        if isinstance(app, web.Application):
            self._server = _WebServer(app, self.port)
        else:
            self._server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    host="127.0.0.1",
                    port=self.port,
                    log_level="warning",
                    lifespan="on",
                    timeout_graceful_shutdown=1,
                )
            )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        """Start serving; returns once the server accepts connections.

        Raises:
            TimeoutError: it did not start in time.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (connections are closed; the port stops answering)."""
        if isinstance(self._server, _WebServer):
            self._server.stop()
        else:
            self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.stop()


class ServerProcess:
    """A server command (an engine, a router) run in a session of its own, its output in a log file.

    Args:
        command: the command line.
        log: file that receives its stdout and stderr.
        env: variables set over this process's environment.
    """

    def __init__(self, command: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.log = log
        self._handle = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            list(command),
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait_healthy(self, url: str, timeout_s: float = 600) -> None:
        """Wait until it answers ``GET {url}/health`` (see :func:`wait_until_healthy`)."""
        wait_until_healthy(url, self.process, self.log, timeout_s)

    def stop(self) -> None:
        """SIGTERM to its whole process group, SIGKILL after 30 s; a process already gone is fine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self._handle.close()

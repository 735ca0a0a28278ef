"""Shared pieces of the command line: one-line errors, warnings as notes, a progress bar, output files checked
before the work starts, and a listening socket checked before a server starts."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from tropical_sched.core.errors import ConfigError

__all__ = [
    "OUTPUT_OPTIONS",
    "OneLineErrorParser",
    "check_output_path",
    "check_outputs",
    "collect_warnings",
    "fraction",
    "http_url",
    "listen_socket",
    "port_number",
    "positive_float",
    "positive_int",
    "progress_bar",
    "report_notes_and_json",
    "require_matplotlib",
    "serve_app",
    "socket_url",
    "stderr",
    "wide_console",
    "write_output",
]

stderr = Console(stderr=True, highlight=False)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``<prog>: error: <what was wrong>`` (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        """Print the error on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Collect warnings raised inside the block as one-line notes (printed by the caller after the results)."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    seen = set()
    for warning in caught:
        text = f"{warning.category.__name__}: {warning.message}"
        if text not in seen:
            seen.add(text)
            notes.append(text)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[tuple[Callable[[str, int], None], Callable[[int], None]]]:
    """A progress bar on stderr with one task per run; yields ``(start_task, advance)`` callbacks."""
    if not enabled:
        yield (lambda name, total: None), (lambda count: None)
        return
    progress = Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=False,
    )
    current: list[TaskID] = []

    def start(name: str, total: int) -> None:
        if not current:
            progress.start()  # lazily, so that an early error prints no empty bar
        current.append(progress.add_task(name, total=total))

    def advance(count: int) -> None:
        if current:
            progress.advance(current[-1], count)

    try:
        yield start, advance
    finally:
        if current:
            progress.stop()


def wide_console(min_width: int = 120) -> Console:
    """A stdout console, at least ``min_width`` columns wide when not writing to a terminal (tables stay legible)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, min_width)
    return console


def report_notes_and_json(notes: list[str], json_path: str | None, data: dict[str, Any]) -> None:
    """Print collected warnings as notes on stderr and, if asked, write ``data`` as JSON to ``json_path``.

    Raises:
        ConfigError: ``json_path`` cannot be written (the message names ``--json``, the path and the reason).
    """
    for note in notes:
        stderr.print(f"note: {note}", markup=False, soft_wrap=True)  # one line each; brackets are text
    if json_path:
        text = json.dumps(data, indent=2) + "\n"
        write_output("--json", json_path, lambda: Path(json_path).write_text(text, encoding="utf-8"))
        stderr.print(f"wrote {json_path}")


# -- argument types ----------------------------------------------------------------------------------------------


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535 (the socket layer would silently wrap larger numbers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number in 1-65535")
    return value


def http_url(text: str) -> str:
    """An argparse type: an ``http://`` or ``https://`` base URL with a host and a valid port."""
    from tropical_sched.serve.config import check_base_url  # pydantic and yaml only: cheap, but not at start-up

    try:
        return check_base_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None


# -- output files ------------------------------------------------------------------------------------------------

OUTPUT_OPTIONS = {"json": ("--json", False), "plot": ("--plot", True), "config_out": ("--config-out", False)}
"""Options that name a file a command writes: argparse dest -> (option, whether its directory is created), checked
by :func:`check_outputs`. Figures go to a results folder that ``--plot`` creates, as ``tropical goodput`` always did;
a ``--json`` path must be in an existing directory."""


def check_output_path(option: str, path: str, *, create_directory: bool = False) -> None:
    """Fail now, not after a long run, if ``path`` (the value of ``option``) cannot be written.

    Args:
        option: the option that named the path, for the message.
        path: the file to be written.
        create_directory: create a missing directory (and its parents) now; otherwise a missing directory is an
            error (a mistyped directory, not something to create).

    Raises:
        ConfigError: ``"<option> <path>: cannot write: <reason>"``.
    """
    if not path:
        raise ConfigError(f"{option}: the path is empty")
    target = Path(path)
    directory = target.parent
    if create_directory and not directory.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{option} {path}: cannot write: cannot create directory {directory}: {exc.strerror or exc}"
            ) from None
    reason = None
    if target.is_dir():
        reason = "it is a directory"
    elif not directory.exists():
        reason = f"directory {directory} does not exist"
    elif not directory.is_dir():
        reason = f"{directory} is not a directory"
    elif not os.access(directory, os.W_OK | os.X_OK):
        reason = f"directory {directory} is not writable"
    elif target.exists() and not os.access(target, os.W_OK):
        reason = "the file exists and is not writable"
    if reason:
        raise ConfigError(f"{option} {path}: cannot write: {reason}")


def write_output(option: str, path: str | Path, write: Callable[[], object]) -> None:
    """Call ``write``, turning an operating-system error (disk full, a directory removed meanwhile) into one line.

    Raises:
        ConfigError: ``"<option> <path>: cannot write: <reason>"``.
    """
    try:
        write()
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write: {exc.strerror or exc}") from None


def require_matplotlib(option: str = "--plot") -> None:
    """Fail now, not after a long run, if matplotlib (the ``plot`` extra) is missing.

    Raises:
        ConfigError: names ``option`` and the extra to install.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f"{option} needs matplotlib: pip install 'tropical-sched[plot]'") from None


def check_outputs(args: argparse.Namespace) -> None:
    """Check every output file of a parsed command line (:data:`OUTPUT_OPTIONS`), and matplotlib for ``--plot``.

    Raises:
        ConfigError: an output cannot be written, or a plot cannot be drawn.
    """
    for dest, (option, create_directory) in OUTPUT_OPTIONS.items():
        path = getattr(args, dest, None)
        if path is not None:
            check_output_path(option, path, create_directory=create_directory)
    if getattr(args, "plot", None):
        require_matplotlib("--plot")


# -- servers -----------------------------------------------------------------------------------------------------


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, as uvicorn would bind it (IPv6 if the host has a colon).

    Binding here, before the server starts, turns "address already in use" and an unknown host into one line
    instead of a log record among the server's start-up lines; the server then serves on this very socket.

    Raises:
        ConfigError: the host does not resolve, or the address cannot be bound (names ``host:port``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
        sock.bind((host, port))
    except socket.gaierror as exc:
        sock.close()
        raise ConfigError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    except OSError as exc:
        sock.close()
        hints = {
            errno.EADDRINUSE: "address already in use (another server runs there; choose another --port)",
            errno.EADDRNOTAVAIL: "not an address of this machine (--host 0.0.0.0 listens on all of them)",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
        }
        raise ConfigError(f"cannot listen on {shown}: {hints.get(exc.errno or 0, exc.strerror or str(exc))}") from None
    return sock


def serve_app(app: Any, sock: socket.socket, *, log_level: str, keep_alive_s: float = 5.0) -> int:
    """Serve an HTTP app on a socket from :func:`listen_socket` until interrupted: an ``aiohttp.web`` application
    (the router's) with aiohttp on uvloop, an ASGI one (the fake engine's) with uvicorn.

    Args:
        app: the application.
        sock: the bound socket.
        log_level: the servers' log level (``critical`` ... ``debug``).
        keep_alive_s: how long an idle client connection is kept open, seconds (uvicorn's default 5 s).

    Returns:
        The exit status: 0, or 1 if the app failed to start (the server has logged why).
    """
    from aiohttp import web

    if isinstance(app, web.Application):
        import asyncio
        import logging

        from tropical_sched.serve.app import RUNNER_OPTIONS

        loop: asyncio.AbstractEventLoop
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # no uvloop on Windows
            loop = asyncio.new_event_loop()

        logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
        started = False

        async def on_startup(app: web.Application) -> None:
            nonlocal started
            started = True

        app.on_startup.append(on_startup)
        try:
            web.run_app(
                app,
                sock=sock,
                print=None,
                keepalive_timeout=keep_alive_s,
                shutdown_timeout=5.0,
                loop=loop,
                **RUNNER_OPTIONS,
            )
        except Exception:
            logging.getLogger("tropical_sched.serve").exception("the application failed to start")
            if started:
                raise
        finally:
            sock.close()
        return 0 if started else 1

    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=max(1, round(keep_alive_s)))
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def socket_url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket, with the port it really got."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

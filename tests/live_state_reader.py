"""Reading an engine's live state as a router does, for the engine tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import httpx

from tropical_sched.live_state import LIVE_STATE_PATH, EngineLiveState, parse_live_state


@contextlib.contextmanager
def reading_live_state(url: str, interval_s: float = 0.05) -> Iterator[list[EngineLiveState]]:
    """Read ``url``'s live state every ``interval_s`` in a thread while the block runs; yields the reports that
    came back (an engine answers 404 until its first step after the first read)."""
    states: list[EngineLiveState] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            response = httpx.get(url + LIVE_STATE_PATH, timeout=10)
            if response.status_code == 200:
                states.append(parse_live_state(response.content, url + LIVE_STATE_PATH))
            done.wait(interval_s)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield states
    finally:
        done.set()
        reader.join(timeout=30)

"""Reading an engine's live state as a router does, for the engine tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

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


def stream_while_reading(
    url: str, body: dict[str, Any], request_id: str, timeout_s: float = 180
) -> tuple[EngineLiveState | None, EngineLiveState]:
    """Stream one completion from ``url`` while reading its live state as a router does; the first report that
    shows ``request_id`` decoding (``None`` if none did) and the last report, read once the engine's report has no
    decode left (or after 10 s)."""
    with reading_live_state(url) as states:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout_s) as response:
            assert response.status_code == 200
            for _ in response.iter_lines():
                pass
        decoding = next((s for s in states if any(d.request_id == request_id for d in s.decodes)), None)
        deadline = time.monotonic() + 10
        while (not states or states[-1].decodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        return decoding, states[-1]

"""An engine's live state from inside the engine (tropical_sched.adapters.live_state), without an engine: the report
built from stand-in requests, the writer's throttle and atomic file, and the API server's middleware."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.test_vllm_logic import side, vllm_request
from tropical_sched.adapters.live_state import (
    LIVE_STATE_FILE_ENV,
    LiveStateMiddleware,
    LiveStateWriter,
    engine_live_state,
    live_state_file,
)
from tropical_sched.live_state import (
    LIVE_STATE_PATH,
    EngineLiveState,
    LiveDecode,
    LivePrefill,
    LiveStepTime,
    parse_live_state,
)


def test_the_report_names_the_routers_requests_and_counts_incoming_kv_as_decodes() -> None:
    engine, clock = side("multiplexing")
    decode = vllm_request("d", 100, computed=100, outputs=1, tropical_tpot_slo_ms=50, tropical_request_id="r-1")
    engine.observe_outputs([decode])  # first token at 100.0
    clock.now = 100.5
    decode.num_output_tokens, decode.num_tokens = 11, 111
    partial = vllm_request("p", 500, computed=128, arrival=100.2, tropical_ttft_slo_ms=900)
    queued = vllm_request("q", 64, arrival=100.4, tropical_request_id="r-2")
    incoming = vllm_request("i", 300, arrival=100.3, tropical_tpot_slo_ms=40, tropical_request_id="r-3")

    state = engine_live_state(
        engine, [queued], [decode, partial], incoming=[incoming], num_kv_tokens_used=700, num_kv_tokens_capacity=4096
    )

    assert [(p.request_id, p.num_prompt_tokens, p.num_computed_tokens, p.ttft_slo_s, p.tpot_slo_s) for p in
            state.prefills] == [(None, 500, 128, 0.9, 0.1), ("r-2", 64, 0, 10.0, 0.1)]  # fmt: skip
    assert [p.waited_s for p in state.prefills] == pytest.approx([0.3, 0.1])
    assert state.decodes == (
        LiveDecode(request_id="r-1", num_context_tokens=111, num_generated_tokens=11, decoding_for_s=0.5,
                   tpot_slo_s=0.05),
        LiveDecode(request_id="r-3", num_context_tokens=301, num_generated_tokens=1, decoding_for_s=0.0,
                   tpot_slo_s=0.04),
    )  # fmt: skip
    assert (state.num_kv_tokens_used, state.num_kv_tokens_capacity) == (700, 4096)
    assert state.step_time == LiveStepTime.from_model(engine.step_time)  # the model the engine predicts with


def test_aged_reports_add_the_time_since_they_were_taken() -> None:
    state = EngineLiveState(
        prefills=(LivePrefill(num_prompt_tokens=10, num_computed_tokens=0, waited_s=0.2, ttft_slo_s=1.0),),
        decodes=(LiveDecode(num_context_tokens=20, num_generated_tokens=3, decoding_for_s=0.5, tpot_slo_s=0.1),),
        num_kv_tokens_capacity=100,
    )
    aged = state.aged(0.25)
    assert aged.prefills[0].waited_s == pytest.approx(0.45)
    assert aged.decodes[0].decoding_for_s == pytest.approx(0.75)
    assert state.aged(0.0) is state
    assert state.aged(-1.0) is state  # a clock step backwards: as taken


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _report(num_decodes: int) -> EngineLiveState:
    decodes = tuple(
        LiveDecode(num_context_tokens=5, num_generated_tokens=1, decoding_for_s=0.0, tpot_slo_s=0.1)
        for _ in range(num_decodes)
    )
    return EngineLiveState(decodes=decodes, num_kv_tokens_capacity=100)


def test_the_writer_throttles_but_writes_at_once_when_requests_come_or_go(tmp_path: Path) -> None:
    clock, wall = FakeClock(), FakeClock()
    path = tmp_path / "state.json"
    writer = LiveStateWriter(path, interval_s=0.02, clock=clock, wall_clock=wall)
    (tmp_path / "state.json.wanted").touch()  # a router reads it
    wall.now = time.time()
    assert writer.maybe_write(["a"], lambda: _report(1))
    clock.now = 0.01
    assert not writer.maybe_write(["a"], lambda: _report(1))  # same requests, within the interval
    assert writer.maybe_write(["a", "b"], lambda: _report(2))  # one arrived
    assert parse_live_state(path.read_bytes(), str(path)) == _report(2)
    assert writer.maybe_write([], lambda: _report(0))  # both left: an idle engine's last report says so
    clock.now = 0.05
    assert writer.maybe_write([], lambda: _report(0))  # the interval passed
    assert writer.num_writes == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.wanted"]  # no temporary file
    writer.remove()
    assert not path.exists()
    assert not (tmp_path / "state.json.wanted").exists()
    writer.remove()  # already gone: fine
    with pytest.raises(ValueError, match="interval_s must be >= 0, got -1"):
        LiveStateWriter(path, interval_s=-1)
    with pytest.raises(ValueError, match="reader_timeout_s must be > 0, got 0"):
        LiveStateWriter(path, reader_timeout_s=0)


def test_the_writer_writes_only_while_a_router_reads_and_removes_what_it_wrote_when_none_does(
    tmp_path: Path,
) -> None:
    clock, wall = FakeClock(), FakeClock()
    path = tmp_path / "state.json"
    wanted = tmp_path / "state.json.wanted"
    writer = LiveStateWriter(path, interval_s=0.02, reader_timeout_s=5.0, clock=clock, wall_clock=wall)
    assert not writer.maybe_write(["a"], lambda: _report(1))  # nobody has asked
    assert not path.exists()
    wanted.touch()
    read_at = wanted.stat().st_mtime
    wall.now = read_at + 1.0
    assert not writer.maybe_write(["a"], lambda: _report(1))  # checked again only after the interval ...
    assert writer.maybe_write(["a", "b"], lambda: _report(2))  # ... or at once when a request comes
    assert path.exists()
    clock.now, wall.now = 0.1, read_at + 6.0  # no read for 6 s
    assert not writer.maybe_write(["a", "b"], lambda: _report(2))
    assert not path.exists()  # the next reader gets 404, not this old report
    assert writer.num_writes == 1


def test_the_file_is_named_by_the_api_servers_pid_unless_the_environment_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(LIVE_STATE_FILE_ENV, raising=False)
    assert live_state_file(1234).name == "tropical-live-state-1234.json"
    monkeypatch.setenv(LIVE_STATE_FILE_ENV, str(tmp_path / "x.json"))
    assert live_state_file(1234) == tmp_path / "x.json"


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Starlette, Path]:
    path = tmp_path / "state.json"
    monkeypatch.setenv(LIVE_STATE_FILE_ENV, str(path))

    async def completions(request: object) -> PlainTextResponse:
        return PlainTextResponse("the engine's own route")

    routes = [Route("/v1/completions", completions, methods=["POST"])]
    # as vLLM's api_server adds a class given to --middleware: app.add_middleware(cls)
    return Starlette(routes=routes, middleware=[Middleware(LiveStateMiddleware)]), path


def test_the_middleware_serves_the_file_aged_and_leaves_other_routes_alone(app: tuple[Starlette, Path]) -> None:
    asyncio.run(_serve_through_the_middleware(*app))


async def _serve_through_the_middleware(starlette_app: Starlette, path: Path) -> None:
    transport = httpx.ASGITransport(app=starlette_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        missing = await client.get(LIVE_STATE_PATH)
        assert missing.status_code == 404
        assert "runs without the Tropical scheduler" in missing.json()["error"]["message"]
        assert path.with_name("state.json.wanted").exists()  # the read asked the engine for reports

        LiveStateWriter(path).maybe_write(["a"], lambda: _report(1))
        written_at_s = time.time() - 2.0
        os.utime(path, (written_at_s, written_at_s))  # written two seconds ago
        served = await client.get(LIVE_STATE_PATH)
        assert served.status_code == 200
        state = parse_live_state(served.content, LIVE_STATE_PATH)
        assert 2.0 <= state.decodes[0].decoding_for_s < 2.5

        wrong = await client.post(LIVE_STATE_PATH)
        assert wrong.status_code == 405
        assert "answers GET only, got POST" in wrong.json()["error"]["message"]
        assert (await client.post("/v1/completions")).text == "the engine's own route"


def test_the_engines_live_state_interval_is_configured_in_its_tropical_section() -> None:
    from tropical_sched.adapters.vllm.config import parse_engine_side_config
    from tropical_sched.core import ConfigError

    assert parse_engine_side_config({"tropical": {}}).live_state_interval_s == 0.05
    assert parse_engine_side_config({"tropical": {"live_state_interval_s": None}}).live_state_interval_s is None
    with pytest.raises(ConfigError, match=r"--additional-config tropical\.live_state_interval_s.*-1"):
        parse_engine_side_config({"tropical": {"live_state_interval_s": -1}})

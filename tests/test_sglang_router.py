"""The router's SGLang path against a stand-in SGLang P/D pair: concurrent halves paired by bootstrap room,
SLOs in ``custom_params``, a failing prefill half, and load readings from ``/v1/loads``."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tropical_sched.core import Slo
from tropical_sched.serve.config import Engine, InstanceConfig, RouterConfig
from tropical_sched.serve.engines import SglangDialect, VllmDialect, dialect_for, prometheus_load, sglang_loads
from tropical_sched.serve.router import Router
from tropical_sched.serve.testing import ServerThread

OUTPUT = ["a", "b", "c", "d"]


class FakeSglangPair:
    """A prefill and a decode-mode SGLang (``prefill_app``, ``decode_app``): a P/D request completes only when
    both halves with the same ``bootstrap_room`` arrived, as SGLang's bootstrap handshake requires."""

    def __init__(self, *, prefill_status: int = 200) -> None:
        self.prefill_status = prefill_status
        self.prefill_bodies: list[dict[str, Any]] = []
        self.decode_bodies: list[dict[str, Any]] = []
        self.local_bodies: list[dict[str, Any]] = []
        self.decode_cancelled = 0
        self._arrived: dict[tuple[str, int], asyncio.Event] = {}
        self.prefill_app, self.decode_app = (
            Starlette(
                routes=[
                    Route("/v1/completions", handler, methods=["POST"]),
                    Route("/health", lambda request: Response()),
                    Route("/v1/loads", loads),
                ]
            )
            for handler, loads in ((self._prefill, self._prefill_loads), (self._decode, self._decode_loads))
        )

    def _event(self, side: str, room: int) -> asyncio.Event:
        return self._arrived.setdefault((side, room), asyncio.Event())

    async def _prefill_loads(self, request: HttpRequest) -> Response:
        return JSONResponse({"loads": [{"num_used_tokens": 0, "max_total_num_tokens": 16000}]})

    async def _decode_loads(self, request: HttpRequest) -> Response:
        used = 4000
        return JSONResponse(
            {
                "loads": [
                    {
                        "num_running_reqs": 2,
                        "num_waiting_reqs": 1,
                        "num_used_tokens": used,
                        "max_total_num_tokens": 16000,
                        "disaggregation": {"decode_prealloc_queue_reqs": 1, "decode_transfer_queue_reqs": 0},
                    }
                ]
            }
        )

    async def _prefill(self, request: HttpRequest) -> Response:
        body = await request.json()
        room = body["bootstrap_room"]
        self.prefill_bodies.append(body)
        self._event("prefill", room).set()
        await asyncio.wait_for(self._event("decode", room).wait(), 5)
        if self.prefill_status != 200:
            return JSONResponse({"object": "error", "message": "prefill died"}, status_code=self.prefill_status)
        return JSONResponse({"choices": [{"index": 0, "text": OUTPUT[0], "finish_reason": "length"}]})

    async def _decode(self, request: HttpRequest) -> Response:
        body = await request.json()
        room = body.get("bootstrap_room")
        if room is None:
            self.local_bodies.append(body)
        else:
            self.decode_bodies.append(body)
            self._event("decode", room).set()
        return StreamingResponse(self._stream(room), media_type="text/event-stream")

    async def _stream(self, room: int | None) -> Any:
        try:
            if room is not None:
                await asyncio.wait_for(self._event("prefill", room).wait(), 5)
                if self.prefill_status != 200:
                    await asyncio.sleep(30)  # KV that never comes: SGLang's decode half waits
            for index, text in enumerate(OUTPUT):
                chunk = {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
                chunk["usage"] = {"completion_tokens": index + 1}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.decode_cancelled += 1
            raise


class Cluster:
    def __init__(self, pair: FakeSglangPair, route_order: str) -> None:
        self.engines = [ServerThread(pair.prefill_app).start(), ServerThread(pair.decode_app).start()]
        self.prefill_url, self.mux_url = (engine.url for engine in self.engines)
        config = RouterConfig.model_validate(
            {
                "policy_options": {"route_order": route_order},
                "health_interval_s": 0.1,
                "metrics_interval_s": 0.05,
                "max_retries": 0,
                "instances": [
                    {"url": self.prefill_url, "role": "prefill", "engine": "sglang", "bootstrap_port": 8999},
                    {"url": self.mux_url, "role": "multiplexing", "engine": "sglang"},
                ],
            }
        )
        self.router = Router(config)
        self.server = ServerThread(self.router.app).start()
        self.url = self.server.url


@pytest.fixture
def cluster_factory() -> Iterator[Any]:
    clusters: list[Cluster] = []

    def make(pair: FakeSglangPair, route_order: str = "prefill-first") -> Cluster:
        clusters.append(Cluster(pair, route_order))
        return clusters[-1]

    yield make
    for cluster in clusters:
        for server in (cluster.server, *cluster.engines):
            server.stop()


def _complete(url: str, **extra: Any) -> httpx.Response:
    body = {"model": "tiny", "prompt": "the prefill queue of decode", "max_tokens": 4, **extra}
    return httpx.post(url + "/v1/completions", json=body, headers={"x-slo-tpot-ms": "80"}, timeout=10)


def test_pd_path_sends_both_halves_at_once_paired_by_a_fresh_room(cluster_factory: Any) -> None:
    pair = FakeSglangPair()
    cluster = cluster_factory(pair)
    responses = [_complete(cluster.url) for _ in range(2)]
    assert [r.status_code for r in responses] == [200, 200]
    assert responses[0].json()["choices"][0]["text"] == "".join(OUTPUT)
    assert len(pair.prefill_bodies) == len(pair.decode_bodies) == 2
    assert pair.local_bodies == []
    rooms = [b["bootstrap_room"] for b in pair.prefill_bodies]
    assert sorted(rooms) == sorted(b["bootstrap_room"] for b in pair.decode_bodies)
    assert rooms[0] != rooms[1]
    for prefill, decode in zip(pair.prefill_bodies, pair.decode_bodies, strict=True):
        assert (prefill["bootstrap_host"], prefill["bootstrap_port"]) == ("127.0.0.1", 8999)
        assert (decode["bootstrap_host"], decode["bootstrap_port"]) == ("127.0.0.1", 8999)
        assert prefill["stream"] is False
        assert decode["stream"] is True
        assert decode["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
        assert decode["custom_params"]["tropical_tpot_slo_ms"] == 80.0
        assert prefill["custom_params"] == decode["custom_params"]
    assert cluster.router.num_tracked == 0
    assert cluster.router.num_counted_on_instances == 0


def test_multiplexed_path_sends_a_plain_request_to_the_multiplexing_worker(cluster_factory: Any) -> None:
    pair = FakeSglangPair()
    cluster = cluster_factory(pair, "multiplex-first")
    response = _complete(cluster.url, custom_params={"mine": 1})
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == "".join(OUTPUT)
    [body] = pair.local_bodies
    assert "bootstrap_room" not in body
    assert body["custom_params"]["mine"] == 1  # the client's own custom_params are kept
    assert body["custom_params"]["tropical_tpot_slo_ms"] == 80.0
    assert pair.prefill_bodies == []


def test_a_failing_prefill_half_ends_the_waiting_decode_half_with_a_clear_error(cluster_factory: Any) -> None:
    pair = FakeSglangPair(prefill_status=500)
    cluster = cluster_factory(pair)
    started = time.monotonic()
    response = _complete(cluster.url)
    assert time.monotonic() - started < 5  # not the 30 s the decode half would wait for its KV cache
    assert response.status_code == 502
    assert "prefill died" in response.json()["error"]["message"]
    for _ in range(100):  # the abandoned decode half is cancelled upstream
        if pair.decode_cancelled:
            break
        time.sleep(0.02)
    assert pair.decode_cancelled == 1
    assert cluster.router.num_tracked == 0
    assert cluster.router.num_counted_on_instances == 0


def test_router_reads_sglang_loads(cluster_factory: Any) -> None:
    pair = FakeSglangPair()
    cluster = cluster_factory(pair)
    mux = cluster.router.instances[1]
    for _ in range(100):
        if mux.engine_kv_usage_fraction is not None:
            break
        time.sleep(0.02)
    assert mux.engine_kv_usage_fraction == pytest.approx(0.25)
    assert mux.engine_num_requests == 4  # running + waiting + KV-transfer queues


def test_load_parsers() -> None:
    assert sglang_loads({"loads": [{"num_used_tokens": 10, "max_total_num_tokens": 100, "num_running_reqs": 3}]}) == (
        pytest.approx(0.1),
        3.0,
    )
    with pytest.raises(ValueError, match="'loads'"):
        sglang_loads({"loads": []})
    text = (
        'sglang:token_usage{tp_rank="0"} 0.5\nsglang:num_running_reqs{tp_rank="0"} 3\n'
        'sglang:num_queue_reqs{tp_rank="0"} 2\n'
    )
    assert prometheus_load(text) == (0.5, 5.0)
    assert prometheus_load("vllm:kv_cache_usage_perc 0.2\n") == (0.2, None)
    assert prometheus_load("other_metric 1\n") == (None, None)


def test_dialects() -> None:
    assert isinstance(dialect_for(Engine.SGLANG), SglangDialect)
    assert isinstance(dialect_for(Engine.VLLM), VllmDialect)
    slo = Slo(ttft_s=0.5, tpot_s=0.05)
    dialect = SglangDialect(random.Random(0))
    handoff = dialect.handoff(InstanceConfig(url="http://prefill.local:8000", role="prefill", engine="sglang"))
    assert handoff is not None
    assert handoff["bootstrap_host"] == "prefill.local"
    assert handoff["bootstrap_port"] == 8998  # SGLang's default
    assert 0 <= handoff["bootstrap_room"] < 2**63
    assert VllmDialect().handoff(InstanceConfig(url="http://p:1", role="prefill")) is None
    with pytest.raises(ValidationError, match="bootstrap_port"):
        InstanceConfig(url="http://p:1", role="prefill", engine="sglang", bootstrap_port=70000)
    with pytest.raises(ValueError, match="handoff"):
        dialect.prefill_body({"prompt": "x"}, slo, None)
    body = dialect.prefill_body({"prompt": "x", "stream": True, "stream_options": {}}, slo, handoff)
    assert body["stream"] is False
    assert "stream_options" not in body
    assert body["custom_params"] == {"tropical_ttft_slo_ms": 500.0, "tropical_tpot_slo_ms": 50.0}


def test_server_process_reports_an_early_exit_with_its_log_and_stops_cleanly(tmp_path: Any) -> None:
    import sys

    from tropical_sched.serve.testing import ServerProcess

    command = [sys.executable, "-c", "print('engine failed: no GPU'); raise SystemExit(3)"]
    server = ServerProcess(command, tmp_path / "x.log")
    with pytest.raises(RuntimeError, match=r"exited with 3(.|\n)*engine failed: no GPU"):
        server.wait_healthy("http://127.0.0.1:9", timeout_s=30)
    server.stop()  # already gone: no error

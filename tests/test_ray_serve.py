"""Tropical inside Ray Serve (marked ``ray``; runs in its own virtual environment from .ci/run): a local Ray
cluster, fake engines as the instances, requests through Ray Serve's HTTP proxy, and straight to the ingress
replica with Ray Serve's direct ingress, alone and in its throughput-optimized mode."""

from __future__ import annotations

import asyncio
import json
import os
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

with warnings.catch_warnings():  # Ray's import warns (pydantic deprecations), and warnings are errors here
    warnings.simplefilter("ignore")
    ray = pytest.importorskip("ray")
    from ray import serve

    from tropical_sched.integrations.ray_serve import batched_chunks, build_tropical_app, direct_ingress_env

from tropical_sched.predictors import Profile, load_profile, time_scaled, write_profile_file
from tropical_sched.serve.decision_log import read_decision_log
from tropical_sched.serve.fake_engine import FakeEngine
from tropical_sched.serve.testing import ServerThread, free_port

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore")]

SCALE = 0.05


class RayCluster:
    def __init__(self, tmp: Any, mode: str) -> None:
        scaled = time_scaled(load_profile("a100-llama2-70b-tp4").file, SCALE)
        path = tmp / "scaled.json"
        write_profile_file(scaled, path)
        profile = Profile(scaled)
        roles = ("prefill", "multiplexing", "multiplexing")
        self.engines = [
            FakeEngine(profile, engine_id=f"e{i}", policy="tropical", role=role)  # type: ignore[arg-type]
            for i, role in enumerate(roles)
        ]
        self.servers = [ServerThread(engine.app).start() for engine in self.engines]
        self.decision_log = tmp / "decisions.jsonl"  # each router process writes decisions.jsonl.<pid>
        config = {
            "policy": "tropical",
            "policy_options": {"route_order": "prefill-first"},
            "profile": str(path),
            "model": "fake-model",
            "decision_log": str(self.decision_log),
            "instances": [{"url": s.url, "role": role} for s, role in zip(self.servers, roles, strict=True)],
        }
        # Ray's processes inherit the environment at ray.init: direct ingress puts the ingress replica on its port
        direct_ingress = mode != "proxy"
        optimized = mode == "throughput-optimized"
        self.env = {}
        if direct_ingress:
            self.env = direct_ingress_env(free_port(), free_port(), throughput_optimized=optimized)
        os.environ.update(self.env)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_tropical_app(config, stats_period_s=0.1), route_prefix="/")
        if direct_ingress:  # not the proxy's port: what answers there is the ingress replica itself
            port = int(self.env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"])
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        serve.shutdown()
        ray.shutdown()
        for name in self.env:
            os.environ.pop(name, None)
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module", params=["proxy", "direct-ingress", "throughput-optimized"])
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[RayCluster]:
    running = RayCluster(tmp_path_factory.mktemp("ray"), request.param)
    yield running
    running.close()


def test_requests_through_ray_serve_are_routed_by_tropical(cluster: RayCluster) -> None:
    """Streamed and whole completions come back through Ray Serve's HTTP proxy; the requests the policy sent
    through P/D reached the prefill engine with the decode half on a multiplexing one, with the SLOs and the
    request id the ingress gave them."""
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        for i in range(6):
            body = {"prompt": [1] * (200 + 50 * i), "max_tokens": 8, "stream": i % 2 == 0}
            response = client.post("/v1/completions", json=body, headers={"x-slo-tpot-ms": "90"})
            assert response.status_code == 200, response.text
            assert response.headers["x-tropical-route"] in ("prefill", "multiplex")
            if body["stream"]:
                events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                chunks = [json.loads(event) for event in events[:-1]]
                assert sum(bool(chunk["choices"][0]["text"]) for chunk in chunks) == 8
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
                assert all("usage" not in chunk for chunk in chunks)  # per-chunk usage: not asked for
            else:
                answer = response.json()
                assert answer["usage"]["completion_tokens"] == 8
    prefill, *multiplexing = cluster.engines
    assert prefill.stats.num_remote_decodes >= 1
    assert sum(engine.stats.num_remote_prefills for engine in multiplexing) == prefill.stats.num_remote_decodes
    xargs = prefill.stats.xargs[-1]
    assert str(xargs["tropical_request_id"]).startswith("ray-")
    assert xargs["tropical_tpot_slo_ms"] == 90.0
    # the routers' decision logs: a line per request, written when the ingress tells them it finished
    entries: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(entries) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
        entries = [e for path in cluster.decision_log.parent.glob("decisions.jsonl.*") for e in read_decision_log(path)]
    assert len(entries) == 6
    for entry in entries:
        assert entry["route"] in ("prefill", "multiplex")
        assert entry["num_output_tokens"] == 8
        assert entry["tpot_slo_s"] == pytest.approx(0.09)
        assert 0 < entry["ttft_s"] < 60
        assert entry["worker"]
        assert entry["reason"]
        assert (entry["decode_worker"] is not None) == (entry["route"] == "prefill")


def test_a_malformed_request_gets_a_4xx_naming_the_field(cluster: RayCluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        bad = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": -3})
        assert bad.status_code == 400
        assert "max_tokens" in bad.json()["error"]["message"]
        slo = client.post("/v1/completions", json={"prompt": [1, 2]}, headers={"x-slo-ttft-ms": "soon"})
        assert slo.status_code == 400
        assert "x-slo-ttft-ms" in slo.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": [1] * 50, "max_tokens": 2}).status_code == 200


def test_the_direct_ingress_environment_names_its_ports_and_refuses_bad_ones() -> None:
    env = direct_ingress_env(30100, 40100)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "30100",
        "30101",
    )
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] == "40100"
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in env
    assert direct_ingress_env(30100, 40100, throughput_optimized=True) == {**env, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    with pytest.raises(ValueError, match="http_port must be a TCP port"):
        direct_ingress_env(0, 40100)
    with pytest.raises(ValueError, match="must differ"):
        direct_ingress_env(30100, 30100)


def test_an_sglang_prefill_instance_is_refused_with_the_reason() -> None:
    from tropical_sched.core import ConfigError

    config = {
        "instances": [
            {"url": "http://127.0.0.1:9001", "role": "prefill", "engine": "sglang", "bootstrap_port": 8998},
            {"url": "http://127.0.0.1:9002", "role": "multiplexing", "engine": "sglang"},
        ]
    }
    with pytest.raises(ConfigError, match=r"instances\[0\]: a sglang prefill instance"):
        build_tropical_app(config)


def test_streamed_bytes_cross_in_batches_after_the_first_token() -> None:
    """The first chunk crosses at once (the client's TTFT); later ones are joined per window, none lost, and an
    error after some bytes still reaches the caller after them."""

    async def tokens(gaps_s: list[float], fail: bool = False) -> AsyncIterator[bytes]:
        for index, gap_s in enumerate(gaps_s):
            await asyncio.sleep(gap_s)
            yield f"t{index};".encode()
        if fail:
            raise ConnectionResetError("engine went away")

    async def collect(gaps_s: list[float], interval_s: float) -> list[tuple[float, bytes]]:
        started = time.perf_counter()
        return [(time.perf_counter() - started, chunk) async for chunk in batched_chunks(tokens(gaps_s), interval_s)]

    gaps_s = [0.0] + [0.01] * 10
    items = asyncio.run(collect(gaps_s, 0.05))
    assert items[0][1] == b"t0;"
    assert b"".join(chunk for _, chunk in items) == b"".join(f"t{i};".encode() for i in range(11))
    assert 2 <= len(items) <= 5  # 10 tokens 10 ms apart in 50 ms windows, not 11 items
    unbatched = asyncio.run(collect(gaps_s, 0.0))
    assert len(unbatched) == 11

    received: list[bytes] = []

    async def failing() -> None:
        async for chunk in batched_chunks(tokens([0.0, 0.0], fail=True), 0.05):
            received.append(chunk)

    with pytest.raises(ConnectionResetError):
        asyncio.run(failing())
    assert b"".join(received) == b"t0;t1;"

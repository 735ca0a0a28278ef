"""Property tests of the router against fake engines: whatever mix of requests arrives (valid, malformed, hostile,
streamed or not, clients that leave early), every request gets a status and nothing stays counted in flight."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_router import scaled_profile  # noqa: F401 - the fixture is used by name
from tropical_sched.predictors import Profile
from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.fake_engine import FakeEngine
from tropical_sched.serve.router import Router
from tropical_sched.serve.testing import ServerThread

pytestmark = pytest.mark.slow


class _Deployment:
    """One prefill and two multiplexing fake engines behind a Tropical router."""

    def __init__(self, profile: tuple[str, Profile]) -> None:
        path, scaled = profile
        roles = ["prefill", "multiplexing", "multiplexing"]
        self.engines = [FakeEngine(scaled, engine_id=f"e{i}", policy="tropical", role=r) for i, r in enumerate(roles)]  # type: ignore[arg-type]
        self.servers = [ServerThread(engine.app).start() for engine in self.engines]
        config = RouterConfig.model_validate(
            {
                "profile": path,
                "health_interval_s": 0.1,
                "instances": [{"url": s.url, "role": r} for s, r in zip(self.servers, roles, strict=True)],
            }
        )
        self.router = Router(config)
        self.server = ServerThread(self.router.app).start()

    def close(self) -> None:
        for server in (self.server, *self.servers):
            server.stop()


@pytest.fixture(scope="module")
def deployment(scaled_profile: tuple[str, Profile]) -> Iterator[_Deployment]:  # noqa: F811
    deployment = _Deployment(scaled_profile)
    yield deployment
    deployment.close()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
_fields = st.sampled_from(
    ["prompt", "max_tokens", "stream", "stream_options", "n", "model", "vllm_xargs", "messages", "min_tokens"]
)
_valid = st.fixed_dictionaries(
    {
        "prompt": st.one_of(
            st.lists(st.integers(10, 200), min_size=1, max_size=1500), st.text(min_size=1, max_size=200)
        ),
        "max_tokens": st.integers(1, 6),
        "stream": st.booleans(),
    }
)
_mutated = st.tuples(_valid, _fields, _json_values).map(lambda t: {**t[0], t[1]: t[2]})
_headers = st.dictionaries(
    st.sampled_from(["x-slo-ttft-ms", "x-slo-tpot-ms", "x-llm-d-slo-ttft-ms"]),
    st.sampled_from(["100", "5000", "1", "0", "-3", "nan", "1e-300", "abc", "250.5"]),
    max_size=2,
)
_requests = st.lists(
    st.tuples(
        st.sampled_from(["completions", "chat"]),
        st.one_of(_valid, _mutated, _json_values),
        _headers,
        st.booleans(),  # leave after the first event
    ),
    min_size=1,
    max_size=8,
)


async def _send(client: httpx.AsyncClient, url: str, kind: str, body: Any, headers: dict, leave: bool) -> int:
    if kind == "chat" and isinstance(body, dict) and "prompt" in body:
        body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "hi"}]}
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    async with client.stream("POST", url + path, content=json.dumps(body), headers=headers) as response:
        if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
            async for line in response.aiter_lines():
                if leave:
                    return response.status_code
                if line == "data: [DONE]":
                    break
        else:
            await response.aread()
        return response.status_code


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=_requests)
def test_every_request_gets_a_status_and_nothing_stays_in_flight(
    deployment: _Deployment, requests: list[tuple[str, Any, dict, bool]]
) -> None:
    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(_send(client, deployment.server.url, *r) for r in requests))

    statuses = asyncio.run(run())
    assert len(statuses) == len(requests)
    for status in statuses:
        assert status == 200 or 400 <= status < 500, statuses  # never a 5xx: the engines are all up
    router = deployment.router
    deadline = time.monotonic() + 10
    while router.num_tracked or router.num_counted_on_instances:
        assert time.monotonic() < deadline, "requests left counted in flight"
        time.sleep(0.02)
    metrics = httpx.get(deployment.server.url + "/metrics").text
    for line in metrics.splitlines():
        if line.startswith(("tropical_router_requests_in_flight{", "tropical_router_requests_waiting ")):
            assert line.endswith(" 0.0"), line
    assert all(instance.healthy for instance in router.instances)

"""The router service against fake engines on 127.0.0.1: both paths, streaming, SLO headers, faults, the toggle."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tropical_sched.core import ConfigError, RouteAction, Slo
from tropical_sched.predictors import Profile, load_profile, time_scaled, write_profile_file
from tropical_sched.serve.config import ClusterFileError, RouterConfig, load_router_config
from tropical_sched.serve.fake_engine import FakeEngine
from tropical_sched.serve.openai import BadRequest
from tropical_sched.serve.router import Router, parse_slo_headers
from tropical_sched.serve.testing import ServerThread

SCALE = 0.05  # fake engines run 20x faster than the profiled GPUs
BASE = load_profile("a100-llama2-70b-tp4")


@pytest.fixture(scope="module")
def scaled_profile(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Profile]:
    scaled = time_scaled(BASE.file, SCALE)
    path = tmp_path_factory.mktemp("profile") / "scaled.json"
    write_profile_file(scaled, path)
    return str(path), Profile(scaled)


class Cluster:
    """A prefill and a multiplexing fake engine behind a router."""

    def __init__(self, profile: tuple[str, Profile], **options: object) -> None:
        path, scaled = profile
        self.prefill = FakeEngine(scaled, engine_id="p", policy="tropical", role="prefill")  # type: ignore[arg-type]
        self.mux = FakeEngine(scaled, engine_id="m", policy="tropical", role="multiplexing")  # type: ignore[arg-type]
        self.p_server = ServerThread(self.prefill.app).start()
        self.m_server = ServerThread(self.mux.app).start()
        config = {
            "profile": path,
            "health_interval_s": 0.1,
            "metrics_interval_s": 0.1,
            "unavailable_grace_s": 0.3,
            "instances": [
                {"url": self.p_server.url, "role": "prefill"},
                {"url": self.m_server.url, "role": "multiplexing"},
            ],
        }
        config.update(options)
        self.router = Router(RouterConfig.model_validate(config))
        self.server = ServerThread(self.router.app).start()
        self.url = self.server.url

    def close(self) -> None:
        for server in (self.server, self.p_server, self.m_server):
            server.stop()

    def wait_idle(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.router.num_tracked or self.router.num_counted_on_instances:
            assert time.monotonic() < deadline, "requests left counted in flight"
            time.sleep(0.02)


@pytest.fixture
def prefill_first(scaled_profile: tuple[str, Profile]) -> Iterator[Cluster]:
    cluster = Cluster(scaled_profile, policy_options={"route_order": "prefill-first"})
    yield cluster
    cluster.close()


@pytest.fixture
def multiplex_first(scaled_profile: tuple[str, Profile]) -> Iterator[Cluster]:
    cluster = Cluster(scaled_profile, policy_options={"route_order": "multiplex-first"})
    yield cluster
    cluster.close()


PROMPT = list(range(10, 810))


def _stream(url: str, body: dict, headers: dict | None = None, path: str = "/v1/completions") -> list[dict]:
    events = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, headers=headers or {}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def _text(events: list[dict]) -> str:
    return "".join(
        e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content") or ""
        for e in events
        if e.get("choices")
    )


def test_prefill_path_goes_through_pd_and_matches_the_engine_alone(prefill_first: Cluster) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6}
    via_router = httpx.post(prefill_first.url + "/v1/completions", json=body, timeout=30).json()
    alone = httpx.post(prefill_first.m_server.url + "/v1/completions", json=body, timeout=30).json()
    assert via_router["choices"][0]["text"] == alone["choices"][0]["text"]
    assert via_router["usage"]["completion_tokens"] == 6
    assert prefill_first.prefill.stats.num_remote_decodes == 1
    assert prefill_first.mux.stats.num_remote_prefills == 1
    prefill_first.wait_idle()


def test_multiplexed_path_is_served_by_the_multiplexing_worker_alone(multiplex_first: Cluster) -> None:
    events = _stream(multiplex_first.url, {"prompt": PROMPT, "max_tokens": 5})
    assert len([e for e in events if e.get("choices") and e["choices"][0]["text"]]) == 5
    assert multiplex_first.prefill.stats.num_requests == 0
    assert multiplex_first.mux.stats.num_remote_prefills == 0
    assert multiplex_first.mux.stats.num_requests == 1
    metrics = httpx.get(multiplex_first.url + "/metrics").text
    assert 'tropical_router_requests_total{outcome="ok",route="multiplex"} 1.0' in metrics
    multiplex_first.wait_idle()


def test_streaming_shapes_usage_as_the_client_asked(prefill_first: Cluster) -> None:
    plain = _stream(prefill_first.url, {"prompt": PROMPT, "max_tokens": 3})
    assert all("usage" not in e for e in plain)
    with_usage = _stream(
        prefill_first.url, {"prompt": PROMPT, "max_tokens": 3, "stream_options": {"include_usage": True}}
    )
    assert with_usage[-1]["choices"] == []
    assert with_usage[-1]["usage"]["completion_tokens"] == 3


def test_chat_completions_stream_and_aggregate(prefill_first: Cluster) -> None:
    body = {"messages": [{"role": "user", "content": "hello " * 200}], "max_tokens": 4}
    events = _stream(prefill_first.url, body, path="/v1/chat/completions")
    response = httpx.post(prefill_first.url + "/v1/chat/completions", json=body, timeout=30).json()
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"]["content"] == _text(events)
    assert response["choices"][0]["finish_reason"] == "length"


def test_slo_headers_reach_the_engine_and_llm_d_names_work(prefill_first: Cluster) -> None:
    _stream(
        prefill_first.url,
        {"prompt": PROMPT, "max_tokens": 2},
        headers={"x-slo-ttft-ms": "1234", "x-llm-d-slo-tpot-ms": "56"},
    )
    # The engines get the TTFT budget left when the request leaves the router (its deadline stays the client's).
    prefill_xargs = prefill_first.prefill.stats.xargs[-1]
    decode_xargs = prefill_first.mux.stats.xargs[-1]
    names = {"tropical_ttft_slo_ms", "tropical_tpot_slo_ms", "tropical_request_id"}
    assert set(prefill_xargs) == set(decode_xargs) == names
    assert prefill_xargs["tropical_request_id"] == decode_xargs["tropical_request_id"]  # both halves: one id
    assert 1234.0 - 500 < prefill_xargs["tropical_ttft_slo_ms"] <= 1234.0
    assert decode_xargs["tropical_ttft_slo_ms"] <= prefill_xargs["tropical_ttft_slo_ms"]
    assert prefill_xargs["tropical_tpot_slo_ms"] == decode_xargs["tropical_tpot_slo_ms"] == 56.0


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({"x-slo-ttft-ms": "fast"}, {"prompt": "hi"}, "header x-slo-ttft-ms = 'fast' is not a number"),
        ({"x-slo-tpot-ms": "-5"}, {"prompt": "hi"}, "header x-slo-tpot-ms = '-5' must be between 1 and 600000"),
        ({}, {"prompt": ""}, "field 'prompt' is empty"),
        ({}, {"prompt": "hi", "max_tokens": 0}, "field max_tokens = 0: Input should be greater than or equal to 1"),
        ({}, {"max_tokens": 3}, "field 'prompt' must be a non-empty string"),
    ],
)
def test_bad_requests_get_400_naming_the_field_while_others_carry_on(
    prefill_first: Cluster, headers: dict, body: dict, message: str
) -> None:
    response = httpx.post(prefill_first.url + "/v1/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    ok = httpx.post(prefill_first.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
    prefill_first.wait_idle()


def test_invalid_json_gets_400(prefill_first: Cluster) -> None:
    response = httpx.post(prefill_first.url + "/v1/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400
    assert "not JSON" in response.json()["error"]["message"]


def test_an_instance_that_stops_answering_is_marked_down_and_requests_are_retried(multiplex_first: Cluster) -> None:
    # Multiplex-first sends everything to the multiplexing worker; once it is gone, requests must go P/D... which
    # also needs it as the decoder, so they fail cleanly; then it comes back.
    multiplex_first.m_server.stop()
    response = httpx.post(multiplex_first.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=30)
    assert response.status_code in (502, 503)
    assert response.json()["error"]["message"]
    health = httpx.get(multiplex_first.url + "/health").json()
    assert [i["healthy"] for i in health["instances"]] == [True, False]
    metrics = httpx.get(multiplex_first.url + "/metrics").text
    assert (
        f'tropical_router_instance_up{{instance="{multiplex_first.m_server.url}",role="multiplexing"}} 0.0' in metrics
    )
    multiplex_first.wait_idle()


def test_a_request_without_tokens_is_retried_on_another_instance(scaled_profile: tuple[str, Profile]) -> None:
    # Two multiplexing workers: kill the one the policy picks first; the request lands on the other.
    path, scaled = scaled_profile
    engines = [FakeEngine(scaled, engine_id=f"m{i}") for i in range(3)]
    servers = [ServerThread(e.app).start() for e in engines]
    config = RouterConfig.model_validate(
        {
            "profile": path,
            "health_interval_s": 30,
            "policy_options": {"route_order": "multiplex-first"},
            "instances": [
                {"url": servers[0].url, "role": "prefill"},
                {"url": servers[1].url, "role": "multiplexing"},
                {"url": servers[2].url, "role": "multiplexing"},
            ],
        }
    )
    router = Router(config)
    with ServerThread(router.app) as server:
        servers[1].stop()
        response = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=30)
        assert response.status_code == 200
        assert engines[2].stats.num_requests == 1
        assert not router.instances[1].healthy
        assert router.num_tracked == 0
    for s in (servers[0], servers[2]):
        s.stop()


def test_a_stream_that_breaks_after_tokens_ends_with_a_clear_error(multiplex_first: Cluster) -> None:
    multiplex_first.mux.fail_after_tokens = 2
    events = _stream(multiplex_first.url, {"prompt": PROMPT, "max_tokens": 6})
    assert len([e for e in events if e.get("choices")]) == 2
    assert "failed after 2 tokens" in events[-1]["error"]["message"]
    multiplex_first.mux.fail_after_tokens = None
    multiplex_first.wait_idle()


def test_a_client_that_disconnects_aborts_the_upstream_request(multiplex_first: Cluster) -> None:
    with httpx.stream(
        "POST",
        multiplex_first.url + "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 2000, "stream": True},
        timeout=30,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # got a token; leave
    deadline = time.monotonic() + 5
    while multiplex_first.mux.stats.num_aborted == 0:
        assert time.monotonic() < deadline, "upstream request was not aborted"
        time.sleep(0.02)
    multiplex_first.wait_idle()
    metrics = httpx.get(multiplex_first.url + "/metrics").text
    assert 'tropical_router_requests_total{outcome="aborted",route="multiplex"} 1.0' in metrics


def test_unattainable_requests_are_rejected_with_503(scaled_profile: tuple[str, Profile]) -> None:
    cluster = Cluster(scaled_profile, policy_options={"reject_unattainable": True})
    try:
        response = httpx.post(
            cluster.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 2},
            headers={"x-slo-ttft-ms": "1"},
            timeout=30,
        )
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "SLOUnattainable"
        assert cluster.prefill.stats.num_requests == cluster.mux.stats.num_requests == 0
    finally:
        cluster.close()


def test_the_toggle_switches_multiplexing_off_on_observed_tpot_misses(scaled_profile: tuple[str, Profile]) -> None:
    cluster = Cluster(
        scaled_profile, policy_options={"route_order": "multiplex-first", "toggle": {"min_samples": 3, "hold_s": 0.0}}
    )
    try:
        for _ in range(4):  # a 1 ms TPOT SLO cannot be met (steps take about 2 ms here): TPOT attainment 0
            _stream(cluster.url, {"prompt": PROMPT, "max_tokens": 3}, headers={"x-slo-tpot-ms": "1"})
        assert not cluster.router.policy.toggle.multiplexing_on  # type: ignore[attr-defined]
        time.sleep(0.1)
        assert "tropical_router_multiplexing_enabled 0.0" in httpx.get(cluster.url + "/metrics").text
        decision = cluster.router.policy.route(
            cluster.router._tracked.get("x") or _request(), cluster.router.snapshot()
        )
        assert decision.action is not RouteAction.MULTIPLEX
    finally:
        cluster.close()


def _request():  # type: ignore[no-untyped-def]
    from tests.conftest import make_request

    return make_request(num_prompt_tokens=100, arrival_at_s=0.0)


def test_engine_metrics_correct_the_kv_view(prefill_first: Cluster) -> None:
    prefill_first.mux._worker.kv_used = prefill_first.mux._worker.kv_capacity // 2  # another tenant's usage
    deadline = time.monotonic() + 3
    while prefill_first.router.instances[1].engine_kv_usage_fraction != pytest.approx(0.5, abs=0.01):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert prefill_first.router.snapshot().workers[1].kv_usage_fraction >= 0.49
    prefill_first.mux._worker.kv_used = 0


def test_slo_header_parsing_unit() -> None:
    default = Slo(ttft_s=1.0, tpot_s=0.1)
    assert parse_slo_headers({}, default) == default
    assert parse_slo_headers({"x-slo-ttft-ms": "250"}, default) == Slo(ttft_s=0.25, tpot_s=0.1)
    with pytest.raises(BadRequest, match="x-llm-d-slo-ttft-ms"):
        parse_slo_headers({"x-llm-d-slo-ttft-ms": "inf"}, default)


def test_config_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "policy: tropical\ninstances:\n  - url: http://a:1\n    role: prefill\n  - url: ftp://b\n"
        "    role: multiplexing\n"
    )
    with pytest.raises(ClusterFileError, match=r"cluster.yaml:5: field instances\[1\].url = 'ftp://b'"):
        load_router_config(path)
    path.write_text("instances: [\n")
    with pytest.raises(ClusterFileError, match=r"cluster.yaml:\d+: not valid YAML"):
        load_router_config(path)
    path.write_text("instances:\n  - {url: 'http://a:1', role: prefill}\n  - {url: 'http://b:1', role: decode}\n")
    with pytest.raises(ConfigError, match=r"policy 'tropical' needs roles \['multiplexing', 'prefill'\]"):
        Router(load_router_config(path))


def test_sse_events_with_unicode_line_separators_in_the_text_stay_whole() -> None:
    """Engines send generated text unescaped in JSON; U+2028, U+0085 and U+001C are line breaks for str.splitlines
    (and httpx's aiter_lines) but not for SSE. Such an event must reach the router whole, and the connection must be
    read to its end."""
    import asyncio

    from tropical_sched.serve.openai import iter_sse

    texts = ["a\u2028b", "c\x85d", "e\x1cf", "plain"]
    body = (
        "".join(
            "data: " + json.dumps({"choices": [{"index": 0, "text": t}]}, ensure_ascii=False) + "\n\n" for t in texts
        )
        + "data: [DONE]\n\n: trailing comment\n\n"
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())

    async def read() -> tuple[list[str], bool]:
        async with (
            httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client,
            client.stream("POST", "http://engine/v1/completions") as response,
        ):
            events = [event["choices"][0]["text"] async for event in iter_sse(response)]
            return events, response.is_stream_consumed

    events, consumed = asyncio.run(read())
    assert events == texts
    assert consumed


def test_a_non_sse_answer_to_a_stream_is_a_value_error_not_a_transport_failure() -> None:
    import asyncio

    from tropical_sched.serve.openai import iter_sse

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, content=b"{}")

    async def read() -> None:
        async with (
            httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client,
            client.stream("POST", "http://engine/v1/completions") as response,
        ):
            async for _ in iter_sse(response):
                pass

    with pytest.raises(ValueError, match="text/event-stream"):
        asyncio.run(read())


def test_losing_the_only_prefill_engine_leaves_no_request_waiting(scaled_profile: tuple[str, Profile]) -> None:
    """Issue reproducer: 1 prefill + 2 multiplexing engines, the prefill engine dies, 20 requests of about 3,000
    tokens arrive together. They used to wait up to request_timeout_s while both multiplexing engines sat idle."""
    import concurrent.futures

    path, scaled = scaled_profile
    engines = [
        FakeEngine(scaled, engine_id=f"e{i}", policy="tropical", role=role)
        for i, role in enumerate(["prefill", "multiplexing", "multiplexing"])
    ]  # type: ignore[arg-type]
    servers = [ServerThread(e.app).start() for e in engines]
    config = RouterConfig.model_validate(
        {
            "profile": path,
            "health_interval_s": 0.2,
            "instances": [
                {"url": servers[0].url, "role": "prefill"},
                {"url": servers[1].url, "role": "multiplexing"},
                {"url": servers[2].url, "role": "multiplexing"},
            ],
        }
    )
    router = Router(config)
    try:
        with ServerThread(router.app) as server:
            servers[0].stop()
            body = {"prompt": list(range(10, 3010)), "max_tokens": 4}
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                statuses = list(
                    pool.map(
                        lambda _: httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code,
                        range(20),
                    )
                )
            elapsed_s = time.monotonic() - started
            assert statuses == [200] * 20
            # 20 prefills of 3,000 tokens at 1/20 of an A100's time take about 1 s on two engines; the old
            # behaviour waited tens of seconds.
            assert elapsed_s < 10, elapsed_s
            assert engines[1].stats.num_requests + engines[2].stats.num_requests == 20
            assert router.num_tracked == 0
            assert "tropical_router_requests_waiting 0.0" in httpx.get(server.url + "/metrics").text
    finally:
        for s in servers[1:]:
            s.stop()


@pytest.mark.parametrize(
    ("prompt_tokens", "refusal"),
    [("estimate", "This model's maximum context length is 4096"), ("tokenize", "4000 prompt tokens + max_tokens 200")],
)
def test_prompt_tokens_tokenize_asks_an_instance_for_the_exact_count(
    scaled_profile: tuple[str, Profile], prompt_tokens: str, refusal: str
) -> None:
    # The engines count one token per character; the router's estimate is four characters per token. A 4,000
    # character prompt plus 200 output tokens fits a 4,096-token context by the estimate (1,000 + 200) but not
    # by the engine's own count (4,000 + 200). Estimating, the router sends it and the engine refuses it;
    # tokenizing, the router refuses it itself without sending it anywhere.
    path, scaled = scaled_profile
    engines = [FakeEngine(scaled, engine_id=f"e{i}", chars_per_token=1.0) for i in range(2)]
    servers = [ServerThread(e.app).start() for e in engines]
    config = RouterConfig.model_validate(
        {
            "profile": path,
            "policy": "vllm",
            "prompt_tokens": prompt_tokens,
            "instances": [{"url": s.url, "role": "colocated"} for s in servers],
        }
    )
    try:
        with ServerThread(Router(config).app) as server:
            body = {"prompt": "a" * 4000, "max_tokens": 200}
            response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            assert response.status_code == 400, response.text
            assert refusal in response.json()["error"]["message"]
    finally:
        for s in servers:
            s.stop()


def test_replay_takes_the_context_from_the_endpoint_the_slos_from_the_router_and_reports_the_route(
    scaled_profile: tuple[str, Profile], tmp_path: Path
) -> None:
    """The documented `tropical replay --url ROUTER` works without --profile or --max-model-len: prompts beyond the
    engines' context (their /v1/models says 1,024 tokens, not the profile's 4,096) are filtered instead of failing
    with HTTP 400, the SLOs come from the profile the router predicts with, and the muxed column counts the
    requests the router multiplexed."""
    from tropical_sched.cli.main import main as tropical_main

    path, scaled = scaled_profile
    engines = [
        FakeEngine(scaled, engine_id=f"e{i}", policy="tropical", role=role, max_model_len=1024)  # type: ignore[arg-type]
        for i, role in enumerate(["prefill", "multiplexing"])
    ]
    servers = [ServerThread(e.app).start() for e in engines]
    config = RouterConfig.model_validate(
        {
            "profile": path,
            "policy_options": {"route_order": "multiplex-first"},
            "instances": [
                {"url": servers[0].url, "role": "prefill"},
                {"url": servers[1].url, "role": "multiplexing"},
            ],
        }
    )
    out = tmp_path / "replay.json"
    try:
        with ServerThread(Router(config).app) as server:
            code = tropical_main(
                [
                    "replay",
                    "--url",
                    server.url,
                    "--num-requests",
                    "30",
                    "--rate",
                    "10",
                    "--no-progress",
                    "--json",
                    str(out),
                ]
            )
    finally:
        for s in servers:
            s.stop()
    assert code == 0
    data = json.loads(out.read_text())
    assert data["profile"] == scaled.name
    assert "filtered out" in data["workload"]
    assert all(r["num_prompt_tokens"] < 1024 for r in data["records"])
    assert not [r["reason"] for r in data["records"] if r["failed"]]
    assert data["policies"]["replay"]["num_multiplexed"] > 0


def test_a_fake_engine_whose_loop_fails_dies_like_an_engine_instead_of_hanging_its_requests(
    scaled_profile: tuple[str, Profile],
) -> None:
    """A failure inside the engine loop (here a step that raises, as a warning does under warnings-as-errors) must
    break the streams in flight and fail what comes later, not leave requests waiting for steps that never come."""
    import threading

    _, scaled = scaled_profile
    engine = FakeEngine(scaled)
    original = engine._worker.start_step

    def failing_step(now_s: float) -> float | None:
        if engine._worker.num_steps >= 3:
            raise RuntimeError("boom")
        return original(now_s)

    engine._worker.start_step = failing_step  # type: ignore[method-assign]
    with ServerThread(engine.app) as server:
        result: dict[str, object] = {}

        def stream() -> None:
            try:
                _stream(server.url, {"prompt": PROMPT, "max_tokens": 50})
            except (httpx.HTTPError, AssertionError) as exc:
                result["error"] = exc

        thread = threading.Thread(target=stream)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the stream hung"
        assert "error" in result
        assert httpx.get(server.url + "/health").status_code == 500
        late = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=5)
        assert late.status_code == 500
        assert "boom" in late.json()["error"]["message"]


@settings(max_examples=100, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 400), max_size=12),
    ends=st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=8, max_size=8),
)
def test_sse_events_are_the_same_whatever_the_chunks_and_line_ends(cuts: list[int], ends: list[str]) -> None:
    """The one SSE parser (httpx's and aiohttp's responses both go through it): CR, LF and CRLF end lines, a CRLF
    split across two chunks is one line end, Unicode line breaks inside the text do not split, multi-line data is
    joined, comments and events without data are skipped, and nothing after [DONE] is an event."""
    import asyncio

    from tropical_sched.serve.openai import parse_sse

    first = json.dumps({"choices": [{"index": 0, "text": "a\u2028b\x85c"}]}, ensure_ascii=False)
    lines = [
        ": comment",
        "data: " + first,
        "",
        "event: ping",
        "",
        'data:{"n": 1,',
        'data:  "m": 2}',
        "",
    ]
    for i in range(len(lines) - 1):  # a CR then an LF is one CRLF: the empty line after a CR must not start with LF
        if ends[i] == "\r" and ends[i + 1].startswith("\n"):
            ends[i + 1] = "\r"
    body = "".join(line + end for line, end in zip(lines, ends, strict=True)) + "data: [DONE]\n\ndata: {}\n\n"
    raw = body.encode()
    bounds = sorted({0, len(raw), *(c for c in cuts if c < len(raw))})

    async def chunks() -> Any:
        for start, stop in itertools.pairwise(bounds):
            yield raw[start:stop]

    async def read() -> list[Any]:
        return [event async for event in parse_sse(chunks())]

    assert asyncio.run(read()) == [json.loads(first), {"n": 1, "m": 2}]


_TRICKY_TEXT = st.lists(
    st.sampled_from(['"', "\\", "{", "}", "[", "]", ":", ",", " ", "a", "\u2028", "é", "\n"])
    | st.sampled_from(['"usage":{"completion_tokens":99}', '"choices":[]', '"error"', '\\"usage\\":']),
    max_size=12,
).map("".join)


@st.composite
def _stream_chunks(draw: st.DrawFn) -> dict[str, Any]:
    """Stream chunks as vLLM and SGLang send them (and some they do not): any text, usage in any form and place."""
    members: dict[str, Any] = {"id": draw(_TRICKY_TEXT), "object": "text_completion", "model": "m"}
    kind = draw(st.sampled_from(["text", "chat", "none", "empty"]))
    if kind == "text":
        finish = draw(st.none() | st.just("length"))
        members["choices"] = [{"index": 0, "text": draw(_TRICKY_TEXT), "finish_reason": finish}]
    elif kind == "chat":
        members["choices"] = [{"index": 0, "delta": {"content": draw(st.none() | _TRICKY_TEXT)}, "logprobs": None}]
    elif kind == "empty":
        members["choices"] = []
    usage = draw(st.sampled_from(["absent", "null", "object", "no count"]))
    if usage == "null":
        members["usage"] = None
    elif usage != "absent":
        counts = {"prompt_tokens": draw(st.integers(0, 10**6)), "total_tokens": draw(st.integers(0, 10**6))}
        if usage == "object":
            counts["completion_tokens"] = draw(st.integers(0, 10**6))
        details = draw(st.sampled_from([None, "null", "object"]))
        if details is not None:
            counts["prompt_tokens_details"] = None if details == "null" else {"cached_tokens": draw(st.integers(0, 9))}
        members["usage"] = dict(draw(st.permutations(list(counts.items()))))
    if draw(st.booleans()) and draw(st.booleans()):
        members["error"] = {"message": draw(_TRICKY_TEXT), "code": 500}
    return dict(draw(st.permutations(list(members.items()))))


@settings(max_examples=400, deadline=None)
@given(
    chunk=_stream_chunks(),
    separators=st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :  ")]),
    ensure_ascii=st.booleans(),
    so_far=st.integers(0, 10**6),
)
def test_stream_event_scan_equals_the_json_reading(
    chunk: dict[str, Any], separators: tuple[str, str], ensure_ascii: bool, so_far: int
) -> None:
    """The router reads engine events by scanning their bytes (no decode, no re-encode); what it reads, and the
    event it relays without usage, equal what parsing the JSON gives (the reference: chunk_delta)."""
    from tropical_sched.serve.openai import StreamEvent, chunk_delta

    payload = json.dumps(chunk, separators=separators, ensure_ascii=ensure_ascii).encode()
    event = StreamEvent(payload)
    usage = chunk.get("usage")
    assert event.is_error == ("error" in chunk)
    assert event.num_completion_tokens == (usage.get("completion_tokens") if isinstance(usage, dict) else None)
    assert event.has_choices == bool(chunk.get("choices"))
    assert event.num_new_tokens(so_far) == chunk_delta(chunk, so_far).num_tokens
    assert json.loads(event.without_usage()) == {k: v for k, v in chunk.items() if k != "usage"}


def test_a_stream_event_that_is_not_a_json_object_is_refused() -> None:
    from tropical_sched.serve.openai import StreamEvent

    truncated = b'{"usage":{"completion_tokens":1},"choices":[{"text":"a'
    for payload in (truncated, b"[1]", b"nonsense", b'{"usage": {"completion_tokens": 1}}x', b"  "):
        with pytest.raises(ValueError, match="not a JSON object"):
            StreamEvent(payload)
    with pytest.raises(ValueError, match="Expecting value"):  # no usage: parsed, and refused by the parser
        StreamEvent(b'{"choices": [}')


def test_the_decision_log_has_one_line_per_request_with_its_route_workers_and_times(
    scaled_profile: tuple[str, Profile], tmp_path: Path
) -> None:
    from tropical_sched.serve.decision_log import read_decision_log, summarize_decision_log

    path = tmp_path / "decisions.jsonl"
    for order in ("prefill-first", "multiplex-first"):
        cluster = Cluster(scaled_profile, policy_options={"route_order": order}, decision_log=str(path))
        try:
            body = {"prompt": PROMPT, "max_tokens": 6}
            assert httpx.post(cluster.url + "/v1/completions", json=body, timeout=30).status_code == 200
            bad = httpx.post(cluster.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": -1}, timeout=30)
            assert bad.status_code == 400  # refused before routing: not a decision
            cluster.wait_idle()
            urls = {"prefill": cluster.p_server.url, "multiplexing": cluster.m_server.url}
        finally:
            cluster.close()  # stops the router, which writes what is queued and closes the file
        entries = read_decision_log(path)
        entry = entries[-1]
        assert (entry["outcome"], entry["num_output_tokens"], entry["num_prompt_tokens"]) == ("ok", 6, 800)
        assert entry["reason"]
        assert entry["arrival_at_s"] <= entry["routed_at_s"] <= entry["first_token_at_s"] <= entry["last_token_at_s"]
        assert entry["ttft_s"] == pytest.approx(entry["first_token_at_s"] - entry["arrival_at_s"])
        assert entry["tpot_s"] == pytest.approx((entry["last_token_at_s"] - entry["first_token_at_s"]) / 5)
        assert entry["met_ttft"] == (entry["ttft_s"] <= entry["ttft_slo_s"])
        assert entry["predicted"]["tpot_s"] > 0
        if order == "prefill-first":
            assert entry["route"] == "prefill"
            assert (entry["worker"], entry["decode_worker"]) == (urls["prefill"], urls["multiplexing"])
            assert entry["routed_at_s"] <= entry["prefill_done_at_s"] <= entry["decode_placed_at_s"]
            assert entry["decode_placed_at_s"] <= entry["first_token_at_s"]
        else:
            assert entry["route"] == "multiplex"
            assert (entry["worker"], entry["decode_worker"]) == (urls["multiplexing"], None)
            assert (entry["prefill_done_at_s"], entry["decode_placed_at_s"]) == (None, None)
    assert len(entries) == 2  # appended, one line per routed request
    summaries = summarize_decision_log(entries)
    assert list(summaries) == ["prefill", "multiplex"]
    assert all(s.num_requests == 1 for s in summaries.values())


def test_a_decision_log_that_cannot_be_opened_fails_at_start(
    scaled_profile: tuple[str, Profile], tmp_path: Path
) -> None:
    path = tmp_path / "missing" / "decisions.jsonl"
    config = RouterConfig.model_validate(
        {
            "profile": scaled_profile[0],
            "decision_log": str(path),
            "instances": [{"url": "http://127.0.0.1:9", "role": "multiplexing"}],
        }
    )
    with pytest.raises(ConfigError, match=r"decision_log: cannot append to .*missing/decisions.jsonl"):
        Router(config)


def test_a_corrupt_decision_log_fails_at_load_with_its_path_and_line(tmp_path: Path) -> None:
    from tropical_sched.serve.decision_log import read_decision_log

    good = {k: 0 for k in ("request_id", "outcome", "route", "arrival_at_s", "ttft_slo_s", "tpot_slo_s")}
    good.update(ttft_s=None, tpot_s=None)
    path = tmp_path / "decisions.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"request_id": "1", "outcome": "ok"\n')
    with pytest.raises(ConfigError, match=r"decisions.jsonl:2: not a JSON object"):
        read_decision_log(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"request_id": "2"}) + "\n")
    with pytest.raises(ConfigError, match=r"decisions.jsonl:3: a decision-log entry lacks outcome, route"):
        read_decision_log(path)


def test_validate_through_a_router_in_the_client_process_takes_both_paths_with_no_http_to_the_router(
    scaled_profile: tuple[str, Profile], tmp_path: Path
) -> None:
    """`tropical validate --router-config` runs the router of a cluster file inside the client: every request
    reaches the engines through it (P/D and multiplexed alike, counted by the engines), the routes are reported as
    over HTTP, the decision log has a line per request, and a request the router refuses (a model no engine serves)
    fails with the status and message the HTTP surface would answer while the rest are served. `tropical replay
    --router-config` takes its SLOs from the router's profile."""
    from tropical_sched.cli.main import main as tropical_main
    from tropical_sched.serve.decision_log import read_decision_log

    path, scaled = scaled_profile
    roles = ["prefill", "multiplexing", "multiplexing"]
    engines = [
        FakeEngine(scaled, engine_id=f"e{i}", policy="tropical", role=role)  # type: ignore[arg-type]
        for i, role in enumerate(roles)
    ]
    servers = [ServerThread(e.app).start() for e in engines]
    decisions = tmp_path / "decisions.jsonl"
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(
        json.dumps(
            {
                "profile": path,
                "model": "fake",
                "decision_log": str(decisions),
                "instances": [{"url": s.url, "role": role} for s, role in zip(servers, roles, strict=True)],
            }
        )
    )
    common = ["--profile", path, "--workers", "3", "--prefill-workers", "1", "--policies", "tropical", "--no-progress"]
    common += ["--num-requests", "40", "--rate", "10", "--arrival", "poisson", "--tpot-slo-scale", "5"]
    out = tmp_path / "validate.json"
    wrong_model = tmp_path / "wrong-model.json"
    try:
        assert tropical_main(["validate", "--router-config", str(cluster_file), *common, "--json", str(out)]) == 0
        served = sum(e.stats.num_requests for e in engines)
        argv = ["validate", "--router-config", str(cluster_file), *common, "--num-requests", "3", "--model", "gpt-x"]
        assert tropical_main([*argv, "--json", str(wrong_model)]) == 0
        replayed = tmp_path / "replay.json"
        argv = ["replay", "--router-config", str(cluster_file), "--num-requests", "10", "--rate", "10", "--no-progress"]
        assert tropical_main([*argv, "--json", str(replayed)]) == 0
    finally:
        for s in servers:
            s.stop()
    data = json.loads(out.read_text())
    assert data["router_config"] == str(cluster_file)
    assert "url" not in data
    records = data["records"]
    assert len(records) == 40
    assert not [r["reason"] for r in records if r["failed"]]
    assert data["measured"]["slo_attainment"] > 0.5
    entries = read_decision_log(decisions)
    assert len(entries) == 40 + 10  # validate's, then replay's; the refused requests were never decided
    entries = entries[:40]
    routes = [e["route"] for e in entries]
    assert {"prefill", "multiplex"} <= set(routes)
    assert sum(r["multiplexed"] for r in records) == routes.count("multiplex")  # the route, read in the process
    # P/D requests are two engine requests (prefill, then decode), multiplexed ones one
    assert served == 40 + routes.count("prefill")
    replay_data = json.loads(replayed.read_text())
    assert replay_data["router_config"] == str(cluster_file)
    assert replay_data["profile"] == scaled.name  # SLOs from the router's profile
    assert replay_data["num_requests"] == 10
    assert not [r["reason"] for r in replay_data["records"] if r["failed"]]
    refused = json.loads(wrong_model.read_text())["records"]
    assert all(r["failed"] for r in refused)
    assert refused[0]["reason"].startswith("HTTP 404: field model = 'gpt-x'")


def test_submit_checks_a_body_as_the_http_surface_does_and_refuses_naming_the_field(
    scaled_profile: tuple[str, Profile],
) -> None:
    """`Router.submit` is the one check both fronts use: a malformed field or SLO header raises BadRequest naming
    it (counted as invalid), headers are read as the HTTP ones are, and a refused request is never tracked."""
    import asyncio

    from tropical_sched.serve.openai import BadRequest

    path, _ = scaled_profile
    instances = [
        {"url": "http://127.0.0.1:9", "role": "prefill"},
        {"url": "http://127.0.0.1:10", "role": "multiplexing"},
    ]
    router = Router(RouterConfig.model_validate({"profile": path, "instances": instances}))

    async def submit(body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
        try:
            tracked, events = await router.submit(body, headers=headers)
        except BadRequest as exc:
            return f"{exc.status} {exc}"
        await events.aclose()  # never started: nothing was sent
        return f"{tracked.request.slo.ttft_s:.3f}"

    assert asyncio.run(submit({"prompt": PROMPT, "max_tokens": 0})).startswith("400 field max_tokens")
    assert asyncio.run(submit({"prompt": PROMPT}, {"x-slo-ttft-ms": "fast"})).startswith("400 header x-slo-ttft-ms")
    assert asyncio.run(submit({"prompt": PROMPT, "max_tokens": 4}, {"x-slo-ttft-ms": "250"})) == "0.250"
    assert router.num_tracked == 0
    invalid = router.metrics.registry.get_sample_value(
        "tropical_router_requests_total", {"route": "none", "outcome": "invalid"}
    )
    assert invalid == 2

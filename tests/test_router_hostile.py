"""Hostile and malformed input to the router: always a 4xx naming the field, never a 5xx, a cut stream, or an
instance marked down; every other request carries on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.test_router import PROMPT, Cluster, scaled_profile  # noqa: F401 - the fixture is used by name
from tropical_sched.predictors import Profile


@pytest.fixture(scope="module")
def cluster(scaled_profile: tuple[str, Profile]) -> Iterator[Cluster]:  # noqa: F811
    cluster = Cluster(scaled_profile, policy_options={"route_order": "prefill-first"})
    deadline = time.monotonic() + 5
    while not all(i.served_models for i in cluster.router.instances):  # the first health round reads /v1/models
        assert time.monotonic() < deadline, "the router did not read the instances' /v1/models"
        time.sleep(0.02)
    yield cluster
    cluster.close()


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


OK = {"prompt": PROMPT, "max_tokens": 2}
CONTEXT = 4096  # the fake engines report the profile's max_model_len

# (id, path, raw body, extra headers, expected status, substring of the error message)
HOSTILE: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("invalid-utf8", "/v1/completions", b'{"prompt": "\xff\xfe"}', {}, 400, "not valid UTF-8"),
    ("nested-5000", "/v1/completions", b"[" * 5000 + b"]" * 5000, {}, 400, "nested too deeply"),
    ("nested-object", "/v1/completions", b'{"a":' * 5000 + b"1" + b"}" * 5000, {}, 400, "nested too deeply"),
    ("not-json", "/v1/completions", b"{not json", {}, 400, "not JSON"),
    ("empty-body", "/v1/completions", b"", {}, 400, "not JSON"),
    ("array-body", "/v1/completions", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("xargs-list", "/v1/completions", _json({**OK, "vllm_xargs": [1, 2]}), {}, 400, "field vllm_xargs"),
    ("xargs-str", "/v1/completions", _json({**OK, "vllm_xargs": "abc"}), {}, 400, "field vllm_xargs"),
    ("xargs-nested", "/v1/completions", _json({**OK, "vllm_xargs": {"a": {"b": 1}}}), {}, 400, "vllm_xargs.a"),
    (
        "stream-options-str",
        "/v1/completions",
        _json({**OK, "stream": True, "stream_options": "x"}),
        {},
        400,
        "field stream_options",
    ),
    (
        "stream-options-no-stream",
        "/v1/completions",
        _json({**OK, "stream_options": {"include_usage": True}}),
        {},
        400,
        "stream_options is only allowed with stream=true",
    ),
    ("stream-yes", "/v1/completions", _json({**OK, "stream": "yes"}), {}, 400, "field stream = 'yes'"),
    ("n-2", "/v1/completions", _json({**OK, "n": 2}), {}, 400, "field n = 2"),
    ("best-of-3", "/v1/completions", _json({**OK, "best_of": 3}), {}, 400, "field best_of = 3"),
    ("unknown-model", "/v1/completions", _json({**OK, "model": "gpt-9"}), {}, 404, "field model = 'gpt-9'"),
    ("model-int", "/v1/completions", _json({**OK, "model": 7}), {}, 400, "field model = 7"),
    ("negative-token", "/v1/completions", _json({"prompt": [5, -1, 7], "max_tokens": 2}), {}, 400, "prompt[1]"),
    ("prompt-nested", "/v1/completions", _json({"prompt": [[1, 2]], "max_tokens": 2}), {}, 400, "field 'prompt'"),
    ("prompt-bool", "/v1/completions", _json({"prompt": True, "max_tokens": 2}), {}, 400, "field 'prompt'"),
    ("max-tokens-float", "/v1/completions", _json({**OK, "max_tokens": 2.5}), {}, 400, "field max_tokens = 2.5"),
    ("max-tokens-bool", "/v1/completions", _json({**OK, "max_tokens": True}), {}, 400, "field max_tokens = True"),
    ("max-tokens-huge", "/v1/completions", _json({**OK, "max_tokens": 10**9}), {}, 400, "field max_tokens"),
    (
        "beyond-context",
        "/v1/completions",
        _json({"prompt": PROMPT, "max_tokens": CONTEXT - len(PROMPT) + 1}),
        {},
        400,
        "exceed the model's context of 4096 tokens",
    ),
    (
        "prompt-beyond-context",
        "/v1/completions",
        _json({"prompt": [11] * (CONTEXT + 1)}),
        {},
        400,
        "exceed the model's context",
    ),
    ("kv-params", "/v1/completions", _json({**OK, "kv_transfer_params": {"x": 1}}), {}, 400, "kv_transfer_params"),
    ("bootstrap", "/v1/completions", _json({**OK, "bootstrap_room": 5}), {}, 400, "bootstrap_room"),
    ("slo-tiny", "/v1/completions", _json(OK), {"x-slo-ttft-ms": "1e-300"}, 400, "x-slo-ttft-ms = '1e-300'"),
    ("slo-zero", "/v1/completions", _json(OK), {"x-slo-tpot-ms": "0"}, 400, "x-slo-tpot-ms = '0'"),
    ("slo-nan", "/v1/completions", _json(OK), {"x-slo-ttft-ms": "nan"}, 400, "x-slo-ttft-ms = 'nan'"),
    ("slo-inf", "/v1/completions", _json(OK), {"x-slo-tpot-ms": "1e400"}, 400, "x-slo-tpot-ms = '1e400'"),
    ("slo-huge", "/v1/completions", _json(OK), {"x-llm-d-slo-ttft-ms": "1e12"}, 400, "x-llm-d-slo-ttft-ms"),
    ("slo-words", "/v1/completions", _json(OK), {"x-slo-ttft-ms": "soon"}, 400, "is not a number"),
    ("header-1mb", "/v1/completions", _json(OK), {"x-junk": "a" * (1 << 20)}, 431, "request headers of"),
    ("body-40mb", "/v1/completions", b'{"prompt": "' + b"a" * (40 << 20) + b'"}', {}, 413, "request body"),
    ("chat-no-messages", "/v1/chat/completions", _json({"max_tokens": 2}), {}, 400, "field messages"),
    ("chat-empty", "/v1/chat/completions", _json({"messages": []}), {}, 400, "field messages"),
    ("chat-no-role", "/v1/chat/completions", _json({"messages": [{"content": "x"}]}), {}, 400, "messages[0].role"),
    (
        "chat-content-int",
        "/v1/chat/completions",
        _json({"messages": [{"role": "user", "content": 5}]}),
        {},
        400,
        "messages[0].content",
    ),
    ("chat-messages-str", "/v1/chat/completions", _json({"messages": "hi"}), {}, 400, "field messages"),
]


@pytest.mark.parametrize(
    ("path", "content", "headers", "status", "message"), [case[1:] for case in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_input_gets_a_4xx_naming_it_and_harms_nothing(
    cluster: Cluster, path: str, content: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    response = httpx.post(
        cluster.url + path,
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )
    assert response.status_code == status, response.text[:300]
    assert message in response.json()["error"]["message"]
    assert all(instance.healthy for instance in cluster.router.instances)
    assert cluster.router.num_tracked == 0
    ok = httpx.post(cluster.url + "/v1/completions", json=OK, timeout=30)
    assert ok.status_code == 200


def test_an_engine_5xx_fails_the_request_but_never_takes_the_engine_out_of_routing(cluster: Cluster) -> None:
    cluster.prefill.fail_with_status = 500
    try:
        for _ in range(3):
            response = httpx.post(cluster.url + "/v1/completions", json=OK, timeout=30)
            assert response.status_code == 502
            assert "HTTP 500" in response.json()["error"]["message"]
            assert all(instance.healthy for instance in cluster.router.instances)
    finally:
        cluster.prefill.fail_with_status = None
    assert httpx.post(cluster.url + "/v1/completions", json=OK, timeout=30).status_code == 200
    cluster.wait_idle()


def test_the_response_names_the_route(cluster: Cluster) -> None:
    response = httpx.post(cluster.url + "/v1/completions", json=OK, timeout=30)
    assert response.headers["x-tropical-route"] in ("prefill", "multiplex")
    with httpx.stream("POST", cluster.url + "/v1/completions", json={**OK, "stream": True}, timeout=30) as streamed:
        assert streamed.headers["x-tropical-route"] in ("prefill", "multiplex")
        streamed.read()
    cluster.wait_idle()


def test_invalid_requests_are_counted(cluster: Cluster) -> None:
    httpx.post(cluster.url + "/v1/completions", json={**OK, "n": 5}, timeout=30)
    metrics = httpx.get(cluster.url + "/metrics").text
    assert 'tropical_router_requests_total{outcome="invalid",route="none"}' in metrics

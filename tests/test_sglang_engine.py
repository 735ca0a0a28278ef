"""Tropical on real SGLang engines (SGLang's CPU engine) with a tiny model built at test time. Marked ``sglang``.

Three OpenAI servers on 127.0.0.1: a stock colocated engine (the reference), a prefill worker and a multiplexing
worker (decode mode + the Tropical plug-in), P/D over ``mooncake_tcp``. Both router paths must give the stock
engine's greedy output. Needs SGLang 0.5.23, its CPU dependencies and the import stand-ins under
``tests/engines/sglang_cpu_shim`` (``.ci/run`` sets them up; see docs/sglang.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_state_reader import stream_while_reading
from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.router import Router
from tropical_sched.serve.testing import ServerThread, free_port, wait_until_healthy

pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="SGLang is not installed"),
]

SHIM = Path(__file__).parent / "engines" / "sglang_cpu_shim"
START_TIMEOUT_S = 600


def tokens(n: int, start: int = 0) -> list[int]:
    """``n`` token ids inside the tiny model's vocabulary (avoiding the special ids 0-2)."""
    return [3 + (start + i) % 340 for i in range(n)]


class SglangServer:
    def __init__(self, name: str, model: Path, logs: Path, tropical: dict[str, Any] | None, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        env = {
            **os.environ,
            "SGLANG_USE_CPU_ENGINE": "1",
            "SGLANG_HOST_IP": "127.0.0.1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TROPICAL_SGLANG_CPU_PD_FIX": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")])),
        }
        env.pop("TROPICAL_SGLANG_CONFIG", None)
        if tropical is not None:
            env["TROPICAL_SGLANG_CONFIG"] = json.dumps(tropical)
        command = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(self.port), "--attention-backend", "torch_native",
            "--sampling-backend", "pytorch", "--disable-cuda-graph", "--max-total-tokens", "16384",
            "--mem-fraction-static", "0.1", "--served-model-name", "tiny", *flags,
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, deadline: float) -> None:
        wait_until_healthy(self.url, self.process, self.log, max(1.0, deadline - time.monotonic()))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tropical_sched.profiling.tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")
    logs = tmp_path_factory.mktemp("sglang-logs")
    bootstrap_port = free_port()
    servers = {
        "reference": SglangServer("reference", model, logs, None),
        "prefill": SglangServer(
            "prefill", model, logs, {"role": "prefill"},
            "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "mooncake_tcp",
            "--disaggregation-bootstrap-port", str(bootstrap_port), "--disable-radix-cache",
        ),
        "multiplexing": SglangServer(
            "multiplexing", model, logs, {"role": "multiplexing", "reject_unattainable": True},
            "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "mooncake_tcp",
            "--disaggregation-decode-retraction-backup", "cpu_tensor", "--disable-overlap-schedule",
            "--chunked-prefill-size", "64",
        ),
        "misconfigured": SglangServer("misconfigured", model, logs, {"role": "multiplexing"}),
    }  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for name in ("reference", "prefill", "multiplexing"):
            servers[name].wait_ready(deadline)
        yield {"servers": servers, "bootstrap_port": bootstrap_port}
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def routers(engines: dict[str, Any]) -> Iterator[dict[str, str]]:
    servers = engines["servers"]
    started = {}
    for order in ("prefill-first", "multiplex-first"):
        config = RouterConfig.model_validate(
            {
                "policy_options": {"route_order": order},
                "slo": {"ttft_slo_ms": 60_000, "tpot_slo_ms": 10_000},
                "request_timeout_s": 120,
                "instances": [
                    {
                        "url": servers["prefill"].url,
                        "role": "prefill",
                        "engine": "sglang",
                        "bootstrap_port": engines["bootstrap_port"],
                    },
                    {"url": servers["multiplexing"].url, "role": "multiplexing", "engine": "sglang"},
                ],
            }
        )
        router = Router(config)
        started[order] = (router, ServerThread(router.app).start())
    yield {order: server.url for order, (_, server) in started.items()}
    for router, server in started.values():
        assert router.num_tracked == 0
        server.stop()


def _complete(url: str, prompt: list[int], max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(url + "/v1/completions", json={**body, **extra}, timeout=180)
    assert response.status_code == 200, response.text
    return response.json()


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("order", ["prefill-first", "multiplex-first"])
def test_both_paths_give_the_stock_engines_greedy_output(
    engines: dict[str, Any], routers: dict[str, str], order: str
) -> None:
    prompt = tokens(150, start=7)
    reference = _complete(engines["servers"]["reference"].url, prompt)
    via_router = _complete(routers[order], prompt)
    assert via_router["choices"][0]["text"] == reference["choices"][0]["text"]
    assert via_router["usage"]["completion_tokens"] == 16
    route = "prefill" if order == "prefill-first" else "multiplex"
    assert _metric(routers[order], f'tropical_router_requests_total{{outcome="ok",route="{route}"}}') >= 1


def test_local_prefills_run_in_chunks_beside_remote_decodes(engines: dict[str, Any], routers: dict[str, str]) -> None:
    """Concurrent P/D and multiplexed requests on the same multiplexing worker (its local prompts of 300 tokens
    prefill in chunks of 64 while transferred requests decode): every one finishes with all its tokens."""
    prompts = [tokens(300, start=31 * i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(_complete, routers["prefill-first" if i % 2 else "multiplex-first"], prompt, 24)
            for i, prompt in enumerate(prompts)
        ]
        results = [future.result() for future in futures]
    assert [r["usage"]["completion_tokens"] for r in results] == [24] * 6
    # The same prompt alone on the stock engine gives the same greedy text as the multiplexed run of it.
    alone = _complete(engines["servers"]["reference"].url, prompts[0], 24)
    again = _complete(routers["multiplex-first"], prompts[0], 24)
    assert again["choices"][0]["text"] == alone["choices"][0]["text"]


def test_unattainable_request_gets_503_with_the_reason(engines: dict[str, Any]) -> None:
    mux = engines["servers"]["multiplexing"].url
    body = {
        "model": "tiny",
        "prompt": tokens(2000),
        "max_tokens": 4,
        "custom_params": {"tropical_ttft_slo_ms": 0.001},
    }
    response = httpx.post(mux + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 503, response.text
    assert "SLO unattainable" in response.text
    assert _complete(mux, tokens(20), 4)["usage"]["completion_tokens"] == 4  # the worker carries on


def test_a_role_that_does_not_match_the_mode_stops_sglang_at_start(engines: dict[str, Any]) -> None:
    server = engines["servers"]["misconfigured"]
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert server.process.returncode not in (None, 0)
    assert "role 'multiplexing' needs --disaggregation-mode decode, this server runs null" in server.log.read_text()


def test_the_multiplexing_worker_serves_its_live_state_with_the_routers_ids(engines: dict[str, Any]) -> None:
    mux = engines["servers"]["multiplexing"].url
    body = {
        "model": "tiny",
        "prompt": tokens(200, start=77),
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "custom_params": {"tropical_tpot_slo_ms": 250, "tropical_request_id": "live-s1"},
    }
    decoding, last = stream_while_reading(mux, body, "live-s1")
    assert decoding is not None, "the decode never showed in the engine's report"
    [decode] = [d for d in decoding.decodes if d.request_id == "live-s1"]
    assert decode.tpot_slo_s == 0.25
    assert decode.num_context_tokens >= 201
    assert 201 <= decoding.num_kv_tokens_used < decoding.num_kv_tokens_capacity
    assert decoding.step_time is not None  # the plug-in's calibrated model
    assert last.decodes == ()  # written at once when the request left

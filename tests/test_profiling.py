"""tropical-profile without an engine: sweep planning, step classification, fitting measured steps, the endpoint
profiler against a fake engine, the importers' reproducibility of the bundled profiles, and the CLI."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tropical_sched.core.errors import ConfigError
from tropical_sched.predictors import load_profile, time_scaled
from tropical_sched.predictors.profile import (
    EngineInfo,
    HardwareInfo,
    ModelInfo,
    Profile,
    ProfileFile,
    StepSample,
    write_profile_file,
)
from tropical_sched.profiling.cli import main as profile_main
from tropical_sched.profiling.endpoint import kv_cache_tokens_from_metrics, profile_endpoint, serving_overheads
from tropical_sched.profiling.pinning import cpu_environment, format_cpu_list, parse_cpu_list, pin_process, resolve_cpus
from tropical_sched.profiling.show import fit_table, step_kind
from tropical_sched.profiling.sweep import (
    StepRecord,
    build_profile,
    log_grid,
    plan_sweep,
    step_record,
)
from tropical_sched.serve.fake_engine import FakeEngine
from tropical_sched.serve.testing import ServerThread

UPSTREAM = Path(__file__).parent / "data" / "upstream"
BUNDLED = Path(__file__).parent.parent / "src" / "tropical_sched" / "data" / "profiles"


def test_log_grid_spans_the_range_in_increasing_order() -> None:
    grid = log_grid(16, 2047, 12)
    assert grid[0] == 16
    assert grid[-1] == 2047
    assert grid == sorted(set(grid))
    assert len(grid) == 12
    ratios = [b / a for a, b in itertools.pairwise(grid)]
    assert max(ratios) / min(ratios) < 1.2  # evenly spaced in log scale
    with pytest.raises(ConfigError, match="log_grid"):
        log_grid(0, 10, 3)


def test_sweep_covers_every_kind_within_the_engine_limits() -> None:
    grid, scenarios = plan_sweep(
        max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=2048, num_kv_cache_tokens=20_000, repetitions=2
    )
    kinds = {s.kind for s in scenarios}
    assert kinds == {"prefill", "chunked-prefill", "decode", "mixed"}
    assert len(scenarios) % 2 == 0
    assert scenarios[: len(scenarios) // 2] == scenarios[len(scenarios) // 2 :]  # repetitions interleaved by round
    assert max(grid.prefill_tokens) == 2047
    assert max(grid.decode_batch_sizes) == 32
    for s in scenarios:
        assert s.num_prefill_tokens < 2048
        if s.kind == "decode":
            # a decode batch never holds more than 80% of the KV cache
            assert s.num_decode_seqs * (s.num_decode_prompt_tokens + s.num_decode_output_tokens) <= 16_000
        if s.kind in ("chunked-prefill", "mixed"):
            assert s.max_num_step_tokens is not None
    quick = plan_sweep(
        max_model_len=2048,
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        num_kv_cache_tokens=20_000,
        quick=True,
        repetitions=2,
    )[1]
    assert sum(s.num_steps_estimate for s in quick) < 0.5 * sum(s.num_steps_estimate for s in scenarios)


def test_sweep_rejects_an_engine_too_small_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="max_num_seqs must be >= 1, got 0"):
        plan_sweep(max_model_len=2048, max_num_seqs=0, max_num_batched_tokens=2048, num_kv_cache_tokens=9000)


def test_step_record_tells_prefill_chunks_from_decodes() -> None:
    record = step_record(
        0.05,
        num_scheduled_tokens={"a": 512, "b": 1, "c": 1, "d": 100},
        num_computed_tokens_before={"a": 1024, "b": 300, "c": 40, "d": 0},
        num_prompt_tokens={"a": 2000, "b": 200, "c": 40, "d": 100},
    )
    assert record.prefill_chunks == ((1024, 512), (0, 100))
    assert record.decode_context_tokens == (301, 41)
    sample = record.to_sample(7)
    assert sample.num_decode_seqs == 2
    assert sample.num_decode_context_tokens == 342
    assert step_kind(sample) == "mixed"


def _synthetic_records(profile: Profile, num: int, seed: int = 0) -> list[StepRecord]:
    """Steps priced by a known model with 3% noise: what a real engine's sweep yields."""
    rng = random.Random(seed)
    model = profile.step_time
    records = []
    for i in range(num):
        kind = i % 3
        chunks: tuple[tuple[int, int], ...] = ()
        contexts: tuple[int, ...] = ()
        if kind in (0, 2):
            chunks = ((rng.choice([0, 512, 1024]), rng.choice([64, 256, 1024])),)
        if kind in (1, 2):
            contexts = tuple(rng.randint(64, 1500) for _ in range(rng.randint(1, 64)))
        exact = model.step_time_s(
            num_decode_seqs=len(contexts), num_decode_context_tokens=sum(contexts), prefill_chunks=chunks
        )
        records.append(StepRecord(exact * rng.uniform(0.97, 1.03), chunks, contexts, f"synthetic {i}"))
    return records


def _fake_hardware() -> HardwareInfo:
    return HardwareInfo(gpu_name="X", gpu_memory_bytes=1, interconnect="x", interconnect_bandwidth_bytes_per_s=1e9)


def _fake_model_info() -> ModelInfo:
    return ModelInfo(name="m", num_layers=2, num_kv_heads=2, head_dim=32, num_params=1e6, max_model_len=2048)


def test_fitting_measured_steps_recovers_the_model_and_sets_stalls_aside(tmp_path: Path) -> None:
    truth = load_profile("a100-opt-13b-tp1")
    records = _synthetic_records(truth, 300)
    stalled = records[10]
    records[10] = StepRecord(stalled.step_time_s * 10, stalled.prefill_chunks, stalled.decode_context_tokens, "gc")
    file = build_profile(
        records,
        name="synthetic",
        model=_fake_model_info(),
        hardware=_fake_hardware(),
        tensor_parallel_size=1,
        engine=EngineInfo(name="vllm", version="0.32.0"),
        num_kv_cache_tokens=10_000,
        kv_cache_derivation="given",
        source_description="synthetic",
        environment={"torch": "2.13"},
    )
    assert file.fit.num_samples_excluded == 1
    assert not file.samples[10].used_in_fit
    assert "stalls" in file.fit.exclusion_note
    assert file.fit.median_relative_error < 0.03
    fitted = Profile(file)
    for prompt in (128, 1024, 2000):
        assert fitted.step_time.prefill_time_s(prompt) == pytest.approx(truth.step_time.prefill_time_s(prompt), rel=0.1)
    assert fitted.step_time.decode_step_time_s(32, 32 * 800) == pytest.approx(
        truth.step_time.decode_step_time_s(32, 32 * 800), rel=0.1
    )
    # written and loaded back like any profile, environment included
    from tropical_sched.predictors import write_profile_file

    write_profile_file(file, tmp_path / "p.json")
    loaded = load_profile(tmp_path / "p.json")
    assert loaded.file == file
    assert loaded.metadata.environment == {"torch": "2.13"}
    table = fit_table(loaded)
    assert "decode" in table
    assert "mixed" in table


def test_build_profile_needs_enough_steps() -> None:
    with pytest.raises(ConfigError, match="at least 6 measured steps, got 2"):
        build_profile(
            [StepRecord(0.01, (), (5,)), StepRecord(0.02, ((0, 5),), ())],
            name="x",
            model=_fake_model_info(),
            hardware=_fake_hardware(),
            tensor_parallel_size=1,
            engine=EngineInfo(name="vllm", version="0"),
            num_kv_cache_tokens=100,
            kv_cache_derivation="",
            source_description="",
        )


def test_kv_capacity_is_read_from_vllm_metrics() -> None:
    text = (
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="2000",prefix_caching="False"} 1.0\n'
    )
    assert kv_cache_tokens_from_metrics(text) == 32_000
    assert kv_cache_tokens_from_metrics("vllm:num_requests_running 0\n") is None


def test_endpoint_profile_of_a_fake_engine_predicts_the_engine(tmp_path: Path) -> None:
    """Profile a fake engine (steps priced by a known profile, run 5x faster than the GPU) through its HTTP API:
    the fitted model must predict the engine's prefill and decode steps. Client-side timing adds HTTP round trips
    and event-loop jitter on a loaded machine, hence the 35% tolerance."""
    truth = time_scaled(load_profile("a100-opt-13b-tp1").file, 0.2)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 5120,
                "num_attention_heads": 40,
                "num_hidden_layers": 40,
                "intermediate_size": 20480,
                "vocab_size": 50272,
                "max_position_embeddings": 2048,
            }
        )
    )
    engine = FakeEngine(Profile(truth), time_scale=1.0, max_num_seqs=32)
    with ServerThread(engine.app) as server:
        file = profile_endpoint(
            server.url,
            model_dir=str(tmp_path),
            served_model_name="fake-model",
            out_name="fake",
            engine_name="vllm",
            num_kv_cache_tokens=20_000,
            max_num_seqs=16,
            quick=True,
            repetitions=1,
            progress=False,
            confirm=lambda message: None,
        )
    fitted = Profile(file).step_time
    model = Profile(truth).step_time
    assert {step_kind(s) for s in file.samples} == {"prefill", "decode"}
    assert fitted.prefill_time_s(1500) == pytest.approx(model.prefill_time_s(1500), rel=0.35)
    assert fitted.decode_step_time_s(16, 16 * 300) == pytest.approx(model.decode_step_time_s(16, 16 * 300), rel=0.35)
    assert file.metadata.model.num_layers == 40
    assert file.kv_cache.num_tokens == 20_000


def _same_json(got: Any, want: Any, where: str = "$") -> None:
    """``got`` equals ``want`` key for key and item for item, floats to 1e-9 relative (their last digits differ
    between numpy / scikit-learn builds: the fit's least squares run on whatever BLAS the build links)."""
    assert type(got) is type(want) or {type(got), type(want)} <= {int, float}, where
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            _same_json(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same_json(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), where
    else:
        assert got == want, where


@pytest.mark.parametrize(
    ("argv", "bundled"),
    [
        (
            [
                "splitwise",
                str(UPSTREAM / "splitwise-perf_model.csv"),
                "--model",
                "llama2-70b",
                "--hardware",
                "a100-80gb",
                "--tp",
                "4",
            ],
            "a100-llama2-70b-tp4",
        ),
        (
            [
                "splitwise",
                str(UPSTREAM / "splitwise-perf_model.csv"),
                "--model",
                "llama2-70b",
                "--hardware",
                "h100-80gb",
                "--tp",
                "8",
            ],
            "h100-llama2-70b-tp8",
        ),
        (
            [
                "distserve",
                str(UPSTREAM / "profiler-a100-80g.vllm.json"),
                str(UPSTREAM / "max_num_tokens.csv"),
                "--model",
                "opt-13b",
                "--tp",
                "1",
            ],
            "a100-opt-13b-tp1",
        ),
    ],
)
def test_import_reproduces_the_bundled_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], bundled: str
) -> None:
    """Re-importing an upstream table writes the bundled profile again: the same text, or, where the fit's floats
    differ in their last digits (another numpy / scikit-learn build), the same keys, order and values."""
    out = tmp_path / f"{bundled}.json"
    assert profile_main(["import", *argv, "--out", str(out)]) == 0
    assert "R^2" in capsys.readouterr().out
    text, bundled_text = out.read_text(), (BUNDLED / f"{bundled}.json").read_text()
    if text != bundled_text:
        assert text.count("\n") == bundled_text.count("\n")  # one sample per line, as written
        _same_json(json.loads(text), json.loads(bundled_text))


def test_show_prints_the_fit_by_kind_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_main(["show", "a100-llama2-70b-tp4", "--plot", str(tmp_path / "fit.png")]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out
    assert "decode" in out
    assert "coefficients: const_s=" in out
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_main(["sglang", "--model", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "needs --endpoint" in capsys.readouterr().err
    assert (
        profile_main(
            [
                "import",
                "splitwise",
                "a.csv",
                "b.csv",
                "--model",
                "llama2-70b",
                "--tp",
                "4",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )
    assert "takes one file" in capsys.readouterr().err
    assert profile_main(["show", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        profile_main(["vllm", "--model", "m", "--out", "x.json", "--repetitions", "0"])
    assert exc.value.code == 2
    assert "--repetitions: must be >= 1, got 0" in capsys.readouterr().err


def test_an_error_event_is_not_taken_for_a_first_token() -> None:
    """SGLang refuses a prompt beyond its input limit with HTTP 200 and an error event; read as a token, it made a
    2,303-token "prefill" take milliseconds and the real long prefills look like stalls."""
    import asyncio

    import httpx

    from tropical_sched.profiling.endpoint import _stream_times

    refusal = (
        b'data: {"object": "error", "message": "Input length (2303 tokens) exceeds the maximum allowed length '
        b'(2298 tokens).", "type": "BadRequestError", "code": 400}\n\ndata: [DONE]\n\n'
    )
    token = b'data: {"choices": [{"index": 0, "text": "a"}], "usage": {"completion_tokens": 1}}\n\ndata: [DONE]\n\n'

    async def stream(body: bytes) -> tuple[float, list[tuple[float, int]]]:
        headers = {"content-type": "text/event-stream"}
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body, headers=headers))
        async with httpx.AsyncClient(transport=transport) as client:
            return await _stream_times(client, "http://engine", "m", [1, 2, 3], 1)

    _, arrivals = asyncio.run(stream(token))
    assert [count for _, count in arrivals] == [1]
    with pytest.raises(ConfigError, match=r"refused the request: .*2298 tokens"):
        asyncio.run(stream(refusal))


def test_decode_estimate_is_robust_to_tokens_delivered_in_bursts() -> None:
    from tropical_sched.profiling.endpoint import decode_step_estimate_s

    # three streams, a token every 10 ms; the first is read in pairs (coalesced events), the second in bursts of
    # five, which must not change the estimate: single gaps would swing between 0 and 50 ms
    steady = [(0.01 * i, i) for i in range(1, 33)]
    pairs = [(0.01 * i, i) for i in range(2, 33, 2)]
    bursts = [(0.01 * i + 0.0001 * j, i + j) for i in range(5, 33, 5) for j in range(5)]
    step_s, generated = decode_step_estimate_s([steady, pairs, bursts])
    assert step_s == pytest.approx(0.01, rel=0.05)
    assert 10 < generated < 25
    assert decode_step_estimate_s([[(0.1, 1)], []]) is None
    # one stream whose tokens all came in one read at the end: no estimate rather than a near-zero one
    assert decode_step_estimate_s([[(0.1, 1), (0.3, 16), (0.3001, 17)]]) is None


def test_fidelity_rows_give_relative_errors_and_nan_where_undefined() -> None:
    import math

    from tropical_sched.metrics import fidelity_rows
    from tropical_sched.metrics.attainment import AttainmentSummary

    def summary(ttft_p50_s: float, attainment: float) -> AttainmentSummary:
        return AttainmentSummary(
            num_requests=10,
            slo_attainment=attainment,
            ttft_attainment=1.0,
            tpot_attainment=1.0,
            ttft_p50_s=ttft_p50_s,
            ttft_p90_s=0.2,
            tpot_p50_s=math.nan,
            tpot_p90_s=0.05,
            num_rejected=0,
            num_multiplexed=0,
            num_preempted=0,
        )

    rows = {r.metric: r for r in fidelity_rows(summary(0.1, 0.0), summary(0.12, 0.5))}
    assert rows["ttft_p50_s"].relative_error == pytest.approx(0.2)
    assert rows["ttft_p90_s"].relative_error == 0.0
    assert math.isnan(rows["tpot_p50_s"].relative_error)  # nothing measured
    assert math.isnan(rows["slo_attainment"].relative_error)  # measured 0: a relative error is undefined


def test_replay_round_robin_and_validate_against_fake_engines(tmp_path: Path) -> None:
    """`tropical replay` spreads requests over several URLs; `tropical validate` replays and simulates the same
    requests. Fake engines priced by the profile itself (20x faster than the GPU) must come out close to the
    simulator at light load, up to the HTTP round trip."""
    from tropical_sched.cli.main import main as tropical_main
    from tropical_sched.predictors import write_profile_file

    scaled = time_scaled(load_profile("a100-opt-13b-tp1").file, 0.05)
    profile_path = tmp_path / "scaled.json"
    write_profile_file(scaled, profile_path)
    engines = [FakeEngine(Profile(scaled), max_num_seqs=32) for _ in range(2)]
    common = [
        "--profile",
        str(profile_path),
        "--num-requests",
        "40",
        "--rate",
        "8",
        "--arrival",
        "poisson",
        "--tpot-slo-scale",
        "5",
        "--no-progress",
    ]
    with ServerThread(engines[0].app) as first, ServerThread(engines[1].app) as second:
        replay_json = tmp_path / "replay.json"
        assert (
            tropical_main(["replay", "--url", first.url, "--url", second.url, *common, "--json", str(replay_json)]) == 0
        )
        assert engines[0].stats.num_requests == engines[1].stats.num_requests == 20
        assert json.loads(replay_json.read_text())["num_requests"] == 40
        validate_json = tmp_path / "validate.json"
        assert (
            tropical_main(
                [
                    "validate",
                    "--url",
                    first.url,
                    *common,
                    "--policy-option",
                    "vllm-chunked.max_num_batched_tokens=2048",
                    "--json",
                    str(validate_json),
                ]
            )
            == 0
        )
    data = json.loads(validate_json.read_text())
    assert set(data["simulated"]) == {"vllm-chunked"}
    errors = data["relative_error"]["vllm-chunked"]
    assert set(errors) == {"ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "slo_attainment"}
    assert data["measured"]["slo_attainment"] > 0.5
    assert errors["tpot_p50_s"] < 0.5
    # TTFT: the simulator has no HTTP; the replay's round trip adds a few ms here, on steps 20x shorter than a GPU's
    simulated = data["simulated"]["vllm-chunked"]
    assert 0 <= data["measured"]["ttft_p50_s"] - simulated["ttft_p50_s"] < 0.02


def test_text_prompts_follow_the_tokenizers_characters_per_token() -> None:
    from tropical_sched.cli.main import build_parser
    from tropical_sched.serve.replay import ReplaySettings, _prompt

    default = _prompt(ReplaySettings(url="http://x", prompt_format="text"), 0, 400)
    byte_level = _prompt(ReplaySettings(url="http://x", prompt_format="text", chars_per_token=1.0), 0, 400)
    assert len(default) == pytest.approx(1600, abs=4)  # 400 tokens x 4 characters
    assert len(byte_level) == pytest.approx(400, abs=4)
    args = build_parser().parse_args(
        ["replay", "--url", "http://x", "--prompt-format", "text", "--chars-per-token", "1"]
    )
    assert args.chars_per_token == 1.0


# -- pinning: --cpus and VLLM_CPU_OMP_THREADS_BIND -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("1", (1,)), ("0-3", (0, 1, 2, 3)), ("5,0-1", (0, 1, 5)), (" 2 , 2", (2,)), ("3-3", (3,))],
)
def test_cpu_lists_read_as_taskset_reads_them(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a CPU list"),
        ("a", "not a CPU list"),
        ("1-", "not a CPU list"),
        ("-1", "not a CPU list"),
        ("3-1", "runs backwards"),
    ],
)
def test_a_malformed_cpu_list_names_the_option(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"--cpus: .*{message}"):
        parse_cpu_list(text)


@given(st.sets(st.integers(min_value=0, max_value=300), min_size=1))
def test_formatted_cpu_lists_read_back_to_the_same_cores(cpus: set[int]) -> None:
    text = format_cpu_list(cpus)
    assert parse_cpu_list(text) == tuple(sorted(cpus))
    assert len(text.split(",")) <= len(cpus)  # ranges, never longer than one id per core


BIND = "VLLM_CPU_OMP_THREADS_BIND"


@pytest.mark.parametrize(
    ("option", "environ", "tp", "cpus"),
    [
        (None, {}, 1, None),  # nothing asks: the process runs where it may
        ("1", {}, 1, (1,)),
        (None, {BIND: "1"}, 1, (1,)),  # the served engine's variable pins the profiler alike
        ("0-1", {BIND: "auto"}, 1, (0, 1)),  # vLLM's own values name no cores
        ("1", {BIND: "nobind"}, 1, (1,)),
        ("1", {BIND: "1"}, 1, (1,)),
        (None, {BIND: "0-3|4-7"}, 2, None),  # vLLM binds each rank itself
    ],
)
def test_the_cores_come_from_the_option_or_the_variable(
    option: str | None, environ: dict[str, str], tp: int, cpus: tuple[int, ...] | None
) -> None:
    assert resolve_cpus(option, tensor_parallel_size=tp, environ=environ) == cpus


@pytest.mark.parametrize(
    ("option", "environ", "tp", "message"),
    [
        ("0", {BIND: "1"}, 1, "--cpus 0 disagrees with VLLM_CPU_OMP_THREADS_BIND='1'"),
        ("1", {}, 2, "at --tp 2 vLLM binds each rank itself"),
        (None, {BIND: "0|1"}, 1, "one list per rank, but the engine runs at --tp 1"),
        (None, {BIND: "x"}, 1, "VLLM_CPU_OMP_THREADS_BIND: 'x' is not a CPU list"),
    ],
)
def test_conflicting_or_malformed_pinning_is_refused(
    option: str | None, environ: dict[str, str], tp: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_cpus(option, tensor_parallel_size=tp, environ=environ)


PIN_SCRIPT = """
import json, os, sys, threading
from tropical_sched.profiling.pinning import cpu_environment, pin_process
started, stop = threading.Event(), threading.Event()
thread = threading.Thread(target=lambda: (started.set(), stop.wait()))
thread.start()
started.wait()
environ = {}
pin_process((int(sys.argv[1]),), environ)
later = threading.Thread(target=lambda: None)
print(json.dumps({
    "main": sorted(os.sched_getaffinity(0)),
    "earlier_thread": sorted(os.sched_getaffinity(thread.native_id)),
    "environ": environ,
    "recorded": cpu_environment(num_threads=1, environ=environ),
}))
stop.set()
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning is Linux only")
def test_pinning_moves_every_thread_and_sets_the_binding_variable() -> None:
    core = max(os.sched_getaffinity(0))
    # in a child process: pinning this one would pin the rest of the test run
    done = subprocess.run(
        [sys.executable, "-c", PIN_SCRIPT, str(core)], capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(done.stdout)
    assert result["main"] == [core]
    assert result["earlier_thread"] == [core]  # a thread started before the pinning (as torch's pool) moved too
    assert result["environ"] == {BIND: str(core), "OMP_NUM_THREADS": "1"}
    assert result["recorded"] == {"cpu_affinity": str(core), "omp_threads_bind": str(core), "num_threads": "1"}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning is Linux only")
def test_pinning_to_a_core_the_machine_lacks_names_the_cores_it_has() -> None:
    allowed = format_cpu_list(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=rf"--cpus 4095: cannot pin .* this process may use {allowed}$"):
        pin_process((4095,), {})
    assert format_cpu_list(os.sched_getaffinity(0)) == allowed  # nothing moved
    assert cpu_environment(num_threads=None, environ={}) == {"cpu_affinity": allowed, "omp_threads_bind": "unset"}


def test_profile_vllm_gets_the_cores_of_cpus_or_of_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tropical_sched.profiling import vllm_inprocess

    calls: list[dict[str, object]] = []

    def fake_profile_vllm(model: str, **options: object) -> ProfileFile:
        calls.append(options)
        return load_profile("cpu-tiny-llama").file

    monkeypatch.setattr(vllm_inprocess, "profile_vllm", fake_profile_vllm)
    monkeypatch.delenv(BIND, raising=False)
    out = str(tmp_path / "p.json")
    assert profile_main(["vllm", "--model", "m", "--cpus", "0-1,3", "--out", out]) == 0
    assert calls[-1]["cpus"] == (0, 1, 3)
    assert profile_main(["vllm", "--model", "m", "--out", out]) == 0
    assert calls[-1]["cpus"] is None
    monkeypatch.setenv(BIND, "1")
    assert profile_main(["vllm", "--model", "m", "--out", out]) == 0
    assert calls[-1]["cpus"] == (1,)
    capsys.readouterr()
    assert profile_main(["vllm", "--model", "m", "--cpus", "0", "--out", out]) == 2
    assert len(calls) == 3  # refused before the sweep
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("tropical-profile: error: --cpus 0 disagrees with VLLM_CPU_OMP_THREADS_BIND='1'")


# -- tropical-profile save: a router's live profile ------------------------------------------------------------


def test_save_writes_the_profile_the_router_predicts_with(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tropical_sched.serve.config import RouterConfig
    from tropical_sched.serve.router import Router

    fast = time_scaled(load_profile("cpu-tiny-llama").file, 0.5)
    fast_path = tmp_path / "fast.json"
    write_profile_file(fast, fast_path)
    engines = [FakeEngine(Profile(fast), engine_id=f"e{i}") for i in range(2)]
    with ServerThread(engines[0].app) as first, ServerThread(engines[1].app) as second:
        router = Router(
            RouterConfig.model_validate(
                {
                    "profile": "cpu-tiny-llama",
                    "instances": [
                        {"url": first.url, "role": "prefill"},
                        {"url": second.url, "role": "multiplexing", "profile": str(fast_path)},
                    ],
                }
            )
        )
        with ServerThread(router.app) as server:
            own, other = tmp_path / "router.json", tmp_path / "second.json"
            assert profile_main(["save", "--url", server.url, "--out", str(own)]) == 0
            assert f"wrote {own}: " in capsys.readouterr().out
            assert profile_main(["save", "--url", server.url + "/", "--instance", second.url, "--out", str(other)]) == 0
            # what the router answers, checked and written as a profile file
            for path, query in ((own, {}), (other, {"instance": second.url})):
                answer = httpx.get(server.url + "/v1/tropical/profile", params=query).json()
                assert load_profile(path).file == ProfileFile.model_validate(answer)
            # each its own: before any traffic, the router's profile and the instance's (calibration starts there)
            assert load_profile(own).file.fit.coefficients == load_profile("cpu-tiny-llama").file.fit.coefficients
            assert load_profile(other).file.fit.coefficients == pytest.approx(fast.fit.coefficients)
            # an instance the router does not have: the router's own message, one line, nothing written
            capsys.readouterr()
            missing = tmp_path / "missing.json"
            unknown = "http://127.0.0.1:9"
            assert profile_main(["save", "--url", server.url, "--instance", unknown, "--out", str(missing)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1
            assert err.startswith(f"tropical-profile: error: {server.url}/v1/tropical/profile?instance=")
            assert f"HTTP 404: query instance = '{unknown}' is not one of" in err
            assert not missing.exists()


def test_save_names_the_url_when_the_router_is_unreachable_or_its_answer_is_no_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tropical_sched.serve.testing import free_port

    out = tmp_path / "p.json"
    closed = f"http://127.0.0.1:{free_port()}"
    assert profile_main(["save", "--url", closed, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"tropical-profile: error: --url {closed}: cannot fetch ")
    broken = load_profile("cpu-tiny-llama").file.model_dump(mode="json")
    broken["kv_cache"]["num_tokens"] = 0

    async def not_a_profile(request: object) -> JSONResponse:
        return JSONResponse(broken)

    with ServerThread(Starlette(routes=[Route("/v1/tropical/profile", not_a_profile)])) as server:
        assert profile_main(["save", "--url", server.url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"tropical-profile: error: {server.url}/v1/tropical/profile:1: ")
    assert "kv_cache.num_tokens" in err
    assert not out.exists()


# -- serving overheads: a served engine against its in-process profile -----------------------------------------


def _served_samples(engine: Profile, per_step_s: float, per_token_s: float, per_request_s: float) -> list[StepSample]:
    """What an endpoint sweep of a server that adds these overheads to ``engine``'s steps measures, exactly."""
    model = engine.step_time
    samples = [
        StepSample(
            step_time_s=model.prefill_time_s(length) + per_step_s + per_token_s + per_request_s,
            num_decode_seqs=0,
            num_decode_context_tokens=0,
            prefill_chunks=((0, length),),
        )
        for length in (16, 100, 700, 2000)
    ]
    samples += [
        StepSample(
            step_time_s=model.decode_step_time_s(b, b * context) + per_step_s + b * per_token_s,
            num_decode_seqs=b,
            num_decode_context_tokens=b * context,
            prefill_chunks=(),
        )
        for b in (1, 2, 6, 18, 32)
        for context in (64, 500)
    ]
    return samples


@pytest.mark.parametrize(
    ("per_step_s", "per_token_s", "per_request_s"), [(0.002, 0.0008, 0.006), (0.0, 0.001, 0.004), (0.003, 0.0, 0.0)]
)
def test_serving_overheads_recover_what_the_server_adds(
    per_step_s: float, per_token_s: float, per_request_s: float
) -> None:
    engine = load_profile("cpu-tiny-llama")
    samples = _served_samples(engine, per_step_s, per_token_s, per_request_s)
    overheads = serving_overheads(samples, engine.step_time, source="test")
    assert overheads.per_step_s == pytest.approx(per_step_s, abs=1e-9)
    assert overheads.per_streamed_token_s == pytest.approx(per_token_s, abs=1e-9)
    assert overheads.per_request_s == pytest.approx(per_request_s, abs=1e-9)
    assert (overheads.pd_hop_fixed_s, overheads.pd_hop_per_prompt_token_s) == (0.0, 0.0)  # not measured here
    assert overheads.source == "test"


def test_serving_overheads_resist_a_stall_and_stay_non_negative() -> None:
    engine = load_profile("cpu-tiny-llama")
    samples = _served_samples(engine, 0.002, 0.0005, 0.005)
    stalled = samples[-1].model_copy(update={"step_time_s": samples[-1].step_time_s + 0.5})
    overheads = serving_overheads([*samples, stalled, samples[-1]], engine.step_time, source="test")
    assert overheads.per_step_s == pytest.approx(0.002, abs=1e-9)  # the batch's median, not its mean
    assert overheads.per_streamed_token_s == pytest.approx(0.0005, abs=1e-9)
    # a server faster than the profile (another machine, a wrong profile): zeros, not negative costs
    fast = _served_samples(Profile(time_scaled(engine.file, 0.5)), 0.0, 0.0, 0.0)
    overheads = serving_overheads(fast, engine.step_time, source="test")
    assert (overheads.per_step_s, overheads.per_streamed_token_s, overheads.per_request_s) == (0.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="got 0 prefills and 10 decode batches"):
        serving_overheads(samples[4:], engine.step_time, source="test")


def test_endpoint_sweep_with_the_in_process_profile_writes_it_with_serving_overheads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one-shot: sweep a fake engine (steps of the bundled tiny profile) through HTTP, compare with that profile.
    The fake engine adds only HTTP and event-loop time, a few milliseconds at most."""
    engine = load_profile("cpu-tiny-llama")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_hidden_layers": 2,
                "intermediate_size": 256,
                "vocab_size": 352,
                "max_position_embeddings": 2048,
            }
        )
    )
    out = tmp_path / "served.json"
    # contexts within the profile's range (pytest turns its extrapolation warning into an error in the engine)
    with ServerThread(FakeEngine(engine, max_num_seqs=8, max_model_len=1024).app) as server:
        argv = ["vllm", "--endpoint", server.url, "--model", str(tmp_path), "--served-model-name", "fake-model"]
        argv += ["--quick", "--repetitions", "1", "--max-num-seqs", "8", "--kv-cache-tokens", "20000"]
        assert profile_main([*argv, "--no-progress", "--in-process-profile", "cpu-tiny-llama", "--out", str(out)]) == 0
    assert "serving overheads: " in capsys.readouterr().out
    served = load_profile(out)
    assert served.file.samples == engine.file.samples  # the engine's steps, as profiled in-process
    assert served.file.fit == engine.file.fit
    assert served.name == "served"
    assert served.metadata.environment["serving_endpoint"] == server.url
    assert served.metadata.environment["omp_threads_bind"] == engine.metadata.environment["omp_threads_bind"]
    serving = served.file.serving
    assert serving is not None
    assert "measured by tropical-profile --endpoint" in serving.source
    assert serving.per_request_s + serving.per_step_s + 8 * serving.per_streamed_token_s < 0.05
    assert profile_main(["show", str(out)]) == 0
    assert "serving overheads: " in capsys.readouterr().out
    assert profile_main(["vllm", "--model", "m", "--in-process-profile", "cpu-tiny-llama", "--out", str(out)]) == 2
    assert "--in-process-profile needs --endpoint URL" in capsys.readouterr().err

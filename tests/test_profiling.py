"""tropical-profile without an engine: sweep planning, step classification, fitting measured steps, the endpoint
profiler against a fake engine, the importers' reproducibility of the bundled profiles, and the CLI."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from tropical_sched.core.errors import ConfigError
from tropical_sched.predictors import load_profile, time_scaled
from tropical_sched.predictors.profile import EngineInfo, HardwareInfo, ModelInfo, Profile
from tropical_sched.profiling.cli import main as profile_main
from tropical_sched.profiling.endpoint import kv_cache_tokens_from_metrics, profile_endpoint
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
def test_import_reproduces_the_bundled_profile_byte_for_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], bundled: str
) -> None:
    out = tmp_path / f"{bundled}.json"
    assert profile_main(["import", *argv, "--out", str(out)]) == 0
    assert "R^2" in capsys.readouterr().out
    assert out.read_text() == (BUNDLED / f"{bundled}.json").read_text()


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

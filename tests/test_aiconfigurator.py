"""Profiles from AIConfigurator's kernel tables: ``tropical-profile import aiconfigurator`` and the bundled ones.

aiconfigurator-core is part of the test extra; it answers offline from the tables in its wheel.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path

import pytest

from tropical_sched.cli.main import main
from tropical_sched.core.errors import ConfigError
from tropical_sched.predictors.profile import load_profile
from tropical_sched.profiling.cli import main as profile_main
from tropical_sched.profiling.show import step_kind

pytest.importorskip("aiconfigurator_core", reason="aiconfigurator-core (the test extra) is not installed")

from tropical_sched.profiling.aiconfigurator import (
    CONTEXT_BANDS,
    _quiet,
    fit_error_by_context_band,
    import_aiconfigurator,
    sample_context_tokens,
)

LLAMA_70B = "meta-llama/Meta-Llama-3.1-70B"
AIC_PROFILES = (
    "a100-llama3.1-70b-tp4",
    "h100-llama3.1-70b-tp4",
    "h200-llama3.1-70b-tp4",
    "h100-llama3.1-8b-tp1",
    "h200-llama3.1-8b-tp1",
    "h200-qwen3-32b-tp2",
    "h200-qwen3-32b-tp2-sglang",
)


@pytest.fixture(scope="module")
def h100_70b():  # type: ignore[no-untyped-def]
    return import_aiconfigurator(LLAMA_70B, system="h100_sxm", backend="vllm", tensor_parallel_size=4)


def test_import_samples_every_kind_of_step_up_to_the_models_context(h100_70b) -> None:  # type: ignore[no-untyped-def]
    profile = h100_70b
    assert profile.metadata.name == "h100-llama3.1-70b-tp4"
    assert profile.metadata.model.max_model_len == 131072  # Llama-3.1's context, from its config
    assert (profile.metadata.model.num_layers, profile.metadata.model.num_kv_heads) == (80, 8)
    assert 69e9 < profile.metadata.model.num_params < 72e9
    kinds = {step_kind(s) for s in profile.samples}
    assert {"prefill", "chunk", "decode", "mixed"} <= kinds
    assert max(sample_context_tokens(s) for s in profile.samples) == 131072
    assert profile.valid_range.max_num_prompt_tokens == 131072
    assert all(s.origin.startswith("AIConfigurator ") for s in profile.samples)
    assert profile.metadata.engine.version.startswith("0.24.0")
    assert profile.metadata.environment["backend_version"] == "0.24.0"


def test_samples_are_the_estimators_answers_to_the_calls_they_name(h100_70b) -> None:  # type: ignore[no-untyped-def]
    from aiconfigurator_core.sdk.engine import EngineHandle

    with _quiet():
        engine = EngineHandle.compile(LLAMA_70B, "h100_sxm", "vllm", tp_size=4)
    by_origin = {s.origin: s for s in h100_70b.samples}
    prefill = by_origin["AIConfigurator predict_prefill_latency(bs=1, isl=4096, prefix=0)"]
    assert prefill.prefill_chunks == ((0, 4096),)
    assert prefill.step_time_s == pytest.approx(engine.predict_prefill_latency(1, 4096, 0) / 1e3)
    chunk = by_origin["AIConfigurator predict_prefill_latency(bs=1, isl=16896, prefix=16384)"]
    assert chunk.prefill_chunks == ((16384, 512),)
    assert chunk.step_time_s == pytest.approx(engine.predict_prefill_latency(1, 16896, 16384) / 1e3)
    decode = by_origin["AIConfigurator decode_step_latency(gen_tokens=32, isl=8190, osl=2)"]
    # decode_step_latency's sequences attend to isl + osl // 2 + 1 tokens
    assert (decode.num_decode_seqs, decode.num_decode_context_tokens) == (32, 32 * 8192)
    assert decode.step_time_s == pytest.approx(engine.decode_step_latency(32, 8190, 2) / 1e3)


def test_the_fit_holds_in_every_context_band_long_context_included(h100_70b) -> None:  # type: ignore[no-untyped-def]
    bands = fit_error_by_context_band(h100_70b)
    assert [(b.lower_tokens, b.upper_tokens) for b in bands] == list(CONTEXT_BANDS)
    # the bands partition the fitted samples
    assert sum(b.num_samples for b in bands) == h100_70b.fit.num_samples_fitted
    for band in bands:
        assert band.median_relative_error < 0.10, band
        assert band.max_relative_error < 0.30, band
    # a long prompt alone: the estimator's 64K-token prefill, predicted from the fit within 10%
    model = load_profile("h100-llama3.1-70b-tp4").step_time
    (sample,) = [s for s in h100_70b.samples if s.prefill_chunks == ((0, 65536),)]
    assert model.prefill_time_s(65536) == pytest.approx(sample.step_time_s, rel=0.10)


def test_kv_capacity_is_aiconfigurators_memory_estimate(h100_70b) -> None:  # type: ignore[no-untyped-def]
    from aiconfigurator_core.sdk.memory import estimate_kv_cache

    with _quiet():
        kv = estimate_kv_cache(
            LLAMA_70B,
            "h100_sxm",
            "vllm",
            "0.24.0",
            max_num_tokens=8192,
            max_batch_size=256,
            memory_fraction_kind="of_total",
            memory_fraction_value=0.9,
            tp_size=4,
        )
    assert h100_70b.kv_cache.num_tokens == kv["total_kv_size_tokens"]
    assert "estimate_kv_cache" in h100_70b.kv_cache.derivation
    # no decode batch beyond the cache was sampled
    assert all(s.num_decode_context_tokens <= h100_70b.kv_cache.num_tokens for s in h100_70b.samples)


def test_max_model_len_cuts_the_grid() -> None:
    profile = import_aiconfigurator(
        LLAMA_70B, system="a100_sxm", backend="vllm", tensor_parallel_size=4, max_model_len=4096, name="a100-4k"
    )
    assert profile.metadata.name == "a100-4k"
    assert profile.metadata.model.max_model_len == 4096
    assert max(sample_context_tokens(s) for s in profile.samples) == 4096
    assert profile.metadata.engine.version.startswith("0.14.0")  # A100's current vLLM tables


def test_sglang_tables_name_their_backend() -> None:
    profile = import_aiconfigurator("Qwen/Qwen3-32B", system="h200_sxm", backend="sglang", tensor_parallel_size=2)
    assert profile.metadata.name == "h200-qwen3-32b-tp2-sglang"
    assert profile.metadata.engine.name == "sglang"
    assert profile.metadata.model.max_model_len == 40960


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "nobody/no-such-model"}, "--model 'nobody/no-such-model': no config.json there"),
        ({"system": "z100"}, "--system 'z100' is not an AIConfigurator system"),
        ({"backend": "trtllm"}, "--backend must be vllm or sglang, got 'trtllm'"),
        ({"max_model_len": 200_000}, "--max-model-len 200000 exceeds the model's context (131072 tokens)"),
        ({"model": "mistralai/Mixtral-8x7B-v0.1"}, "is a mixture of experts"),
        ({"backend_version": "9.9"}, "AIConfigurator cannot estimate"),
    ],
)
def test_bad_requests_name_the_field(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"model": LLAMA_70B, "system": "h100_sxm", "backend": "vllm"}
    arguments.update(kwargs)
    model = arguments.pop("model")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_aiconfigurator(model, tensor_parallel_size=4, **arguments)  # type: ignore[arg-type]


def test_a_corrupt_local_config_fails_with_its_path(tmp_path: Path) -> None:
    from tropical_sched.core.errors import ProfileFormatError

    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 4096,\n "num_hidden_layers": }')
    with pytest.raises(ProfileFormatError, match=f"{config}:2"):
        import_aiconfigurator(str(tmp_path), system="h100_sxm", backend="vllm")


def test_cli_writes_a_loadable_profile_and_reports_the_bands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.json"
    argv = ["import", "aiconfigurator", "--model", "meta-llama/Meta-Llama-3.1-8B", "--system", "h200_sxm"]
    assert profile_main([*argv, "--backend", "vllm", "--tp", "1", "--max-model-len", "32768", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "context 0-4,096 tokens" in captured.err
    assert "context 4,096-32,768 tokens" in captured.err
    assert f"wrote {out}" in captured.out
    profile = load_profile(out)
    assert profile.name == "h200-llama3.1-8b-tp1"  # the importer's name, as for the other imports
    assert profile.max_model_len == 32768
    assert main(["simulate", "--profile", str(out), "--num-requests", "50", "--no-progress"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "vllm"], "import aiconfigurator needs --system"),
        (["--system", "h200_sxm"], "import aiconfigurator needs --backend"),
        (["--system", "h200_sxm", "--backend", "vllm", "--max-model-len", "0"], "--max-model-len: must be >= 1, got 0"),
    ],
)
def test_cli_errors_are_one_line(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["import", "aiconfigurator", "--model", LLAMA_70B, "--tp", "4", "--out", "/tmp/never.json", *extra]
    try:
        status = profile_main(argv)
    except SystemExit as exc:  # argparse exits on its own errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err


def test_cli_takes_no_files_for_aiconfigurator(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["import", "aiconfigurator", "perf_model.csv", "--model", LLAMA_70B, "--system", "h100_sxm"]
    assert profile_main([*argv, "--backend", "vllm", "--tp", "4", "--out", "/tmp/never.json"]) == 2
    assert "import aiconfigurator takes no files, got 1: perf_model.csv" in capsys.readouterr().err


@pytest.mark.parametrize("name", AIC_PROFILES)
def test_bundled_profiles_are_what_the_importer_makes(name: str) -> None:
    """The bundled files are reproducible: the same import today gives the same coefficients (when the installed
    aiconfigurator-core is the one that built them; its tables may change with a release)."""
    bundled = load_profile(name)
    environment = bundled.metadata.environment
    if metadata.version("aiconfigurator-core") != environment["aiconfigurator_core"]:
        pytest.skip(f"built with aiconfigurator-core {environment['aiconfigurator_core']}")
    fresh = import_aiconfigurator(
        bundled.metadata.model.name,
        system=environment["system"],
        backend=environment["backend"],
        tensor_parallel_size=bundled.tensor_parallel_size,
    )
    assert fresh.metadata.name == name
    assert fresh.fit.coefficients == pytest.approx(bundled.file.fit.coefficients, rel=1e-9)
    assert fresh.kv_cache.num_tokens == bundled.num_kv_cache_tokens


def test_quiet_leaves_logging_as_it_was() -> None:
    before = logging.root.manager.disable
    with _quiet():
        assert logging.root.manager.disable >= logging.WARNING
    assert logging.root.manager.disable == before


def test_long_prompts_run_unclipped_on_a_long_context_profile(tmp_path: Path) -> None:
    """Mooncake's prompts (max 126K tokens) fit Llama-3.1's context: nothing filtered or clipped, and the JSON's
    workload_report says so; on Llama-2's 4K context they are clipped, and it says how many."""
    counts = {}
    for profile in ("h100-llama3.1-70b-tp4", "h100-llama2-70b-tp4"):
        out = tmp_path / f"{profile}.json"
        argv = ["simulate", "--profile", profile, "--trace", "mooncake-conversation", "--overlength", "clip"]
        assert (
            main([*argv, "--num-requests", "300", "--policies", "tropical", "--json", str(out), "--no-progress"]) == 0
        )
        counts[profile] = json.loads(out.read_text())["workload_report"]
    assert counts["h100-llama3.1-70b-tp4"] == {
        "num_requests": 300,
        "num_filtered": 0,
        "num_prompts_clipped": 0,
        "num_outputs_clipped": 0,
    }
    clipped = counts["h100-llama2-70b-tp4"]
    assert clipped["num_requests"] == 300
    assert clipped["num_filtered"] == 0
    # 66% of Mooncake's prompts exceed 4,095 tokens (7,929 of 12,031), and a clipped prompt leaves its output
    # one token
    assert 150 < clipped["num_prompts_clipped"] < 250
    assert clipped["num_outputs_clipped"] >= clipped["num_prompts_clipped"]


def test_the_documented_imports_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/profiling.md's AIConfigurator commands, verbatim but for where they write."""
    from tests.doc_commands import doc_block_commands

    commands = doc_block_commands(
        Path(__file__).resolve().parent.parent / "docs" / "profiling.md", "aiconfigurator-import"
    )
    assert len(commands) == 2
    for command in commands:
        assert command.argv[:3] == ("tropical-profile", "import", "aiconfigurator")
        out = tmp_path / Path(command.option("--out")).name
        assert profile_main(list(command.with_option("--out", str(out)).argv[1:])) == 0
        assert load_profile(out).step_time.prefill_time_s(1024) > 0
    assert load_profile(tmp_path / "h100-llama3.1-8b-32k.json").max_model_len == 32768


def test_list_shows_each_profiles_context_and_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.count("│") > 5}
    for name in AIC_PROFILES:
        context = "40,960" if "qwen3" in name else "131,072"
        assert context in rows[name], rows[name]
        assert "aiconfigurator" in rows[name], rows[name]
    assert "4,096" in rows["a100-llama2-70b-tp4"]
    assert "splitwise-sim" in rows["a100-llama2-70b-tp4"]
    assert "sglang 0.5.14" in rows["h200-qwen3-32b-tp2-sglang"]

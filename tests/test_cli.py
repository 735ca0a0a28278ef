"""The command line: the main job, its JSON, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tropical_sched.cli.main import main
from tropical_sched.profiling.cli import main as profile_main

FAST = ["--num-requests", "150", "--no-progress", "--max-num-seqs", "64"]


def test_simulate_prints_the_table_and_writes_the_json_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    assert main(["simulate", *FAST, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("tropical", "vllm", "vllm-chunked", "distserve", "SLO att.", "TPOT p50/p90 ms"):
        assert name in printed
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1
    assert (data["trace"], data["profile"], data["num_requests"]) == ("azure-conv-2023", "a100-llama2-70b-tp4", 150)
    assert list(data["policies"]) == ["tropical", "vllm", "vllm-chunked", "distserve"]
    keys = {
        "slo_attainment",
        "ttft_attainment",
        "tpot_attainment",
        "ttft_p50_s",
        "ttft_p90_s",
        "tpot_p50_s",
        "tpot_p90_s",
        "num_rejected",
        "num_multiplexed",
    }
    for figures in data["policies"].values():
        assert keys <= set(figures)
        assert 0 <= figures["slo_attainment"] <= 1


def test_simulate_options_reach_the_experiment(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = [
        "simulate",
        "--trace",
        "arxiv-summarization",
        "--rate",
        "0.5",
        "--workers",
        "4",
        "--prefill-workers",
        "1",
        "--policies",
        "tropical,distserve",
        "--ttft-slo-ms",
        "3000",
        "--tpot-slo-ms",
        "150",
        "--seed",
        "3",
        "--policy-option",
        "tropical.route_order=multiplex-first",
        "--policy-option",
        "tropical.toggle.enabled=false",
        "--json",
        str(out),
        *FAST,
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["num_gpus"] == 16
    assert data["slo"] == "TTFT 3000 ms, TPOT 150 ms"
    assert list(data["policies"]) == ["tropical", "distserve"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--rate", "abc"], "tropical simulate: error: argument --rate: 'abc' is not a number"),
        (["simulate", "--workers", "0"], "argument --workers: '0' must be >= 1"),
        (
            ["simulate", "--policies", "tropical,foo"],
            "unknown policy 'foo'; known: distserve, scorpio, slos-serve, tempo, tropical",
        ),
        (["simulate", "--trace", "missing.csv"], "no such trace file: missing.csv"),
        (["simulate", "--profile", "b200"], "unknown profile 'b200'"),
        (["simulate", "--workers", "1", "--policies", "tropical"], "at least one prefill and one multiplexing worker"),
        (["simulate", "--policy-option", "route_order=x"], "is not POLICY.KEY=VALUE"),
        (["simulate", "--policy-option", "tropical.route_order=x"], "TropicalConfig.route_order must be one of"),
        (["simulate", "--ttft-slo-ms", "5", "--ttft-slo-scale", "2"], "not allowed with argument"),
    ],
)
def test_bad_arguments_end_with_one_clear_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse exits on its own errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err


def test_corrupt_trace_file_names_path_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrival_at_s,num_prompt_tokens,num_output_tokens\n0,10,5\n1,abc,4\n")
    assert main(["simulate", "--trace", str(path), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tropical simulate: error: {path}:3: field 'num_prompt_tokens' = 'abc' is not an integer"
    )


def test_list_shows_profiles_traces_and_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "a100-llama2-70b-tp4",
        "h100-llama2-70b-tp4",
        "a100-opt-66b-tp4",
        "mooncake-conversation",
        "sharegpt",
        "distserve",
    ):
        assert name in out


def test_tropical_profile_without_a_command_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        profile_main([])
    assert exc.value.code == 2
    assert "{vllm,sglang,import,show}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        profile_main(["--version"])
    assert exc.value.code == 0
    assert "tropical-profile (tropical-sched " in capsys.readouterr().out


def test_console_scripts_are_installed() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts["tropical"] == "tropical_sched.cli.main:main"
    assert scripts["tropical-profile"] == "tropical_sched.profiling.cli:main"
    result = subprocess.run(
        [sys.executable, "-m", "tropical_sched.cli.main", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("tropical-sched ")

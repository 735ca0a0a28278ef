"""The command line: the main job, its JSON, and one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tropical_sched.cli._common import report_notes_and_json
from tropical_sched.cli.main import main
from tropical_sched.cli.simulate import parse_policy_options
from tropical_sched.core.errors import ConfigError
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
        (
            ["simulate", "--workers", "2", "--prefill-workers", "2", "--policies", "tropical"],
            "at least one multiplexing worker",
        ),
        (["simulate", "--policy-option", "route_order=x"], "is not POLICY.KEY=VALUE"),
        (["simulate", "--policy-option", "tropical.route_order=x"], "TropicalConfig.route_order must be one of"),
        (["simulate", "--ttft-slo-ms", "5", "--ttft-slo-scale", "2"], "not allowed with argument"),
        (
            ["simulate", "--policy-option", "vllm.max_num_batched_tokens=abc"],
            "--policy-option 'vllm.max_num_batched_tokens=abc': the value must be an integer, got 'abc'",
        ),
        (
            ["simulate", "--policy-option", "tropical.toggle.enabled=maybe"],
            "--policy-option 'tropical.toggle.enabled=maybe': the value must be true or false, got 'maybe'",
        ),
        (
            ["simulate", "--policy-option", "tropical.slack_margin_fraction=lots"],
            "the value must be a number, got 'lots'",
        ),
        (["simulate", "--policy-option", "tropical.toggle=5"], "toggle is a group of options; set them one by one"),
        (["simulate", "--policy-option", "tropical.route_order.x=1"], "route_order is an option, not a group of them"),
        (
            ["serve", "--config", "c.yaml", "--port", "99999"],
            "argument --port: '99999' is not a port number in 1-65535",
        ),
        (["serve", "--config", "c.yaml", "--port", "0"], "argument --port: '0' is not a port number in 1-65535"),
        (["fake-engine", "--port", "-1"], "argument --port: '-1' is not a port number in 1-65535"),
        (["simulate", "--arrival", "gamma", "--burstiness", "1e308"], "burstiness_cv (--burstiness) must be in"),
        (["validate", "--url", "http://"], "argument --url: 'http://' has no host"),
        (["validate", "--url", "127.0.0.1:8000"], "argument --url: '127.0.0.1:8000' must start with http://"),
        (["validate", "--url", "http://h:99999"], "'http://h:99999' has port '99999', which is not a port number"),
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
    assert "{vllm,sglang,import,save,show}" in capsys.readouterr().err
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


def test_policy_option_values_take_the_type_of_their_option() -> None:
    options = parse_policy_options(
        [
            "vllm.max_num_batched_tokens=none",
            "tropical.toggle.enabled=FALSE",
            "tropical.slack_margin_fraction=1",
            "tropical.route_order=multiplex-first",
            "tempo.length_trace=2024",
            "unknown.key=3",
        ]
    )
    assert options == {
        "vllm": {"max_num_batched_tokens": None},
        "tropical": {"toggle": {"enabled": False}, "slack_margin_fraction": 1.0, "route_order": "multiplex-first"},
        "tempo": {"length_trace": "2024"},  # a file name that looks like a number stays a name
        "unknown": {"key": 3},  # the registry names the unknown policy
    }
    assert isinstance(options["tropical"]["slack_margin_fraction"], float)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the work started although its output cannot be written")


@pytest.mark.parametrize(
    ("argv", "work", "reason"),
    [
        (
            ["simulate", "--json", "{missing}/x.json"],
            "tropical_sched.cli.simulate.run_experiment",
            "directory {missing} does not exist",
        ),
        (
            ["slo-scale", "--json", "{missing}/s.json"],
            "tropical_sched.cli.goodput.run_slo_scale",
            "directory {missing} does not exist",
        ),
        (
            ["validate", "--url", "http://127.0.0.1:9", "--json", "{missing}/v.json"],
            "tropical_sched.cli.validate.run_experiment",
            "directory {missing} does not exist",
        ),
        (  # --plot creates its directory, but not below a file
            ["goodput", "--plot", "{file}/plots/g.png"],
            "tropical_sched.cli.goodput.run_goodput",
            "cannot create directory {file}/plots: Not a directory",
        ),
    ],
)
def test_an_unwritable_output_fails_in_one_line_before_the_work(
    argv: list[str],
    work: str,
    reason: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    places = {"{missing}": str(tmp_path / "no" / "such" / "dir"), "{file}": str(tmp_path / "a-file")}
    (tmp_path / "a-file").write_text("")
    for key, value in places.items():
        argv = [arg.replace(key, value) for arg in argv]
        reason = reason.replace(key, value)
    monkeypatch.setattr(work, _must_not_run)
    assert main([*argv, *FAST]) == 2
    option = argv[-2]
    assert _one_error_line(capsys) == f"tropical {argv[0]}: error: {option} {argv[-1]}: cannot write: {reason}"


def test_an_output_path_that_is_a_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("tropical_sched.cli.simulate.run_experiment", _must_not_run)
    assert main(["simulate", "--json", str(tmp_path), *FAST]) == 2
    assert _one_error_line(capsys) == f"tropical simulate: error: --json {tmp_path}: cannot write: it is a directory"


def test_a_write_that_fails_at_the_end_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "removed-meanwhile" / "x.json"
    with pytest.raises(ConfigError, match=rf"^--json {path}: cannot write: No such file or directory$"):
        report_notes_and_json([], str(path), {"a": 1})


def test_plot_without_matplotlib_names_the_extra_before_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails as if not installed
    monkeypatch.setattr("tropical_sched.cli.goodput.run_goodput", _must_not_run)
    assert main(["goodput", "--plot", str(tmp_path / "g.png"), *FAST]) == 2
    assert _one_error_line(capsys) == (
        "tropical goodput: error: --plot needs matplotlib: pip install 'tropical-sched[plot]'"
    )
    assert profile_main(["show", "a100-opt-13b-tp1", "--plot", str(tmp_path / "fit.png")]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err.strip() == "tropical-profile: error: --plot needs matplotlib: pip install 'tropical-sched[plot]'"
    )
    assert captured.out == ""  # refused before the table, not after it
    from tropical_sched.predictors import load_profile
    from tropical_sched.profiling.show import plot_fit

    with pytest.raises(ConfigError, match=r"pip install 'tropical-sched\[plot\]'"):
        plot_fit(load_profile("a100-opt-13b-tp1"), str(tmp_path / "fit.png"))


def test_profile_show_plot_writes_the_file_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "fit.png"
    assert profile_main(["show", "a100-opt-13b-tp1", "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(b"\x89PNG")
    assert f"wrote {path}" in capsys.readouterr().out
    assert profile_main(["show", "a100-opt-13b-tp1", "--plot", str(tmp_path)]) == 2  # not <dir>.png beside it
    assert _one_error_line(capsys) == f"tropical-profile: error: --plot {tmp_path}: cannot write: it is a directory"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["vllm", "--model", "m", "--out", "p.json", "--tp", "abc"], "argument --tp: 'abc' is not an integer"),
        (
            ["vllm", "--model", "m", "--out", "p.json", "--gpu-memory-utilization", "5"],
            "argument --gpu-memory-utilization: '5' must be in (0, 1]",
        ),
        (
            ["vllm", "--model", "m", "--out", "p.json", "--kv-cache-memory-gib", "-1"],
            "argument --kv-cache-memory-gib: '-1' must be a positive number",
        ),
        (["sglang", "--model", "m", "--out", "p.json", "--endpoint", "foo"], "argument --endpoint: 'foo' must start"),
        (
            ["vllm", "--model", "m", "--out", "{dir}/no/p.json"],
            "--out {dir}/no/p.json: cannot write: directory {dir}/no does not exist",
        ),
        (
            [
                "import",
                "splitwise",
                "{dir}/perf_model.csv",
                "--model",
                "llama2-70b",
                "--tp",
                "4",
                "--out",
                "p.json",
            ],
            "import splitwise: no such file: {dir}/perf_model.csv",
        ),
        (
            ["show", "a100-opt-13b-tp1", "--plot", "{dir}/a-file/fit.png"],
            "--plot {dir}/a-file/fit.png: cannot write: {dir}/a-file is not a directory",
        ),
        ([], "the following arguments are required: {vllm,sglang,import,save,show}"),
    ],
)
def test_tropical_profile_bad_arguments_end_with_one_clear_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    try:
        status = profile_main([arg.replace("{dir}", str(tmp_path)) for arg in argv])
    except SystemExit as exc:  # argparse exits on its own errors
        status = exc.code
    assert status == 2
    assert message.replace("{dir}", str(tmp_path)) in _one_error_line(capsys)


def test_a_profile_with_zero_step_times_names_the_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tropical_sched.predictors import load_profile, write_profile_file

    file = load_profile("a100-opt-13b-tp1").file
    zero = file.model_copy(
        update={"fit": file.fit.model_copy(update={"coefficients": dict.fromkeys(file.fit.coefficients, 0.0)})}
    )
    path = tmp_path / "zero.json"
    write_profile_file(zero, path)
    assert main(["simulate", "--profile", str(path), *FAST]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"tropical simulate: error: {path}:")
    assert "field fit.coefficients: " in err
    assert "so a prefill step would take no time" in err


def test_a_trace_whose_arrivals_go_backwards_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrival_at_s,num_prompt_tokens,num_output_tokens\n0,10,5\n2,10,4\n1,10,4\n")
    assert main(["simulate", "--trace", str(path), *FAST]) == 2
    assert _one_error_line(capsys) == (
        f"tropical simulate: error: {path}:4: field 'arrival_at_s' = '1' is earlier than '2' on line 3: arrival times "
        "must not go backwards (sort the file by arrival_at_s)"
    )


CLUSTER = (
    "instances:\n  - url: http://127.0.0.1:9\n    role: prefill\n  - url: http://127.0.0.1:10\n    role: multiplexing\n"
)


def test_serve_on_a_taken_port_is_one_line_naming_the_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(CLUSTER)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv in (["serve", "--config", str(config)], ["fake-engine"]):
            assert main([*argv, "--port", str(port)]) == 2
            assert _one_error_line(capsys) == (
                f"tropical {argv[0]}: error: cannot listen on 127.0.0.1:{port}: address already in use (another "
                "server runs there; choose another --port)"
            )


def test_serve_on_a_host_that_does_not_resolve_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(CLUSTER)
    assert main(["serve", "--config", str(config), "--host", "no-such-host.invalid", "--port", "8000"]) == 2
    assert _one_error_line(capsys).startswith(
        "tropical serve: error: --host 'no-such-host.invalid': cannot resolve it ("
    )


def test_serve_with_a_broken_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(CLUSTER.replace("  - url: http://127.0.0.1:10", "   - url: http://127.0.0.1:10"))
    assert main(["serve", "--config", str(config)]) == 2
    assert _one_error_line(capsys).startswith(
        f"tropical serve: error: {config}:4: not valid YAML: expected <block end>"
    )


def test_fake_engine_serves_on_the_port_it_names() -> None:
    """The server runs on the socket bound before it starts, and the line that names the address is true."""
    import httpx

    from tropical_sched.serve.testing import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tropical_sched.cli.main", "fake-engine", "--port", str(port), "--engine-id", "e1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
                break
            except httpx.TransportError:
                assert process.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert status == 200
    assert err.splitlines()[0] == f"fake engine e1: listening on http://127.0.0.1:{port}; profile a100-llama2-70b-tp4"

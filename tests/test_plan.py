"""``tropical plan``: every policy at every split it runs, the best one recommended with a cluster file that
``tropical serve`` loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tropical_sched.cli.main import main
from tropical_sched.core import ConfigError
from tropical_sched.serve.config import load_router_config
from tropical_sched.sim import Experiment, SearchSettings, candidate_splits, run_plan
from tropical_sched.sim.plan import PlanCandidate, cluster_yaml

SMALL = Experiment(
    profile="a100-llama2-70b-tp4",
    num_workers=3,
    num_requests=150,
    policies=("tropical", "distserve"),
    max_num_seqs=64,  # the profile's measured range
)
QUICK = SearchSettings(relative_tolerance=0.1, max_evaluations=6)


def test_each_policy_gets_the_splits_it_runs() -> None:
    experiment = Experiment(num_workers=4, policies=("tropical", "distserve", "vllm", "scorpio"))
    assert candidate_splits("tropical", 4, experiment) == (0, 1, 2, 3)
    assert candidate_splits("distserve", 4, experiment) == (1, 2, 3)
    assert candidate_splits("vllm", 4, experiment) == (0,)
    assert candidate_splits("scorpio", 4, experiment) == (0,)
    with pytest.raises(ConfigError, match=r"distserve.*runs on no split of 1 instances"):
        candidate_splits("distserve", 1, experiment)


def test_the_plan_searches_every_candidate_and_recommends_the_best() -> None:
    result = run_plan(SMALL, seeds=(0,), settings=QUICK, jobs=1)
    shapes = sorted((c.policy, c.num_prefill_workers) for c in result.candidates)
    assert shapes == [("distserve", 1), ("distserve", 2), ("tropical", 0), ("tropical", 1), ("tropical", 2)]
    goodputs = [c.goodput_per_s for c in result.candidates]
    assert goodputs == sorted(goodputs, reverse=True)
    assert result.recommendation is result.candidates[0]
    assert result.runner_up is not None
    assert result.runner_up.policy != result.recommendation.policy
    # Each candidate's goodput is its search's: the curve passes the target at it and fails above it.
    for candidate in result.candidates:
        (run,) = candidate.runs
        passing = [p.value for p in run.curve if p.slo_attainment >= QUICK.target_attainment]
        assert run.threshold == (max(passing) if passing else 0.0)
    data = result.to_json()
    assert data["schema_version"] == 1
    assert set(data["recommendation"]) >= {"policy", "prefill_workers", "goodput_per_s", "config_yaml", "curve"}
    assert {"policy", "prefill_workers", "goodput_per_s", "goodput_per_gpu_per_s"} <= set(data["candidates"][0])
    assert data["candidates"][0]["goodput_per_gpu_per_s"] == pytest.approx(data["candidates"][0]["goodput_per_s"] / 12)
    json.dumps(data)  # JSON-ready


def test_the_cluster_file_is_what_tropical_serve_loads(tmp_path: Path) -> None:
    candidate = PlanCandidate(policy="tropical", num_prefill_workers=1, roles=("prefill", "multiplexing"), runs=())
    experiment = Experiment(num_workers=2, policies=("tropical",), max_num_seqs=64)
    path = tmp_path / "cluster.yaml"
    urls = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    path.write_text(cluster_yaml(experiment, candidate, urls))
    config = load_router_config(path)
    assert config.policy == "tropical"
    assert config.profile == experiment.profile
    assert [(i.url, i.role.value, i.max_num_seqs) for i in config.instances] == [
        (urls[0], "prefill", 64),
        (urls[1], "multiplexing", 64),
    ]
    assert config.slo.spec() == experiment.slo
    with pytest.raises(ConfigError, match="urls: 1 given for 2 instances"):
        cluster_yaml(experiment, candidate, urls[:1])


def test_the_plan_refuses_a_fixed_split() -> None:
    with pytest.raises(ConfigError, match="num_prefill_workers=1: plan searches the split"):
        run_plan(Experiment(num_workers=2, num_prefill_workers=1, policies=("tropical",)), seeds=(0,))


def test_tropical_plan_command_writes_json_and_the_cluster_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, config = tmp_path / "plan.json", tmp_path / "cluster.yaml"
    argv = ["plan", "--instances", "2", "--policies", "tropical,vllm", "--seeds", "0", "--num-requests", "120"]
    argv += ["--max-evaluations", "5", "--tolerance", "0.1", "--jobs", "1", "--no-progress", "--max-num-seqs", "64"]
    assert main([*argv, "--json", str(out), "--config-out", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "recommended:" in printed
    data = json.loads(out.read_text())
    assert {(c["policy"], c["prefill_workers"]) for c in data["candidates"]} == {
        ("tropical", 0),
        ("tropical", 1),
        ("vllm", 0),
    }
    rec = data["recommendation"]
    assert config.read_text() == rec["config_yaml"]
    loaded = load_router_config(config)
    assert loaded.policy == rec["policy"]
    assert sum(i.role.value == "prefill" for i in loaded.instances) == rec["prefill_workers"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prefill-workers", "1"], "--prefill-workers: plan searches every split itself"),
        (["--instance-url", "http://127.0.0.1:9000"], "--instance-url: 1 given for --instances 2"),
    ],
)
def test_tropical_plan_errors_name_the_option(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--instances", "2", "--policies", "tropical", "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err

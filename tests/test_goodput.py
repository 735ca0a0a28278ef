"""Goodput and SLO-scale searches, their JSON, plots and CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest

from tropical_sched.cli.main import main
from tropical_sched.core import ConfigError
from tropical_sched.sim import CurvePoint, Experiment, SearchSettings, find_threshold, run_goodput, run_slo_scale


def _point(value: float, attainment: float) -> CurvePoint:
    return CurvePoint(
        value=value,
        slo_attainment=attainment,
        ttft_attainment=attainment,
        tpot_attainment=1.0,
        ttft_p90_s=1.0,
        tpot_p90_s=0.05,
        multiplexed_fraction=0.0,
    )


@pytest.mark.parametrize("start", [0.1, 1.0, 3.7, 50.0])
def test_rate_search_brackets_then_bisects_to_the_boundary(start: float) -> None:
    boundary = 2.345  # attainment is 1 below it and 0 above
    evaluations: list[float] = []

    def evaluate(rate: float) -> CurvePoint:
        evaluations.append(rate)
        return _point(rate, 1.0 if rate <= boundary else 0.0)

    settings = SearchSettings(relative_tolerance=0.01, max_evaluations=30)
    goodput, curve = find_threshold(evaluate, start, settings, passing_side="below")
    assert boundary * 0.99 <= goodput <= boundary
    assert [p.value for p in curve] == sorted(evaluations)
    assert len(evaluations) <= 30


def test_scale_search_finds_the_smallest_passing_scale() -> None:
    scale, _ = find_threshold(
        lambda s: _point(s, 0.95 if s >= 0.7 else 0.5),
        1.0,
        SearchSettings(relative_tolerance=0.01),
        passing_side="above",
    )
    assert 0.7 <= scale <= 0.71


def test_search_reports_zero_or_inf_when_nothing_passes() -> None:
    never = lambda value: _point(value, 0.0)  # noqa: E731
    assert find_threshold(never, 1.0, SearchSettings(), passing_side="below")[0] == 0.0
    assert find_threshold(never, 1.0, SearchSettings(), passing_side="above")[0] == math.inf


def test_search_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"SearchSettings\.target_attainment is out of range: 0"):
        SearchSettings(target_attainment=0)


SMALL = Experiment(
    trace="arxiv-summarization",
    arrival_process="poisson",
    num_requests=200,
    policies=("tropical", "distserve"),
    max_num_seqs=64,
)


def test_goodput_of_a_small_experiment_is_reproducible_and_serialisable() -> None:
    settings = SearchSettings(relative_tolerance=0.05)
    first = run_goodput(SMALL, seeds=(0, 1), settings=settings, jobs=1)
    second = run_goodput(SMALL, seeds=(0, 1), settings=settings, jobs=1)
    for name in SMALL.policies:
        assert first.goodput_per_s(name) == second.goodput_per_s(name) > 0
        low, high = first.spread_per_s(name)
        assert low <= first.goodput_per_s(name) <= high
        for run in first.runs[name]:
            passing = [p for p in run.curve if p.slo_attainment >= 0.9]
            assert run.threshold == max(p.value for p in passing)
    data = first.to_json()
    assert data["schema_version"] == 1
    assert data["target_attainment"] == 0.9
    entry = data["policies"]["tropical"]
    assert entry["goodput_per_gpu_per_s"] == pytest.approx(entry["goodput_per_s"] / 8)
    assert all(len(point) == 2 for point in entry["curve"])
    json.dumps(data)


def test_parallel_searches_give_the_same_goodput_as_serial_ones() -> None:
    settings = SearchSettings(relative_tolerance=0.1, max_evaluations=6)
    serial = run_goodput(SMALL, seeds=(0,), settings=settings, jobs=1)
    parallel = run_goodput(SMALL, seeds=(0,), settings=settings, jobs=2)
    for name in SMALL.policies:
        assert serial.goodput_per_s(name) == parallel.goodput_per_s(name)


def test_looser_slos_never_hurt_in_the_slo_scale_search() -> None:
    experiment = Experiment(
        trace="arxiv-summarization",
        arrival_process="poisson",
        num_requests=200,
        rate_per_s=1.0,
        policies=("tropical",),
        max_num_seqs=64,
    )
    result = run_slo_scale(experiment, settings=SearchSettings(relative_tolerance=0.05), jobs=1)
    scale = result.tightest_scale("tropical")
    assert 0 < scale < math.inf
    curve = sorted((p.value, p.slo_attainment) for p in result.runs["tropical"][0].curve)
    assert all(a <= b + 0.02 for (_, a), (_, b) in itertools.pairwise(curve))  # monotone, up to noise
    assert result.to_json()["policies"]["tropical"]["tightest_slo_scale"] == scale


def test_goodput_cli_writes_json_and_both_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, plot = tmp_path / "g.json", tmp_path / "plots" / "g.png"
    argv = [
        "goodput",
        "--trace",
        "arxiv-summarization",
        "--num-requests",
        "150",
        "--seeds",
        "0",
        "--policies",
        "tropical,vllm",
        "--tolerance",
        "0.1",
        "--jobs",
        "1",
        "--max-num-seqs",
        "64",
        "--no-progress",
        "--json",
        str(out),
        "--plot",
        str(plot),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "goodput req/s" in printed
    assert "vs best other" in printed
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"tropical", "vllm"}
    for path in (plot, tmp_path / "plots" / "g-latency.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slo_scale_cli_needs_a_fixed_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["slo-scale", "--native-rate", "--no-progress"]) == 2
    assert "needs a fixed --rate" in capsys.readouterr().err


def test_the_engines_options_reach_every_simulated_point() -> None:
    """Engines slower than the profile sustain less, whatever the policy predicts; the SLOs stay the profile's."""
    from tropical_sched.sim import evaluate_point

    base = Experiment(num_requests=300, policies=("vllm",), rate_per_s=2.0, max_num_seqs=64)
    points = {
        scale: evaluate_point(dataclasses.replace(base, engine_time_scale=scale), "vllm", 0, rate_per_s=2.0)
        for scale in (0.5, 1.0, 2.0)
    }
    assert points[0.5].ttft_p90_s < points[1.0].ttft_p90_s < points[2.0].ttft_p90_s
    assert points[0.5].slo_attainment >= points[1.0].slo_attainment > points[2.0].slo_attainment
    other = dataclasses.replace(base, engine_profile="h100-llama2-70b-tp4")
    assert evaluate_point(other, "vllm", 0, rate_per_s=2.0).ttft_p90_s < points[1.0].ttft_p90_s
    data = run_goodput(
        dataclasses.replace(base, engine_time_scale=2.0, calibration=True, first_token_at="after-hop"),
        seeds=(0,),
        settings=SearchSettings(relative_tolerance=0.2, max_evaluations=4),
        jobs=1,
    ).to_json()
    assert data["engine"]["engine_time_scale"] == 2.0
    assert data["engine"]["calibration"] is True
    assert data["engine"]["first_token_at"] == "after-hop"

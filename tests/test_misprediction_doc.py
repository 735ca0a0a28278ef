"""docs/evaluation.md's misprediction section agrees with benchmarks/results/misprediction.json: the tables are
the script's rendering of the committed JSON, the figure is there, and each claim of the reading holds in the data."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "evaluation.md"
RESULTS = ROOT / "benchmarks" / "results" / "misprediction.json"
BASELINES = ("vllm", "vllm-chunked", "distserve")


def _script() -> ModuleType:
    return load_script("benchmarks/misprediction.py")


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return json.loads(RESULTS.read_text())  # type: ignore[no-any-return]


def _goodput(point: dict[str, Any], variant: str) -> float:
    return float(point["variants"][variant]["goodput_per_s"])


def _attainment(point: dict[str, Any], variant: str) -> float:
    return float(point["variants"][variant]["slo_attainment"])


def test_the_tables_in_the_docs_are_the_rendering_of_the_committed_results(data: dict[str, Any]) -> None:
    script = _script()
    doc = DOC.read_text()
    assert script.render_markdown(data) in doc, "run python benchmarks/misprediction.py --render"
    assert script.render_doc(data, doc) == doc
    assert (ROOT / "docs" / "misprediction.png").stat().st_size > 10_000
    assert "misprediction.png" in doc


def test_the_results_cover_the_axes_and_variants_the_docs_describe(data: dict[str, Any]) -> None:
    errors = [p["step_time_error"] for p in data["step_time"]]
    assert min(errors) == pytest.approx(-0.5)
    assert max(errors) == pytest.approx(1.0)
    assert [p["engine_pd_hop_fixed_s"] for p in data["pd_hop"]] == [0.0, 0.05, 0.1, 0.2, 0.4]
    assert data["first_token_at"] == "after-hop"
    assert len(data["seeds"]) >= 2
    for point in data["step_time"] + data["pd_hop"]:
        assert set(point["variants"]) == set(data["variants"])


def test_tropical_leads_every_baseline_by_1_14x_to_1_31x_up_to_plus_50_percent(data: dict[str, Any]) -> None:
    ratios = [
        _goodput(p, "tropical") / max(_goodput(p, b) for b in BASELINES)
        for p in data["step_time"]
        if p["step_time_error"] <= 0.5
    ]
    assert round(min(ratios), 2) == 1.14
    assert round(max(ratios), 2) == 1.31
    slowest = data["step_time"][-1]
    assert slowest["step_time_error"] == pytest.approx(1.0)
    goodputs = [v["goodput_per_s"] for v in slowest["variants"].values()]
    assert round(min(goodputs), 2) == 0.17
    assert round(max(goodputs), 2) == 0.22


def test_the_toggle_changes_goodput_by_at_most_a_hundredth_and_attainment_by_at_most_2_4_points(
    data: dict[str, Any],
) -> None:
    for point in data["step_time"] + data["pd_hop"]:
        for on, off in [("tropical", "tropical, no toggle"), ("tropical, no calibration", "tropical, neither")]:
            assert abs(_goodput(point, on) - _goodput(point, off)) <= 0.01
            assert abs(_attainment(point, on) - _attainment(point, off)) <= 0.0245
    acting = [
        p["variants"][v]["toggle_off_fraction"]
        for p in data["step_time"]
        if p["step_time_error"] >= 0.1 - 1e-9
        for v in ("tropical", "tropical, no calibration")
    ]
    assert round(min(acting), 2) == 0.13
    assert round(max(acting), 2) == 0.94


def test_calibration_moves_goodput_little_on_the_step_time_axis(data: dict[str, Any]) -> None:
    for point in data["step_time"]:
        gain = _goodput(point, "tropical") - _goodput(point, "tropical, no calibration")
        assert abs(gain) <= 0.175
        relative = gain / _goodput(point, "tropical, no calibration")
        if point["step_time_error"] < 0:
            assert abs(relative) <= 0.04
    by_error = {round(p["step_time_error"], 2): p for p in data["step_time"]}
    for error, expected in [(0.25, 0.04), (0.5, 0.08)]:
        point = by_error[error]
        gain = _goodput(point, "tropical") / _goodput(point, "tropical, no calibration") - 1
        assert round(gain, 2) == expected


def test_calibration_earns_its_keep_on_an_unknown_hop_and_a_large_hop_favours_colocation(
    data: dict[str, Any],
) -> None:
    by_hop = {p["engine_pd_hop_fixed_s"]: p for p in data["pd_hop"]}
    for hop_s, gain in [(0.1, 0.16), (0.2, 0.49)]:
        point = by_hop[hop_s]
        assert round(_goodput(point, "tropical") - _goodput(point, "tropical, no calibration"), 2) == gain
    largest = by_hop[0.4]
    assert _goodput(largest, "tropical, no calibration") == 0.0
    assert _goodput(largest, "distserve") == 0.0
    assert round(_goodput(largest, "tropical"), 2) == 1.41
    assert round(_goodput(largest, "vllm"), 2) == 2.23
    assert round(_goodput(by_hop[0.2], "tropical"), 2) == 2.42
    assert _goodput(by_hop[0.2], "tropical") > _goodput(by_hop[0.2], "vllm")

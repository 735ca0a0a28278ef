"""The router's decision log summed up (tropical_sched.serve.decision_log, benchmarks/decision_log.py), and the
paired engine A/B's figures (benchmarks/engine_ab.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.scripts import ROOT, load_script
from tropical_sched.serve.decision_log import DecisionLog, read_decision_log, summarize_decision_log


def _entry(request_id: str, route: str, **fields: Any) -> dict[str, Any]:
    entry = {
        "request_id": request_id,
        "outcome": "ok",
        "route": route,
        "arrival_at_s": 10.0,
        "routed_at_s": 10.0,
        "num_output_tokens": 11,
        "ttft_slo_s": 1.0,
        "tpot_slo_s": 0.05,
        "ttft_s": 0.5,
        "tpot_s": 0.04,
        "predicted": {"predicted_ttft_s": 0.4, "tpot_s": 0.03},
    }
    entry.update(fields)
    return entry


ENTRIES = [
    _entry("1", "multiplex"),
    _entry("2", "multiplex", tpot_s=0.06, routed_at_s=10.2),  # misses TPOT; waited 0.2 s
    _entry("3", "prefill", ttft_s=1.5, predicted={"predicted_ttft_s": 0.5}),  # misses TTFT
    _entry("4", "", outcome="rejected", ttft_s=None, tpot_s=None, routed_at_s=None, predicted={}),
    _entry("5", "multiplex", outcome="aborted", ttft_s=None, tpot_s=None),  # left out
]


def test_summary_per_route_counts_misses_waits_and_prediction_errors() -> None:
    summaries = summarize_decision_log(ENTRIES)
    assert list(summaries) == ["multiplex", "prefill", ""]
    mux = summaries["multiplex"]
    assert (mux.num_requests, mux.ttft_attainment, mux.tpot_attainment, mux.slo_attainment) == (2, 1.0, 0.5, 0.5)
    assert mux.wait_p50_s == pytest.approx(0.1)
    assert mux.ttft_over_predicted_p50_s == pytest.approx(0.1)
    assert mux.tpot_over_predicted_p50_s == pytest.approx(0.02)  # 0.01 and 0.03 over the predicted 0.03
    assert mux.tpot_over_slo_p50 == pytest.approx(1.0)  # 0.8 and 1.2
    pd = summaries["prefill"]
    assert (pd.ttft_attainment, pd.tpot_attainment, pd.slo_attainment) == (0.0, 1.0, 0.0)
    assert math.isnan(pd.tpot_over_predicted_p50_s)  # no predicted decode step
    rejected = summaries[""]
    assert (rejected.num_requests, rejected.slo_attainment) == (1, 0.0)
    assert math.isnan(rejected.wait_p50_s)


def test_the_log_writes_from_its_thread_appends_and_writes_non_finite_numbers_as_null(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    for entries in (ENTRIES[:2], ENTRIES[2:]):
        log = DecisionLog(path)
        for entry in entries:
            log.write({**entry, "predicted": {**entry["predicted"], "min_tpot_slack_s": math.inf}})
        log.close()
        log.close()  # idempotent
        log.write(ENTRIES[0])  # after close: dropped, not an error
    loaded = read_decision_log(path)
    assert [e["request_id"] for e in loaded] == ["1", "2", "3", "4", "5"]
    assert all(e["predicted"]["min_tpot_slack_s"] is None for e in loaded)


def test_the_summary_script_prints_and_writes_the_tpot_deciles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("benchmarks/decision_log.py")
    path = tmp_path / "decisions.jsonl"
    ratios = [0.5, 0.95, 0.97, 1.05, 1.2]  # TPOT / SLO
    path.write_text(
        "".join(json.dumps(_entry(str(i), "multiplex", tpot_s=0.05 * r)) + "\n" for i, r in enumerate(ratios))
    )
    out = tmp_path / "summary.json"
    monkeypatch.setattr(sys, "argv", ["decision_log.py", str(path), "--json", str(out)])
    assert script.main() == 0
    printed = capsys.readouterr().out
    assert "multiplex     5 requests" in printed
    summary = json.loads(out.read_text())["logs"][0]
    assert summary["num_tpot_within_10pct_below_slo"] == 2
    assert summary["num_tpot_within_10pct_over_slo"] == 1
    assert len(summary["tpot_over_slo_deciles"]) == 9
    assert summary["routes"]["multiplex"]["tpot_attainment"] == pytest.approx(0.6)


def _benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A benchmark script that imports its siblings (real_engines, fidelity), as a module."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return load_script(f"benchmarks/{name}.py")


def test_engine_ab_figures_count_failed_requests_as_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    script = _benchmark("engine_ab", monkeypatch)
    records = [
        {"failed": False, "ttft_s": 0.1, "ttft_slo_s": 0.2, "tpot_s": 0.01, "tpot_slo_s": 0.02, "num_output_tokens": 5},
        {"failed": False, "ttft_s": 0.3, "ttft_slo_s": 0.2, "tpot_s": 0.01, "tpot_slo_s": 0.02, "num_output_tokens": 5},
        {"failed": True, "ttft_s": None, "ttft_slo_s": 0.2, "tpot_s": None, "tpot_slo_s": 0.02, "num_output_tokens": 0},
    ]
    figures = script._figures(records)
    assert figures["num_requests"] == 3
    assert figures["slo_attainment"] == pytest.approx(1 / 3)
    assert figures["ttft_attainment"] == pytest.approx(1 / 3)
    assert figures["tpot_attainment"] == pytest.approx(2 / 3)
    assert figures["ttft_p50_s"] == pytest.approx(0.2)


def test_paired_knee_windows_count_the_same_requests_in_both_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/paired_ab.py: a knee pair's requests by round robin's send time, met-both counts per deployment;
    a run without per-request records (before stop 29) is no pair."""
    script = _benchmark("paired_ab", monkeypatch)

    def record(i: int, arrival: float, ttft_s: float | None) -> dict[str, Any]:
        return {
            "request_id": str(i),
            "arrival_at_s": arrival,
            "failed": ttft_s is None,
            "ttft_s": ttft_s,
            "tpot_s": None if ttft_s is None else 0.01,
            "ttft_slo_s": 0.5,
            "tpot_slo_s": 0.02,
        }

    arrivals = [1.0, 5.0, 25.0, 41.0]
    rr = [record(i, a, 0.1) for i, a in enumerate(arrivals)]
    tropical = [record(0, 1.2, 0.1), record(1, 5.3, 0.9), record(2, 24.9, None), record(3, 41.1, 0.2)]
    for name, records in (("vllm-round-robin", rr), ("tropical", tropical)):
        (tmp_path / f"{name}-knee-run3.json").write_text(json.dumps({"records": records}))
    (tmp_path / "tropical-knee-run2.json").write_text(json.dumps({"measured": {}}))  # no records: not a pair
    (tmp_path / "vllm-round-robin-knee-run2.json").write_text(json.dumps({"records": rr}))
    assert script.knee_pairs(tmp_path) == ["run3"]
    pair = script.windows("run3", tmp_path, window_s=20.0)
    assert [row["num_requests"] for row in pair["windows"]] == [2, 1, 1]
    assert [row["met"] for row in pair["windows"]] == [
        {"vllm-round-robin": 2, "tropical": 1},
        {"vllm-round-robin": 1, "tropical": 0},
        {"vllm-round-robin": 1, "tropical": 1},
    ]
    assert pair["slo_attainment"] == {"vllm-round-robin": 1.0, "tropical": 0.5}


def test_pd_requests_ttft_by_segment() -> None:
    """benchmarks/decision_log.py: a P/D request's TTFT split at its route, its prefill's answer, its decode's
    placement and its first token; multiplexed requests and P/D requests without a first token stay out."""
    script = load_script("benchmarks/decision_log.py")
    times = {"arrival_at_s": 0.0, "routed_at_s": 0.1, "prefill_done_at_s": 0.4, "decode_placed_at_s": 0.45}
    entries = [
        _entry("1", "prefill", **times, first_token_at_s=0.6),
        _entry("2", "prefill", **{k: v * 2 for k, v in times.items()}, first_token_at_s=1.0),
        _entry("3", "prefill", **times, first_token_at_s=None),
        _entry("4", "multiplex", first_token_at_s=0.2),
    ]
    segments = script.pd_segments(entries)
    assert segments["wait"]["p50_s"] == pytest.approx(0.15)
    assert segments["prefill"]["p50_s"] == pytest.approx(0.45)
    assert segments["back_and_placement"]["p50_s"] == pytest.approx(0.075)
    assert segments["hop_to_first_token"]["p50_s"] == pytest.approx((0.15 + 0.1) / 2)


def test_same_router_pairs_are_matched_by_their_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _benchmark("paired_ab", monkeypatch)

    def write(name: str, joint: float) -> None:
        measured = {"slo_attainment": joint, "ttft_attainment": 1.0, "tpot_attainment": joint}
        (tmp_path / f"{name}.json").write_text(json.dumps({"measured": measured}))

    write("tropical-knee-s29-same-router-10", 0.7)
    write("vllm-colocated-router-knee-s29-same-router-10", 0.6)
    write("tropical-knee-s29-same-router-2", 0.8)
    write("vllm-colocated-router-knee-s29-same-router-2", 0.9)
    write("tropical-knee-s29-same-router-3", 0.5)  # its other half is missing: no pair
    pairs = script.same_router_pairs(tmp_path)
    assert [p["pair"] for p in pairs] == [2, 10]
    assert pairs[0]["tropical"]["slo_attainment"] == 0.8
    assert pairs[1]["stock-behind-router"]["slo_attainment"] == 0.6


def test_the_client_is_matched_to_the_router_by_prompt_length_and_arrival() -> None:
    """benchmarks/decision_log.py --replay: the client's records (their own ids and clock) are matched to the log's
    entries by prompt length and arrival since the run's start; the client's TTFT over the router's, and the
    requests the path between them cost."""
    script = load_script("benchmarks/decision_log.py")
    entries = [
        _entry("a", "multiplex", arrival_at_s=100.0, num_prompt_tokens=50, ttft_s=0.2),
        _entry("b", "multiplex", arrival_at_s=100.5, num_prompt_tokens=50, ttft_s=0.9),  # met at the router only
        _entry("c", "prefill", arrival_at_s=101.0, num_prompt_tokens=80, ttft_s=0.5),
        _entry("d", "", arrival_at_s=101.2, num_prompt_tokens=80, outcome="rejected", ttft_s=None, tpot_s=None),
    ]
    record = {"ttft_slo_s": 1.0, "tpot_slo_s": 0.05, "tpot_s": 0.04, "failed": False}
    records = [
        {**record, "arrival_at_s": 0.0, "num_prompt_tokens": 50, "ttft_s": 0.25},
        {**record, "arrival_at_s": 0.5, "num_prompt_tokens": 50, "ttft_s": 1.1},  # 0.2 s later: misses at the client
        {**record, "arrival_at_s": 1.0, "num_prompt_tokens": 80, "ttft_s": 0.6},
        {**record, "arrival_at_s": 1.2, "num_prompt_tokens": 80, "ttft_s": None, "failed": True},
    ]
    gap = script.client_over_router(entries, records)
    assert gap["num_matched"] == 3
    assert gap["ttft_p50_s"] == pytest.approx(0.1)
    assert gap["num_met_at_router_missed_at_client"] == 1
    with pytest.raises(ValueError, match="nothing to match"):
        script.client_over_router([], records)

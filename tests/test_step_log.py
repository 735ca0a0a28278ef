"""benchmarks/step_log.py: an engine's step log against a profile's predictions."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_script
from tropical_sched.core.errors import DataFormatError
from tropical_sched.predictors import load_profile

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    return load_script("benchmarks/step_log.py")


def _step(
    at_s: float,
    duration_s: float,
    decodes: int,
    context: int,
    chunks: list[list[int]],
    cap: int | None,
    predicted_s: float | None = None,
) -> str:
    step = {
        "started_at_s": at_s,
        "duration_s": duration_s,
        "num_decode_seqs": decodes,
        "num_decode_context_tokens": context,
        "prefill_chunks": chunks,
        "prefill_token_cap": cap,
    }
    if predicted_s is not None:  # what the engine side predicted (logs from stop 34 on)
        step["predicted_s"] = predicted_s
    return json.dumps(step)


def test_a_log_is_summarized_per_kind_of_step_against_the_profile(tmp_path: Path) -> None:
    model = load_profile("cpu-served-llama").step_time
    decode_s = model.step_time_s(num_decode_seqs=2, num_decode_context_tokens=400)
    mixed_s = model.step_time_s(num_decode_seqs=2, num_decode_context_tokens=400, prefill_chunks=((0, 64),))
    lines = [
        _step(0.0, 2 * decode_s, 2, 400, [], None, 1.6 * decode_s),  # twice the profile, 1.25x the engine's model
        _step(1.0, 2 * decode_s, 2, 400, [], None, 1.6 * decode_s),
        _step(2.0, mixed_s, 2, 400, [[0, 64]], 64),  # as predicted, capped at 64 (an older log: no predicted_s)
        _step(3.0, 0.5, 0, 0, [[0, 300]], None),
    ]
    log = tmp_path / "steps.1.jsonl"
    log.write_text("\n".join(lines) + "\n")
    script = _script()
    summary = script.summarize(script.read_steps(log), model)
    assert summary["num_steps"] == 4
    assert summary["span_s"] == pytest.approx(3.5)
    assert summary["busy_s"] == pytest.approx(4 * decode_s + mixed_s + 0.5)
    assert summary["num_prefill_tokens"] == 364
    assert summary["decode_batch_token_weighted"] == pytest.approx(2.0)
    kinds = summary["kinds"]
    assert kinds["decode"]["num_steps"] == 2
    assert kinds["decode"]["measured_over_predicted_p50"] == pytest.approx(2.0)
    assert kinds["decode"]["measured_over_engine_predicted_p50"] == pytest.approx(1.25)
    assert kinds["decode"]["prefill_token_cap_p50"] is None
    assert kinds["mixed"]["measured_over_engine_predicted_p50"] is None
    assert kinds["mixed"]["measured_over_predicted_p50"] == pytest.approx(1.0)
    assert kinds["mixed"]["prefill_token_cap_p50"] == 64
    assert kinds["prefill"]["prefill_tokens_per_step_p50"] == 300


@pytest.mark.parametrize(
    ("line", "named"),
    [("not json", "not JSON"), ('{"started_at_s": 0}', "duration_s"), ("[1, 2]", "started_at_s")],
)
def test_a_corrupt_log_fails_naming_its_path_and_line(tmp_path: Path, line: str, named: str) -> None:
    log = tmp_path / "steps.1.jsonl"
    log.write_text(_step(0.0, 0.01, 1, 10, [], None) + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=f"{log}:2") as info:
        _script().read_steps(log)
    assert named in str(info.value)


def test_the_committed_step_summaries_hold_what_docs_evaluation_md_reads_from_them() -> None:
    """docs/evaluation.md (real engines, stop 27) quotes ranges from the committed step-log summaries."""
    diagnosis = ROOT / "benchmarks" / "results" / "real-engines" / "vllm-cpu" / "diagnosis"
    runs = {
        name: json.loads((diagnosis / f"tropical-knee-steplog-{name}.steps.json").read_text())["engines"]
        for name in ("cap", "cap-2", "nocap")
    }
    doc = (ROOT / "docs" / "evaluation.md").read_text()
    engines = [(name, engine, s) for name, run in runs.items() for engine, s in run.items()]
    assert len(engines) == 6
    assert {round(100 * s["busy_fraction"]) for _, _, s in engines} <= {93, 94}
    decode_ratio: dict[str, list[float]] = {engine: [] for _, engine, _ in engines}
    for _, engine, s in engines:
        decode_ratio[engine].append(round(s["kinds"]["decode"]["measured_over_predicted_p50"], 2))
    assert min(decode_ratio["engine-a-core0.jsonl"]) >= 1.35
    assert max(decode_ratio["engine-a-core0.jsonl"]) <= 1.36
    assert min(decode_ratio["engine-b-core1.jsonl"]) >= 1.18
    assert max(decode_ratio["engine-b-core1.jsonl"]) <= 1.20
    capped = [s["kinds"]["mixed"] for name, _, s in engines if name != "nocap"]
    uncapped = [s["kinds"]["mixed"] for name, _, s in engines if name == "nocap"]
    assert (
        56
        <= min(m["prefill_tokens_per_step_p50"] for m in capped)
        <= max(m["prefill_tokens_per_step_p50"] for m in capped)
        <= 69
    )
    assert min(m["prefill_tokens_per_step_p50"] for m in uncapped) >= 876
    assert max(m["prefill_tokens_per_step_p50"] for m in uncapped) <= 996
    assert {m["num_steps"] for m in capped} <= set(range(394, 579))
    assert {m["num_steps"] for m in uncapped} <= set(range(88, 94))
    assert all(124 <= s["busy_s"] <= 130 for _, _, s in engines)
    assert "busy 93-94% of the run" in doc
    assert "1.35-1.36x" in doc
    assert "1.18-1.20x" in doc
    assert "pieces of 56-69 tokens" in doc
    assert "876-996 prompt tokens" in doc


def test_the_stop_34_step_summaries_and_runs_hold_what_docs_evaluation_md_reads_from_them() -> None:
    """docs/evaluation.md's stop 34 reading quotes the committed step-log summaries and diagnosis runs."""
    real = ROOT / "benchmarks" / "results" / "real-engines"
    diagnosis = real / "vllm-cpu" / "diagnosis"
    doc = " ".join((ROOT / "docs" / "evaluation.md").read_text().split())  # the prose wraps anywhere
    logged = {
        name: json.loads((diagnosis / f"tropical-in-client-knee-{name}.steps.json").read_text())["engines"]
        for name in ("norm-10", "minchunk256-1", "s34-nocap-1")
    }
    busy = {name: round(sum(e["busy_s"] for e in engines.values()), 1) for name, engines in logged.items()}
    assert busy == {"norm-10": 480.1, "minchunk256-1": 450.1, "s34-nocap-1": 466.5}
    assert {sum(e["num_prefill_tokens"] for e in engines.values()) for engines in logged.values()} == {148_765}
    mixed = {name: sum(e["kinds"]["mixed"]["num_steps"] for e in engines.values()) for name, engines in logged.items()}
    assert mixed == {"norm-10": 1146, "minchunk256-1": 433, "s34-nocap-1": 189}
    capped = sorted(e["kinds"]["mixed"]["prefill_tokens_per_step_p50"] for e in logged["norm-10"].values())
    assert capped == [32, 54]
    ratios = [
        round(kind["measured_over_engine_predicted_p50"], 2)
        for engines in logged.values()
        for e in engines.values()
        for kind in e["kinds"].values()
    ]
    assert (min(ratios), max(ratios)) == (0.96, 1.10)
    for quoted in ("480.1 s", "450.1 s", "466.5 s", "148,765", "1,146", "433 mixed", "189 mixed", "0.96-1.10"):
        assert quoted in doc, quoted

    runs = {r["name"]: r for r in json.loads((real / "vllm-cpu.json").read_text())["diagnosis"]}

    def joint(name: str) -> str:
        return f"{100 * runs[name]['slo_attainment']:.1f}%"

    for n in (2, 3, 4):
        tropical, round_robin = (f"{d}-knee-minchunk256-{n}" for d in ("tropical-in-client", "vllm-round-robin"))
        assert f"{joint(tropical)} / {joint(round_robin)}" in doc
    for n in (1, 2):
        tropical, round_robin = (f"{d}-knee-mc256-watermark-{n}" for d in ("tropical-in-client", "vllm-round-robin"))
        assert f"{joint(tropical)} / {joint(round_robin)}" in doc
    assert f"{joint('tropical-in-client-knee-guard-1')}, a little" in doc
    assert f"(no cap): {joint('tropical-in-client-knee-s34-nocap-1')}" in doc


def _burst(run: dict, start_s: float = 120.0, end_s: float = 160.0) -> dict[str, float]:
    """A run's requests arriving in [start_s, end_s): how many, the median TPOT over its SLO, how many met both
    SLOs and how many met the TTFT SLO."""
    records = [r for r in run["records"] if start_s <= r["arrival_at_s"] < end_s]
    median = statistics.median(r["tpot_s"] / r["tpot_slo_s"] for r in records)
    met_ttft = [r["ttft_s"] <= r["ttft_slo_s"] for r in records]
    met_tpot = [r["tpot_s"] <= r["tpot_slo_s"] for r in records]
    return {
        "num_requests": len(records),
        "tpot_over_slo_p50": round(median, 2),
        "num_met_both": sum(a and b for a, b in zip(met_ttft, met_tpot, strict=True)),
        "num_met_ttft": sum(met_ttft),
    }


def test_the_stop_36_cells_hold_what_docs_evaluation_md_reads_from_them() -> None:
    """docs/evaluation.md's stop 36 reading quotes the collected cells and pairs (vllm-cpu.json): per load the pairs'
    mean difference, the cells' attainment, the knee's wins, standard error and ranges, and the bar it states."""
    data = json.loads((ROOT / "benchmarks" / "results" / "real-engines" / "vllm-cpu.json").read_text())
    loads = {load["name"]: load for load in data["loads"]}
    doc = " ".join((ROOT / "docs" / "evaluation.md").read_text().split())
    reading = doc[doc.index("**Reading (stop 36") : doc.index("**Reading (stop 35")]

    def pct(load: str, key: str, figure: str = "slo_attainment", *, simulated: bool = False) -> str:
        cell = loads[load]["deployments"][key]
        return f"{100 * (cell['simulated'] if simulated else cell)[figure]:.1f}%"

    def differences(load: str) -> list[float]:
        return [pair["difference_points"] for pair in loads[load]["pairs"]]

    knee = differences("knee")
    assert f"over {len(knee)} pairs Tropical {statistics.fmean(knee):+.1f} points on average" in reading
    assert f"({pct('knee', 'tropical')} against round robin's {pct('knee', 'vllm-round-robin')})" in reading
    assert f"winning {sum(d > 0 for d in knee)} of the {len(knee)}" in reading
    standard_error = statistics.stdev(knee) / len(knee) ** 0.5
    assert f"standard error of {standard_error:.1f} points" in reading
    assert [pair["pair"] for pair in loads["knee"]["pairs"]][2:] == [3, 4, 5, 6, 7, 8]
    assert f"(pairs 3-8): {statistics.fmean(knee[2:]):+.1f} on average" in reading
    runs = {
        key: sorted(run["slo_attainment"] for run in loads["knee"]["deployments"][key]["runs"])
        for key in ("tropical", "vllm-round-robin")
    }
    assert f"runs ranged {100 * runs['tropical'][0]:.1f}%-{100 * runs['tropical'][-1]:.1f}%" in reading
    assert (
        f"round robin's {100 * runs['vllm-round-robin'][0]:.1f}%-{100 * runs['vllm-round-robin'][-1]:.1f}%" in reading
    )
    for figure, what in (("tpot_attainment", "meets TPOT"), ("ttft_attainment", "pays in TTFT")):
        assert (
            f"{what} ({pct('knee', 'tropical', figure)} against {pct('knee', 'vllm-round-robin', figure)})" in reading
        )
    overloaded = differences("overloaded")
    assert (
        f"over {len(overloaded)} pairs {statistics.fmean(overloaded):+.1f} points ({pct('overloaded', 'tropical')} "
        f"against {pct('overloaded', 'vllm-round-robin')}; TPOT {pct('overloaded', 'tropical', 'tpot_attainment')} "
        f"against {pct('overloaded', 'vllm-round-robin', 'tpot_attainment')}, TTFT "
        f"{pct('overloaded', 'tropical', 'ttft_attainment')} against "
        f"{pct('overloaded', 'vllm-round-robin', 'ttft_attainment')})"
    ) in reading
    light = differences("light")
    assert (
        f"over {len(light)} pairs {statistics.fmean(light):+.1f} ({pct('light', 'tropical')} against "
        f"{pct('light', 'vllm-round-robin')})"
    ) in reading
    assert f"({', '.join(pct(load, 'vllm-pd') for load in ('light', 'knee', 'overloaded'))})" in reading
    assert f"scored {pct('knee', 'tropical-default-options')} at the knee and " in reading
    assert f"{pct('overloaded', 'tropical-default-options')} overloaded" in reading
    simulated = (
        f"({pct('knee', 'tropical', simulated=True)} and {pct('overloaded', 'tropical', simulated=True)} simulated)"
    )
    assert simulated in reading
    assert (
        f"({pct('knee', 'vllm-round-robin', simulated=True)} simulated, {pct('knee', 'vllm-round-robin')} measured)"
        in (reading)
    )
    # the bar: against the best stock deployment at each load, by the cells' means
    bar = []
    for name in ("light", "knee", "overloaded"):
        cells = loads[name]["deployments"]
        best = max(("vllm-round-robin", "vllm-pd"), key=lambda key: cells[key]["slo_attainment"])
        assert best == "vllm-round-robin"
        bar.append(f"{name} {100 * (cells['tropical']['slo_attainment'] - cells[best]['slo_attainment']):+.1f}")
    assert "by their means: " + ", ".join(bar) + " against round robin" in reading
    assert all(float(entry.split()[1]) >= -2 for entry in bar)
    assert float(bar[1].split()[1]) > 0


def test_the_stop_35_runs_hold_what_docs_evaluation_md_reads_from_them() -> None:
    """docs/evaluation.md's stop 35 reading quotes the committed diagnosis runs: each pair's joint attainment, the
    mean difference, and what the burst of 120-160 s did in them."""
    real = ROOT / "benchmarks" / "results" / "real-engines"
    diagnosis = real / "vllm-cpu" / "diagnosis"
    doc = " ".join((ROOT / "docs" / "evaluation.md").read_text().split())
    reading = doc[doc.index("**Reading (stop 35") : doc.index("**Reading (stop 34")]

    def run(deployment: str, name: str, load: str = "knee") -> dict:
        # the pacelate runs are cells from stop 36 on (Tropical's cell options), the others diagnosis runs
        folder = diagnosis.parent if name.startswith("pacelate-") else diagnosis
        return json.loads((folder / f"{deployment}-{load}-{name}.json").read_text())

    def pair(name: str, load: str = "knee") -> tuple[float, float]:
        tropical, round_robin = (run(d, name, load) for d in ("tropical-in-client", "vllm-round-robin"))
        return tropical["measured"]["slo_attainment"], round_robin["measured"]["slo_attainment"]

    def quoted(name: str, load: str = "knee") -> str:
        tropical, round_robin = pair(name, load)
        return f"{100 * (tropical - round_robin):+.1f} ({100 * tropical:.1f}% / {100 * round_robin:.1f}%)"

    for name in ("drain-1", "drain-2", "pace-1", "pace90-1", "pace90-2", "pace90-3", "pacelate-1", "pacelate-2"):
        assert quoted(name) in reading, name
    for load in ("light", "overloaded"):
        assert quoted("pacelate-1", load) in reading, load
    guarded = ("pace90-1", "pace90-2", "pace90-3", "pacelate-1", "pacelate-2")
    differences = [100 * (t - r) for t, r in map(pair, guarded)]
    assert f"{sum(differences) / len(differences):+.1f} points on average" in reading
    tropical_runs = sorted(100 * pair(name)[0] for name in guarded)
    round_robin_runs = sorted(100 * pair(name)[1] for name in guarded)
    assert f"ranged {tropical_runs[0]:.1f}%-{tropical_runs[-1]:.1f}%" in reading
    assert f"round robin's {round_robin_runs[0]:.1f}%-{round_robin_runs[-1]:.1f}%" in reading

    ttft = [run("tropical-in-client", f"drain-{n}")["measured"]["ttft_attainment"] for n in (1, 2)]
    assert f"({100 * ttft[0]:.1f}% and {100 * ttft[1]:.1f}%," in reading
    logged = json.loads((diagnosis / "tropical-in-client-knee-norm-10.steps.json").read_text())["engines"]
    mixed_ms = sorted(round(1e3 * e["kinds"]["mixed"]["mean_step_s"]) for e in logged.values())
    assert f"{mixed_ms[0]}-{mixed_ms[-1]} ms on average" in reading
    drained = [_burst(run("tropical-in-client", f"drain-{n}")) for n in (1, 2)]
    assert all(b["num_requests"] == 40 and b["num_met_both"] == 0 for b in drained)
    assert [b["tpot_over_slo_p50"] for b in drained] == [1.44, 1.46]
    beside = [_burst(run("vllm-round-robin", f"drain-{n}")) for n in (1, 2)]
    assert [(b["num_met_both"], b["tpot_over_slo_p50"]) for b in beside] == [(13, 1.13), (14, 1.22)]
    assert "1.44 and 1.46x" in reading
    assert "met 13 and 14 (1.13 and 1.22x)" in reading
    assert _burst(run("tropical-in-client", "pace-1"))["tpot_over_slo_p50"] == 0.98
    bursts = [_burst(run("tropical-in-client", name)) for name in guarded]
    rr_bursts = [_burst(run("vllm-round-robin", name)) for name in guarded]
    tpot = sorted(b["tpot_over_slo_p50"] for b in bursts)
    assert f"median {tpot[0]:.2f}-{tpot[-1]:.2f}x of the SLO" in reading
    ttft = sorted(b["num_met_ttft"] for b in bursts)
    rr_ttft = sorted(b["num_met_ttft"] for b in rr_bursts)
    assert f"TTFT met by {ttft[0]}-{ttft[-1]} of the 40, against {rr_ttft[0]}-{rr_ttft[-1]}" in reading

    decode_ms = [round(1e3 * e["kinds"]["decode"]["mean_step_s"]) for e in logged.values()]
    assert decode_ms == [46, 40]
    assert "averaged 46 and 40 ms" in reading

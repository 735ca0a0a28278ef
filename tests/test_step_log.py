"""benchmarks/step_log.py: an engine's step log against a profile's predictions."""

from __future__ import annotations

import json
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

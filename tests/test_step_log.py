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


def _step(at_s: float, duration_s: float, decodes: int, context: int, chunks: list[list[int]], cap: int | None) -> str:
    return json.dumps(
        {
            "started_at_s": at_s,
            "duration_s": duration_s,
            "num_decode_seqs": decodes,
            "num_decode_context_tokens": context,
            "prefill_chunks": chunks,
            "prefill_token_cap": cap,
        }
    )


def test_a_log_is_summarized_per_kind_of_step_against_the_profile(tmp_path: Path) -> None:
    model = load_profile("cpu-served-llama").step_time
    decode_s = model.step_time_s(num_decode_seqs=2, num_decode_context_tokens=400)
    mixed_s = model.step_time_s(num_decode_seqs=2, num_decode_context_tokens=400, prefill_chunks=((0, 64),))
    lines = [
        _step(0.0, 2 * decode_s, 2, 400, [], None),  # twice as slow as predicted
        _step(1.0, 2 * decode_s, 2, 400, [], None),
        _step(2.0, mixed_s, 2, 400, [[0, 64]], 64),  # as predicted, capped at 64
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
    assert kinds["decode"]["prefill_token_cap_p50"] is None
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

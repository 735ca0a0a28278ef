"""Traces and workloads: bundled data, formats, errors with lines, context limits and arrival processes."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from tropical_sched.core import ConfigError, TraceFormatError, UnknownNameError
from tropical_sched.workloads import (
    bundled_trace_names,
    gamma_arrivals,
    load_trace,
    make_workload,
    poisson_arrivals,
    rescale_arrivals,
)


@pytest.mark.parametrize(
    ("name", "num_requests", "timed"),
    [
        ("azure-conv-2023", 19_366, True),
        ("mooncake-conversation", 12_031, True),
        ("arxiv-summarization", 28_257, False),
        ("sharegpt", 30_731, False),
    ],
)
def test_bundled_traces_load_whole(name: str, num_requests: int, timed: bool) -> None:
    trace = load_trace(name)
    assert len(trace) == num_requests
    assert (trace.arrival_at_s is not None) == timed
    assert trace.num_prompt_tokens.min() >= 1
    assert trace.num_output_tokens.min() >= 1
    assert trace.source
    if timed:
        assert trace.arrival_at_s[0] == 0
        assert np.all(np.diff(trace.arrival_at_s) >= 0)


def test_bundled_names() -> None:
    assert bundled_trace_names() == ["arxiv-summarization", "azure-conv-2023", "mooncake-conversation", "sharegpt"]


def test_azure_trace_rate_and_first_requests() -> None:
    trace = load_trace("azure-conv-2023")
    assert trace.mean_rate_per_s == pytest.approx(5.53, abs=0.01)
    assert trace.num_prompt_tokens[:2].tolist() == [374, 396]
    assert trace.arrival_at_s[1] == pytest.approx(4.3145790)


@pytest.mark.parametrize(
    ("text", "suffix", "arrivals", "prompts"),
    [
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,2\n"
            "2023-11-16 18:15:48.1805900,20,3\n",
            ".csv",
            [0.0, 1.5],
            [10, 20],
        ),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n5.0,10,2\n6.0,20,3\n", ".csv", [0.0, 1.0], [10, 20]),
        (
            "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n10,2,12,5\n20,3,23,6.7\n",
            ".csv",
            None,
            [10, 20],
        ),
        # equal arrival times are a burst, not a step backwards
        ("arrival_at_s,num_prompt_tokens,num_output_tokens\n0.5,10,2\n0.5,20,3\n", ".csv", [0.0, 0.0], [10, 20]),
        (
            '{"timestamp": 1000, "input_length": 10, "output_length": 2}\n'
            '{"timestamp": 3000, "input_length": 20, "output_length": 3}\n',
            ".jsonl",
            [0.0, 2.0],
            [10, 20],
        ),
    ],
)
def test_formats_are_recognised(
    tmp_path: Path, text: str, suffix: str, arrivals: list[float] | None, prompts: list[int]
) -> None:
    path = tmp_path / f"t{suffix}"
    path.write_text(text)
    trace = load_trace(path)
    assert trace.num_prompt_tokens.tolist() == prompts
    if arrivals is None:
        assert trace.arrival_at_s is None
    else:
        assert trace.arrival_at_s.tolist() == pytest.approx(arrivals)


@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
def test_azure_timestamps_do_not_depend_on_the_machines_time_zone(
    tmp_path: Path, zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across New York's spring-forward night, local-time parsing made a 1 h gap 1 s (or a sorted file unsorted)."""
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-03-12 01:59:59,1,1\n2023-03-12 02:30:00,1,1\n"
        "2023-03-12 03:00:00,1,1\n"
    )
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        arrivals = load_trace(path).arrival_at_s
    finally:
        monkeypatch.undo()
        time.tzset()
    assert arrivals is not None
    assert arrivals.tolist() == [0.0, 1801.0, 3601.0]


def test_gzip_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "t.csv.gz"
    path.write_bytes(gzip.compress(b"num_prompt_tokens,num_output_tokens\n7,8\n"))
    assert load_trace(path).num_output_tokens.tolist() == [8]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b\n1,2\n", r":1: unrecognised CSV header \['a', 'b'\]"),
        ("num_prompt_tokens,num_output_tokens\n7,8\n9,x\n", r":3: field 'num_output_tokens' = 'x' is not an integer"),
        ("num_prompt_tokens,num_output_tokens\n7,8\n0,4\n", r":3: field 'num_prompt_tokens' = 0: a request needs at"),
        ("num_prompt_tokens,num_output_tokens\n7\n", r":2: expected 2 fields, got 1"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n", r":2: field 'TIMESTAMP' = 'yesterday' is not"),
        (
            '{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"timestamp": 1, "input_length": 2}\n',
            r":2: missing field 'output_length'",
        ),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1}\n{oops\n', r":2: not valid JSON"),
        ("", r"empty file|no requests"),
        # arrival times that go backwards: the first out-of-order row is named, with the row it follows
        (
            "arrival_at_s,num_prompt_tokens,num_output_tokens\n0.1,10,2\n0.5,10,2\n0.5,10,2\n0.25,20,3\n0.3,1,1\n",
            r":5: field 'arrival_at_s' = '0.25' is earlier than '0.5' on line 4: arrival times must not go backwards",
        ),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6,1,2\n2023-11-16 18:15:46.5,1,2\n",
            r":3: field 'TIMESTAMP' = '2023-11-16 18:15:46.5' is earlier than '2023-11-16 18:15:46.6' on line 2",
        ),
        (
            '{"timestamp": 2000, "input_length": 1, "output_length": 1}\n\n'
            '{"timestamp": 1000, "input_length": 2, "output_length": 1}\n',
            r":3: field 'timestamp' = 1000 is earlier than 2000 on line 1",
        ),
        (
            "arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\nnan,1,1\n",
            r":3: field 'arrived_at' = 'nan' is not a fin",
        ),
    ],
)
def test_malformed_files_fail_with_path_and_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(TraceFormatError, match=match) as caught:
        load_trace(path)
    assert str(caught.value).startswith(str(path))


def test_unknown_trace_name_and_missing_file() -> None:
    with pytest.raises(UnknownNameError, match="unknown trace 'azure'; known: arxiv-summarization"):
        load_trace("azure")
    with pytest.raises(UnknownNameError, match=r"no such trace file: nowhere/t\.csv"):
        load_trace("nowhere/t.csv")


def _trace(tmp_path: Path, prompts: list[int], outputs: list[int], arrivals: list[float] | None = None):
    path = tmp_path / "t.csv"
    if arrivals is None:
        rows = [f"{p},{o}" for p, o in zip(prompts, outputs, strict=False)]
        path.write_text("num_prompt_tokens,num_output_tokens\n" + "\n".join(rows) + "\n")
    else:
        rows = [f"{a},{p},{o}" for a, p, o in zip(arrivals, prompts, outputs, strict=False)]
        path.write_text("arrival_at_s,num_prompt_tokens,num_output_tokens\n" + "\n".join(rows) + "\n")
    return load_trace(path)


def test_filter_drops_prompts_beyond_the_context_and_reports_how_many(tmp_path: Path) -> None:
    trace = _trace(tmp_path, [10, 100, 20, 99], [5, 5, 95, 5], [0, 1, 2, 3])
    workload = make_workload(trace, max_model_len=100)
    assert workload.num_prompt_tokens.tolist() == [10, 20, 99]
    assert workload.num_output_tokens.tolist() == [5, 80, 1]  # prompt + output <= 100
    report = workload.report
    assert (report.num_filtered, report.num_prompts_clipped, report.num_outputs_clipped) == (1, 0, 2)
    assert "1 prompts over 99 tokens filtered out" in report.describe()


def test_clip_cuts_prompts_to_fit(tmp_path: Path) -> None:
    trace = _trace(tmp_path, [10, 100, 250], [5, 5, 5], [0, 1, 2])
    workload = make_workload(trace, max_model_len=100, overlength="clip")
    assert workload.num_prompt_tokens.tolist() == [10, 99, 99]
    assert workload.num_output_tokens.tolist() == [5, 1, 1]
    assert workload.report.num_prompts_clipped == 2


def test_rescaling_keeps_the_burst_pattern_and_hits_the_rate() -> None:
    arrivals = np.array([0.0, 1.0, 1.0, 5.0, 9.0])
    scaled = rescale_arrivals(arrivals, rate_per_s=2.0)
    assert (len(scaled) - 1) / scaled[-1] == pytest.approx(2.0)
    assert np.allclose(np.diff(scaled) / np.diff(scaled).sum(), np.diff(arrivals) / 9.0)


def test_first_n_requests_of_a_timed_trace_at_a_rate() -> None:
    workload = make_workload(load_trace("azure-conv-2023"), max_model_len=4096, num_requests=500, rate_per_s=2.0)
    assert len(workload) == 500
    assert workload.report.rate_per_s == pytest.approx(2.0)
    assert workload.num_prompt_tokens[:2].tolist() == [374, 396]


@pytest.mark.parametrize("cv", [1.0, 3.0])
def test_gamma_and_poisson_arrivals_have_the_requested_mean_rate(cv: float) -> None:
    rng = np.random.default_rng(1)
    arrivals = gamma_arrivals(20_000, 4.0, rng, cv=cv)
    gaps = np.diff(arrivals)
    assert 1 / gaps.mean() == pytest.approx(4.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)
    assert poisson_arrivals(3, 1.0, np.random.default_rng(0))[0] == 0.0


def test_length_only_trace_needs_a_rate_and_is_sampled_reproducibly() -> None:
    trace = load_trace("arxiv-summarization")
    with pytest.raises(ConfigError, match="poisson arrivals need a rate"):
        make_workload(trace, max_model_len=4096)
    a = make_workload(trace, max_model_len=4096, num_requests=300, rate_per_s=1.0, seed=3)
    b = make_workload(trace, max_model_len=4096, num_requests=300, rate_per_s=1.0, seed=3)
    c = make_workload(trace, max_model_len=4096, num_requests=300, rate_per_s=1.0, seed=4)
    assert np.array_equal(a.num_prompt_tokens, b.num_prompt_tokens)
    assert np.array_equal(a.arrival_at_s, b.arrival_at_s)
    assert not np.array_equal(a.num_prompt_tokens, c.num_prompt_tokens)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate_per_s": -1.0}, "rate_per_s must be a positive number"),
        ({"overlength": "trim"}, "overlength must be 'filter' or 'clip', got 'trim'"),
        ({"arrival_process": "uniform"}, "arrival_process must be one of"),
        ({"num_requests": 0}, "num_requests must be >= 1"),
        # shape 1 / cv^2 overflows or underflows: a ZeroDivisionError deep in the arrivals otherwise
        (
            {"arrival_process": "gamma", "rate_per_s": 1.0, "burstiness_cv": 1e308},
            r"burstiness_cv \(--burstiness\) must be in \[0.01, 100\] for gamma arrivals, got 1e\+308",
        ),
        ({"arrival_process": "gamma", "rate_per_s": 1.0, "burstiness_cv": 1e-300}, r"got 1e-300"),
    ],
)
def test_bad_workload_settings_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_workload(load_trace("azure-conv-2023"), max_model_len=4096, **kwargs)

"""Core types: SLOs, requests, records, slack, snapshots, decisions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import make_decodes, make_prefill, make_request, make_worker
from tropical_sched.core import (
    ConfigError,
    DecodeBatch,
    RequestRecord,
    RouteAction,
    RouteDecision,
    Slo,
    SloSpec,
    WorkerRole,
    min_tpot_slack_s,
    predicted_prefill_finish_at_s,
    tpot_slack_s,
    ttft_slack_s,
)


@pytest.mark.parametrize(("ttft_s", "tpot_s"), [(0, 0.1), (1, -0.1), (math.inf, 0.1), (math.nan, 0.1)])
def test_slo_rejects_non_positive_or_non_finite_values(ttft_s: float, tpot_s: float) -> None:
    with pytest.raises(ConfigError, match=r"Slo\.(ttft_s|tpot_s)"):
        Slo(ttft_s=ttft_s, tpot_s=tpot_s)


def test_request_rejects_empty_prompt_and_names_the_field() -> None:
    with pytest.raises(ConfigError, match="num_prompt_tokens must be >= 1, got 0"):
        make_request(num_prompt_tokens=0)


def test_request_deadline_is_arrival_plus_ttft_slo() -> None:
    assert make_request(arrival_at_s=2.0, slo=Slo(ttft_s=0.5, tpot_s=0.1)).ttft_deadline_at_s == 2.5


def _record(**overrides: object) -> RequestRecord:
    fields: dict[str, object] = {
        "request_id": "r",
        "arrival_at_s": 1.0,
        "num_prompt_tokens": 10,
        "num_output_tokens": 11,
        "ttft_slo_s": 0.5,
        "tpot_slo_s": 0.1,
        "first_token_at_s": 1.4,
        "finished_at_s": 2.4,
    }
    fields.update(overrides)
    return RequestRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "ttft_s", "tpot_s", "met_ttft", "met_tpot"),
    [
        ({}, 0.4, 0.1, True, True),  # exactly on both SLOs counts as met
        ({"first_token_at_s": 1.6, "finished_at_s": 2.6}, 0.6, 0.1, False, True),
        ({"finished_at_s": 2.5}, 0.4, 0.11, True, False),
        ({"num_output_tokens": 1, "finished_at_s": 1.4}, 0.4, 0.0, True, True),  # one token: TPOT is 0
        (
            {"rejected": True, "first_token_at_s": None, "finished_at_s": None, "num_output_tokens": 0},
            math.inf,
            math.inf,
            False,
            False,
        ),
    ],
)
def test_record_latencies_and_slo_checks(
    overrides: dict[str, object], ttft_s: float, tpot_s: float, met_ttft: bool, met_tpot: bool
) -> None:
    record = _record(**overrides)
    assert record.ttft_s == pytest.approx(ttft_s)
    assert record.tpot_s == pytest.approx(tpot_s)
    assert (record.met_ttft, record.met_tpot, record.met_slo) == (met_ttft, met_tpot, met_ttft and met_tpot)


def test_slo_spec_defaults_are_the_papers() -> None:
    spec = SloSpec.make()
    slo = spec.slo_for(100, isolated_prefill_s=lambda n: n * 0.001, isolated_decode_step_s=lambda n: 0.02)
    assert slo == Slo(ttft_s=0.5, tpot_s=0.1)
    assert spec.describe() == "TTFT 5x isolated prefill, TPOT 100 ms"


def test_slo_spec_absolute_scaled_and_global_scale() -> None:
    spec = SloSpec.make(ttft_slo_s=2.0, tpot_slo_scale=3.0, slo_scale=0.5)
    slo = spec.slo_for(100, isolated_prefill_s=lambda n: 1.0, isolated_decode_step_s=lambda n: 0.02)
    assert slo.ttft_s == pytest.approx(1.0)
    assert slo.tpot_s == pytest.approx(0.03)


def test_slo_spec_rejects_both_forms_of_one_slo() -> None:
    with pytest.raises(ConfigError, match="exactly one of ttft_slo_s and ttft_slo_scale"):
        SloSpec.make(ttft_slo_s=1.0, ttft_slo_scale=5.0)


def test_ttft_slack_counts_queue_and_remaining_prefill() -> None:
    assert ttft_slack_s(arrival_at_s=1.0, ttft_slo_s=2.0, now_s=1.5, remaining_prefill_s=0.3, queue_ahead_s=0.2) == (
        pytest.approx(1.0)
    )


def test_tpot_slack_treats_the_first_token_as_one_generated() -> None:
    # n_generated = 0 or 1: the second token is due one TPOT SLO after the first.
    for n in (0, 1):
        assert tpot_slack_s(first_token_at_s=1.0, num_generated_tokens=n, tpot_slo_s=0.1, now_s=1.05) == (
            pytest.approx(0.05)
        )
    assert tpot_slack_s(first_token_at_s=1.0, num_generated_tokens=10, tpot_slo_s=0.1, now_s=1.5) == (
        pytest.approx(0.5)
    )


@given(remaining=st.floats(0, 100), extra=st.floats(0.001, 100), queue=st.floats(0, 100), now=st.floats(0, 1000))
def test_ttft_slack_falls_as_predicted_time_rises(remaining: float, extra: float, queue: float, now: float) -> None:
    base = ttft_slack_s(
        arrival_at_s=0.0, ttft_slo_s=10.0, now_s=now, remaining_prefill_s=remaining, queue_ahead_s=queue
    )
    more = ttft_slack_s(
        arrival_at_s=0.0, ttft_slo_s=10.0, now_s=now, remaining_prefill_s=remaining + extra, queue_ahead_s=queue
    )
    assert more < base


def test_min_tpot_slack_is_the_tightest_decode_less_its_margin() -> None:
    decodes = DecodeBatch(
        request_ids=("a", "b"),
        first_token_at_s=(0.0, 0.0),
        num_generated_tokens=(10, 3),
        tpot_slo_s=(0.1, 0.2),
        num_context_tokens=(5, 5),
    )
    # slacks at t=0.5: a: 1.0 - 0.5 = 0.5; b: 0.6 - 0.5 = 0.1; margins 0.5 * SLO: 0.05 and 0.1.
    assert min_tpot_slack_s(decodes, 0.5) == pytest.approx(0.1)
    assert min_tpot_slack_s(decodes, 0.5, margin_fraction=0.5) == pytest.approx(0.0)
    assert min_tpot_slack_s(DecodeBatch(), 0.5) == math.inf


def test_predicted_prefill_finish_accumulates_with_safety_factor() -> None:
    queue = [make_prefill(num_prompt_tokens=100), make_prefill(num_prompt_tokens=200, num_computed_tokens=100)]
    finish = predicted_prefill_finish_at_s(
        queue, 1.0, lambda p: 0.001 * (p.num_prompt_tokens - p.num_computed_tokens), safety_factor=2.0
    )
    assert finish == pytest.approx([1.2, 1.4])


def test_decode_batch_checks_columns_and_sums_context() -> None:
    batch = make_decodes(3, num_context_tokens=7)
    assert len(batch) == 3
    assert batch.total_context_tokens == 21
    assert [d.request_id for d in batch] == ["d0", "d1", "d2"]
    with pytest.raises(ConfigError, match="first_token_at_s has 1 entries, request_ids has 2"):
        DecodeBatch(
            request_ids=("a", "b"),
            first_token_at_s=(0.0,),
            num_generated_tokens=(1, 1),
            tpot_slo_s=(0.1, 0.1),
            num_context_tokens=(1, 1),
        )


def test_worker_snapshot_derived_loads() -> None:
    worker = make_worker(
        prefills=(make_prefill(num_prompt_tokens=100, num_computed_tokens=40), make_prefill(num_prompt_tokens=50)),
        decodes=make_decodes(2, num_context_tokens=30),
        num_kv_tokens_used=25_000,
    )
    assert worker.num_outstanding_prompt_tokens == 110
    assert worker.num_executing_tokens == 170
    assert worker.kv_usage_fraction == 0.25
    assert worker.num_free_kv_tokens == 75_000
    assert not worker.is_idle


def test_roles_say_what_they_run() -> None:
    assert not WorkerRole.PREFILL.runs_decodes
    assert WorkerRole.PREFILL.runs_prefills
    assert WorkerRole.DECODE.runs_decodes
    assert not WorkerRole.DECODE.runs_prefills
    assert WorkerRole.MULTIPLEXING.runs_decodes
    assert WorkerRole.MULTIPLEXING.runs_prefills


@pytest.mark.parametrize(("action", "worker_id"), [(RouteAction.PREFILL, None), (RouteAction.WAIT, 0)])
def test_route_decision_requires_worker_exactly_when_the_action_needs_one(
    action: RouteAction, worker_id: int | None
) -> None:
    with pytest.raises(ConfigError, match="does not fit action"):
        RouteDecision(action=action, worker_id=worker_id, reason="x")

"""Core types: SLOs, requests, records, slack, snapshots, decisions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import make_decodes, make_model, make_prefill, make_request, make_worker
from tropical_sched.core import (
    ConfigError,
    DecodeBatch,
    PrefillState,
    RequestRecord,
    RouteAction,
    RouteDecision,
    Slo,
    SloSpec,
    WorkerRole,
    decode_first_token_wait_s,
    expected_step_in_flight_s,
    min_tpot_slack_s,
    predicted_queue_finish,
    queued_prefill_s,
    tpot_slack_s,
    ttft_slack_s,
)
from tropical_sched.predictors.calibration import observed_pd_hop_s


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


MODEL = make_model()  # 10 ms per step + 0.1 ms per token: a 100-token prefill alone takes 20 ms


def _remaining_tokens(prefill: PrefillState) -> float:
    return float(prefill.num_prompt_tokens - prefill.num_computed_tokens - prefill.num_scheduled_tokens)


def test_queued_prefill_counts_the_tokens_in_flight_as_done_and_chunks() -> None:
    running = make_prefill(num_prompt_tokens=300, num_computed_tokens=100, num_scheduled_tokens=100)
    assert queued_prefill_s(running, MODEL) == pytest.approx(0.010 + 0.010)  # 100 tokens left, one step
    assert queued_prefill_s(make_prefill(num_prompt_tokens=300), MODEL, 100) == pytest.approx(3 * 0.020)


@pytest.mark.parametrize(
    ("case", "queue", "options", "finish_at_s", "ahead_s", "broken"),
    [
        ("an empty queue: its own prefill, scaled", (), {"safety_factor": 2.0}, 1.04, 0.0, None),
        ("the step in flight runs first", (), {"busy_until_s": 1.5}, 1.52, 0.5, None),
        ("a step that already ended costs nothing", (), {"busy_until_s": 0.5}, 1.02, 0.0, None),
        ("after the prefill (a P/D hop) delays only the first token", (), {"after_prefill_s": 0.3}, 1.32, 0.0, None),
        (
            "without an order it goes last",
            (make_prefill(request_id="a", num_prompt_tokens=500), make_prefill(request_id="b", num_prompt_tokens=10)),
            {},
            1.0 + 0.060 + 0.011 + 0.020,
            0.071,
            None,
        ),
        (
            "in the worker's order it overtakes longer prefills, not equal ones",
            (make_prefill(request_id="a", num_prompt_tokens=100), make_prefill(request_id="b", num_prompt_tokens=500)),
            {"sort_key": _remaining_tokens},
            1.040,
            0.020,
            None,
        ),
        (
            "it overtakes a longer prefill in flight at the next chunk boundary...",
            (make_prefill(request_id="a", num_prompt_tokens=900, num_scheduled_tokens=100),),
            {"sort_key": _remaining_tokens, "busy_until_s": 1.1},
            1.12,
            0.1,
            None,
        ),
        (
            "... unless the engine finishes a started prefill first",
            (make_prefill(request_id="a", num_prompt_tokens=900, num_scheduled_tokens=100),),
            {"sort_key": _remaining_tokens, "busy_until_s": 1.1, "in_flight_first": True},
            1.1 + 0.090 + 0.020,
            0.19,
            None,
        ),
        (
            "it names the first queued prefill whose deadline it breaks",
            (
                make_prefill(request_id="late", num_prompt_tokens=500, ttft_slo_s=1.0),  # misses it anyway
                make_prefill(request_id="due", num_prompt_tokens=600, ttft_slo_s=1.14),  # 1.13 alone, 1.15 behind
                make_prefill(request_id="also", num_prompt_tokens=700, ttft_slo_s=1.21),
            ),
            {"sort_key": _remaining_tokens},
            1.020,
            0.0,
            "due",
        ),
    ],
)
def test_predicted_queue_finish(
    case: str, queue: tuple[PrefillState, ...], options: dict, finish_at_s: float, ahead_s: float, broken: str | None
) -> None:
    new = make_prefill(request_id="new", num_prompt_tokens=100)
    finish = predicted_queue_finish(queue, new, 1.0, MODEL, **options)
    assert finish.finish_at_s == pytest.approx(finish_at_s), case
    assert finish.ahead_s == pytest.approx(ahead_s), case
    assert finish.finish_at_s == pytest.approx(1.0 + finish.ahead_s + finish.own_s + finish.after_prefill_s)
    assert finish.broken_request_id == broken, case
    assert finish.breaks_none is (broken is None)


def test_the_expected_step_in_flight_is_half_the_first_prefills_next_chunk() -> None:
    assert expected_step_in_flight_s((), MODEL) == 0.0  # no prefill: nothing in flight
    queue = (
        make_prefill(request_id="head", num_prompt_tokens=900, num_computed_tokens=100),
        make_prefill(request_id="next", num_prompt_tokens=50),
    )
    assert expected_step_in_flight_s(queue, MODEL) == pytest.approx(0.5 * (0.010 + 800e-4))  # the rest, whole
    assert expected_step_in_flight_s(queue, MODEL, 200) == pytest.approx(0.5 * (0.010 + 200e-4))  # one chunk
    scheduled = make_prefill(num_prompt_tokens=900, num_computed_tokens=100, num_scheduled_tokens=300)
    assert expected_step_in_flight_s((scheduled,), MODEL, 200) == pytest.approx(0.5 * (0.010 + 300e-4))


def test_the_decode_first_token_wait_is_what_an_observed_pd_hop_leaves_out() -> None:
    idle = decode_first_token_wait_s(MODEL, num_decoding=0, num_decoding_context_tokens=0, num_prompt_tokens=100)
    assert idle == pytest.approx(MODEL.decode_step_time_s(1, 101))  # no step in flight: its own step only
    busy = decode_first_token_wait_s(MODEL, num_decoding=8, num_decoding_context_tokens=4000, num_prompt_tokens=100)
    assert busy == pytest.approx(MODEL.decode_step_time_s(9, 4101) + MODEL.decode_step_time_s(8, 4000) / 2)
    assert busy > idle
    # one definition for both halves: a first token that came the hop plus that wait after the decode half was sent
    # gives the hop back
    observed_s = observed_pd_hop_s(
        MODEL, waited_s=0.3 + busy, num_decoding=8, num_decoding_context_tokens=4000, num_prompt_tokens=100
    )
    assert observed_s == pytest.approx(0.3)


@given(
    prompts=st.lists(st.integers(1, 4000), max_size=8),
    new_prompt=st.integers(1, 4000),
    extra=st.integers(1, 4000),
    factor=st.floats(1.0, 2.0),
)
def test_queue_finish_never_falls_with_more_work_ahead_or_a_larger_safety_factor(
    prompts: list[int], new_prompt: int, extra: int, factor: float
) -> None:
    def queue_of(lengths: list[int]) -> tuple[PrefillState, ...]:  # in the worker's (shortest-first) order
        return tuple(make_prefill(request_id=str(i), num_prompt_tokens=n) for i, n in enumerate(sorted(lengths)))

    new = make_prefill(request_id="new", num_prompt_tokens=new_prompt)
    base = predicted_queue_finish(queue_of(prompts), new, 0.0, MODEL, sort_key=_remaining_tokens, safety_factor=factor)
    more = predicted_queue_finish(
        queue_of([*prompts, extra]), new, 0.0, MODEL, sort_key=_remaining_tokens, safety_factor=factor
    )
    slower = predicted_queue_finish(
        queue_of(prompts), new, 0.0, MODEL, sort_key=_remaining_tokens, safety_factor=factor * 1.1
    )
    assert more.finish_at_s >= base.finish_at_s
    assert slower.finish_at_s > base.finish_at_s


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

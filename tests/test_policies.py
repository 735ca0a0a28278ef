"""Policies: contract tests over the registry, Tropical's routing rule (table-driven), baselines, local schedulers."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.conftest import make_cluster, make_decodes, make_model, make_prefill, make_request, make_worker
from tropical_sched.core import (
    ConfigError,
    DecodeBatch,
    PrefillState,
    RouteAction,
    Slo,
    UnknownNameError,
    WorkerRole,
    decode_first_token_wait_s,
    expected_step_in_flight_s,
    min_tpot_slack_s,
    num_behind_tpot_pace,
    tpot_slack_s,
)
from tropical_sched.policies import (
    POLICIES,
    LocalScheduler,
    Policy,
    PolicyContext,
    ScorpioPolicy,
    SlackCappedScheduler,
    TropicalConfig,
    TropicalPolicy,
    make_policy,
    policy_names,
)
from tropical_sched.policies.toggle import ToggleConfig
from tropical_sched.predictors.output_length import LengthSamples

MODEL = make_model()  # 10 ms per step + 0.1 ms per token + 1 us per decode context token
CONTEXT = PolicyContext(
    step_time=MODEL,
    max_model_len=4096,
    length_samples=LengthSamples(list(range(100, 4100, 10)), [1 + (i * 37) % 500 for i in range(400)]),
)

P = WorkerRole.PREFILL
M = WorkerRole.MULTIPLEXING


def tropical(**options: Any) -> TropicalPolicy:
    return TropicalPolicy(CONTEXT, TropicalConfig(**options))


# -- contract tests over every registered policy ----------------------------------------------------------------


@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("num_workers", [2, 4])
def test_every_policy_builds_a_deployment_and_routes_on_it(name: str, num_workers: int) -> None:
    policy = make_policy(name, CONTEXT)
    assert isinstance(policy, Policy)
    assert policy.name == name
    roles = policy.worker_roles(num_workers, None)
    assert len(roles) == num_workers
    assert any(role.runs_prefills for role in roles)
    assert any(role.runs_decodes for role in roles)
    for role in set(roles):
        settings = policy.engine_settings(role)
        assert settings.max_num_batched_tokens >= 1
        assert isinstance(policy.local_scheduler(role), LocalScheduler)
    cluster = make_cluster(*(make_worker(i, role) for i, role in enumerate(roles)))
    decision = policy.route(make_request(), cluster)
    assert decision.action.needs_worker
    assert decision.reason
    assert cluster.workers[decision.worker_id].role.runs_prefills


@pytest.mark.parametrize("name", policy_names())
def test_every_policy_rejects_unknown_options_naming_them(name: str) -> None:
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['bogus'\]"):
        make_policy(name, CONTEXT, {"bogus": 1})


def test_registry_is_explicit_and_complete() -> None:
    assert policy_names() == ["tropical", "vllm", "vllm-chunked", "distserve", "scorpio", "slos-serve", "tempo"]
    assert all(entry.summary for entry in POLICIES.values())
    with pytest.raises(UnknownNameError, match="unknown policy 'sarathi'"):
        make_policy("sarathi", CONTEXT)


# -- Tropical: routing rule -------------------------------------------------------------------------------------

# A queued prefill due soon (30.6 ms of predicted work, deadline 35 ms): any request that SRPF puts ahead of it
# breaks its deadline.
URGENT = make_prefill(request_id="urgent", num_prompt_tokens=200, ttft_slo_s=0.035)
RELAXED_DECODES = make_decodes(4, first_token_at_s=0.0, num_generated_tokens=100)  # 10 s of TPOT slack each
LATE_DECODES = make_decodes(4, first_token_at_s=-10.0, num_generated_tokens=2)  # 9.8 s late
# 8 decodes of 9,800 context tokens: a step of 10 + 0.8 + 78.4 ms, within the 90 ms watermark (0.9 x the 100 ms
# TPOT SLO); 92.3 ms with a 3,000-token prompt more, past it
HEAVY_DECODES = make_decodes(8, first_token_at_s=0.0, num_generated_tokens=100, num_context_tokens=9_800)


@pytest.mark.parametrize(
    ("case", "workers", "request_overrides", "options", "action", "worker_id"),
    [
        ("idle prefill worker takes it", [(P, {}), (M, {})], {}, {}, RouteAction.PREFILL, 0),
        (
            "busy prefill worker still meeting every deadline takes it",
            [(P, {"prefills": (make_prefill(num_prompt_tokens=300),)}), (M, {})],
            {},
            {},
            RouteAction.PREFILL,
            0,
        ),
        (
            "prefill worker whose queue would break overflows to multiplexing",
            [(P, {"prefills": (URGENT,)}), (M, {"decodes": RELAXED_DECODES})],
            {"num_prompt_tokens": 50},
            {},
            RouteAction.MULTIPLEX,
            1,
        ),
        (
            "short prompts are multiplexed too (prototype bug: <512 never)",
            [(P, {"prefills": (URGENT,)}), (M, {"decodes": RELAXED_DECODES})],
            {"num_prompt_tokens": 8},
            {},
            RouteAction.MULTIPLEX,
            1,
        ),
        (
            "a slow P/D hop makes the multiplexed path the earlier first token",
            [(P, {}), (M, {"decodes": RELAXED_DECODES})],
            {},
            {"pd_overhead_s": 0.5},
            RouteAction.MULTIPLEX,
            1,
        ),
        (
            "a P/D hop that breaks the TTFT SLO leaves only the multiplexing worker",
            [(P, {}), (M, {"decodes": RELAXED_DECODES})],
            {"slo": Slo(ttft_s=0.2, tpot_s=0.1)},
            {"pd_overhead_s": 0.3, "route_order": "prefill-first", "reject_unattainable": True},
            RouteAction.MULTIPLEX,
            1,
        ),
        (
            "multiplex-first prefers the multiplexing worker",
            [(P, {}), (M, {"decodes": RELAXED_DECODES})],
            {},
            {"route_order": "multiplex-first"},
            RouteAction.MULTIPLEX,
            1,
        ),
        (
            "a multiplexing worker with a prefill outstanding is not eligible",
            [(P, {"prefills": (URGENT,)}), (M, {"decodes": RELAXED_DECODES, "prefills": (make_prefill(),)})],
            {"num_prompt_tokens": 50},
            {},
            RouteAction.WAIT,
            None,
        ),
        (
            "prompts above max_multiplexed_prompt_tokens wait",
            [(P, {"prefills": (URGENT,)}), (M, {"decodes": RELAXED_DECODES})],
            {"num_prompt_tokens": 50},
            {"max_multiplexed_prompt_tokens": 40},
            RouteAction.WAIT,
            None,
        ),
        (
            "KV watermark",
            [(P, {"prefills": (URGENT,)}), (M, {"decodes": RELAXED_DECODES, "num_kv_tokens_used": 89_990})],
            {"num_prompt_tokens": 50},
            {},
            RouteAction.WAIT,
            None,
        ),
        (
            "late decodes cannot absorb a prefill with a tight TTFT SLO",
            [(P, {"prefills": (URGENT,)}), (M, {"decodes": LATE_DECODES})],
            {"num_prompt_tokens": 50, "slo": Slo(ttft_s=0.02, tpot_s=0.1)},
            {},
            RouteAction.WAIT,
            None,
        ),
        (
            "unattainable requests are rejected when asked",
            [(P, {"prefills": (URGENT,)}), (M, {"decodes": LATE_DECODES})],
            {"num_prompt_tokens": 50, "slo": Slo(ttft_s=0.01, tpot_s=0.1)},
            {"reject_unattainable": True},
            RouteAction.REJECT,
            None,
        ),
    ],
)
def test_tropical_routing_rule(
    case: str,
    workers: list[tuple[WorkerRole, dict]],
    request_overrides: dict,
    options: dict,
    action: RouteAction,
    worker_id: int | None,
) -> None:
    cluster = make_cluster(*(make_worker(i, role, **kw) for i, (role, kw) in enumerate(workers)))
    decision = tropical(**options).route(make_request(**request_overrides), cluster)
    assert (decision.action, decision.worker_id) == (action, worker_id), decision.reason
    assert decision.reason


def test_tropical_compares_every_eligible_prefill_worker_before_choosing() -> None:
    # Prototype bug: the first eligible worker won. Here the second one has fewer outstanding tokens.
    cluster = make_cluster(
        make_worker(0, P, prefills=(make_prefill(num_prompt_tokens=400),)),
        make_worker(1, P, prefills=(make_prefill(num_prompt_tokens=100),)),
        make_worker(2, M),
    )
    request = make_request(num_prompt_tokens=1000, slo=Slo(ttft_s=5.0, tpot_s=0.1))
    decision = tropical(route_order="prefill-first").route(request, cluster)
    assert (decision.action, decision.worker_id) == (RouteAction.PREFILL, 1)
    assert decision.predicted["outstanding_prompt_tokens"] == 100


def test_tropical_picks_the_multiplexing_worker_with_fewest_decode_context_tokens() -> None:
    cluster = make_cluster(
        make_worker(0, P, prefills=(URGENT,)),
        make_worker(1, M, decodes=make_decodes(4, num_generated_tokens=100, num_context_tokens=500)),
        make_worker(2, M, decodes=make_decodes(4, num_generated_tokens=100, num_context_tokens=300)),
    )
    decision = tropical().route(make_request(num_prompt_tokens=50), cluster)
    assert (decision.action, decision.worker_id) == (RouteAction.MULTIPLEX, 2)
    assert decision.predicted["decode_context_tokens"] == 1200
    assert 0 < decision.predicted["predicted_ttft_s"] < 1.0


def test_toggle_off_stops_multiplexing() -> None:
    policy = tropical(toggle=ToggleConfig(min_samples=1, hold_s=0.0))
    request = make_request(num_prompt_tokens=50)
    policy.on_finished(request, tpot_s=1.0, now_s=0.0)  # a TPOT miss: attainment 0 < 0.9
    assert not policy.toggle.multiplexing_on
    cluster = make_cluster(make_worker(0, P, prefills=(URGENT,)), make_worker(1, M, decodes=RELAXED_DECODES))
    decision = policy.route(request, cluster)
    assert decision.action is RouteAction.WAIT
    assert "switched off by the attainment toggle" in decision.reason


def test_toggle_off_keeps_the_slack_test_where_no_prefill_worker_exists() -> None:
    """With no prefill worker there is no disaggregated path to fall back on: switching the slack-tested path off
    would leave only best effort, which protects the decodes less, so the toggle changes nothing there."""
    policy = tropical(toggle=ToggleConfig(min_samples=1, hold_s=0.0))
    request = make_request(num_prompt_tokens=50)
    policy.on_finished(request, tpot_s=1.0, now_s=0.0)
    assert not policy.toggle.multiplexing_on
    cluster = make_cluster(make_worker(0, M, decodes=HEAVY_DECODES), make_worker(1, M, decodes=RELAXED_DECODES))
    decision = policy.route(request, cluster)
    assert (decision.action, decision.worker_id) == (RouteAction.MULTIPLEX, 1), decision.reason
    assert decision.reason.startswith("decodes can absorb the prefill")
    down = make_worker(2, P, is_available=False)  # all prefill workers down: none to fall back on either
    assert policy.route(request, make_cluster(*cluster.workers, down)).reason == decision.reason
    decision = policy.route(request, make_cluster(*cluster.workers, make_worker(2, P)))
    assert (decision.action, decision.worker_id) == (RouteAction.PREFILL, 2), decision.reason


def test_whole_prefill_slack_test_is_the_prototypes() -> None:
    # T_pf(50) = 15 ms; decodes have slack 0.1 * 100 - 9.95 = 0.05 s; margin 0.1 * 0.1 s = 10 ms.
    decodes = make_decodes(4, first_token_at_s=-9.95, num_generated_tokens=100)
    cluster = make_cluster(make_worker(0, P, prefills=(URGENT,)), make_worker(1, M, decodes=decodes))
    request = make_request(num_prompt_tokens=50)
    assert tropical(slack_test="whole-prefill").route(request, cluster).action is RouteAction.MULTIPLEX
    assert tropical(slack_test="whole-prefill", slack_margin_fraction=1.0).route(request, cluster).action is (
        RouteAction.WAIT
    )


def test_multiplexed_prefill_time_grows_with_tighter_slack() -> None:
    policy = tropical()
    idle = make_worker(1, M)
    relaxed = make_worker(1, M, decodes=RELAXED_DECODES)
    late = make_worker(1, M, decodes=LATE_DECODES)
    alone = policy.multiplexed_prefill_s(idle, 2000, 0.0)
    assert alone == pytest.approx(MODEL.remaining_prefill_time_s(2000, 0, 8192))
    assert alone < policy.multiplexed_prefill_s(relaxed, 2000, 0.0) < policy.multiplexed_prefill_s(late, 2000, 0.0)


@pytest.mark.parametrize(
    ("case", "option", "value"),
    [
        ("bad order", "route_order", "random"),
        ("negative margin", "slack_margin_fraction", -1.0),
        ("safety below one", "queue_safety_factor", 0.5),
        ("floor aimed at nothing", "deadline_floor_fraction", 0.0),
        ("floor aimed past the deadline", "deadline_floor_fraction", 1.5),
    ],
)
def test_tropical_config_validation_names_the_field(case: str, option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"TropicalConfig.{option}"):
        TropicalConfig(**{option: value})


def test_tropical_runs_every_split_with_a_multiplexing_worker() -> None:
    with pytest.raises(ConfigError, match=r"at least one multiplexing worker.*workers=2, prefill_workers=2"):
        tropical().worker_roles(2, 2)
    with pytest.raises(ConfigError, match="prefill_workers=-1"):
        tropical().worker_roles(2, -1)
    assert tropical().worker_roles(4, 1) == (P, M, M, M)
    assert tropical().worker_roles(4, 3) == (P, P, P, M)
    assert tropical().worker_roles(2, 0) == (M, M)
    assert tropical().worker_roles(1, None) == (M,)
    assert tropical().worker_roles(4, None) == (P, P, M, M)


# -- Tropical: decode placement ---------------------------------------------------------------------------------


def test_decode_goes_to_the_feasible_worker_with_fewest_context_tokens() -> None:
    cluster = make_cluster(
        make_worker(0, P),
        make_worker(1, M, decodes=make_decodes(4, num_context_tokens=900)),
        make_worker(2, M, decodes=make_decodes(4, num_context_tokens=100)),
    )
    placement = tropical().place_decode(make_request(), cluster)
    assert placement.worker_id == 2
    assert "TPOT-feasible" in placement.reason


def test_decode_placement_falls_back_to_least_loaded_and_waits_without_room() -> None:
    busy = make_decodes(200, num_context_tokens=1000)  # 10 + 20 + 200 ms per step: over the 90 ms watermark
    cluster = make_cluster(make_worker(0, P), make_worker(1, M, decodes=busy))
    placement = tropical().place_decode(make_request(), cluster)
    assert placement.worker_id == 1
    assert "no worker stays TPOT-feasible" in placement.reason
    full = make_cluster(make_worker(0, P), make_worker(1, M, decodes=busy, max_num_seqs=200))
    assert tropical().place_decode(make_request(), full).worker_id is None


# -- local schedulers -------------------------------------------------------------------------------------------


def test_slack_capped_chunk_keeps_the_step_within_the_smallest_slack() -> None:
    scheduler = SlackCappedScheduler(MODEL, min_chunk_tokens=0, margin_fraction=0.0)
    decodes = make_decodes(4, first_token_at_s=0.0, num_generated_tokens=5)  # slack 0.5 - now
    cap = scheduler.prefill_token_cap(now_s=0.45, decodes=decodes, num_prefix_tokens=0)
    assert cap is not None
    assert cap > 0
    step = lambda chunk: MODEL.step_time_s(  # noqa: E731
        num_decode_seqs=4, num_decode_context_tokens=decodes.total_context_tokens, prefill_chunks=[(0, chunk)]
    )
    budget = min_tpot_slack_s(decodes, 0.45)  # 0.05 s, give or take rounding
    assert budget == pytest.approx(0.05)
    assert step(cap) <= budget + 1e-12 < step(cap + 1)  # within a picosecond counts as within (float rounding)
    assert scheduler.prefill_token_cap(now_s=0.45, decodes=make_decodes(0), num_prefix_tokens=0) is None
    floor = SlackCappedScheduler(MODEL, min_chunk_tokens=32)
    assert floor.prefill_token_cap(now_s=10.0, decodes=decodes, num_prefix_tokens=0) == 32


def test_srpf_and_fcfs_orders() -> None:
    policy = tropical()
    srpf = policy.local_scheduler(P)
    short, long = make_prefill(num_prompt_tokens=1000, num_computed_tokens=900), make_prefill(num_prompt_tokens=200)
    assert srpf.prefill_sort_key(short) < srpf.prefill_sort_key(long)
    fcfs = make_policy("vllm", CONTEXT).local_scheduler(WorkerRole.COLOCATED)
    assert fcfs.prefill_sort_key(make_prefill(arrival_at_s=1.0)) < fcfs.prefill_sort_key(make_prefill(arrival_at_s=2.0))


# -- baselines --------------------------------------------------------------------------------------------------


def test_colocated_balances_by_fewest_executing_tokens() -> None:
    cluster = make_cluster(
        make_worker(0, WorkerRole.COLOCATED, decodes=make_decodes(3, num_context_tokens=100)),
        make_worker(1, WorkerRole.COLOCATED, prefills=(make_prefill(num_prompt_tokens=250),)),
    )
    decision = make_policy("vllm", CONTEXT).route(make_request(), cluster)
    assert (decision.action, decision.worker_id) == (RouteAction.COLOCATED, 1)


@pytest.mark.parametrize(("name", "chunked", "budget"), [("vllm", False, 4096), ("vllm-chunked", True, 512)])
def test_colocated_engine_settings(name: str, chunked: bool, budget: int) -> None:
    settings = make_policy(name, CONTEXT).engine_settings(WorkerRole.COLOCATED)
    assert (settings.enable_chunked_prefill, settings.max_num_batched_tokens) == (chunked, budget)
    with pytest.raises(ConfigError, match="do not apply"):
        make_policy(name, CONTEXT).worker_roles(2, 1)


def test_distserve_places_decodes_on_the_least_loaded_decode_worker_with_room() -> None:
    policy = make_policy("distserve", CONTEXT)
    assert policy.worker_roles(4, None) == (P, P, WorkerRole.DECODE, WorkerRole.DECODE)
    cluster = make_cluster(
        make_worker(0, P),
        make_worker(1, WorkerRole.DECODE, decodes=make_decodes(2, num_context_tokens=10)),
        make_worker(2, WorkerRole.DECODE, decodes=make_decodes(2, num_context_tokens=1000)),
    )
    assert policy.place_decode(make_request(), cluster).worker_id == 1
    no_room = make_cluster(make_worker(0, P), make_worker(1, WorkerRole.DECODE, num_kv_tokens_used=99_950))
    assert policy.place_decode(make_request(), no_room).worker_id is None
    assert math.isfinite(policy.waiting_sort_key(make_request()))


@pytest.mark.parametrize(
    ("case", "workers", "action", "worker_id"),
    [
        # The prefill worker is busy, the late request breaks nobody only on the idle multiplexing worker.
        ("an idle multiplexing worker takes a late request", [(P, {"prefills": (URGENT,)}), (M, {})], "multiplex", 1),
        # Decodes run on the multiplexing worker and a prefill worker exists: the late request waits for it.
        (
            "a busy multiplexing worker is kept for requests that can still make it",
            [(P, {"prefills": (URGENT,)}), (M, {"decodes": RELAXED_DECODES})],
            "wait",
            None,
        ),
        # No prefill worker is up: the multiplexing workers are the only path, decodes or not.
        (
            "with every prefill worker down, multiplexing workers take late requests",
            [(P, {"is_available": False}), (M, {"decodes": RELAXED_DECODES})],
            "multiplex",
            1,
        ),
        (
            "... the one without a prefill outstanding",
            [(P, {"is_available": False}), (M, {"prefills": (URGENT,)}), (M, {"decodes": RELAXED_DECODES})],
            "multiplex",
            2,
        ),
        (
            "... and when each has one, the request waits for the next state change",
            [(P, {"is_available": False}), (M, {"prefills": (URGENT,)})],
            "wait",
            None,
        ),
    ],
)
def test_a_late_request_never_waits_while_a_worker_that_can_run_it_idles(
    case: str, workers: list[tuple[WorkerRole, dict]], action: str, worker_id: int | None
) -> None:
    cluster = make_cluster(*(make_worker(i, role, **kw) for i, (role, kw) in enumerate(workers)), now_s=5.0)
    late = make_request(num_prompt_tokens=3000, slo=Slo(ttft_s=1.0, tpot_s=0.1))  # arrived at 0, deadline at 1 s
    decision = tropical().route(late, cluster)
    assert (decision.action.value, decision.worker_id) == (action, worker_id), decision.reason
    if action == "multiplex":
        assert decision.reason.startswith("best effort")
    rejecting = tropical(reject_unattainable=True).route(late, cluster)
    assert rejecting.action is RouteAction.REJECT


def test_the_best_effort_watermark_holds_a_late_request_that_would_push_decodes_past_it() -> None:
    late = make_request(num_prompt_tokens=3000, slo=Slo(ttft_s=1.0, tpot_s=0.1))  # arrived at 0, deadline at 1 s
    down = make_worker(0, P, is_available=False)
    heavy, relaxed = make_worker(1, M, decodes=HEAVY_DECODES), make_worker(2, M, decodes=RELAXED_DECODES)
    watermark = tropical(best_effort_decode_watermark=True)
    # off (the default): a late request joins whichever worker finishes its prefill first, heavy decodes or not
    decision = tropical().route(late, make_cluster(down, heavy, now_s=5.0))
    assert (decision.action, decision.worker_id) == (RouteAction.MULTIPLEX, 1), decision.reason
    # on: it waits rather than push the heavy worker's step past 90% of the 100 ms TPOT SLO ...
    assert watermark.route(late, make_cluster(down, heavy, now_s=5.0)).action is RouteAction.WAIT
    # ... and goes where the decodes stay under it
    decision = watermark.route(late, make_cluster(down, heavy, relaxed, now_s=5.0))
    assert (decision.action, decision.worker_id) == (RouteAction.MULTIPLEX, 2), decision.reason
    assert decision.reason.startswith("best effort")
    # an idle worker still takes it
    decision = watermark.route(late, make_cluster(down, heavy, make_worker(3, M), now_s=5.0))
    assert (decision.action, decision.worker_id) == (RouteAction.MULTIPLEX, 3), decision.reason


def _decodes_with_pace(num_on_pace: int, num_behind: int) -> DecodeBatch:
    """Decodes at t=10 s with a 100 ms TPOT SLO: 10 tokens since their first at 9 s are on pace (slack 0), 5 are
    behind (slack -0.5 s)."""
    n = num_on_pace + num_behind
    return DecodeBatch(
        request_ids=tuple(f"d{i}" for i in range(n)),
        first_token_at_s=(9.0,) * n,
        num_generated_tokens=(10,) * num_on_pace + (5,) * num_behind,
        tpot_slo_s=(0.1,) * n,
        num_context_tokens=(200,) * n,
    )


def test_num_behind_tpot_pace_counts_the_decodes_with_negative_tpot_slack() -> None:
    batch = _decodes_with_pace(3, 2)
    assert num_behind_tpot_pace(batch, 10.0) == 2  # slack 0 is on pace
    assert num_behind_tpot_pace(batch, 10.0 + 1e-9) == 5
    assert num_behind_tpot_pace(batch, 9.4) == 0
    assert num_behind_tpot_pace(DecodeBatch(), 10.0) == 0
    # at 90% of the SLO, a running mean TPOT of exactly the SLO is behind too
    assert num_behind_tpot_pace(batch, 10.0, pace_fraction=0.9) == 5
    assert num_behind_tpot_pace(batch, 9.85, pace_fraction=0.9) == 2  # 10 tokens by 0.85 s: 85 ms, within 90 ms
    expected = sum(
        tpot_slack_s(first_token_at_s=f, num_generated_tokens=g, tpot_slo_s=slo, now_s=10.0) < 0
        for f, g, slo in zip(batch.first_token_at_s, batch.num_generated_tokens, batch.tpot_slo_s, strict=True)
    )
    assert num_behind_tpot_pace(batch, 10.0) == expected


def test_the_pace_guard_holds_requests_off_a_worker_whose_decodes_fall_behind() -> None:
    on_time = make_request(arrival_at_s=10.0, num_prompt_tokens=100, slo=Slo(ttft_s=5.0, tpot_s=0.1))
    late = make_request(arrival_at_s=0.0, num_prompt_tokens=100, slo=Slo(ttft_s=1.0, tpot_s=0.1))  # deadline 1 s
    behind = make_worker(0, M, decodes=_decodes_with_pace(2, 2))  # half behind
    keeping_up = make_worker(1, M, decodes=_decodes_with_pace(3, 1))  # a quarter behind
    guarded = tropical(max_behind_pace_fraction=0.25, pace_tpot_fraction=1.0)
    for request in (on_time, late):
        # off (the default): the fewest-context worker (ties to the earliest first token) takes it either way
        assert tropical().route(request, make_cluster(behind, now_s=10.0)).action is RouteAction.MULTIPLEX
        # on: more than a quarter behind takes nothing, slack-tested or best effort; the request waits ...
        decision = guarded.route(request, make_cluster(behind, now_s=10.0))
        assert decision.action is RouteAction.WAIT, decision.reason
    # ... unless a worker keeps pace (a quarter behind is not more than a quarter) ...
    decision = guarded.route(on_time, make_cluster(behind, keeping_up, now_s=10.0))
    assert (decision.action, decision.worker_id) == (RouteAction.MULTIPLEX, 1), decision.reason
    # ... which a late request, lost for joint attainment, joins only with none of its decodes behind
    assert guarded.route(late, make_cluster(behind, keeping_up, now_s=10.0)).action is RouteAction.WAIT
    on_pace = make_worker(2, M, decodes=_decodes_with_pace(4, 0))
    decision = guarded.route(late, make_cluster(behind, keeping_up, on_pace, now_s=10.0))
    assert (decision.action, decision.worker_id) == (RouteAction.MULTIPLEX, 2), decision.reason
    assert "behind their TPOT pace" in guarded.route(on_time, make_cluster(behind, now_s=10.0)).reason
    # the decodes catch up (or finish): the worker opens again
    assert guarded.route(on_time, make_cluster(behind, now_s=9.4)).action is RouteAction.MULTIPLEX
    assert guarded.route(on_time, make_cluster(make_worker(0, M), now_s=10.0)).action is RouteAction.MULTIPLEX
    # at the default pace of 90% of the SLO, decodes running at exactly their SLO are behind: it waits
    at_slo = make_worker(1, M, decodes=_decodes_with_pace(4, 0))
    assert guarded.route(on_time, make_cluster(at_slo, now_s=10.0)).action is RouteAction.MULTIPLEX
    reserve = tropical(max_behind_pace_fraction=0.25)
    assert reserve.route(on_time, make_cluster(at_slo, now_s=10.0)).action is RouteAction.WAIT


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_behind_pace_fraction", -0.1),
        ("max_behind_pace_fraction", 1.0),
        ("max_behind_pace_fraction", math.nan),
        ("pace_tpot_fraction", 0.0),
        ("pace_tpot_fraction", 1.5),
        ("pace_tpot_fraction", math.nan),
    ],
)
def test_the_pace_guard_fractions_must_lie_in_their_ranges(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=name):
        tropical(**{"max_behind_pace_fraction": 0.25, name: value})


# -- per-worker models: a worker's calibrated step times and learned P/D hop -------------------------------------

SLOW = MODEL.scaled(10.0)  # a worker whose engine runs 10x slower than the profile says
ONE_QUEUED = (make_prefill(request_id="q", num_prompt_tokens=100, ttft_slo_s=10.0),)


def test_a_worker_with_a_calibrated_model_is_predicted_by_it() -> None:
    policy = tropical()
    new = make_prefill(request_id="n", num_prompt_tokens=1000)
    accurate = policy.predicted_first_token(make_worker(0, P, prefills=ONE_QUEUED), new, 0.0)
    slow = policy.predicted_first_token(make_worker(0, P, prefills=ONE_QUEUED, step_time=SLOW), new, 0.0)
    assert slow.own_s == pytest.approx(10 * accurate.own_s, rel=1e-12)
    assert slow.ahead_s == pytest.approx(10 * accurate.ahead_s, rel=1e-12)
    idle_mux, slow_mux = make_worker(1, M), make_worker(1, M, step_time=SLOW)
    assert policy.multiplexed_prefill_s(slow_mux, 2000, 0.0) == pytest.approx(
        10 * policy.multiplexed_prefill_s(idle_mux, 2000, 0.0), rel=1e-12
    )
    scorpio = ScorpioPolicy(CONTEXT)
    colocated = make_worker(0, WorkerRole.COLOCATED, prefills=ONE_QUEUED)
    slow_colocated = make_worker(0, WorkerRole.COLOCATED, prefills=ONE_QUEUED, step_time=SLOW)
    margin_s = scorpio.config.ttft_margin_s
    slow_s = scorpio.predicted_first_token(slow_colocated, new, 0.0).finish_at_s - margin_s
    assert slow_s == pytest.approx(10 * (scorpio.predicted_first_token(colocated, new, 0.0).finish_at_s - margin_s))


@pytest.mark.parametrize(
    ("case", "policy_name", "options", "context_model", "workers", "request_overrides", "action", "worker_id"),
    [
        (
            "tropical: the 10x slower prefill worker would miss the TTFT SLO; the accurate one takes it",
            "tropical",
            {"route_order": "prefill-first"},
            MODEL,
            [(P, {"prefills": ONE_QUEUED, "step_time": SLOW}), (P, {"prefills": ONE_QUEUED}), (M, {})],
            {"slo": Slo(ttft_s=0.2, tpot_s=0.1)},
            RouteAction.PREFILL,
            1,
        ),
        (
            "tropical: ... and the other way round, a worker calibrated faster than a slow profile wins",
            "tropical",
            {"route_order": "prefill-first"},
            SLOW,
            [(P, {"prefills": ONE_QUEUED}), (P, {"prefills": ONE_QUEUED, "step_time": MODEL}), (M, {})],
            {"slo": Slo(ttft_s=0.2, tpot_s=0.1)},
            RouteAction.PREFILL,
            1,
        ),
        (
            "tropical: the 10x slower multiplexing worker fails the slack test; the accurate one multiplexes",
            "tropical",
            {"route_order": "multiplex-first"},
            MODEL,
            [
                (P, {"prefills": (URGENT,)}),
                (M, {"decodes": RELAXED_DECODES, "step_time": SLOW}),
                (M, {"decodes": make_decodes(4, num_generated_tokens=100, num_context_tokens=300)}),
            ],
            {"num_prompt_tokens": 50, "slo": Slo(ttft_s=0.1, tpot_s=0.1)},
            RouteAction.MULTIPLEX,
            2,
        ),
        (
            "scorpio: the TTFT guard rejects the 10x slower, less loaded worker",
            "scorpio",
            {},
            MODEL,
            [
                (WorkerRole.COLOCATED, {"step_time": SLOW}),
                (WorkerRole.COLOCATED, {"decodes": make_decodes(2)}),
            ],
            {"num_prompt_tokens": 1000, "slo": Slo(ttft_s=0.5, tpot_s=0.1)},
            RouteAction.COLOCATED,
            1,
        ),
        (
            "slos-serve: the 10x slower, less loaded worker's plan misses the deadline",
            "slos-serve",
            {},
            MODEL,
            [
                (WorkerRole.COLOCATED, {"step_time": SLOW}),
                (WorkerRole.COLOCATED, {"decodes": make_decodes(2)}),
            ],
            {"num_prompt_tokens": 1000, "slo": Slo(ttft_s=0.5, tpot_s=0.1)},
            RouteAction.COLOCATED,
            1,
        ),
    ],
)
def test_a_worker_calibrated_10x_slower_loses_the_route_to_an_accurately_predicted_one(
    case: str,
    policy_name: str,
    options: dict,
    context_model: Any,
    workers: list[tuple[WorkerRole, dict]],
    request_overrides: dict,
    action: RouteAction,
    worker_id: int,
) -> None:
    context = PolicyContext(step_time=context_model, max_model_len=4096, length_samples=CONTEXT.length_samples)
    policy = make_policy(policy_name, context, options)
    cluster = make_cluster(*(make_worker(i, role, **kw) for i, (role, kw) in enumerate(workers)))
    decision = policy.route(make_request(**request_overrides), cluster)
    assert (decision.action, decision.worker_id) == (action, worker_id), decision.reason
    # Predicted with one model for all, the workers tie and the other one (lower id, or less loaded) wins.
    one_model = make_cluster(
        *(
            make_worker(i, role, **{k: v for k, v in kw.items() if k != "step_time"})
            for i, (role, kw) in enumerate(workers)
        )
    )
    assert make_policy(policy_name, CONTEXT, options).route(make_request(**request_overrides), one_model).worker_id != (
        worker_id
    )


def test_a_router_that_cannot_see_the_step_in_flight_counts_its_expected_rest() -> None:
    """A live router's snapshot (``sees_step_in_flight`` false) has no ``busy_until_s``: behind a busy prefill
    worker the new prefill first waits the expected rest of the step in flight; an idle worker has none."""
    policy = tropical()
    new = PrefillState.from_request(make_request())
    queued = (make_prefill(request_id="q", num_prompt_tokens=2000, ttft_slo_s=10.0),)
    seen = policy.predicted_first_token(make_worker(0, P, prefills=queued), new, 0.0)
    blind = policy.predicted_first_token(make_worker(0, P, prefills=queued, sees_step_in_flight=False), new, 0.0)
    in_flight_s = expected_step_in_flight_s(queued, MODEL, policy.config.prefill_chunk_tokens)
    assert in_flight_s > 0
    assert blind.finish_at_s - seen.finish_at_s == pytest.approx(in_flight_s)
    idle_blind = policy.predicted_first_token(make_worker(0, P, sees_step_in_flight=False), new, 0.0)
    assert idle_blind == policy.predicted_first_token(make_worker(0, P), new, 0.0)


def test_a_learned_hop_counts_the_wait_on_the_decoding_instance_with_room() -> None:
    """After a learned hop the first token waits on the decoding instance: the least wait over the multiplexing
    workers with a free slot (half their step in flight, then their first step with the request)."""
    busy = make_decodes(32, num_context_tokens=2000)
    light = make_decodes(2, num_context_tokens=200)
    cluster = make_cluster(
        make_worker(0, P, pd_hop_fixed_s=0.05),
        make_worker(1, M, decodes=busy),
        make_worker(2, M, decodes=light),
        make_worker(3, M, decodes=make_decodes(1, num_context_tokens=10), max_num_seqs=1),  # full: left out
    )
    policy = tropical(route_order="prefill-first")
    wait_s = decode_first_token_wait_s(
        MODEL, num_decoding=len(light), num_decoding_context_tokens=light.total_context_tokens, num_prompt_tokens=100
    )
    assert policy.pd_decode_wait_s(cluster, 100) == pytest.approx(wait_s)
    decision = policy.route(make_request(), cluster)
    assert decision.action is RouteAction.PREFILL
    assert decision.predicted["predicted_ttft_s"] == pytest.approx(1.02 * MODEL.prefill_time_s(100) + 0.05 + wait_s)
    assert policy.pd_decode_wait_s(make_cluster(make_worker(0, P)), 100) is None  # nowhere to decode


def test_decode_placement_checks_each_worker_with_its_own_model() -> None:
    cluster = make_cluster(
        make_worker(0, P),
        make_worker(1, M, decodes=make_decodes(4, num_context_tokens=100), step_time=SLOW),
        make_worker(2, M, decodes=make_decodes(4, num_context_tokens=900)),
    )
    placement = tropical().place_decode(make_request(), cluster)
    assert placement.worker_id == 2
    assert "TPOT-feasible" in placement.reason


@pytest.mark.parametrize(
    ("case", "prefill_worker", "mux_worker", "options", "action", "worker_id"),
    [
        ("no learned hop: the P/D path gives the earlier first token", {}, {}, {}, RouteAction.PREFILL, 0),
        (
            "a large learned fixed hop makes multiplexing the earlier first token",
            {"pd_hop_fixed_s": 0.5},
            {},
            {},
            RouteAction.MULTIPLEX,
            1,
        ),
        (
            "a learned per-token hop (5 ms x 100 tokens) does too",
            {"pd_hop_per_prompt_token_s": 0.005},
            {},
            {},
            RouteAction.MULTIPLEX,
            1,
        ),
        # The multiplexed first token comes 1.2 ms after the P/D one (the decodes' share of the mixed step).
        ("a static pd_overhead_s of 0.8 ms alone keeps P/D", {}, {}, {"pd_overhead_s": 0.0008}, RouteAction.PREFILL, 0),
        # A learned hop ends where the decoding instance's first step begins: that step (10.2 ms here) comes on top.
        (
            "a learned hop of 0.8 ms plus the first decode step tips the choice",
            {"pd_hop_fixed_s": 0.0008},
            {},
            {},
            RouteAction.MULTIPLEX,
            1,
        ),
        (
            "vice versa: a small hop beside a multiplexing worker calibrated 10x slower keeps P/D",
            {"pd_hop_fixed_s": 0.05},
            {"step_time": SLOW},
            {},
            RouteAction.PREFILL,
            0,
        ),
        (
            "a learned hop that breaks the TTFT SLO leaves only multiplexing, even prefill-first",
            {"pd_hop_fixed_s": 1.5},
            {},
            {"route_order": "prefill-first", "reject_unattainable": True},
            RouteAction.MULTIPLEX,
            1,
        ),
    ],
)
def test_tropical_weighs_the_learned_pd_hop_of_each_prefill_worker(
    case: str, prefill_worker: dict, mux_worker: dict, options: dict, action: RouteAction, worker_id: int
) -> None:
    cluster = make_cluster(
        make_worker(0, P, **prefill_worker), make_worker(1, M, decodes=RELAXED_DECODES, **mux_worker)
    )
    decision = tropical(**options).route(make_request(), cluster)
    assert (decision.action, decision.worker_id) == (action, worker_id), decision.reason
    if action is RouteAction.PREFILL:
        learned_s = cluster.workers[0].pd_hop_s(100)
        # a learned hop ends at the decoding instance: half its step in flight, then its first step with the request
        decoding = cluster.workers[1]
        first_step_s = (
            decode_first_token_wait_s(
                decoding.step_time or MODEL,
                num_decoding=len(decoding.decodes),
                num_decoding_context_tokens=decoding.decodes.total_context_tokens,
                num_prompt_tokens=100,
            )
            if learned_s > 0
            else 0.0
        )
        hop_s = options.get("pd_overhead_s", 0.0) + learned_s + first_step_s
        isolated_s = 1.02 * MODEL.prefill_time_s(100)
        assert decision.predicted["predicted_ttft_s"] == pytest.approx(isolated_s + hop_s)

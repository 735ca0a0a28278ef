"""SLO classes and the SLO-aware policies of the literature: SCORPIO, SLOs-Serve, Tempo."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import (
    make_cluster,
    make_decodes,
    make_model,
    make_prefill,
    make_request,
    make_worker,
    make_workload,
)
from tropical_sched.core import ConfigError, DecodeBatch, RequestRecord, RouteAction, Slo, SloClass, SloSpec, WorkerRole
from tropical_sched.core.slo import SLO_CLASS_PRESETS, parse_slo_classes
from tropical_sched.metrics import summarize_by_class
from tropical_sched.policies import (
    CreditBatchingScheduler,
    DecodePlannerScheduler,
    GainDensityScheduler,
    PolicyContext,
    ScorpioConfig,
    ScorpioPolicy,
    SlosServeConfig,
    SlosServePolicy,
    TempoConfig,
    TempoPolicy,
    make_policy,
    plan_admission,
    virtual_batch_size,
)
from tropical_sched.predictors import LengthSamples, OutputLengthBound, load_profile
from tropical_sched.sim import ClusterConfig, SimEvent, build_requests, simulate
from tropical_sched.workloads import load_trace
from tropical_sched.workloads import make_workload as make_trace_workload

MODEL = make_model()  # 10 ms per step + 0.1 ms per new token + 1 us per decode context token
SAMPLES = LengthSamples(list(range(100, 4100, 10)), [1 + (i * 37) % 500 for i in range(400)])
CONTEXT = PolicyContext(step_time=MODEL, max_model_len=8192, length_samples=SAMPLES)
PROFILE = load_profile("a100-llama2-70b-tp4")


# -- SLO classes ------------------------------------------------------------------------------------------------


def test_slo_classes_multiply_the_base_slos_and_are_drawn_by_weight_deterministically() -> None:
    classes = (
        SloClass(name="chat", weight=3.0, ttft_factor=0.5, tpot_factor=0.5),
        SloClass(name="batch", weight=1.0, ttft_factor=4.0, tpot_factor=3.0),
    )
    spec = SloSpec.make(ttft_slo_s=2.0, tpot_slo_s=0.1, classes=classes)
    drawn = spec.draw_classes(4000)
    assert drawn == spec.draw_classes(4000)
    share = sum(c.name == "chat" for c in drawn) / len(drawn)
    assert 0.72 < share < 0.78
    workload = make_workload([0.0, 1.0, 2.0, 3.0], [100] * 4, [5] * 4)
    requests = build_requests(workload, PROFILE, spec)
    for request, slo_class in zip(requests, spec.draw_classes(4), strict=True):
        assert slo_class is not None
        assert request.slo_class == slo_class.name
        assert request.slo.ttft_s == pytest.approx(2.0 * slo_class.ttft_factor)
        assert request.slo.tpot_s == pytest.approx(0.1 * slo_class.tpot_factor)
    assert "2 SLO classes" in spec.describe()


def test_slo_classes_parse_from_presets_and_json_with_errors_that_name_the_field() -> None:
    assert parse_slo_classes("scorpio6") == SLO_CLASS_PRESETS["scorpio6"]
    assert len(SLO_CLASS_PRESETS["scorpio6"]) == 6
    parsed = parse_slo_classes('[{"name": "a", "tpot_factor": 2}, {"name": "b", "weight": 3}]')
    assert [(c.name, c.tpot_factor, c.weight) for c in parsed] == [("a", 2.0, 1.0), ("b", 1.0, 3.0)]
    with pytest.raises(ConfigError, match="neither a preset"):
        parse_slo_classes("fast-ones")
    with pytest.raises(ConfigError, match=r"SloClass 'a'\.tpot_factor must be a positive number, got -1"):
        parse_slo_classes('[{"name": "a", "tpot_factor": -1}]')
    with pytest.raises(ConfigError, match=r"SLO class 0: .*unexpected keyword argument 'speed'"):
        parse_slo_classes('[{"name": "a", "speed": 2}]')
    with pytest.raises(ConfigError, match="must be unique"):
        parse_slo_classes('[{"name": "a"}, {"name": "a"}]')


def test_attainment_is_summarised_per_class_and_only_when_there_are_classes() -> None:
    def record(request_id: str, slo_class: str, met: bool) -> RequestRecord:
        return RequestRecord(
            request_id=request_id,
            arrival_at_s=0.0,
            num_prompt_tokens=10,
            num_output_tokens=2,
            ttft_slo_s=1.0,
            tpot_slo_s=1.0,
            first_token_at_s=0.5 if met else 2.0,
            finished_at_s=1.0 if met else 2.5,
            slo_class=slo_class,
        )

    records = [record("0", "chat", True), record("1", "chat", False), record("2", "batch", True)]
    by_class = summarize_by_class(records)
    assert list(by_class) == ["chat", "batch"]
    assert by_class["chat"].slo_attainment == 0.5
    assert by_class["batch"].slo_attainment == 1.0
    assert summarize_by_class([record("0", "", True)]) == {}


# -- SCORPIO ----------------------------------------------------------------------------------------------------


def test_credit_batching_runs_each_decode_in_proportion_to_its_tpot_ratio() -> None:
    scheduler = CreditBatchingScheduler()
    decodes = DecodeBatch(
        request_ids=("tight", "half", "quarter"),
        first_token_at_s=(0.0,) * 3,
        num_generated_tokens=(1,) * 3,
        tpot_slo_s=(0.05, 0.1, 0.2),
        num_context_tokens=(100,) * 3,
    )
    runs = [scheduler.select_decodes(now_s=0.0, decodes=decodes, num_waiting_prefills=0) for _ in range(8)]
    assert [r[0] for r in runs] == [True] * 8
    assert [r[1] for r in runs] == [True, False] * 4
    assert [r[2] for r in runs] == [True, False, False, False] * 2
    same = make_decodes(3)
    assert list(scheduler.select_decodes(now_s=0.0, decodes=same, num_waiting_prefills=0)) == [True] * 3
    assert not CreditBatchingScheduler(credit_batching=False).selects_decodes


def test_virtual_batch_size_sums_the_tpot_ratios() -> None:
    assert virtual_batch_size([0.05, 0.1, 0.2]) == pytest.approx(1 + 0.5 + 0.25)
    assert virtual_batch_size([]) == 0.0


def test_scorpio_rejects_what_the_ttft_guard_finds_unattainable() -> None:
    policy = ScorpioPolicy(CONTEXT)
    # 4000 tokens take 10 ms + 400 ms alone: a 300 ms TTFT SLO cannot be met anywhere
    decision = policy.route(make_request(num_prompt_tokens=4000, slo=Slo(ttft_s=0.3, tpot_s=0.1)), _colocated(2))
    assert decision.action is RouteAction.REJECT
    assert "TTFT guard" in decision.reason
    # the queue ahead counts: three earlier-deadline prefills of 1000 tokens (110 ms each) ahead of a 100-token one
    queue = tuple(make_prefill(request_id=f"q{i}", num_prompt_tokens=1000, ttft_slo_s=0.3) for i in range(3))
    busy = make_cluster(make_worker(0, WorkerRole.COLOCATED, prefills=queue))
    tight = make_request(num_prompt_tokens=100, slo=Slo(ttft_s=0.35, tpot_s=0.1))
    assert policy.route(tight, busy).action is RouteAction.REJECT
    assert policy.route(make_request(num_prompt_tokens=100, slo=Slo(ttft_s=0.5, tpot_s=0.1)), busy).action is (
        RouteAction.COLOCATED
    )
    lenient = ScorpioPolicy(CONTEXT, ScorpioConfig(reject_unattainable=False))
    assert lenient.route(tight, busy).action is RouteAction.COLOCATED


def test_scorpio_tpot_guard_makes_a_request_wait_when_the_virtual_batch_is_too_slow() -> None:
    policy = ScorpioPolicy(CONTEXT)
    # a decode step of B requests of 200 tokens takes 10 ms + B x (0.1 + 0.2) ms
    roomy = make_cluster(make_worker(0, WorkerRole.COLOCATED, decodes=make_decodes(200, tpot_slo_s=0.1)))
    assert policy.route(make_request(slo=Slo(ttft_s=5.0, tpot_s=0.1)), roomy).action is RouteAction.COLOCATED
    # a 50 ms newcomer among 100 ms decodes: they run every other step, a virtual batch of 101 (40 ms): admitted
    assert policy.route(make_request(slo=Slo(ttft_s=5.0, tpot_s=0.05)), roomy).action is RouteAction.COLOCATED
    # among 200 decodes that all need 50 ms, the virtual batch is 201 (70 ms): it waits
    crowded = make_cluster(make_worker(0, WorkerRole.COLOCATED, decodes=make_decodes(200, tpot_slo_s=0.05)))
    decision = policy.route(make_request(slo=Slo(ttft_s=5.0, tpot_s=0.05)), crowded)
    assert decision.action is RouteAction.WAIT
    assert "TPOT guard" in decision.reason
    # the least loaded of the admitting workers takes it
    two = make_cluster(
        make_worker(0, WorkerRole.COLOCATED, decodes=make_decodes(50)),
        make_worker(1, WorkerRole.COLOCATED, decodes=make_decodes(10)),
    )
    assert policy.route(make_request(slo=Slo(ttft_s=5.0, tpot_s=0.1)), two).worker_id == 1


def test_credit_batching_in_the_simulator_paces_loose_decodes_and_keeps_token_counts() -> None:
    # two requests decode side by side; the loose one (2x the TPOT SLO) runs every other step while the tight one
    # runs (and has half its tokens, so they overlap throughout): twice the tight one's TPOT
    spec = SloSpec.make(
        ttft_slo_s=10.0,
        tpot_slo_s=0.1,
        classes=(SloClass(name="tight", tpot_factor=1.0), SloClass(name="loose", tpot_factor=2.0)),
        class_seed=0,
    )
    classes = [c.name for c in spec.draw_classes(2)]  # type: ignore[union-attr]
    assert sorted(classes) == ["loose", "tight"]  # the seed gives one of each
    outputs = [81 if name == "tight" else 41 for name in classes]
    workload = make_workload([0.0, 0.0], [100, 100], outputs)
    result = simulate(workload, PROFILE, "scorpio", cluster=ClusterConfig(num_workers=1), slo=spec)
    by_class = {r.slo_class: r for r in result.records}
    assert [r.num_output_tokens for r in result.records] == outputs
    assert by_class["loose"].tpot_s == pytest.approx(2 * by_class["tight"].tpot_s, rel=0.05)
    plain = simulate(
        workload,
        PROFILE,
        "scorpio",
        cluster=ClusterConfig(num_workers=1),
        slo=spec,
        policy_options={"credit_batching": False},
    )
    assert {r.slo_class: r for r in plain.records}["loose"].tpot_s < 0.6 * by_class["loose"].tpot_s


@pytest.mark.parametrize("policy", ["scorpio", "slos-serve", "tempo"])
def test_slo_policies_finish_every_request_under_preemption_with_mixed_classes(policy: str) -> None:
    workload = make_trace_workload(load_trace("azure-conv-2023"), max_model_len=4096, num_requests=400, rate_per_s=3.0)
    events: list[SimEvent] = []
    spec = SloSpec.make(classes=SLO_CLASS_PRESETS["scorpio6"])
    cluster = ClusterConfig(num_kv_cache_tokens=60_000, max_num_seqs=64)
    result = simulate(workload, PROFILE, policy, cluster=cluster, slo=spec, on_event=events.append)
    for record in result.records:
        assert record.rejected != (record.finished_at_s is not None)
        if not record.rejected:
            assert record.num_output_tokens == workload.num_output_tokens[int(record.request_id)]
            assert record.first_token_at_s <= record.finished_at_s
    assert events[-1].kv_tokens_used == (0,) * 2
    assert {r.slo_class for r in result.records} == {c.name for c in spec.classes}


# -- SLOs-Serve -------------------------------------------------------------------------------------------------


def test_admission_plan_admits_what_fits_before_its_deadline() -> None:
    worker = make_worker(0, WorkerRole.COLOCATED)
    new = make_prefill(request_id="new", num_prompt_tokens=1000, ttft_slo_s=1.0, tpot_slo_s=0.1)
    plan = plan_admission(MODEL, worker, new, 0.0)
    assert plan.admits_new
    assert plan.num_admitted == 1
    # a 2048-token step takes 10 + 204.8 ms: 1000 tokens cannot be done within 100 ms
    rushed = make_prefill(request_id="new", num_prompt_tokens=1000, ttft_slo_s=0.1, tpot_slo_s=0.1)
    assert not plan_admission(MODEL, worker, rushed, 0.0).admits_new


def test_admission_plan_never_drops_an_admitted_request_for_the_new_one() -> None:
    # two admitted 1000-token prefills due at 0.45 s with a 200 ms TPOT; once one is admitted it counts as a
    # decode, and steps of up to 200 ms carry ~1,890 prompt tokens: about 3,780 tokens by 0.45 s
    queued = tuple(
        make_prefill(request_id=f"q{i}", num_prompt_tokens=1000, ttft_slo_s=0.45, tpot_slo_s=0.2) for i in range(2)
    )
    worker = make_worker(0, WorkerRole.COLOCATED, prefills=queued)
    new = make_prefill(request_id="new", num_prompt_tokens=2000, ttft_slo_s=0.45, tpot_slo_s=0.2)
    plan = plan_admission(MODEL, worker, new, 0.0)
    assert not plan.admits_new
    assert plan.num_admitted == 2  # {q0, new} would fit too, but never at the cost of q1
    # the same request with a later deadline fits after them
    later = make_prefill(request_id="new", num_prompt_tokens=2000, ttft_slo_s=0.7, tpot_slo_s=0.2)
    assert plan_admission(MODEL, worker, later, 0.0).admits_new
    # best-effort prefills are not part of the plan
    assert plan_admission(MODEL, worker, new, 0.0, best_effort_ids={"q0"}).admits_new


def test_admission_plan_accounts_for_the_decodes_tpot() -> None:
    # 100 decodes with a 50 ms TPOT leave 50 - 40 = 10 ms per step: 100 prompt tokens per step
    worker = make_worker(0, WorkerRole.COLOCATED, decodes=make_decodes(100, tpot_slo_s=0.05))
    fits = make_prefill(request_id="new", num_prompt_tokens=900, ttft_slo_s=0.5, tpot_slo_s=0.1)
    assert plan_admission(MODEL, worker, fits, 0.0).admits_new
    too_many = make_prefill(request_id="new", num_prompt_tokens=1100, ttft_slo_s=0.5, tpot_slo_s=0.1)
    assert not plan_admission(MODEL, worker, too_many, 0.0).admits_new


def test_slos_serve_serves_declined_requests_best_effort_after_admitted_ones() -> None:
    policy = SlosServePolicy(CONTEXT)
    cluster = _colocated(2)
    rushed = make_request(request_id="rushed", num_prompt_tokens=4000, slo=Slo(ttft_s=0.1, tpot_s=0.1))
    decision = policy.route(rushed, cluster)
    assert decision.action is RouteAction.COLOCATED
    assert decision.predicted["best_effort"] == 1.0
    local = policy.local_scheduler(WorkerRole.COLOCATED)
    late_admitted = make_prefill(request_id="other", arrival_at_s=100.0)
    assert local.prefill_sort_key(make_prefill(request_id="rushed")) > local.prefill_sort_key(late_admitted)
    policy.on_finished(rushed, 0.0, 1.0)
    assert local.prefill_sort_key(make_prefill(request_id="rushed")) < local.prefill_sort_key(late_admitted)
    strict = SlosServePolicy(CONTEXT, SlosServeConfig(best_effort=False))
    assert strict.route(rushed, cluster).action is RouteAction.REJECT


def test_decode_planner_budget_fits_the_tightest_tpot() -> None:
    local = DecodePlannerScheduler(MODEL, set())
    decodes = make_decodes(100, tpot_slo_s=0.05)  # 40 ms of decodes: 10 ms left = 100 tokens
    assert local.prefill_token_cap(now_s=0.0, decodes=decodes, num_prefix_tokens=0) == 100
    assert local.prefill_token_cap(now_s=0.0, decodes=make_decodes(200, tpot_slo_s=0.05), num_prefix_tokens=0) == 32
    assert local.prefill_token_cap(now_s=0.0, decodes=DecodeBatch(), num_prefix_tokens=0) is None


# -- Tempo ------------------------------------------------------------------------------------------------------


def test_output_length_bound_is_the_quantile_refined_by_what_was_generated() -> None:
    lengths = list(range(1, 1001))
    bound = OutputLengthBound(LengthSamples([100] * 1000, lengths), quantile=0.95, num_buckets=1)
    assert bound.upper_bound(100) == 950
    assert bound.upper_bound(100, num_generated_tokens=900) == 995  # the 95th percentile of 901..1000
    assert bound.upper_bound(100, num_generated_tokens=2000) == 4000  # beyond the data: assume half done
    # per prompt bucket: long prompts with short answers get a smaller bound
    prompts = [100] * 500 + [3000] * 500
    outputs = [500 + i % 100 for i in range(500)] + [1 + i % 10 for i in range(500)]
    bucketed = OutputLengthBound(LengthSamples(prompts, outputs), num_buckets=2)
    assert bucketed.upper_bound(3000) <= 10 < 500 <= bucketed.upper_bound(100)
    with pytest.raises(ConfigError, match="quantile must be in"):
        OutputLengthBound(SAMPLES, quantile=1.0)
    with pytest.raises(ConfigError, match="non-empty columns"):
        OutputLengthBound(LengthSamples([], []))


def test_gain_density_prefers_short_service_and_puts_lost_requests_last() -> None:
    bound = OutputLengthBound(LengthSamples([100] * 100, [50] * 100), num_buckets=1)
    local = GainDensityScheduler(MODEL, bound)
    short = make_prefill(num_prompt_tokens=100, ttft_slo_s=1.0)
    long = make_prefill(num_prompt_tokens=3000, ttft_slo_s=1.0)
    lost = make_prefill(num_prompt_tokens=3000, ttft_slo_s=0.2)  # its prefill alone takes 310 ms
    assert local.prefill_sort_key(short) < local.prefill_sort_key(long) < 0 <= local.prefill_sort_key(lost)


def test_tempo_pacing_lets_decodes_ahead_of_their_slo_sit_out_only_while_prefills_wait() -> None:
    local = GainDensityScheduler(MODEL, OutputLengthBound(SAMPLES), pacing_lead=2.0)
    decodes = DecodeBatch(
        request_ids=("ahead", "on-time"),
        first_token_at_s=(0.0, 0.0),
        num_generated_tokens=(30, 11),  # next tokens due at 3.0 s and 1.1 s
        tpot_slo_s=(0.1, 0.1),
        num_context_tokens=(100, 100),
    )
    assert list(local.select_decodes(now_s=1.0, decodes=decodes, num_waiting_prefills=1)) == [False, True]
    assert list(local.select_decodes(now_s=1.0, decodes=decodes, num_waiting_prefills=0)) == [True, True]


def test_tempo_needs_lengths_to_fit_its_bound() -> None:
    bare = PolicyContext(step_time=MODEL, max_model_len=8192)
    with pytest.raises(ConfigError, match="length_trace"):
        TempoPolicy(bare)
    policy = TempoPolicy(bare, TempoConfig(length_trace="azure-conv-2023"))
    trace = load_trace("azure-conv-2023")
    expected = np.quantile(trace.num_output_tokens, 0.95)
    assert 0.5 * expected < policy.bound.upper_bound(int(np.median(trace.num_prompt_tokens))) < 2 * expected
    with pytest.raises(ConfigError, match="output_length_quantile"):
        make_policy("tempo", CONTEXT, {"output_length_quantile": 0})


def test_cli_reports_attainment_per_slo_class(capsys: pytest.CaptureFixture[str]) -> None:
    from tropical_sched.cli.main import main

    code = main(
        [
            "simulate",
            "--num-requests",
            "150",
            "--policies",
            "vllm,scorpio",
            "--slo-classes",
            json.dumps([{"name": "chat", "tpot_factor": 0.75}, {"name": "batch", "ttft_factor": 4}]),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "SLO attainment per SLO class" in out
    assert "chat" in out
    assert "batch" in out


# -- helpers ----------------------------------------------------------------------------------------------------


def _colocated(n: int):  # type: ignore[no-untyped-def]
    return make_cluster(*(make_worker(i, WorkerRole.COLOCATED) for i in range(n)))

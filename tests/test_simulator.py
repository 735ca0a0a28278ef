"""The simulator: invariants, determinism, and latencies that can be worked out by hand."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_model, make_request, make_workload
from tropical_sched.cli.main import main as cli_main
from tropical_sched.core import ConfigError, SimulationError, SloSpec, WorkerRole
from tropical_sched.metrics import summarize
from tropical_sched.policies import policy_names
from tropical_sched.policies.base import EngineSettings
from tropical_sched.policies.local import FcfsScheduler
from tropical_sched.predictors import load_profile
from tropical_sched.sim import ClusterConfig, DecodePlacementTime, SimEvent, simulate
from tropical_sched.sim.worker import Job, SimWorker
from tropical_sched.workloads import load_trace
from tropical_sched.workloads import make_workload as make_trace_workload

PROFILE = load_profile("a100-llama2-70b-tp4")
MODEL = PROFILE.step_time
AZURE = make_trace_workload(load_trace("azure-conv-2023"), max_model_len=4096, num_requests=600, rate_per_s=3.0)
IN_RANGE = ClusterConfig(max_num_seqs=64)  # the profile measured decode batches up to 64: no extrapolation warnings


@pytest.mark.parametrize("policy", policy_names())
def test_every_request_finishes_or_is_rejected_exactly_once_and_the_clock_never_goes_back(policy: str) -> None:
    events: list[SimEvent] = []
    cluster = ClusterConfig(num_kv_cache_tokens=60_000, max_num_seqs=64)  # small enough to force preemption
    result = simulate(AZURE, PROFILE, policy, cluster=cluster, on_event=events.append)
    assert [r.request_id for r in result.records] == [str(i) for i in range(len(AZURE))]
    for record in result.records:
        assert record.rejected != (record.finished_at_s is not None)
        if not record.rejected:
            assert record.arrival_at_s <= record.first_scheduled_at_s <= record.first_token_at_s <= record.finished_at_s
            assert record.num_output_tokens == AZURE.num_output_tokens[int(record.request_id)]
    times = [e.at_s for e in events]
    assert times == sorted(times)
    assert all(used <= 60_000 for e in events for used in e.kv_tokens_used)
    assert all(w.max_kv_tokens_used <= w.num_kv_cache_tokens for w in result.stats.workers)
    assert events[-1].kv_tokens_used == (0,) * len(result.stats.workers)  # nothing left allocated


def test_small_kv_cache_preempts_by_recompute_and_still_completes() -> None:
    result = simulate(
        AZURE, PROFILE, "vllm-chunked", cluster=ClusterConfig(num_kv_cache_tokens=40_000, max_num_seqs=64)
    )
    assert sum(w.num_preemptions for w in result.stats.workers) > 0
    assert any(r.num_preemptions for r in result.records)
    assert not any(r.rejected for r in result.records)


@pytest.mark.parametrize("policy", ["tropical", "distserve"])
def test_same_inputs_give_identical_records(policy: str) -> None:
    first = simulate(AZURE, PROFILE, policy, cluster=IN_RANGE)
    second = simulate(AZURE, PROFILE, policy, cluster=IN_RANGE)
    assert first.records == second.records


def test_a_lone_colocated_request_takes_exactly_the_predicted_times() -> None:
    workload = make_workload([0.0], [1000], [11])
    record = simulate(workload, PROFILE, "vllm").records[0]
    assert record.ttft_s == pytest.approx(MODEL.prefill_time_s(1000))
    # each of the 10 later tokens is one decode step of one request at its growing context
    steps = [MODEL.decode_step_time_s(1, 1000 + i) for i in range(10)]
    assert record.tpot_s == pytest.approx(sum(steps) / 10)
    assert record.prefill_worker_id == record.decode_worker_id == 0
    assert not record.multiplexed


def test_disaggregated_request_pays_the_kv_transfer() -> None:
    workload = make_workload([0.0], [2000], [3])
    slow_link = ClusterConfig(kv_link_bandwidth_bytes_per_s=1e9)  # 1 GB/s: 2000 tokens x 320 KiB = 0.66 s
    record = simulate(workload, PROFILE, "distserve", cluster=slow_link).records[0]
    transfer_s = 2000 * PROFILE.kv_bytes_per_token / 1e9
    assert record.ttft_s == pytest.approx(MODEL.prefill_time_s(2000))
    assert record.finished_at_s - record.first_token_at_s == pytest.approx(
        transfer_s + MODEL.decode_step_time_s(1, 2000) + MODEL.decode_step_time_s(1, 2001)
    )
    assert (record.prefill_worker_id, record.decode_worker_id) == (0, 1)


def test_at_route_placement_reserves_decode_kv_before_the_prefill_and_keeps_the_latencies() -> None:
    """SGLang's P/D: the decode worker is chosen and its KV reserved when the request is routed."""
    workload = make_workload([0.0], [2000], [3])
    by_placement = {}
    for placement in DecodePlacementTime:
        events: list[SimEvent] = []
        cluster = ClusterConfig(decode_placement=placement)
        by_placement[placement] = simulate(workload, PROFILE, "distserve", cluster=cluster, on_event=events.append)
        arrival = events[0]
        assert arrival.kind == "arrival"
        expected_reserved = 2000 if placement is DecodePlacementTime.AT_ROUTE else 0
        assert arrival.kv_tokens_used[1] == expected_reserved  # the decode worker, before any step ran
    records = [result.records[0] for result in by_placement.values()]
    assert records[0].ttft_s == pytest.approx(records[1].ttft_s)  # one request: nothing else changes
    assert records[0].finished_at_s == pytest.approx(records[1].finished_at_s)
    assert records[1].decode_worker_id == 1


@pytest.mark.parametrize("policy", ["tropical", "distserve"])
def test_at_route_placement_finishes_every_request_under_load(policy: str) -> None:
    cluster = ClusterConfig(num_kv_cache_tokens=60_000, max_num_seqs=64, decode_placement=DecodePlacementTime.AT_ROUTE)
    events: list[SimEvent] = []
    result = simulate(AZURE, PROFILE, policy, cluster=cluster, on_event=events.append)
    assert len(result.records) == len(AZURE)
    for record in result.records:
        assert record.rejected != (record.finished_at_s is not None)
        if not record.rejected:
            assert record.num_output_tokens == AZURE.num_output_tokens[int(record.request_id)]
    assert all(used <= 60_000 for e in events for used in e.kv_tokens_used)
    assert events[-1].kv_tokens_used == (0,) * len(result.stats.workers)  # nothing left reserved


def test_at_route_placement_of_two_simultaneous_requests_completes_through_the_cli(tmp_path: Path) -> None:
    """Both one-token requests finish on the prefill worker; the decode slot reserved for the first must be given
    back, or the second waits for it forever (one sequence per worker)."""
    trace = tmp_path / "two.csv"
    trace.write_text("arrival_at_s,num_prompt_tokens,num_output_tokens\n0,1,1\n0,1,1\n")
    out = tmp_path / "result.json"
    argv = ["simulate", "--trace", str(trace), "--native-rate", "--max-num-seqs", "1", "--decode-placement"]
    argv += ["at-route", "--policies", "tropical,distserve", "--no-progress", "--json", str(out)]
    assert cli_main(argv) == 0
    policies = json.loads(out.read_text())["policies"]
    assert {name: p["num_rejected"] for name, p in policies.items()} == {"tropical": 0, "distserve": 0}


@pytest.mark.parametrize("policy", ["tropical", "distserve"])
@pytest.mark.parametrize("max_num_seqs", [1, 256])
@pytest.mark.filterwarnings("ignore::tropical_sched.predictors.step_time.ProfileRangeWarning")  # 300 reserved decodes
def test_at_route_reservations_of_requests_done_at_their_prefill_are_released(policy: str, max_num_seqs: int) -> None:
    """300 one-token requests at once: each reserves a decode slot and KV at route, and none ever decodes. Every
    reservation must come back (a leaked one keeps its slot, and once the slots are gone the rest wait forever)."""
    workload = make_workload([0.0] * 300, [1] * 300, [1] * 300)
    cluster = ClusterConfig(max_num_seqs=max_num_seqs, decode_placement=DecodePlacementTime.AT_ROUTE)
    events: list[SimEvent] = []
    result = simulate(workload, PROFILE, policy, cluster=cluster, on_event=events.append)
    assert [(r.rejected, r.num_output_tokens) for r in result.records] == [(False, 1)] * 300
    assert all(r.finished_at_s == r.first_token_at_s for r in result.records)
    assert events[-1].kv_tokens_used == (0, 0)  # no reservation left on the decode worker


def _worker(role: WorkerRole, *, num_kv_cache_tokens: int, chunk_tokens: int) -> SimWorker:
    """One worker that batches a single sequence, with chunked prefill of ``chunk_tokens`` per step."""
    return SimWorker(
        worker_id=0,
        role=role,
        settings=EngineSettings(enable_chunked_prefill=True, max_num_batched_tokens=chunk_tokens),
        local=FcfsScheduler(),
        step_time=make_model(),
        num_kv_cache_tokens=num_kv_cache_tokens,
        max_num_seqs=1,
    )


def _job(request_id: str, num_prompt_tokens: int, num_output_tokens: int) -> Job:
    return Job(make_request(request_id=request_id, num_prompt_tokens=num_prompt_tokens), num_output_tokens)


def test_a_decode_whose_kv_arrived_is_not_stuck_behind_a_started_prefill_waiting_for_that_kv() -> None:
    """A started prefill holds the only sequence slot and needs KV that a transferred decode holds; the decode
    needs the slot. The worker must break the tie (preempt the prefill) rather than go idle for good."""
    worker = _worker(WorkerRole.DECODE, num_kv_cache_tokens=10, chunk_tokens=4)
    recompute = _job("recompute", 9, 2)
    worker.enqueue_prefill(recompute)
    assert worker.start_step(0.0) is not None
    worker.finish_step(1.0)  # 4 of its 9 tokens computed: a started prefill, holding the slot
    arrived = _job("arrived", 6, 2)
    arrived.num_generated = 1
    worker.reserve_incoming(arrived)
    worker.receive(arrived)
    assert worker.kv_used == worker.kv_capacity
    duration_s = worker.start_step(1.0)
    assert duration_s is not None  # the arrived decode runs; the prefill is recomputed later
    assert list(worker.decodes) == ["arrived"]
    assert recompute.num_computed == 0
    assert recompute.num_preemptions == 1
    now_s = 1.0 + duration_s
    worker.finish_step(now_s)
    while worker.has_work():  # then everything completes
        duration_s = worker.start_step(now_s)
        assert duration_s is not None
        now_s += duration_s
        worker.finish_step(now_s)
    assert (arrived.num_generated, recompute.num_generated) == (2, 2)
    assert worker.kv_used == 0


def test_equal_priority_prefills_do_not_take_turns_preempting_each_other() -> None:
    """Two 2000-token prompts arrive together on a worker with one sequence slot: the first one started keeps
    its place between chunks and finishes, then the other runs. (Re-queued behind its equal, a started prefill
    was preempted by it at the next step, which was then preempted in turn: a livelock.)"""
    workload = make_workload([0.0, 0.0], [2000, 2000], [1, 1])
    num_events = 0

    def count(event: SimEvent) -> None:
        nonlocal num_events
        num_events += 1
        assert num_events < 1000, "the prefills keep preempting each other"

    cluster = ClusterConfig(num_workers=1, max_num_seqs=1)
    result = simulate(workload, PROFILE, "vllm-chunked", cluster=cluster, on_event=count)
    first, second = result.records
    assert (first.num_preemptions, second.num_preemptions) == (0, 0)
    assert first.first_token_at_s <= second.first_scheduled_at_s  # one after the other, no interleaving
    assert result.stats.workers[0].num_steps == 2 * math.ceil(2000 / 512)


@pytest.mark.parametrize("reject_unattainable", [True, False])
def test_scorpio_serves_a_request_whose_tpot_slo_not_even_an_idle_worker_meets(reject_unattainable: bool) -> None:
    """A 1 ms TPOT SLO is below one decode step: SCORPIO's TPOT guard refuses it everywhere. On an idle worker
    nothing can finish to make room, so the request must run there (late) rather than wait forever."""
    workload = make_workload([0.0, 0.0], [100, 100], [5, 5])
    result = simulate(
        workload,
        PROFILE,
        "scorpio",
        cluster=ClusterConfig(num_workers=1),
        slo=SloSpec.make(ttft_slo_s=10.0, tpot_slo_s=0.001),  # TTFT easily met: only the TPOT guard objects
        policy_options={"reject_unattainable": reject_unattainable},
    )
    assert [(r.rejected, r.num_output_tokens) for r in result.records] == [(False, 5), (False, 5)]


def test_prefill_prioritised_vllm_stalls_decodes_and_chunked_does_not_run_whole_prompts() -> None:
    # A long decode is running when a 3000-token prompt arrives: vLLM stops the decode for the whole prefill.
    workload = make_workload([0.0, 0.5], [100, 3000], [200, 2])
    vllm = simulate(workload, PROFILE, "vllm", cluster=ClusterConfig(num_workers=1)).records
    chunked = simulate(workload, PROFILE, "vllm-chunked", cluster=ClusterConfig(num_workers=1)).records
    assert vllm[1].ttft_s == pytest.approx(MODEL.prefill_time_s(3000), abs=0.1)
    assert chunked[1].ttft_s > vllm[1].ttft_s  # 512-token chunks, each sharing its step with the decode
    assert vllm[0].tpot_s > chunked[0].tpot_s  # ... and the decode is stalled less


def test_tropical_multiplexes_when_the_prefill_worker_is_swamped() -> None:
    # Ten 3000-token prompts at once: the prefill worker can only meet a few deadlines.
    workload = make_workload([0.0] * 10 + [5.0 + 0.05 * i for i in range(20)], [3000] * 10 + [500] * 20, [300] * 30)
    result = simulate(workload, PROFILE, "tropical")
    multiplexed = [r for r in result.records if r.multiplexed]
    assert multiplexed
    assert all(r.prefill_worker_id == r.decode_worker_id == 1 for r in multiplexed)
    assert all(r.prefill_worker_id == 0 and r.decode_worker_id == 1 for r in result.records if not r.multiplexed)
    assert result.stats.dispatch.by_action.get("multiplex", 0) == len(multiplexed)


def test_tropical_rejection_counts_as_a_miss() -> None:
    workload = make_workload([0.0] * 40, [4000] * 40, [10] * 40)
    result = simulate(
        workload,
        PROFILE,
        "tropical",
        policy_options={"reject_unattainable": True},
        slo=SloSpec.make(ttft_slo_scale=2.0),
    )
    rejected = [r for r in result.records if r.rejected]
    assert rejected
    assert all(r.reject_reason.startswith("TTFT SLO unattainable") for r in rejected)
    summary = summarize(result.records)
    assert summary.num_rejected == len(rejected)
    assert summary.slo_attainment <= 1 - len(rejected) / len(workload)


def test_requests_larger_than_the_kv_cache_are_rejected_not_stuck() -> None:
    workload = make_workload([0.0, 0.1], [3000, 100], [2000, 10])
    result = simulate(workload, PROFILE, "vllm", cluster=ClusterConfig(num_kv_cache_tokens=4000))
    assert [r.rejected for r in result.records] == [True, False]


def test_settings_are_validated_before_running() -> None:
    with pytest.raises(ConfigError, match=r"ClusterConfig\.num_workers is out of range: 0"):
        ClusterConfig(num_workers=0)
    with pytest.raises(ConfigError, match="distserve needs at least one prefill and one decode worker"):
        simulate(AZURE, PROFILE, "distserve", cluster=ClusterConfig(num_workers=1))


def test_policy_that_never_places_a_request_is_reported() -> None:
    from tropical_sched.core import RouteAction, RouteDecision
    from tropical_sched.policies import ColocatedPolicy, PolicyContext

    class Stubborn(ColocatedPolicy):
        def route(self, request, cluster):  # type: ignore[no-untyped-def]
            return RouteDecision(action=RouteAction.WAIT, worker_id=None, reason="never")

    policy = Stubborn(PolicyContext(step_time=MODEL, max_model_len=4096), chunked=False)
    with pytest.raises(SimulationError, match=r"ended with 2 unfinished requests \(2 waiting at the router"):
        simulate(make_workload([0.0, 1.0], [10, 10], [5, 5]), PROFILE, policy)


def test_summary_of_the_default_comparison_is_sane() -> None:
    summaries = {name: summarize(simulate(AZURE, PROFILE, name, cluster=IN_RANGE).records) for name in policy_names()}
    for summary in summaries.values():
        assert 0 <= summary.slo_attainment <= min(summary.ttft_attainment, summary.tpot_attainment) <= 1
        assert summary.ttft_p50_s <= summary.ttft_p90_s
        assert summary.tpot_p50_s <= summary.tpot_p90_s
    assert summaries["distserve"].num_multiplexed == 0
    assert Counter(np.isnan([s.ttft_p50_s for s in summaries.values()]))[True] == 0
    assert not math.isnan(summaries["tropical"].tpot_p90_s)

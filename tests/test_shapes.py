"""Deployment shapes (issue 14): Tropical on any split (0 prefill workers included), several prefill workers,
instances of different profiles, in the simulator, the router and the engine side; and the deadline floor of a
multiplexing worker's chunks."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import make_workload
from tests.test_prediction_consistency import models
from tropical_sched.core import ConfigError, WorkerRole
from tropical_sched.core.snapshot import DecodeBatch, PrefillState
from tropical_sched.policies import make_policy
from tropical_sched.policies.local import SlackCappedScheduler
from tropical_sched.predictors import Profile, load_profile, time_scaled
from tropical_sched.predictors.step_time import StepTimeModel
from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.fake_engine import FakeEngine
from tropical_sched.serve.router import Router
from tropical_sched.serve.testing import ServerThread
from tropical_sched.sim import ClusterConfig, policy_context, simulate
from tropical_sched.workloads import make_workload as make_trace_workload
from tropical_sched.workloads.traces import load_trace

PROFILE = load_profile("a100-llama2-70b-tp4")
AZURE = make_trace_workload(load_trace("azure-conv-2023"), max_model_len=4096, num_requests=300, rate_per_s=3.0)


# -- simulator ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_workers", "num_prefill"), [(1, 0), (2, 0), (4, 0), (4, 1), (4, 3)])
def test_tropical_serves_every_request_on_every_split(num_workers: int, num_prefill: int) -> None:
    cluster = ClusterConfig(num_workers=num_workers, num_prefill_workers=num_prefill, max_num_seqs=64)
    result = simulate(AZURE, PROFILE, "tropical", cluster=cluster)
    assert len(result.records) == len(AZURE)
    assert all(r.first_token_at_s is not None and r.finished_at_s is not None for r in result.records)
    prefill_ids = {r.prefill_worker_id for r in result.records if not r.multiplexed}
    if num_prefill == 0:
        # Every instance multiplexes: every prefill ran beside decodes, on every worker.
        assert all(r.multiplexed for r in result.records)
        assert {r.prefill_worker_id for r in result.records} == set(range(num_workers))
    else:
        assert prefill_ids <= set(range(num_prefill))
        assert {r.decode_worker_id for r in result.records} <= set(range(num_prefill, num_workers))


def test_all_multiplexing_tropical_keeps_up_with_colocated_serving_on_the_same_workers() -> None:
    """0P+2M does the colocated job: at a load colocated vLLM serves, so does Tropical with no prefill worker."""
    cluster = ClusterConfig(num_workers=2, num_prefill_workers=0, max_num_seqs=64)
    tropical = simulate(AZURE, PROFILE, "tropical", cluster=cluster)
    colocated = simulate(AZURE, PROFILE, "vllm-chunked", cluster=ClusterConfig(num_workers=2, max_num_seqs=64))
    joint = [sum(r.met_slo for r in result.records) / len(result.records) for result in (tropical, colocated)]
    assert joint[0] >= joint[1] - 0.02, joint


def test_worker_profiles_run_each_engine_on_its_own_profile_and_predict_it_with_it() -> None:
    """A heterogeneous cluster: a worker twice as slow takes its prefill twice as long, and the policy, which
    predicts each worker with its own profile, sends the lone request to the fast one."""
    slow = Profile(time_scaled(PROFILE.file, 2.0), "slow")
    one = make_workload([0.0], [2000], [3])
    for profiles, expected_worker, factor in [((slow, PROFILE), 1, 1.0), ((PROFILE, slow), 0, 1.0)]:
        result = simulate(
            one,
            PROFILE,
            "tropical",
            cluster=ClusterConfig(num_workers=2, num_prefill_workers=0),
            worker_profiles=profiles,
        )
        (record,) = result.records
        assert record.prefill_worker_id == expected_worker
        assert math.isclose(record.ttft_s, factor * PROFILE.step_time.prefill_time_s(2000), rel_tol=1e-6)
    # A request that only the slow worker can take (the fast one is the prefill worker of a 1P+1M split) runs at
    # the slow worker's speed.
    forced = simulate(
        one,
        PROFILE,
        "tropical",
        cluster=ClusterConfig(num_workers=2, num_prefill_workers=1),
        worker_profiles=(slow, slow),
    )
    assert math.isclose(forced.records[0].ttft_s, slow.step_time.prefill_time_s(2000), rel_tol=1e-6)


def test_worker_profiles_must_give_one_per_worker() -> None:
    with pytest.raises(ConfigError, match="worker_profiles: 1 profiles for 2 workers"):
        simulate(AZURE, PROFILE, "tropical", cluster=ClusterConfig(num_workers=2), worker_profiles=(PROFILE,))


# -- the deadline floor ---------------------------------------------------------------------------------------------

MODELS = models()


def _chunked_time_s(model: StepTimeModel, prompt: int, computed: int, chunk: int, decodes: int, context: int) -> float:
    total_s, prefix = 0.0, computed
    while prefix < prompt:
        step = min(chunk, prompt - prefix)
        total_s += model.step_time_s(
            num_decode_seqs=decodes, num_decode_context_tokens=context, prefill_chunks=((prefix, step),)
        )
        prefix += step
    return total_s


@settings(max_examples=200, deadline=None)
@given(
    model=MODELS,
    prompt=st.integers(1, 4000),
    computed_fraction=st.floats(0, 1),
    decodes=st.integers(0, 64),
    context=st.integers(0, 50_000),
    budget_s=st.floats(0, 5),
)
def test_the_deadline_floor_is_the_smallest_chunk_that_ends_in_time(
    model: StepTimeModel, prompt: int, computed_fraction: float, decodes: int, context: int, budget_s: float
) -> None:
    computed = min(int(computed_fraction * prompt), prompt - 1)
    chunk = model.min_chunk_tokens_to_finish_within(
        budget_s,
        num_prompt_tokens=prompt,
        num_computed_tokens=computed,
        num_decode_seqs=decodes,
        num_decode_context_tokens=context,
    )
    whole_s = _chunked_time_s(model, prompt, computed, prompt, decodes, context)
    if chunk == 0:
        assert whole_s > budget_s * (1 - 1e-9)
        return
    assert _chunked_time_s(model, prompt, computed, chunk, decodes, context) <= budget_s * (1 + 1e-9) + 1e-12
    if chunk > 1:
        assert _chunked_time_s(model, prompt, computed, chunk - 1, decodes, context) > budget_s * (1 - 1e-9)


def test_a_multiplexing_worker_raises_its_cap_to_what_a_prefill_needs_for_its_deadline() -> None:
    model = PROFILE.step_time  # a 2,000-token prefill beside one decode: about 0.42 s in one step
    late = DecodeBatch(
        request_ids=("d",),
        first_token_at_s=(0.0,),
        num_generated_tokens=(1,),
        tpot_slo_s=(0.1,),
        num_context_tokens=(2000,),
    )  # at t=1 s, 1 token after 1 s: far past its TPOT slack
    capped = SlackCappedScheduler(model, min_chunk_tokens=32)
    floored = SlackCappedScheduler(model, min_chunk_tokens=32, deadline_floor=True)
    halfway = SlackCappedScheduler(model, min_chunk_tokens=32, deadline_floor=True, deadline_floor_fraction=0.5)

    def cap(scheduler: SlackCappedScheduler, time_left_s: float) -> int | None:
        prefill = PrefillState(
            request_id="p",
            arrival_at_s=0.0,
            num_prompt_tokens=2000,
            num_computed_tokens=0,
            ttft_slo_s=1.0 + time_left_s,
        )
        return scheduler.prefill_token_cap(now_s=1.0, decodes=late, num_prefix_tokens=0, prefill=prefill)

    assert cap(capped, 1.5) == 32  # the slack cap alone: the late decode leaves nothing but the floor of 32
    full = cap(floored, 1.5)
    assert full is not None
    assert full > 32
    assert _chunked_time_s(model, 2000, 0, full, 1, 2000) <= 1.5
    # Aimed at half the time left, the chunks are bigger and end within that half.
    half = cap(halfway, 1.5)
    assert half is not None
    assert half > full
    assert _chunked_time_s(model, 2000, 0, half, 1, 2000) <= 0.75
    # Half the time left is too little, the whole of it is not: aimed at the deadline itself.
    assert cap(halfway, 0.6) == cap(floored, 0.6)
    assert _chunked_time_s(model, 2000, 0, cap(halfway, 0.6) or 0, 1, 2000) <= 0.6
    # A prefill past saving gets the slack cap only, or with drain_late_prefills the rest of its prompt at once.
    assert cap(floored, 0.3) == cap(halfway, 0.3) == 32
    draining = SlackCappedScheduler(
        model, min_chunk_tokens=32, deadline_floor=True, deadline_floor_fraction=0.5, drain_late_prefills=True
    )
    assert cap(draining, 0.3) == cap(draining, -5.0) == 2000
    assert cap(draining, 1.5) == half  # while the deadline is within reach, the floor is the same
    # The rest after a prefix, not the whole prompt.
    rest = draining.prefill_token_cap(
        now_s=1.0,
        decodes=late,
        num_prefix_tokens=1500,
        prefill=PrefillState(
            request_id="p", arrival_at_s=0.0, num_prompt_tokens=2000, num_computed_tokens=1500, ttft_slo_s=0.5
        ),
    )
    assert rest == 500
    # Without the deadline floor there is nothing to drain: the slack cap alone.
    no_floor = SlackCappedScheduler(model, min_chunk_tokens=32, drain_late_prefills=True)
    assert cap(no_floor, 0.3) == 32


def test_tropical_turns_the_deadline_floor_on_by_default_and_off_by_option() -> None:
    context = policy_context(PROFILE)
    on = make_policy("tropical", context).local_scheduler(WorkerRole.MULTIPLEXING)
    off = make_policy("tropical", context, {"deadline_floor": False}).local_scheduler(WorkerRole.MULTIPLEXING)
    assert isinstance(on, SlackCappedScheduler)
    assert isinstance(off, SlackCappedScheduler)
    assert on.deadline_floor
    assert not off.deadline_floor


# -- router ----------------------------------------------------------------------------------------------------------


SCALE = 0.05


@pytest.fixture(scope="module")
def scaled() -> Profile:
    return Profile(time_scaled(PROFILE.file, SCALE))


def _router(scaled: Profile, tmp_path_factory: pytest.TempPathFactory, roles: list[str], **options: object):  # type: ignore[no-untyped-def]
    from tropical_sched.predictors import write_profile_file

    path = tmp_path_factory.mktemp("profile") / "scaled.json"
    write_profile_file(scaled.file, path)
    engines = [FakeEngine(scaled, engine_id=f"e{i}", policy="tropical", role=role) for i, role in enumerate(roles)]  # type: ignore[arg-type]
    servers = [ServerThread(engine.app).start() for engine in engines]
    config = {
        "profile": str(path),
        "health_interval_s": 0.1,
        "metrics_interval_s": 0.1,
        "instances": [{"url": s.url, "role": role} for s, role in zip(servers, roles, strict=True)],
        **options,
    }
    router = Router(RouterConfig.model_validate(config))
    return router, engines, servers, ServerThread(router.app).start()


def test_the_router_serves_an_all_multiplexing_cluster(
    scaled: Profile, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, engines, servers, server = _router(scaled, tmp_path_factory, ["multiplexing", "multiplexing"])
    try:
        body = {"prompt": list(range(10, 410)), "max_tokens": 4}
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(server.url + "/v1/completions", json=body, timeout=30), range(16))
            )
        assert [a.status_code for a in answers] == [200] * 16
        assert all(a.json()["usage"]["completion_tokens"] == 4 for a in answers)
        # Both instances served, each request on one of them alone: no P/D.
        assert all(e.stats.num_requests > 0 for e in engines)
        assert sum(e.stats.num_requests for e in engines) == 16
        assert all(e.stats.num_remote_prefills == 0 and e.stats.num_remote_decodes == 0 for e in engines)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'tropical_router_requests_total{outcome="ok",route="multiplex"} 16.0' in metrics
    finally:
        for s in (server, *servers):
            s.stop()


def test_the_router_runs_several_prefill_workers(scaled: Profile, tmp_path_factory: pytest.TempPathFactory) -> None:
    _, engines, servers, server = _router(
        scaled,
        tmp_path_factory,
        ["prefill", "prefill", "multiplexing"],
        policy_options={"route_order": "prefill-first"},
    )
    try:
        body = {"prompt": list(range(10, 810)), "max_tokens": 3}
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(server.url + "/v1/completions", json=body, timeout=30), range(12))
            )
        assert [a.status_code for a in answers] == [200] * 12
        assert engines[0].stats.num_remote_decodes + engines[1].stats.num_remote_decodes > 0
        assert engines[2].stats.num_requests > 0
    finally:
        for s in (server, *servers):
            s.stop()


def test_the_router_predicts_an_instance_with_its_own_profile(
    scaled: Profile, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tropical_sched.predictors import write_profile_file

    slow_path = tmp_path_factory.mktemp("slow") / "slow.json"
    write_profile_file(time_scaled(scaled.file, 3.0), slow_path)
    base_path = tmp_path_factory.mktemp("base") / "base.json"
    write_profile_file(scaled.file, base_path)
    config = RouterConfig.model_validate(
        {
            "profile": str(base_path),
            "calibration": {"enabled": False},
            "instances": [
                {"url": "http://127.0.0.1:9001", "role": "multiplexing", "profile": str(slow_path)},
                {"url": "http://127.0.0.1:9002", "role": "multiplexing"},
            ],
        }
    )
    router = Router(config)
    slow, base = (instance.snapshot() for instance in router.instances)
    assert slow.step_time is not None
    assert math.isclose(slow.step_time.prefill_time_s(1000), 3 * scaled.step_time.prefill_time_s(1000), rel_tol=1e-9)
    assert base.step_time is None  # the policy's own


def test_a_cluster_of_prefill_workers_only_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least one multiplexing worker"):
        Router(RouterConfig.model_validate({"instances": [{"url": "http://127.0.0.1:9001", "role": "prefill"}]}))

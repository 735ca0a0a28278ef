"""Engines report their live state; routers that share engines decide from it (tropical_sched.live_state)."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import pytest

from tropical_sched.core import DataFormatError, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.core.snapshot import DecodeBatch
from tropical_sched.live_state import (
    LIVE_STATE_PATH,
    EngineLiveState,
    LivePrefill,
    LiveStepTime,
    merge_live_state,
    parse_live_state,
)
from tropical_sched.policies.base import PolicyContext
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors import Profile, load_profile, time_scaled, write_profile_file
from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.fake_engine import FakeEngine
from tropical_sched.serve.router import Router
from tropical_sched.serve.testing import ServerThread


def _snapshot() -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id=0,
        role=WorkerRole.MULTIPLEXING,
        prefills=(
            PrefillState(
                request_id="a", arrival_at_s=10.0, num_prompt_tokens=300, num_computed_tokens=100, ttft_slo_s=2.0
            ),
            PrefillState(
                request_id="b", arrival_at_s=11.0, num_prompt_tokens=50, num_computed_tokens=0, ttft_slo_s=1.0
            ),
        ),
        decodes=DecodeBatch(
            request_ids=("c",),
            first_token_at_s=(9.0,),
            num_generated_tokens=(7,),
            tpot_slo_s=(0.1,),
            num_context_tokens=(107,),
        ),
        num_kv_tokens_used=457,
        num_kv_tokens_capacity=10_000,
        max_num_seqs=64,
    )


def test_a_report_places_the_engines_durations_on_the_routers_clock() -> None:
    """Durations travel, not timestamps: a prefill that waited 2 engine-units at a scale of 0.5 s per unit arrived
    1 s before the report was taken, on whatever clock the router keeps."""
    state = EngineLiveState.from_snapshot(_snapshot(), now_s=12.0, seconds_per_unit=0.5)
    again = parse_live_state(state.model_dump_json(), "test")
    assert again == state
    prefills = state.prefill_states(taken_at_s=100.0)
    assert [p.arrival_at_s for p in prefills] == [99.0, 99.5]
    assert [p.num_remaining_tokens for p in prefills] == [200, 50]
    assert [p.ttft_deadline_at_s for p in prefills] == [101.0, 100.5]
    ids, first, generated, tpot, context = state.decode_columns(taken_at_s=100.0)
    assert (first, generated, tpot, context) == ((98.5,), (7,), (0.1,), (107,))
    assert len(set(ids)) == 1


def test_merging_adds_what_the_router_sent_after_the_report() -> None:
    state = EngineLiveState.from_snapshot(_snapshot(), now_s=12.0)
    own = PrefillState(
        request_id="mine", arrival_at_s=99.9, num_prompt_tokens=80, num_computed_tokens=0, ttft_slo_s=1.0
    )
    own_decodes = DecodeBatch(
        request_ids=("d",),
        first_token_at_s=(99.0,),
        num_generated_tokens=(2,),
        tpot_slo_s=(0.05,),
        num_context_tokens=(42,),
    )
    prefills, decodes, kv_used = merge_live_state(state, 100.0, 100.5, [own], own_decodes, own_kv_tokens=122)
    assert [p.num_prompt_tokens for p in prefills] == [300, 50, 80]  # the engine's queue first
    assert decodes.num_context_tokens == (107, 42)
    assert decodes.first_token_at_s == (100.5 - 3.0, 99.0)  # the report's decode carried forward by its age
    assert decodes.total_context_tokens == 149
    assert kv_used == 457 + 122


def _queued(request_id: str, arrival_at_s: float, num_prompt_tokens: int) -> PrefillState:
    return PrefillState(
        request_id=request_id,
        arrival_at_s=arrival_at_s,
        num_prompt_tokens=num_prompt_tokens,
        num_computed_tokens=0,
        ttft_slo_s=30.0,
    )


def test_a_prefill_workers_queue_is_merged_in_its_own_order_and_predicted_as_one_routers() -> None:
    """On a shortest-remaining-first prefill worker, the report's prefills and the router's own interleave by
    remaining tokens, so that a new prompt's predicted first token does not depend on which router sent what:
    the same queue, half reported and half the router's own, predicts as the router's own whole."""
    profile = load_profile("a100-llama2-70b-tp4")
    policy = make_policy("tropical", PolicyContext(step_time=profile.step_time, max_model_len=4096))
    key = policy.local_scheduler(WorkerRole.PREFILL).prefill_sort_key
    lengths = [200, 1500, 400, 2500, 700, 900, 1800, 300]
    queue = sorted((_queued(f"q{i}", 9.0 + i / 100, n) for i, n in enumerate(lengths)), key=key)
    reported, own = queue[1::2], queue[0::2]  # another router's, then this router's own
    state = EngineLiveState(
        prefills=tuple(
            LivePrefill(
                num_prompt_tokens=p.num_prompt_tokens,
                num_computed_tokens=0,
                waited_s=10.0 - p.arrival_at_s,
                ttft_slo_s=p.ttft_slo_s,
            )
            for p in reported
        ),
        num_kv_tokens_capacity=100_000,
    )
    no_decodes = DecodeBatch()
    merged, _, _ = merge_live_state(state, 10.0, 10.0, own, no_decodes, 0, sort_key=key)
    assert [p.num_prompt_tokens for p in merged] == sorted(lengths)
    concatenated, _, _ = merge_live_state(state, 10.0, 10.0, own, no_decodes, 0)
    assert [p.num_prompt_tokens for p in concatenated] == [p.num_prompt_tokens for p in reported + own]

    def first_token_at_s(prefills: tuple[PrefillState, ...]) -> float:
        worker = WorkerSnapshot(
            worker_id=0,
            role=WorkerRole.PREFILL,
            prefills=prefills,
            decodes=no_decodes,
            num_kv_tokens_used=0,
            num_kv_tokens_capacity=100_000,
            max_num_seqs=64,
        )
        new = _queued("new", 10.0, 1000)
        return policy.predicted_first_token(worker, new, 10.0).finish_at_s

    alone = first_token_at_s(tuple(queue))
    assert first_token_at_s(merged) == pytest.approx(alone)
    assert first_token_at_s(concatenated) < alone - 0.05  # the router's own shorter prefills left out ahead of it


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            '{"num_kv_tokens_capacity": 10, "prefills": [{"num_prompt_tokens": 5, "num_computed_tokens": 0, '
            '"waited_s": -1, "ttft_slo_s": 1}]}',
            "prefills[0].waited_s = -1",
        ),
        ('{"num_kv_tokens_capacity": 0}', "num_kv_tokens_capacity = 0"),
        ('{"num_kv_tokens_capacity": 10, "schema_version": 2}', "schema_version = 2"),
        ("not json", "test-engine"),
    ],
)
def test_a_malformed_report_is_refused_naming_the_engine_and_the_field(text: str, named: str) -> None:
    with pytest.raises(DataFormatError, match="test-engine") as info:
        parse_live_state(text, "test-engine")
    assert named in str(info.value)


SCALE = 0.05


@pytest.fixture(scope="module")
def scaled_profile(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Profile]:
    scaled = time_scaled(load_profile("a100-llama2-70b-tp4").file, SCALE)
    path = tmp_path_factory.mktemp("profile") / "scaled.json"
    write_profile_file(scaled, path)
    return str(path), Profile(scaled)


def test_the_fake_engine_reports_what_it_runs(scaled_profile: tuple[str, Profile]) -> None:
    _, profile = scaled_profile
    engine = FakeEngine(profile)
    with ServerThread(engine.app) as server:
        idle = parse_live_state(httpx.get(server.url + LIVE_STATE_PATH).content, server.url)
        assert idle.prefills == idle.decodes == ()
        assert idle.num_kv_tokens_capacity == profile.num_kv_cache_tokens
        body = {"prompt": [1] * 200, "max_tokens": 400, "stream": True, "vllm_xargs": {"tropical_tpot_slo_ms": 80}}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the stream, which aborts it
            next(lines)  # the first token came: it decodes now
            busy = parse_live_state(httpx.get(server.url + LIVE_STATE_PATH).content, server.url)
    assert len(busy.decodes) == 1
    decode = busy.decodes[0]
    assert decode.tpot_slo_s == pytest.approx(0.08)
    assert decode.num_context_tokens >= 201
    assert busy.num_kv_tokens_used >= 201


def test_the_fake_engine_reports_a_pd_decode_with_its_tpot_clock_where_the_router_starts_it() -> None:
    """A decode whose KV cache comes over P/D counts its TPOT from its arrival until its first token (as the router
    counts its own from its prefill's end), then from the first token its first decode step produced, which is the
    first the client sees: not from the engine's start (an incoming decode reported as streaming for the engine's
    whole uptime has no slack, which barred multiplexing on that engine for every hop), nor from the KV's arrival a
    step before its first token (every other router then saw each P/D decode with a step less slack than it had)."""
    profile = load_profile("a100-llama2-70b-tp4")  # real speed: a decode step of about 44 ms
    engine = FakeEngine(profile, pd_hop_fixed_s=0.2)
    transfer = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_request_id": "r"}
    body = {"prompt": [1] * 200, "max_tokens": 400, "stream": True, "kv_transfer_params": transfer}
    body["vllm_xargs"] = {"tropical_tpot_slo_ms": 200}
    with ServerThread(engine.app) as server:
        time.sleep(0.3)  # the engine has run a while
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            sent_at_s = time.monotonic()
            during_hop = parse_live_state(httpx.get(server.url + LIVE_STATE_PATH).content, server.url)
            read_at_s = time.monotonic()
            lines = response.iter_lines()  # kept: a dropped iterator closes the stream, which aborts it
            next(line for line in lines if line.startswith("data: {"))  # the first token
            first_token_at_s = time.monotonic()
            decoding = parse_live_state(httpx.get(server.url + LIVE_STATE_PATH).content, server.url)
            decoding_read_at_s = time.monotonic()
    assert first_token_at_s - sent_at_s > 0.2  # it came after the hop
    (incoming,) = during_hop.decodes
    assert incoming.num_generated_tokens == 1
    assert incoming.decoding_for_s <= read_at_s - sent_at_s + 0.02
    (decode,) = decoding.decodes
    assert decode.decoding_for_s <= decoding_read_at_s - first_token_at_s + 0.02  # a step is 44 ms


def _router(profile_path: str, urls: list[str], interval_s: float) -> Router:
    return Router(
        RouterConfig.model_validate(
            {
                "profile": profile_path,
                "policy": "tropical",
                "metrics_interval_s": 0,
                "health_interval_s": 0.1,
                "live_state_interval_s": interval_s,
                "instances": [
                    {"url": urls[0], "role": "prefill"},
                    {"url": urls[1], "role": "multiplexing"},
                ],
            }
        )
    )


@pytest.mark.parametrize("shared", [True, False])
def test_a_router_sees_the_decodes_another_router_sent(scaled_profile: tuple[str, Profile], shared: bool) -> None:
    """Two routers in front of the same engines: a long request through the first shows, in the second's
    snapshot of the engine that decodes it, as a running decode with its TPOT SLO, once the second reads the
    engines' live state (and not at all when it does not); the first, reading the same reports, counts it once."""
    path, profile = scaled_profile
    engines = [FakeEngine(profile, engine_id=name) for name in ("p", "m")]
    servers = [ServerThread(engine.app).start() for engine in engines]
    urls = [server.url for server in servers]
    first = _router(path, urls, interval_s=0.02 if shared else 0)
    second = _router(path, urls, interval_s=0.02 if shared else 0)
    try:
        with ServerThread(first.app) as one, ServerThread(second.app) as two:
            body = {"prompt": [1] * 100, "max_tokens": 2000, "stream": True}
            done = threading.Event()

            def send() -> None:
                with httpx.stream(
                    "POST", one.url + "/v1/completions", json=body, headers={"x-slo-tpot-ms": "90"}, timeout=60
                ) as response:
                    for _ in response.iter_lines():
                        if done.is_set():
                            break

            client = threading.Thread(target=send)
            client.start()
            try:
                deadline = time.monotonic() + 10
                while not sum(len(w.decodes) for w in first.snapshot().workers):  # it streams through the first
                    assert time.monotonic() < deadline, "the request never decoded"
                    time.sleep(0.01)
                seen = 0
                watch_until = time.monotonic() + 0.3  # 15 readings of the live state
                while time.monotonic() < watch_until and not seen:
                    seen = sum(len(worker.decodes) for worker in second.snapshot().workers)
                    time.sleep(0.01)
                assert first.num_tracked == 1, "the request ended before the second router was watched"
                assert second.num_tracked == 0
                if shared:
                    assert seen == 1
                    # The first router finds its own request in the reports, named by its id: counted once.
                    time.sleep(0.1)
                    assert sum(len(w.decodes) for w in first.snapshot().workers) == 1
                    decodes = next(w.decodes for w in second.snapshot().workers if len(w.decodes))
                    assert decodes.tpot_slo_s[0] == pytest.approx(0.09, rel=0.05)
                else:
                    assert seen == 0
                assert httpx.get(two.url + "/health").status_code == 200
            finally:
                done.set()
                client.join(timeout=30)
    finally:
        for server in servers:
            server.stop()


def test_a_report_carries_the_engines_step_time_model_and_older_reports_parse_without_it() -> None:
    profile = load_profile("a100-llama2-70b-tp4")
    calibrated = profile.step_time.scaled(1.5)
    snapshot = _snapshot()
    with_model = dataclasses.replace(snapshot, step_time=calibrated)
    state = EngineLiveState.from_snapshot(with_model, now_s=12.0)
    assert state.step_time == LiveStepTime.from_model(calibrated)
    model = parse_live_state(state.model_dump_json(), "test").step_time.model(profile.step_time)  # type: ignore[union-attr]
    assert model.coefficients == calibrated.coefficients
    assert model.valid_range == profile.step_time.valid_range
    assert model.decode_step_time_s(8, 8000) == pytest.approx(1.5 * profile.step_time.decode_step_time_s(8, 8000))
    assert EngineLiveState.from_snapshot(snapshot, now_s=12.0).step_time is None
    assert parse_live_state('{"num_kv_tokens_capacity": 10}', "test").step_time is None  # a report without one
    with pytest.raises(DataFormatError, match=r"step_time\.const_s"):
        parse_live_state('{"num_kv_tokens_capacity": 10, "step_time": {"const_s": -1}}', "engine")


def test_a_router_predicts_an_engine_with_the_model_its_report_carries() -> None:
    profile = load_profile("a100-llama2-70b-tp4")
    router = Router(
        RouterConfig.model_validate({"policy": "tropical", "instances": [{"url": "http://a", "role": "multiplexing"}]})
    )
    [instance] = router.instances
    reported = LiveStepTime.from_model(profile.step_time.scaled(2.0))
    instance.set_live_state(EngineLiveState(num_kv_tokens_capacity=1000, step_time=reported), taken_at_s=0.0)
    first = instance.snapshot(now_s=0.0).step_time
    assert first is not None
    assert LiveStepTime.from_model(first) == reported
    instance.set_live_state(EngineLiveState(num_kv_tokens_capacity=1000, step_time=reported), taken_at_s=0.1)
    assert instance.snapshot(now_s=0.1).step_time is first  # the same model while the engine's stays the same
    instance.set_live_state(EngineLiveState(num_kv_tokens_capacity=1000), taken_at_s=0.2)
    assert instance.snapshot(now_s=0.2).step_time is not first  # no model reported: the router's own again

"""The vLLM adapter's engine-side logic, on stand-in request objects (runs without vLLM installed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tropical_sched.adapters.engine_side import EngineSide
from tropical_sched.adapters.vllm import UnsupportedVllmError, check_vllm_version
from tropical_sched.adapters.vllm.config import parse_engine_side_config
from tropical_sched.adapters.vllm.logic import make_engine_side
from tropical_sched.core import ConfigError, WorkerRole


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def vllm_request(
    rid: str, prompt: int, computed: int = 0, outputs: int = 0, arrival: float = 0.0, **xargs: float
) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=rid,
        arrival_time=arrival,
        num_prompt_tokens=prompt,
        num_computed_tokens=computed,
        num_output_tokens=outputs,
        num_tokens=prompt + outputs,
        sampling_params=SimpleNamespace(extra_args=xargs or None),
    )


def side(role: str, **extra: object) -> tuple[EngineSide, Clock]:
    clock = Clock()
    return make_engine_side(parse_engine_side_config({"tropical": {"role": role, **extra}}), clock=clock), clock


def test_prefill_workers_order_by_shortest_remaining_prefill() -> None:
    engine, _ = side("prefill")
    requests = [
        vllm_request("a", 900, arrival=1),
        vllm_request("b", 100, arrival=2),
        vllm_request("c", 2000, computed=1950, arrival=0),
    ]
    assert [r.request_id for r in sorted(requests, key=engine.sort_key)] == ["c", "b", "a"]


def test_multiplexing_workers_keep_arrival_order() -> None:
    engine, _ = side("multiplexing")
    requests = [vllm_request("a", 900, arrival=2), vllm_request("b", 100, arrival=3), vllm_request("c", 50, arrival=1)]
    assert [r.request_id for r in sorted(requests, key=engine.sort_key)] == ["c", "a", "b"]


def test_slos_come_from_the_routers_xargs_else_defaults() -> None:
    engine, _ = side("multiplexing", default_tpot_slo_ms=80)
    assert engine.slo_ms(vllm_request("a", 10, tropical_ttft_slo_ms=500, tropical_tpot_slo_ms=50)) == (500, 50)
    assert engine.slo_ms(vllm_request("b", 10)) == (10_000, 80)


def test_decode_batch_uses_observed_first_tokens() -> None:
    engine, clock = side("multiplexing")
    running = [vllm_request("d", 100, computed=100, outputs=1), vllm_request("p", 500, computed=128)]
    engine.observe_outputs(running)
    clock.now = 101.0
    running[0].num_output_tokens = 11
    running[0].num_tokens = 111
    batch = engine.decode_batch(running)
    assert batch.request_ids == ("d",)
    assert batch.first_token_at_s == (100.0,)
    assert batch.num_generated_tokens == (11,)
    assert batch.num_context_tokens == (111,)
    engine.forget(["d"])
    assert engine.decode_batch(running).first_token_at_s == (101.0,)  # forgotten: counts from now


def test_prefill_cap_only_on_multiplexing_workers_with_decodes_and_a_prefill() -> None:
    prefill, _ = side("prefill")
    decoding = vllm_request("d", 100, computed=100, outputs=5)
    pending = vllm_request("w", 3000)
    assert prefill.prefill_token_cap([decoding], pending) is None
    mux, clock = side("multiplexing")
    mux.observe_outputs([decoding])
    assert mux.prefill_token_cap([decoding], None) is None  # no prefill waiting
    assert mux.prefill_token_cap([], pending) is None  # no decodes to protect
    num_decodes, cap = mux.prefill_token_cap([decoding], pending)
    assert num_decodes == 1
    assert 32 <= cap < 3000
    clock.now += 60  # the decode is a minute late: only the 32-token floor remains
    assert mux.prefill_token_cap([decoding], pending) == (1, 32)
    assert mux.num_capped_steps == 2


def test_a_partial_prefill_in_the_running_list_is_the_one_capped() -> None:
    mux, _ = side("multiplexing")
    decoding = vllm_request("d", 100, computed=100, outputs=5)
    mux.observe_outputs([decoding])
    partial = vllm_request("p", 4000, computed=2000)
    _, cap_partial = mux.prefill_token_cap([decoding, partial], vllm_request("w", 10))
    _, cap_fresh = mux.prefill_token_cap([decoding], vllm_request("w", 10))
    assert cap_partial <= cap_fresh  # a deeper prefix makes each chunk costlier


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"role": "boss"}, "tropical.role = 'boss'"),
        ({"colour": 1}, "tropical.colour"),
        ({"default_tpot_slo_ms": -1}, "tropical.default_tpot_slo_ms = -1"),
    ],
)
def test_bad_engine_config_names_the_field(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_engine_side_config({"tropical": section})


def test_defaults_without_a_tropical_section() -> None:
    assert parse_engine_side_config(None).role is WorkerRole.COLOCATED


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.1"])
def test_supported_vllm_versions(version: str) -> None:
    assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.31.9", "0.34.0", "1.0.0", "nightly"])
def test_unsupported_vllm_versions_fail_with_the_supported_list(version: str) -> None:
    with pytest.raises(UnsupportedVllmError, match=r"supported: 0\.32\.x, 0\.33\.x"):
        check_vllm_version(version)


def test_a_role_the_policy_does_not_have_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"tropical.role = 'colocated': policy 'tropical' has the roles"):
        side("colocated")
    assert side("colocated", policy="vllm-chunked")[0].local.caps_prefill_tokens is False


def test_scorpio_engines_leave_loose_decodes_out_of_some_steps_and_order_by_deadline() -> None:
    engine, _ = side("colocated", policy="scorpio")
    running = [
        vllm_request("tight", 10, computed=10, outputs=1, tropical_tpot_slo_ms=50),
        vllm_request("loose", 10, computed=10, outputs=1, tropical_tpot_slo_ms=100),
        vllm_request("prefilling", 500, computed=100, tropical_tpot_slo_ms=100),
    ]
    engine.observe_outputs(running)
    skipped = [[r.request_id for r in engine.decodes_to_skip(running, num_waiting=0)] for _ in range(4)]
    assert skipped == [[], ["loose"], [], ["loose"]]
    assert engine.num_decode_skips == 2
    waiting = [
        vllm_request("late", 100, arrival=0, tropical_ttft_slo_ms=5000),
        vllm_request("soon", 100, arrival=1, tropical_ttft_slo_ms=500),
    ]
    assert [r.request_id for r in sorted(waiting, key=engine.sort_key)] == ["soon", "late"]
    plain, _ = side("colocated", policy="vllm-chunked")
    assert plain.decodes_to_skip(running, num_waiting=3) == []


def test_tempo_engines_need_a_length_trace() -> None:
    with pytest.raises(ConfigError, match="length_trace"):
        side("colocated", policy="tempo")
    engine, _ = side("colocated", policy="tempo", policy_options={"length_trace": "azure-conv-2023"})
    assert engine.local.selects_decodes


def test_every_engine_side_prediction_follows_the_model_it_is_given() -> None:
    mux, _ = side("multiplexing")
    assert mux.step_time is mux.profile.step_time  # the profile's until calibrated
    decoding = vllm_request("d", 100, computed=100, outputs=5)
    mux.observe_outputs([decoding])
    pending = vllm_request("w", 3000)
    _, cap = mux.prefill_token_cap([decoding], pending)
    slower = mux.profile.step_time.scaled(4.0)
    mux.set_step_time(slower)
    assert mux.step_time is slower
    _, slower_cap = mux.prefill_token_cap([decoding], pending)
    assert 32 <= slower_cap < cap  # the same slack buys fewer tokens
    expected = slower.max_chunk_tokens_within(
        0.1 * 5 - 0.1 * 0.1,  # TPOT slack of 5 tokens at 100 ms, seen just now, less the 10% margin
        num_decode_seqs=1,
        num_decode_context_tokens=105,
        num_prefix_tokens=0,
    )
    assert slower_cap == max(expected, 32)


def test_set_step_time_keeps_the_local_schedulers_per_request_state() -> None:
    engine, _ = side("colocated", policy="scorpio")
    local = engine.local
    engine.set_step_time(engine.profile.step_time.scaled(2.0))
    assert engine.local is local  # SCORPIO's credits live there; it predicts nothing
    prefill, _ = side("prefill")
    key = prefill.sort_key(vllm_request("a", 900))
    prefill.set_step_time(prefill.profile.step_time.scaled(2.0))
    assert prefill.sort_key(vllm_request("a", 900)) == key  # an order by tokens does not depend on the model

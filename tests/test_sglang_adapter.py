"""The SGLang adapter's logic and plug-in hooks, on stand-in SGLang objects (runs without SGLang installed)."""

from __future__ import annotations

import enum
import sys
import types
from types import SimpleNamespace
from typing import Any

import pytest

from tropical_sched.adapters.engine_side import EngineSide
from tropical_sched.adapters.sglang import UnsupportedSglangError, check_sglang_version, plugin
from tropical_sched.adapters.sglang.logic import (
    ARRIVAL_ATTR,
    CONFIG_ENV,
    SglangRequestView,
    make_engine_side,
    order_waiting_queue,
    prefill_token_cap,
    read_config_from_env,
)
from tropical_sched.core import ConfigError, WorkerRole


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sglang_req(
    rid: str,
    prompt: int,
    *,
    computed: int = 0,
    outputs: int = 0,
    arrival: float | None = 100.0,
    room: int | None = None,
    **custom: float,
) -> SimpleNamespace:
    req = SimpleNamespace(
        rid=rid,
        origin_input_ids=list(range(prompt)),
        output_ids=list(range(outputs)),
        kv=SimpleNamespace(kv_committed_len=computed),
        sampling_params=SimpleNamespace(custom_params=custom or None),
        bootstrap_room=room,
        time_stats=SimpleNamespace(entered=False, set_wait_queue_entry_time=lambda: None),
        finished=lambda: False,
    )
    if arrival is not None:
        setattr(req, ARRIVAL_ATTR, arrival)
    return req


def side(role: str, **extra: object) -> tuple[EngineSide, Clock]:
    clock = Clock()
    config = read_config_from_env({CONFIG_ENV: __import__("json").dumps({"role": role, **extra})})
    assert config is not None
    return make_engine_side(config, clock=clock), clock


# -- configuration and version --------------------------------------------------------------------------------


def test_config_from_env_json_or_file_and_unset_means_off(tmp_path: Any) -> None:
    assert read_config_from_env({}) is None
    config = read_config_from_env({CONFIG_ENV: '{"role": "multiplexing", "reject_unattainable": true}'})
    assert config is not None
    assert config.role is WorkerRole.MULTIPLEXING
    assert config.reject_unattainable
    path = tmp_path / "tropical.json"
    path.write_text('{"role": "prefill"}')
    from_file = read_config_from_env({CONFIG_ENV: f"@{path}"})
    assert from_file is not None
    assert from_file.role is WorkerRole.PREFILL


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ('{"role": "decoder"}', "$TROPICAL_SGLANG_CONFIG.role"),
        ('{"polcy": "tropical"}', "polcy"),
        ('{"role": ', "not JSON"),
        ("@/nonexistent/tropical.json", "/nonexistent/tropical.json"),
        ('["multiplexing"]', "must be an object"),
    ],
)
def test_bad_config_names_the_field_or_file(value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("$", r"\$").replace(".", r"\.")):
        read_config_from_env({CONFIG_ENV: value})


def test_version_check_needs_the_plugin_loader() -> None:
    assert check_sglang_version("0.5.23") == "0.5.23"
    assert check_sglang_version("0.5.11.post1") == "0.5.11.post1"
    with pytest.raises(UnsupportedSglangError, match=r"0\.5\.10 has no plug-in loader"):
        check_sglang_version("0.5.10")
    with pytest.raises(UnsupportedSglangError, match="cannot read"):
        check_sglang_version("nightly")


# -- engine-side decisions on SGLang requests -----------------------------------------------------------------


def test_view_reads_sglang_fields() -> None:
    req = sglang_req("r", 50, computed=20, outputs=3, tropical_ttft_slo_ms=250, tropical_tpot_slo_ms=40)
    view = SglangRequestView(req, now_s=5.0)
    assert (view.request_id, view.num_prompt_tokens, view.num_computed_tokens) == ("r", 50, 20)
    assert (view.num_output_tokens, view.num_tokens, view.arrival_time) == (3, 53, 100.0)
    engine, _ = side("prefill")
    assert engine.slo_ms(view) == (250.0, 40.0)
    unstamped = SglangRequestView(sglang_req("u", 5, arrival=None), now_s=7.0)
    assert unstamped.arrival_time == 7.0
    del req.kv  # older SGLang: the matched prefix
    req.prefix_indices = [0] * 11
    assert SglangRequestView(req, 0.0).num_computed_tokens == 11


def test_prefill_workers_order_the_waiting_queue_by_shortest_remaining_prefill() -> None:
    engine, _ = side("prefill")
    queue = [sglang_req("a", 900), sglang_req("b", 100), sglang_req("c", 2000, computed=1950), sglang_req("d", 100)]
    order_waiting_queue(engine, queue)
    assert [r.rid for r in queue] == ["c", "b", "d", "a"]  # stable: b before d


def test_multiplexing_cap_shrinks_with_tpot_slack_and_is_off_without_decodes() -> None:
    engine, clock = side("multiplexing")
    head = sglang_req("p", 4000)
    assert prefill_token_cap(engine, [], head) is None
    assert prefill_token_cap(engine, [sglang_req("d", 100, computed=100, outputs=1)], None) is None
    decode = sglang_req("d", 100, computed=100, outputs=1, tropical_tpot_slo_ms=100)
    engine.observe_outputs([SglangRequestView(decode, clock.now)])
    roomy = prefill_token_cap(engine, [decode], head)
    clock.now += 0.09  # 90 ms later, still one token: almost no TPOT slack left
    tight = prefill_token_cap(engine, [decode], head)
    assert roomy is not None
    assert tight is not None
    assert tight < roomy


def test_unattainable_requests_are_named_with_the_prediction() -> None:
    engine, _ = side("prefill", reject_unattainable=True)
    queued = [SglangRequestView(sglang_req(f"q{i}", 4000), 100.0) for i in range(3)]
    tight = SglangRequestView(sglang_req("t", 4000, tropical_ttft_slo_ms=1), 100.0)
    reason = engine.unattainable_reason(tight, queued)
    assert reason is not None
    assert "exceeds the TTFT SLO 1.0 ms" in reason
    loose = SglangRequestView(sglang_req("l", 10, tropical_ttft_slo_ms=60_000), 100.0)
    assert engine.unattainable_reason(loose, queued) is None
    off, _ = side("prefill")
    assert off.unattainable_reason(tight, queued) is None


def test_unattainable_follows_the_engines_calibrated_model_and_the_routers_rule() -> None:
    engine, _ = side("prefill", reject_unattainable=True)
    queued = [SglangRequestView(sglang_req(f"q{i}", 1000), 100.0) for i in range(2)]
    request = SglangRequestView(sglang_req("r", 2000, tropical_ttft_slo_ms=1000), 100.0)
    assert engine.unattainable_reason(request, queued) is None  # behind two 1,000-token prefills, in time
    finish = engine.predicted_first_token(request, queued)
    # The router's rule for a prefill worker: shortest first, in 8,192-token chunks, times the 1.02 safety factor.
    model = engine.profile.step_time
    assert finish.ahead_s == pytest.approx(2 * 1.02 * model.prefill_time_s(1000))
    assert finish.own_s == pytest.approx(1.02 * model.prefill_time_s(2000))
    engine.set_step_time(model.scaled(10.0))  # the engine turned out 10x slower than its profile
    reason = engine.unattainable_reason(request, queued)
    assert reason is not None
    assert "ms of work ahead" in reason
    assert engine.num_rejected == 1


# -- the plug-in's hooks, on a stand-in scheduler ---------------------------------------------------------------


class Mode(enum.Enum):
    NULL = "null"
    PREFILL = "prefill"
    DECODE = "decode"


class FakeBatch:
    def __init__(self, reqs: list[Any], extend: bool = False) -> None:
        self.reqs = list(reqs)
        self.forward_mode = SimpleNamespace(is_extend=lambda: extend)
        self.filtered = False

    def is_empty(self) -> bool:
        return not self.reqs

    def filter_batch(self) -> None:
        self.filtered = True

    def merge_batch(self, other: FakeBatch) -> None:
        self.reqs.extend(other.reqs)


class FakeScheduler:
    def __init__(self, mode: Mode) -> None:
        self.disaggregation_mode = mode
        self.waiting_queue: list[Any] = []
        self.chunked_req = None
        self.last_batch: FakeBatch | None = None
        self.enable_overlap = False
        self.aborted: list[tuple[str, dict[str, Any]]] = []
        self.released: list[str] = []
        self.prebuilt: FakeBatch | None = None
        self.batch_result_processor = SimpleNamespace(process_batch_result_prebuilt=lambda batch: None)
        self.next_batch_calls: list[tuple[list[str], FakeBatch, Any]] = []

    def send_abort_output(self, abort_req: Any, req: Any) -> None:
        self.aborted.append((req.rid, abort_req.finished_reason))

    def _release_aborted_request(self, req: Any) -> None:
        self.released.append(req.rid)

    def get_new_prebuilt_batch(self, running_batch: FakeBatch) -> FakeBatch | None:
        batch, self.prebuilt = self.prebuilt, None
        return batch

    def get_next_batch_to_run(self, running_batch: FakeBatch, last_batch: Any) -> str:
        self.next_batch_calls.append(([r.rid for r in self.waiting_queue], running_batch, last_batch))
        self.waiting_queue.pop(0)  # "admits" the head into a prefill batch
        return "colocated step"


@pytest.fixture
def fake_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins for the few SGLang names the hooks import."""
    utils = types.ModuleType("sglang.srt.disaggregation.utils")
    utils.DisaggregationMode = Mode  # type: ignore[attr-defined]
    scheduler = types.ModuleType("sglang.srt.managers.scheduler")
    scheduler._make_abort_req = lambda req, finished_reason=None: SimpleNamespace(  # type: ignore[attr-defined]
        rid=req.rid, finished_reason=finished_reason
    )
    for name in ("sglang", "sglang.srt", "sglang.srt.disaggregation", "sglang.srt.managers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.disaggregation.utils", utils)
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.scheduler", scheduler)


def install(monkeypatch: pytest.MonkeyPatch, role: str, **extra: object) -> tuple[EngineSide, Clock]:
    engine, clock = side(role, **extra)
    monkeypatch.setattr(plugin, "_side", engine)
    return engine, clock


def test_register_does_nothing_without_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(plugin, "_side", None)
    plugin.register()  # no SGLang import, no hooks
    assert plugin._side is None


def test_register_exits_at_start_on_a_bad_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, '{"role": "multiplexing", "policy": "no-such-policy"}')
    monkeypatch.setattr(plugin, "check_sglang_version", lambda: "0.5.23")
    monkeypatch.setattr(plugin, "detect_hooks", lambda: plugin.SglangHooks(True, True, ()))
    with pytest.raises(SystemExit, match="no-such-policy"):
        plugin.register()


def test_register_exits_when_sglang_lacks_a_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, '{"role": "multiplexing"}')
    monkeypatch.setattr(plugin, "check_sglang_version", lambda: "0.5.12")
    monkeypatch.setattr(plugin, "detect_hooks", lambda: plugin.SglangHooks(False, False, ()))
    with pytest.raises(SystemExit, match=r"multiplexing worker hooks .*0\.5\.16"):
        plugin.register()
    monkeypatch.setattr(plugin, "detect_hooks", lambda: plugin.SglangHooks(True, True, ("Scheduler.x",)))
    with pytest.raises(SystemExit, match=r"SGLang 0\.5\.12 lacks Scheduler\.x"):
        plugin.register()


def test_scheduler_init_check_names_the_mode_and_the_overlap_flag(
    monkeypatch: pytest.MonkeyPatch, fake_sglang: None
) -> None:
    install(monkeypatch, "multiplexing")
    with pytest.raises(RuntimeError, match="needs --disaggregation-mode decode, this server runs null"):
        plugin._after_scheduler_init(None, FakeScheduler(Mode.NULL))
    overlapping = FakeScheduler(Mode.DECODE)
    overlapping.enable_overlap = True
    with pytest.raises(RuntimeError, match="--disable-overlap-schedule"):
        plugin._after_scheduler_init(None, overlapping)
    ok = FakeScheduler(Mode.DECODE)
    plugin._after_scheduler_init(None, ok)
    assert getattr(ok, plugin._LOCAL_QUEUE_ATTR) == []


def test_calc_priority_hook_reorders_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "prefill")
    queue = [sglang_req("long", 3000), sglang_req("short", 30)]
    plugin._after_calc_priority(None, object(), queue)
    assert [r.rid for r in queue] == ["short", "long"]


def test_rejection_answers_503_with_the_reason_and_queues_the_rest(
    monkeypatch: pytest.MonkeyPatch, fake_sglang: None
) -> None:
    engine, _ = install(monkeypatch, "prefill", reject_unattainable=True)
    scheduler = FakeScheduler(Mode.PREFILL)
    queued: list[str] = []

    def original(sched: Any, req: Any, is_retracted: bool = False) -> None:
        queued.append(req.rid)
        sched.waiting_queue.append(req)

    plugin._around_add_request_to_queue(original, scheduler, sglang_req("tight", 4000, tropical_ttft_slo_ms=1))
    plugin._around_add_request_to_queue(original, scheduler, sglang_req("fine", 10, tropical_ttft_slo_ms=60_000))
    plugin._around_add_request_to_queue(original, scheduler, sglang_req("back", 4000, tropical_ttft_slo_ms=1), True)
    assert queued == ["fine", "back"]  # retracted requests are never rejected
    [(rid, reason)] = scheduler.aborted
    assert rid == "tight"
    assert reason["status_code"] == 503
    assert "SLO unattainable" in reason["message"]
    assert scheduler.released == ["tight"]
    assert engine.num_rejected == 1


def test_multiplexing_worker_queues_its_own_prefills_apart(monkeypatch: pytest.MonkeyPatch, fake_sglang: None) -> None:
    install(monkeypatch, "multiplexing")
    scheduler = FakeScheduler(Mode.DECODE)
    plugin._after_scheduler_init(None, scheduler)
    sent_on: list[str] = []

    def original(sched: Any, req: Any, is_retracted: bool = False) -> None:
        sent_on.append(req.rid)

    plugin._around_add_request_to_queue(original, scheduler, sglang_req("local", 40, arrival=None))
    plugin._around_add_request_to_queue(original, scheduler, sglang_req("remote", 40, room=7))
    assert sent_on == ["remote"]  # to SGLang's KV-transfer queues
    [local] = getattr(scheduler, plugin._LOCAL_QUEUE_ATTR)
    assert local.rid == "local"
    assert getattr(local, ARRIVAL_ATTR) == 100.0  # stamped on the engine side's clock


def test_local_requests_are_admitted_as_on_a_colocated_instance(
    monkeypatch: pytest.MonkeyPatch, fake_sglang: None
) -> None:
    install(monkeypatch, "multiplexing")
    scheduler = FakeScheduler(Mode.DECODE)
    seen: list[Mode] = []

    def original(sched: Any, recv_req: Any) -> None:
        seen.append(sched.disaggregation_mode)

    plugin._around_handle_generate(original, scheduler, SimpleNamespace(bootstrap_room=None))
    plugin._around_handle_generate(original, scheduler, SimpleNamespace(bootstrap_room=3))
    assert seen == [Mode.NULL, Mode.DECODE]
    assert scheduler.disaggregation_mode is Mode.DECODE


def test_decode_loop_runs_sglangs_own_step_without_local_work(
    monkeypatch: pytest.MonkeyPatch, fake_sglang: None
) -> None:
    install(monkeypatch, "multiplexing")
    scheduler = FakeScheduler(Mode.DECODE)
    plugin._after_scheduler_init(None, scheduler)
    running = FakeBatch([sglang_req("d", 10, computed=10, outputs=2)])
    calls: list[Any] = []
    assert plugin._around_decode_next_batch(lambda s, rb: calls.append(rb) or "decode step", scheduler, running) == (
        "decode step"
    )
    assert calls == [running]
    assert scheduler.next_batch_calls == []


def test_decode_loop_merges_transferred_requests_then_prefills_the_local_queue(
    monkeypatch: pytest.MonkeyPatch, fake_sglang: None
) -> None:
    install(monkeypatch, "multiplexing")
    scheduler = FakeScheduler(Mode.DECODE)
    plugin._after_scheduler_init(None, scheduler)
    transferred = [sglang_req("waiting-transfer", 10, room=1)]
    scheduler.waiting_queue = list(transferred)
    local_queue = getattr(scheduler, plugin._LOCAL_QUEUE_ATTR)
    local_queue.extend([sglang_req("l1", 30), sglang_req("l2", 30)])
    scheduler.prebuilt = FakeBatch([sglang_req("arrived", 10, computed=10, room=2)])
    running = FakeBatch([sglang_req("d", 10, computed=10, outputs=2)])

    def never(*args: Any) -> None:
        raise AssertionError("the decode-only step must not run while local prefills wait")

    assert plugin._around_decode_next_batch(never, scheduler, running) == "colocated step"
    [(queue_seen, running_seen, _)] = scheduler.next_batch_calls
    assert queue_seen == ["l1", "l2"]  # SGLang's colocated step saw the local queue as its waiting queue
    assert [r.rid for r in running_seen.reqs] == ["d", "arrived"]  # KV-transferred requests joined first
    assert scheduler.waiting_queue == transferred  # the transfer queue is back in place
    assert [r.rid for r in getattr(scheduler, plugin._LOCAL_QUEUE_ATTR)] == ["l2"]  # l1 was admitted


def test_capped_adder_clamps_the_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = install(monkeypatch, "multiplexing")

    class PrefillAdder:
        def __init__(self, rem_input_tokens: int, rem_chunk_tokens: int | None) -> None:
            self.rem_input_tokens = rem_input_tokens
            self.rem_chunk_tokens = rem_chunk_tokens

    policy_module = types.ModuleType("sglang.srt.managers.schedule_policy")
    policy_module.PrefillAdder = PrefillAdder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.schedule_policy", policy_module)
    monkeypatch.setattr(plugin, "_adder_class", None)
    adder_class = plugin._capped_adder_class(None)
    assert issubclass(adder_class, PrefillAdder)
    assert adder_class(16384, 4096).rem_input_tokens == 16384  # no cap outside get_new_batch_prefill
    scheduler = SimpleNamespace(chunked_req=None, waiting_queue=[sglang_req("p", 4000)])
    decode = sglang_req("d", 100, computed=100, outputs=1, tropical_tpot_slo_ms=100)
    engine.observe_outputs([SglangRequestView(decode, engine.now_s())])
    running = FakeBatch([decode])

    def get_new_batch_prefill(sched: Any, batch: Any) -> Any:
        return adder_class(16384, 4096)

    adder = plugin._around_get_new_batch_prefill(get_new_batch_prefill, scheduler, running)
    expected = prefill_token_cap(engine, running.reqs, scheduler.waiting_queue[0])
    assert expected is not None
    assert expected < 4096
    assert adder.rem_input_tokens == adder.rem_chunk_tokens == expected

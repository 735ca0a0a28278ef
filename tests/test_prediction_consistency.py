"""One prediction definition: every inlined fast path equals the reference it copies, over random inputs.

The references: :meth:`StepTimeModel.step_time_s` (the step-time formula), :meth:`StepTimeModel.
max_chunk_tokens_within` (the chunk within a time budget), :func:`~tropical_sched.core.slack.tpot_slack_s` (TPOT
slack) and :func:`~tropical_sched.core.slack.predicted_queue_finish` (the first token behind a queue). The copies
checked here: the model's own specialised predictions, the simulated worker's step pricing, Tropical's multiplexed
prefill loop (against the local scheduler that the multiplexing worker runs), the slack loops of
``min_tpot_slack_s`` and Tempo's pacing, and the engine side's unattainable check (against the router's rule).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from tests.conftest import make_model, make_prefill, make_worker
from tropical_sched.adapters.engine_side import EngineSide, EngineSideConfig
from tropical_sched.core import (
    DecodeBatch,
    Request,
    Slo,
    WorkerRole,
    min_tpot_slack_s,
    predicted_queue_finish,
    tpot_slack_s,
)
from tropical_sched.policies import (
    FirstTokenPredictor,
    GainDensityScheduler,
    PolicyContext,
    TempoConfig,
    TempoPolicy,
    TropicalConfig,
    TropicalPolicy,
    make_policy,
)
from tropical_sched.policies.base import EngineSettings
from tropical_sched.policies.local import FcfsScheduler, SlackCappedScheduler
from tropical_sched.predictors.output_length import LengthSamples
from tropical_sched.predictors.profile import load_profile
from tropical_sched.predictors.step_time import StepTimeCoefficients, StepTimeModel
from tropical_sched.sim.worker import Job, SimWorker

REL_TOL = 1e-12
"""The copies and the references add the same terms in another order: they may differ by rounding only."""


@st.composite
def models(draw: st.DrawFn) -> StepTimeModel:
    """Step-time models with random coefficients around realistic magnitudes (zero included)."""

    def coefficient(high: float) -> float:
        return draw(st.one_of(st.just(0.0), st.floats(high * 1e-3, high)))

    return make_model(
        StepTimeCoefficients(
            const_s=coefficient(0.05),
            per_batched_token_s=coefficient(1e-3),
            per_prefill_seq_s=coefficient(0.01),
            per_prefill_attention_pair_s=coefficient(1e-7),
            per_decode_seq_s=coefficient(1e-3),
            per_decode_context_token_s=coefficient(1e-5),
        )
    )


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-15)


# -- the model's specialised predictions against its general formula ---------------------------------------------


@given(model=models(), decodes=st.integers(1, 512), context=st.integers(0, 1 << 20))
def test_decode_step_is_the_general_step_time(model: StepTimeModel, decodes: int, context: int) -> None:
    expected = model.step_time_s(num_decode_seqs=decodes, num_decode_context_tokens=context)
    assert close(model.decode_step_time_s(decodes, context), expected)


@given(model=models(), prefix=st.integers(0, 1 << 16), chunk=st.integers(1, 1 << 14))
def test_prefill_chunk_is_the_general_step_time(model: StepTimeModel, prefix: int, chunk: int) -> None:
    expected = model.step_time_s(prefill_chunks=[(prefix, chunk)])
    assert close(model.prefill_chunk_time_s(prefix, chunk), expected)
    if prefix == 0:
        a2, a1, a0 = model.prefill_quadratic_coefficients()
        assert close(model.prefill_time_s(chunk), a2 * chunk**2 + a1 * chunk + a0)


@given(
    model=models(),
    prompt=st.integers(1, 1 << 15),
    computed_fraction=st.floats(0, 1),
    chunk=st.one_of(st.none(), st.integers(1, 1 << 13)),
)
def test_remaining_prefill_is_the_sum_of_its_chunk_steps(
    model: StepTimeModel, prompt: int, computed_fraction: float, chunk: int | None
) -> None:
    computed = int(prompt * computed_fraction)
    expected = 0.0
    prefix = computed
    while prefix < prompt:
        size = prompt - prefix if chunk is None else min(chunk, prompt - prefix)
        expected += model.step_time_s(prefill_chunks=[(prefix, size)])
        prefix += size
    assert close(model.remaining_prefill_time_s(prompt, computed, chunk), expected)
    assert model.remaining_prefill_time_s(prompt, computed, chunk) == model.remaining_prefill_time_s(
        prompt, computed, chunk
    )  # memoized: the same answer again


# -- the simulated worker's step pricing against the model -------------------------------------------------------


def _job(
    request_id: str, num_prompt_tokens: int, num_output_tokens: int, tpot_slo_s: float = 0.1, ttft_slo_s: float = 10.0
) -> Job:
    request = Request(
        request_id=request_id,
        arrival_at_s=0.0,
        num_prompt_tokens=num_prompt_tokens,
        slo=Slo(ttft_s=ttft_slo_s, tpot_s=tpot_slo_s),
    )
    return Job(request, num_output_tokens)


@settings(max_examples=60, deadline=None)
@given(
    model=models(),
    prompts=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
    outputs=st.lists(st.integers(1, 40), min_size=6, max_size=6),
    chunked=st.booleans(),
    budget=st.integers(64, 4096),
    capped=st.booleans(),
)
def test_every_simulated_step_costs_what_the_model_predicts_for_what_it_runs(
    model: StepTimeModel,
    prompts: list[int],
    outputs: list[int],
    chunked: bool,
    budget: int,
    capped: bool,
) -> None:
    local = SlackCappedScheduler(model, min_chunk_tokens=16) if capped and chunked else FcfsScheduler()
    worker = SimWorker(
        worker_id=0,
        role=WorkerRole.COLOCATED,
        settings=EngineSettings(enable_chunked_prefill=chunked, max_num_batched_tokens=max(budget, max(prompts))),
        local=local,
        step_time=model,
        num_kv_cache_tokens=1 << 20,
        max_num_seqs=256,
    )
    for index, prompt in enumerate(prompts):
        worker.enqueue_prefill(_job(str(index), prompt, outputs[index]))
    now_s = 0.0
    kinds = set()
    for _ in range(200):
        duration_s = worker.start_step(now_s)
        if duration_s is None:
            break
        step = worker.step_in_flight
        kinds.add((step.num_decode_seqs > 0, bool(step.prefill_chunks)))
        expected = model.step_time_s(
            num_decode_seqs=step.num_decode_seqs,
            num_decode_context_tokens=step.num_decode_context_tokens,
            prefill_chunks=step.prefill_chunks,
        )
        assert close(duration_s, expected), step
        now_s += duration_s
        worker.finish_step(now_s)
    assert not worker.has_work()  # every request ran to its end
    assert kinds  # at least one step was checked


# -- Tropical's multiplexed prefill against the slack-capped scheduler its multiplexing workers run ---------------


@settings(max_examples=150, deadline=None)
@given(
    model=models(),
    num_decodes=st.integers(1, 48),
    context=st.integers(1, 4000),
    lateness_s=st.floats(-2.0, 2.0),
    num_generated=st.integers(1, 200),
    tpot_slo_s=st.floats(0.02, 0.5),
    prompt=st.integers(1, 4000),
    margin=st.floats(0.0, 1.0),
    min_chunk=st.integers(0, 64),
    budget=st.integers(64, 8192),
    ttft_slo_s=st.floats(0.01, 20.0),
    deadline_floor=st.booleans(),
    floor_fraction=st.floats(0.05, 1.0),
    drain_late=st.booleans(),
)
@example(  # a slack exactly at the one-token chunk's step, 1e-17 s apart in the worker's sum and the router's
    model=make_model(
        StepTimeCoefficients(
            const_s=0.01,
            per_batched_token_s=0.0,
            per_prefill_seq_s=0.0,
            per_prefill_attention_pair_s=0.0,
            per_decode_seq_s=0.0,
            per_decode_context_token_s=0.0,
        )
    ),
    num_decodes=1,
    context=1,
    lateness_s=0.0,
    num_generated=1,
    tpot_slo_s=0.02,
    prompt=1,
    margin=0.5,
    min_chunk=0,
    budget=64,
    ttft_slo_s=1.0,
    deadline_floor=False,
    floor_fraction=1.0,
    drain_late=False,
)
def test_multiplexed_prefill_prediction_is_the_slack_capped_run_priced_by_the_model(
    model: StepTimeModel,
    num_decodes: int,
    context: int,
    lateness_s: float,
    num_generated: int,
    tpot_slo_s: float,
    prompt: int,
    margin: float,
    min_chunk: int,
    budget: int,
    ttft_slo_s: float,
    deadline_floor: bool,
    floor_fraction: float,
    drain_late: bool,
) -> None:
    """The router's per-step loop (``multiplexed_prefill_s``, step time inlined) predicts exactly what a simulated
    multiplexing worker does: its local scheduler caps each chunk by the decodes' slack (raised to the prefill's TTFT
    deadline floor when on, and to the rest of the prompt once that deadline is out of reach with
    ``drain_late_prefills``), every step priced by :meth:`StepTimeModel.step_time_s` (decodes of one TPOT SLO, so
    the loop's slack bound is exact)."""
    budget = max(budget, num_decodes + 1)
    policy = TropicalPolicy(
        PolicyContext(step_time=model, max_model_len=1 << 20),
        TropicalConfig(
            slack_margin_fraction=margin,
            min_multiplexed_chunk_tokens=min_chunk,
            multiplexing_token_budget=budget,
            deadline_floor=deadline_floor,
            deadline_floor_fraction=floor_fraction,
            drain_late_prefills=drain_late,
        ),
    )
    role = WorkerRole.MULTIPLEXING
    worker = SimWorker(
        worker_id=0,
        role=role,
        settings=policy.engine_settings(role),
        local=policy.local_scheduler(role),
        step_time=model,
        num_kv_cache_tokens=1 << 30,
        max_num_seqs=1024,
    )
    # Decodes that arrived with their KV cache: a decode step lets them join; then the prefill is routed here.
    for index in range(num_decodes):
        job = _job(f"d{index}", context, 1 << 20, tpot_slo_s)
        job.first_token_at_s = lateness_s - tpot_slo_s * num_generated
        job.num_generated = num_generated
        worker.reserve_incoming(job)
        worker.receive(job)
    now_s = worker.start_step(0.0) or 0.0
    worker.finish_step(now_s)
    snapshot = worker.snapshot()
    assert len(snapshot.decodes) == num_decodes
    new = _job("new", prompt, 2, ttft_slo_s=ttft_slo_s)
    deadline_at_s = new.request.arrival_at_s + ttft_slo_s if deadline_floor else None
    predicted_s = policy.multiplexed_prefill_s(snapshot, prompt, now_s, deadline_at_s=deadline_at_s)

    worker.enqueue_prefill(new)
    started_at_s = now_s
    reference_s = 0.0
    for _ in range(1100):
        duration_s = worker.start_step(now_s)
        assert duration_s is not None
        step = worker.step_in_flight
        reference_s += model.step_time_s(
            num_decode_seqs=step.num_decode_seqs,
            num_decode_context_tokens=step.num_decode_context_tokens,
            prefill_chunks=step.prefill_chunks,
        )
        now_s += duration_s
        worker.finish_step(now_s)
        if new.first_token_at_s is not None:
            break
    num_steps = worker.num_steps - 1
    event(f"prefill steps: {'1' if num_steps == 1 else '2-9' if num_steps < 10 else '10+'}")
    if math.isinf(predicted_s):  # the loop gives up after 1,024 steps
        assert new.first_token_at_s is None or num_steps > 1024
        return
    assert new.first_token_at_s is not None
    assert math.isclose(predicted_s, reference_s, rel_tol=1e-9), (predicted_s, reference_s)
    assert math.isclose(predicted_s, new.first_token_at_s - started_at_s, rel_tol=1e-9)


# -- TPOT slack loops against tpot_slack_s --------------------------------------------------------------------------


@st.composite
def decode_batches(draw: st.DrawFn) -> DecodeBatch:
    n = draw(st.integers(0, 12))
    return DecodeBatch(
        request_ids=tuple(f"d{i}" for i in range(n)),
        first_token_at_s=tuple(draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n))),
        num_generated_tokens=tuple(draw(st.lists(st.integers(0, 500), min_size=n, max_size=n))),
        tpot_slo_s=tuple(draw(st.lists(st.floats(0.005, 1.0), min_size=n, max_size=n))),
        num_context_tokens=tuple(draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n))),
    )


def _slacks(decodes: DecodeBatch, now_s: float) -> list[float]:
    return [
        tpot_slack_s(
            first_token_at_s=d.first_token_at_s,
            num_generated_tokens=d.num_generated_tokens,
            tpot_slo_s=d.tpot_slo_s,
            now_s=now_s,
        )
        for d in decodes
    ]


@given(decodes=decode_batches(), now_s=st.floats(-5, 50), margin=st.floats(0, 2))
def test_min_tpot_slack_is_the_smallest_tpot_slack_less_its_margin(
    decodes: DecodeBatch, now_s: float, margin: float
) -> None:
    expected = min(
        (slack - margin * slo for slack, slo in zip(_slacks(decodes, now_s), decodes.tpot_slo_s, strict=True)),
        default=math.inf,
    )
    assert math.isclose(min_tpot_slack_s(decodes, now_s, margin_fraction=margin), expected, rel_tol=1e-9, abs_tol=1e-9)


TEMPO_SAMPLES = LengthSamples(list(range(100, 4100, 10)), [1 + (i * 37) % 500 for i in range(400)])


@given(decodes=decode_batches(), now_s=st.floats(-5, 50), lead=st.floats(1, 5), waiting=st.integers(1, 3))
def test_tempo_paces_exactly_the_decodes_whose_tpot_slack_exceeds_the_lead(
    decodes: DecodeBatch, now_s: float, lead: float, waiting: int
) -> None:
    context = PolicyContext(step_time=make_model(), max_model_len=4096, length_samples=TEMPO_SAMPLES)
    local = TempoPolicy(context, TempoConfig(pacing_lead=lead)).local_scheduler(WorkerRole.COLOCATED)
    runs = local.select_decodes(now_s=now_s, decodes=decodes, num_waiting_prefills=waiting)
    expected = [slack < lead * slo for slack, slo in zip(_slacks(decodes, now_s), decodes.tpot_slo_s, strict=True)]
    assert list(runs) == expected


# -- the engine side's unattainable check against the router's rule -------------------------------------------------

PROFILE = load_profile("a100-llama2-70b-tp4")
NOW_S = 100.0


def _engine_request(rid: str, prompt: int, computed: int, arrival_s: float, ttft_ms: float, tpot_ms: float) -> Any:
    return SimpleNamespace(
        request_id=rid,
        arrival_time=arrival_s,
        num_prompt_tokens=prompt,
        num_computed_tokens=computed,
        num_output_tokens=0,
        num_tokens=prompt,
        sampling_params=SimpleNamespace(extra_args={"tropical_ttft_slo_ms": ttft_ms, "tropical_tpot_slo_ms": tpot_ms}),
    )


@st.composite
def engine_requests(draw: st.DrawFn, rid: str) -> Any:
    prompt = draw(st.integers(1, 4000))
    return _engine_request(
        rid,
        prompt,
        computed=int(prompt * draw(st.sampled_from([0.0, 0.0, 0.5]))),
        arrival_s=NOW_S - draw(st.floats(0, 2)),
        ttft_ms=draw(st.floats(50, 5000)),
        tpot_ms=100.0,
    )


@settings(max_examples=150, deadline=None)
@given(
    case=st.sampled_from(
        [
            ("tropical", WorkerRole.PREFILL, {}),
            ("tropical", WorkerRole.PREFILL, {"pd_overhead_s": 0.2, "queue_safety_factor": 1.1}),
            ("tropical", WorkerRole.PREFILL, {"prefill_order": "fcfs", "prefill_chunk_tokens": 512}),
            ("tropical", WorkerRole.MULTIPLEXING, {}),
            ("scorpio", WorkerRole.COLOCATED, {}),
            ("vllm-chunked", WorkerRole.COLOCATED, {}),
            ("vllm", WorkerRole.COLOCATED, {}),
        ]
    ),
    num_queued=st.integers(0, 6),
    data=st.data(),
    slow=st.booleans(),
)
def test_engine_side_rejects_exactly_what_the_routers_rule_finds_unattainable(
    case: tuple[str, WorkerRole, dict], num_queued: int, data: st.DataObject, slow: bool
) -> None:
    policy_name, role, options = case
    config = EngineSideConfig(role=role, policy=policy_name, policy_options=options, reject_unattainable=True)
    engine = EngineSide(config, lambda r: r.sampling_params.extra_args, clock=lambda: NOW_S)
    if slow:  # an engine-side calibrated model: both sides must use it
        engine.set_step_time(PROFILE.step_time.scaled(3.0))
    waiting = [data.draw(engine_requests(f"q{i}")) for i in range(num_queued)]
    new = data.draw(engine_requests("new"))

    # The router's view of the same engine: its prefills in the engine's order, its model.
    router_policy = make_policy(policy_name, PolicyContext(step_time=PROFILE.step_time, max_model_len=4096), options)
    local = router_policy.local_scheduler(role)
    prefills = sorted((engine.prefill_state(r) for r in waiting), key=local.prefill_sort_key)
    worker = make_worker(0, role, prefills=tuple(prefills), step_time=engine.step_time)
    state = engine.prefill_state(new)
    if isinstance(router_policy, FirstTokenPredictor):
        routers = router_policy.predicted_first_token(worker, state, NOW_S)
    else:  # no rule of its own: the queue in the local order, chunked as the policy asks the engine to
        settings_ = router_policy.engine_settings(role)
        routers = predicted_queue_finish(
            worker.prefills,
            state,
            NOW_S,
            engine.step_time,
            chunk_tokens=settings_.max_num_batched_tokens if settings_.enable_chunked_prefill else None,
            sort_key=local.prefill_sort_key,
        )
    engines = engine.predicted_first_token(new, waiting)
    assert engines == routers
    reason = engine.unattainable_reason(new, waiting)
    assert (reason is None) is (routers.finish_at_s <= state.ttft_deadline_at_s)


def test_the_queue_rules_of_tropical_and_scorpio_are_the_core_function() -> None:
    """Spot check with numbers: the policies' rules add only their documented extras to the core function."""
    model = make_model()
    queue = (make_prefill(request_id="a", num_prompt_tokens=400), make_prefill(request_id="b", num_prompt_tokens=50))
    worker = make_worker(0, WorkerRole.PREFILL, prefills=queue, busy_until_s=0.3, pd_hop_fixed_s=0.1)
    new = make_prefill(request_id="n", num_prompt_tokens=100)
    tropical = TropicalPolicy(PolicyContext(step_time=model, max_model_len=4096), TropicalConfig(pd_overhead_s=0.05))
    core = predicted_queue_finish(
        queue,
        new,
        0.2,
        model,
        chunk_tokens=8192,
        busy_until_s=0.3,
        safety_factor=1.02,
        sort_key=lambda p: float(p.num_prompt_tokens - p.num_computed_tokens),
    )
    # Its extras: the static overhead, the learned hop, and the first decode step that follows a learned hop.
    extras_s = 0.05 + 0.1 + model.decode_step_time_s(1, 101)
    assert tropical.predicted_first_token(worker, new, 0.2).finish_at_s == pytest.approx(core.finish_at_s + extras_s)
    scorpio = make_policy("scorpio", PolicyContext(step_time=model, max_model_len=4096))
    colocated = make_worker(0, WorkerRole.COLOCATED, prefills=queue, busy_until_s=0.3)
    by_deadline = predicted_queue_finish(
        queue, new, 0.2, model, busy_until_s=0.3, in_flight_first=True, sort_key=lambda p: p.ttft_deadline_at_s
    )
    assert isinstance(scorpio, FirstTokenPredictor)
    assert scorpio.predicted_first_token(colocated, new, 0.2).finish_at_s == by_deadline.finish_at_s + 0.05


@given(model=models(), prompt=st.integers(1, 4000), computed_fraction=st.floats(0, 1))
def test_tempo_prices_each_bounded_output_token_at_the_models_marginal_decode_cost(
    model: StepTimeModel, prompt: int, computed_fraction: float
) -> None:
    context = PolicyContext(step_time=model, max_model_len=1 << 20, length_samples=TEMPO_SAMPLES)
    local = TempoPolicy(context).local_scheduler(WorkerRole.COLOCATED)
    assert isinstance(local, GainDensityScheduler)
    prefill = make_prefill(num_prompt_tokens=prompt, num_computed_tokens=int(prompt * computed_fraction))
    num_output = local.bound.upper_bound(prompt)
    mean_context = prompt + num_output / 2
    # One more decode of that context in a step, as the step-time model prices it.
    marginal_s = model.decode_step_time_s(2, 1000 + mean_context) - model.decode_step_time_s(1, 1000)  # type: ignore[arg-type]
    expected = model.remaining_prefill_time_s(prompt, prefill.num_computed_tokens) + num_output * marginal_s
    assert math.isclose(local.service_time_s(prefill), expected, rel_tol=1e-9, abs_tol=1e-12)

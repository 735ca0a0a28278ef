"""The simulator as a served deployment: serving overheads, the P/D hop, where a P/D first token is counted, engines
that run another profile than the policies predict with, and the router's online calibration run inside it."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import make_workload
from tropical_sched.cli.main import main as cli_main
from tropical_sched.core import ClusterSnapshot, ConfigError, Request, RouteDecision, WorkerRole
from tropical_sched.policies import policy_names
from tropical_sched.policies.base import Policy
from tropical_sched.policies.local import SlackCappedScheduler
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors import load_profile
from tropical_sched.predictors.calibration import CalibrationConfig
from tropical_sched.predictors.profile import Profile, ServingOverheads
from tropical_sched.predictors.step_time import StepTimeModel
from tropical_sched.sim import ClusterConfig, FirstTokenAt, simulate
from tropical_sched.sim.calibration import SimCalibration
from tropical_sched.sim.simulator import engine_profile_of, policy_context
from tropical_sched.sim.worker import Job, SimWorker
from tropical_sched.workloads import load_trace
from tropical_sched.workloads import make_workload as make_trace_workload

PROFILE = load_profile("a100-llama2-70b-tp4")
MODEL = PROFILE.step_time
AZURE = make_trace_workload(load_trace("azure-conv-2023"), max_model_len=4096, num_requests=600, rate_per_s=3.0)
IN_RANGE = ClusterConfig(max_num_seqs=64)  # the profile measured decode batches up to 64: no extrapolation warnings

PER_STEP_S = 0.002
PER_TOKEN_S = 0.0005
PER_REQUEST_S = 0.004


def served(**overheads: float) -> Profile:
    """The A100 profile behind a server that adds ``overheads`` (``ServingOverheads`` fields, seconds)."""
    serving = ServingOverheads(source="test", **overheads)
    return Profile(PROFILE.file.model_copy(update={"serving": serving}))


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# -- what a served engine adds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overheads", "ttft_extra_s", "step_extra_s"),
    [
        ({"per_step_s": PER_STEP_S}, PER_STEP_S, PER_STEP_S),
        ({"per_streamed_token_s": PER_TOKEN_S}, PER_TOKEN_S, PER_TOKEN_S),
        ({"per_request_s": PER_REQUEST_S}, PER_REQUEST_S, 0.0),
        (
            {"per_step_s": PER_STEP_S, "per_streamed_token_s": PER_TOKEN_S, "per_request_s": PER_REQUEST_S},
            PER_STEP_S + PER_TOKEN_S + PER_REQUEST_S,
            PER_STEP_S + PER_TOKEN_S,
        ),
    ],
)
def test_each_serving_overhead_lengthens_a_lone_request_by_exactly_its_share(
    overheads: dict[str, float], ttft_extra_s: float, step_extra_s: float
) -> None:
    """One request, one worker: its prefill step pays the step's, its first token's and its own overhead; each of its
    10 decode steps pays the step's and its one streamed token's."""
    record = simulate(make_workload([0.0], [1000], [11]), served(**overheads), "vllm").records[0]
    assert close(record.ttft_s, MODEL.prefill_time_s(1000) + ttft_extra_s)
    steps = [MODEL.decode_step_time_s(1, 1000 + i) + step_extra_s for i in range(10)]
    assert close(record.tpot_s, sum(steps) / 10)


def test_a_batched_step_pays_the_step_overhead_once_and_the_token_overhead_per_sequence() -> None:
    """Two requests arriving together on one worker: two prefill steps (the second stalls the first's decode), then
    decode steps of two sequences, each paying one step's overhead and two tokens'."""
    profile = served(per_step_s=PER_STEP_S, per_streamed_token_s=PER_TOKEN_S, per_request_s=PER_REQUEST_S)
    one_worker = ClusterConfig(num_workers=1)
    first, second = simulate(
        make_workload([0.0, 0.0], [1000, 1000], [4, 4]), profile, "vllm", cluster=one_worker
    ).records
    prefill_s = MODEL.prefill_time_s(1000) + PER_STEP_S + PER_TOKEN_S + PER_REQUEST_S
    assert close(first.ttft_s, prefill_s)
    assert close(second.ttft_s, 2 * prefill_s)
    steps = [MODEL.decode_step_time_s(2, 2 * (1000 + i)) + PER_STEP_S + 2 * PER_TOKEN_S for i in range(3)]
    assert close(second.tpot_s, sum(steps) / 3)
    assert close(first.finished_at_s - first.first_token_at_s, prefill_s + sum(steps))  # type: ignore[operator]


def test_a_recompute_after_preemption_does_not_pay_the_request_overhead_again() -> None:
    """A KV cache too small for both decodes preempts one; its recompute is engine work, not a new request."""
    profile = served(per_request_s=1.0)  # large enough that a second charge would show in the finish times
    cluster = ClusterConfig(num_workers=1, num_kv_cache_tokens=2100, max_num_seqs=64)
    plain = simulate(make_workload([0.0, 0.0], [1000, 1000], [60, 60]), PROFILE, "vllm", cluster=cluster)
    charged = simulate(make_workload([0.0, 0.0], [1000, 1000], [60, 60]), profile, "vllm", cluster=cluster)
    assert [r.num_preemptions for r in charged.records] == [0, 1]
    # Both prefills run before any decode (prefill priority): their 2 s delay everything; the recompute adds none.
    for with_overhead, without in zip(charged.records, plain.records, strict=True):
        assert close(with_overhead.finished_at_s - without.finished_at_s, 2.0)  # type: ignore[operator]


def test_the_pd_hop_adds_to_the_kv_transfer_and_the_first_token_is_counted_where_asked() -> None:
    """DistServe, one request: the hop (fixed + per prompt token) is paid on top of the KV transfer. Counted at the
    prefill's end, TTFT is the prefill; counted after the hop, it is the prefill, the transfer, the hop and the
    decoding worker's first step, which samples token 1 of 3."""
    hop_fixed_s, hop_per_token_s = 0.05, 2e-5
    profile = served(
        per_step_s=PER_STEP_S,
        per_streamed_token_s=PER_TOKEN_S,
        per_request_s=PER_REQUEST_S,
        pd_hop_fixed_s=hop_fixed_s,
        pd_hop_per_prompt_token_s=hop_per_token_s,
    )
    workload = make_workload([0.0], [2000], [3])
    prefill_s = MODEL.prefill_time_s(2000) + PER_STEP_S + PER_TOKEN_S + PER_REQUEST_S
    move_s = 2000 * PROFILE.kv_bytes_per_token / PROFILE.default_kv_link_bandwidth_bytes_per_s
    move_s += hop_fixed_s + 2000 * hop_per_token_s
    step = [MODEL.decode_step_time_s(1, 2000 + i) + PER_STEP_S + PER_TOKEN_S for i in range(3)]

    at_prefill = simulate(workload, profile, "distserve").records[0]
    assert close(at_prefill.ttft_s, prefill_s)
    assert close(at_prefill.finished_at_s - at_prefill.first_token_at_s, move_s + step[0] + step[1])  # type: ignore[operator]
    assert at_prefill.num_output_tokens == 3

    cluster = ClusterConfig(first_token_at=FirstTokenAt.AFTER_HOP)
    after_hop = simulate(workload, profile, "distserve", cluster=cluster).records[0]
    assert close(after_hop.ttft_s, prefill_s + move_s + step[0])
    assert close(after_hop.tpot_s, (step[1] + step[2]) / 2)
    assert after_hop.num_output_tokens == 3
    assert (after_hop.prefill_worker_id, after_hop.decode_worker_id) == (0, 1)


def test_first_token_after_hop_reports_each_first_token_once_to_the_policy() -> None:
    """The policy hears of a P/D request's first token when the decoding worker streams it, once per request."""
    heard: dict[str, float] = {}

    class Listening:
        def __init__(self, inner: Policy) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def on_first_token(self, request: Request, ttft_s: float, now_s: float) -> None:
            assert request.request_id not in heard
            heard[request.request_id] = ttft_s
            self._inner.on_first_token(request, ttft_s, now_s)

    policy = Listening(make_policy("distserve", policy_context(PROFILE, AZURE)))
    cluster = ClusterConfig(max_num_seqs=64, first_token_at=FirstTokenAt.AFTER_HOP)
    result = simulate(AZURE, PROFILE, policy, cluster=cluster)  # type: ignore[arg-type]
    assert heard == {r.request_id: r.ttft_s for r in result.records}
    at_prefill = simulate(AZURE, PROFILE, "distserve", cluster=IN_RANGE)
    # Counted after the hop, every multi-token request's first token comes later than at its prefill's end.
    later = [
        after.ttft_s > before.ttft_s
        for after, before in zip(result.records, at_prefill.records, strict=True)
        if before.num_output_tokens > 1
    ]
    assert later
    assert all(later)


# -- engines that are not what the policies believe --------------------------------------------------------------


def test_engines_run_the_engine_profile_scaled_while_slos_come_from_the_predicting_one() -> None:
    workload = make_workload([0.0], [1000], [2])
    h100 = load_profile("h100-llama2-70b-tp4")
    for engine, cluster, expected_s in [
        (None, ClusterConfig(engine_time_scale=2.0), 2 * MODEL.prefill_time_s(1000)),
        (h100, ClusterConfig(), h100.step_time.prefill_time_s(1000)),
        (h100, ClusterConfig(engine_time_scale=0.5), 0.5 * h100.step_time.prefill_time_s(1000)),
    ]:
        record = simulate(workload, PROFILE, "vllm", cluster=cluster, engine_profile=engine).records[0]
        assert math.isclose(record.ttft_s, expected_s, rel_tol=1e-9)
        assert math.isclose(record.ttft_slo_s, 5 * MODEL.prefill_time_s(1000), rel_tol=1e-9)


def test_engine_profile_of_applies_the_scale_and_the_hop_overrides() -> None:
    assert engine_profile_of(PROFILE, ClusterConfig()) is PROFILE
    engine = engine_profile_of(PROFILE, ClusterConfig(engine_time_scale=3.0, engine_pd_hop_fixed_s=0.2))
    assert engine.step_time.coefficients.const_s == pytest.approx(3 * MODEL.coefficients.const_s)
    assert engine.serving.pd_hop_fixed_s == 0.2
    assert engine.serving.pd_hop_per_prompt_token_s == 0.0
    scaled_hop = served(pd_hop_fixed_s=0.1, pd_hop_per_prompt_token_s=1e-5)
    engine = engine_profile_of(scaled_hop, ClusterConfig(engine_time_scale=2.0, engine_pd_hop_per_prompt_token_s=0.0))
    assert engine.serving.pd_hop_fixed_s == pytest.approx(0.2)  # scaled with the rest
    assert engine.serving.pd_hop_per_prompt_token_s == 0.0  # overridden


@pytest.mark.parametrize("field", ["engine_time_scale", "engine_pd_hop_fixed_s", "engine_pd_hop_per_prompt_token_s"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_engine_settings_are_validated(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        ClusterConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("engine_step_noise", -0.1),
        ("engine_step_noise", math.nan),
        ("engine_step_noise", 3.0),
        ("engine_step_noise_correlation", 1.0),
        ("engine_step_noise_correlation", -0.5),
        ("engine_noise_seed", -1),
    ],
)
def test_engine_step_noise_settings_are_validated(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"ClusterConfig.{field} is out of range"):
        ClusterConfig(**{field: value})


def _lone_decode_tpot_s(**noise: Any) -> float:
    """TPOT of one request decoding 2,000 tokens alone on one colocated worker (steps of one composition but the
    context), with the cluster's step noise."""
    workload = make_workload([0.0], [500], [2000])
    result = simulate(workload, PROFILE, "vllm", cluster=ClusterConfig(num_workers=1, **noise))
    return result.records[0].tpot_s


def test_engine_step_noise_has_mean_one_and_is_seeded() -> None:
    """Independent log-normal factors (sigma 0.3) leave a 2,000-token decode's mean step within 3% of the noiseless
    one (the mean of 2,000 factors has a standard deviation of about 0.7%); the same seed gives the same run, another
    seed and a correlated stream another one."""
    plain = _lone_decode_tpot_s()
    noisy = _lone_decode_tpot_s(engine_step_noise=0.3, engine_noise_seed=1)
    assert noisy != plain
    assert noisy == pytest.approx(plain, rel=0.03)
    assert _lone_decode_tpot_s(engine_step_noise=0.3, engine_noise_seed=1) == noisy
    assert _lone_decode_tpot_s(engine_step_noise=0.3, engine_noise_seed=2) != noisy
    correlated = _lone_decode_tpot_s(engine_step_noise=0.3, engine_step_noise_correlation=0.99, engine_noise_seed=1)
    assert correlated != noisy


def test_correlated_step_noise_makes_slow_and_fast_periods() -> None:
    """With correlation 0.99 the factors wander in long periods: 40 requests decoding one after another see mean
    steps far more spread out than with independent factors of the same spread."""
    import statistics

    def spread(correlation: float) -> float:
        workload = make_workload([10.0 * i for i in range(40)], [200] * 40, [100] * 40)
        cluster = ClusterConfig(num_workers=1, engine_step_noise=0.2, engine_step_noise_correlation=correlation)
        tpots = [r.tpot_s for r in simulate(workload, PROFILE, "vllm", cluster=cluster).records]
        return statistics.pstdev(tpots) / statistics.fmean(tpots)

    independent, correlated = spread(0.0), spread(0.99)
    assert independent < 0.05  # the mean of 99 independent factors: about 2%
    assert correlated > 2 * independent


# Digests of the records of every policy on AZURE (IN_RANGE) before the simulator learned serving overheads,
# engine profiles and calibration (computed with that code). With all of those at their defaults the records must
# stay byte for byte what they were; change a digest only with a deliberate change of the simulator's behaviour.
# Tropical runs with deadline_floor off, its behaviour of then (the floor, on by default since, changes its runs).
# Tropical's digest changed once since, deliberately: the router's queue retries requests past their TTFT deadline
# after the others (Dispatcher late_requests_last), which reorders some of its late requests here.
RECORD_DIGESTS = {
    "tropical": "41da48b1b416fd45eb7ede1d56a6568c",
    "vllm": "066b549ffcd9f39d31b8dcadda6f7bd4",
    "vllm-chunked": "dcba9d2bda050d6aef01dbc9e07c0c43",
    "distserve": "899e0324bf56c5dac8e7175600ff260f",
    "scorpio": "17a6835a6c21513d7112fb0ae094980a",
    "slos-serve": "16e212e7056e82ceaa2eea67b73f7416",
    "tempo": "f51fd30e361ebee6290d3aa9b7282dfd",
}


@pytest.mark.parametrize("policy", sorted(RECORD_DIGESTS))
def test_calibration_off_and_engine_equal_to_profile_give_the_records_of_before(policy: str) -> None:
    options = {"deadline_floor": False} if policy == "tropical" else None
    default = simulate(AZURE, PROFILE, policy, cluster=IN_RANGE, policy_options=options)
    assert hashlib.sha256(repr(default.records).encode()).hexdigest()[:32] == RECORD_DIGESTS[policy]
    explicit = ClusterConfig(
        max_num_seqs=64,
        first_token_at=FirstTokenAt.PREFILL_END,
        engine_time_scale=1.0,
        calibration=None,
    )
    same = simulate(
        AZURE,
        PROFILE,
        policy,
        cluster=explicit,
        engine_profile=load_profile("a100-llama2-70b-tp4"),
        policy_options=options,
    )
    assert same.records == default.records


# -- online calibration in the simulator ---------------------------------------------------------------------------


def _ratio(model: StepTimeModel, num_decode_seqs: int, num_context_tokens: int) -> float:
    return model.decode_step_time_s(num_decode_seqs, num_context_tokens) / MODEL.decode_step_time_s(
        num_decode_seqs, num_context_tokens
    )


class _SnapshotSpy:
    """Records the step-time model and P/D hop of every worker snapshot the policy is shown at routing."""

    def __init__(self, inner: Policy) -> None:
        self._inner = inner
        self.seen: list[tuple[int, StepTimeModel | None, float]] = []  # (worker id, model, hop at 1,000 tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def route(self, request: Request, cluster: ClusterSnapshot) -> RouteDecision:
        for worker in cluster.workers:
            self.seen.append((worker.worker_id, worker.step_time, worker.pd_hop_s(1000)))
        return self._inner.route(request, cluster)


LIGHT = make_trace_workload(load_trace("azure-conv-2023"), max_model_len=4096, num_requests=300, rate_per_s=0.8)


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(
    scale=st.floats(0.5, 3.0),
    policy=st.sampled_from(["tropical", "distserve", "vllm-chunked"]),
)
def test_calibration_learns_engines_slower_or_faster_than_the_profile(scale: float, policy: str) -> None:
    """Within 300 requests every worker's calibrated step times are within 5% of the engines' (``scale`` x the
    profile's) over decode batches and prefills, and the policy's snapshots carry that model."""
    spy = _SnapshotSpy(make_policy(policy, policy_context(PROFILE, LIGHT)))
    cluster = ClusterConfig(max_num_seqs=64, engine_time_scale=scale, calibration=CalibrationConfig())
    result = simulate(LIGHT, PROFILE, spy, cluster=cluster)  # type: ignore[arg-type]
    for worker in result.stats.workers:
        assert worker.calibrated_coefficients is not None
        model = StepTimeModel(worker.calibrated_coefficients, MODEL.valid_range)
        for decodes, context in [(1, 500), (8, 8 * 1500), (32, 32 * 800)]:
            assert _ratio(model, decodes, context) == pytest.approx(scale, rel=0.05)
        if worker.role is not WorkerRole.DECODE:  # a decode-only worker never prefills: nothing to learn there
            assert model.prefill_time_s(1000) / MODEL.prefill_time_s(1000) == pytest.approx(scale, rel=0.05)
    last = {worker_id: model for worker_id, model, _ in spy.seen}
    for model in last.values():
        assert model is not None
        assert _ratio(model, 8, 8 * 1500) == pytest.approx(scale, rel=0.05)


def test_calibration_learns_a_hop_the_profile_does_not_know() -> None:
    """The engines add 150 ms to every P/D hop; the prefill worker learns it (plus the link's per-token transfer),
    and the policy is shown it."""
    spy = _SnapshotSpy(make_policy("tropical", policy_context(PROFILE, LIGHT)))
    cluster = ClusterConfig(
        max_num_seqs=64,
        engine_pd_hop_fixed_s=0.15,
        calibration=CalibrationConfig(),
        first_token_at=FirstTokenAt.AFTER_HOP,
    )
    result = simulate(LIGHT, PROFILE, spy, cluster=cluster)  # type: ignore[arg-type]
    prefill = next(w for w in result.stats.workers if w.role is WorkerRole.PREFILL)
    link_s_per_token = PROFILE.kv_bytes_per_token / PROFILE.default_kv_link_bandwidth_bytes_per_s
    assert prefill.calibrated_pd_hop_fixed_s is not None
    assert prefill.calibrated_pd_hop_per_prompt_token_s is not None
    for num_prompt_tokens in (100, 1000, 4000):  # the link's share is a fraction of a millisecond per 1,000 tokens
        learned_s = prefill.calibrated_pd_hop_fixed_s + prefill.calibrated_pd_hop_per_prompt_token_s * num_prompt_tokens
        assert learned_s == pytest.approx(0.15 + link_s_per_token * num_prompt_tokens, abs=0.002)
    shown = [hop_s for worker_id, _, hop_s in spy.seen if worker_id == prefill.worker_id]
    assert shown[0] == 0.0  # the profile records no hop
    assert shown[-1] == pytest.approx(0.15 + 1000 * link_s_per_token, rel=0.02)


def test_calibration_keeps_a_right_profile() -> None:
    """Engines that run the profile: the calibrated models stay on it (the observations are exact)."""
    cluster = ClusterConfig(max_num_seqs=64, calibration=CalibrationConfig())
    result = simulate(LIGHT, PROFILE, "tropical", cluster=cluster)
    for worker in result.stats.workers:
        assert worker.num_calibration_samples > 100
        assert worker.calibrated_coefficients is not None
        for got, want in zip(worker.calibrated_coefficients.as_tuple(), MODEL.coefficients.as_tuple(), strict=True):
            assert got == pytest.approx(want, rel=1e-3)


def test_calibration_starts_from_the_served_profile_and_gives_the_local_scheduler_the_calibrated_model() -> None:
    """Each worker's prior is the predicting profile with its serving overheads folded in; the slack-capped local
    scheduler predicts with the worker's calibrated model, and follows it as it learns."""
    profile = served(per_step_s=PER_STEP_S, per_streamed_token_s=PER_TOKEN_S)
    policy = make_policy("tropical", policy_context(profile))
    workers = [
        SimWorker(
            worker_id=i,
            role=role,
            settings=policy.engine_settings(role),
            local=policy.local_scheduler(role),
            step_time=MODEL,
            num_kv_cache_tokens=100_000,
            max_num_seqs=64,
        )
        for i, role in enumerate(policy.worker_roles(2, None))
    ]
    calibration = SimCalibration(workers, profile, CalibrationConfig(min_samples=1))
    mux = workers[1]
    assert mux.predicted_step_time is calibration.instances[1].step_time
    assert mux.predicted_step_time.coefficients.const_s == pytest.approx(MODEL.coefficients.const_s + PER_STEP_S)
    assert isinstance(mux.local, SlackCappedScheduler)
    assert mux.local.step_time is mux.predicted_step_time
    # A request that decoded alone on the multiplexing worker, its steps twice the prior's.
    job = Job(Request(request_id="r", arrival_at_s=0.0, num_prompt_tokens=100, slo=_loose()), 5)
    job.first_token_at_s, job.num_generated, job.num_computed = 0.0, 1, 100
    job.prefill_worker_id = 0
    prior = mux.predicted_step_time
    mux.reserve_incoming(job)
    calibration.on_transfer_done(job, workers[0], mux, 0.01)
    mux.receive(job)
    now_s = 0.0
    for _ in range(4):
        step_s = mux.start_step(now_s)
        assert step_s is not None
        calibration.on_step_start(mux, 2 * prior.decode_step_time_s(1, mux.decode_context_tokens_in_flight))
        now_s += step_s
        calibration.on_step_end(mux, mux.finish_step(now_s))
    assert job.finished_at_s is not None
    assert mux.predicted_step_time is not prior
    assert mux.local.step_time is mux.predicted_step_time
    assert _ratio_to(mux.predicted_step_time, prior) > 1.2  # moving towards the observed 2x


def _loose() -> Any:
    from tropical_sched.core import Slo

    return Slo(ttft_s=100.0, tpot_s=100.0)


def _ratio_to(model: StepTimeModel, prior: StepTimeModel) -> float:
    return model.decode_step_time_s(1, 102) / prior.decode_step_time_s(1, 102)


@pytest.mark.parametrize("policy", policy_names())
def test_every_policy_runs_with_calibration_and_a_wrong_profile(policy: str) -> None:
    cluster = ClusterConfig(
        max_num_seqs=64,
        engine_time_scale=1.5,
        engine_pd_hop_fixed_s=0.05,
        calibration=CalibrationConfig(),
        first_token_at=FirstTokenAt.AFTER_HOP,
    )
    result = simulate(AZURE, PROFILE, policy, cluster=cluster)
    assert len(result.records) == len(AZURE)
    assert all(r.rejected or r.finished_at_s is not None for r in result.records)
    assert all(w.num_calibration_samples > 0 for w in result.stats.workers)


# -- the command line --------------------------------------------------------------------------------------------


def test_simulate_cli_runs_a_mispredicted_calibrated_deployment(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    code = cli_main(
        [
            "simulate",
            "--no-progress",
            "--num-requests",
            "200",
            "--policies",
            "tropical,vllm",
            "--engine-time-scale",
            "2",
            "--engine-pd-hop-ms",
            "100",
            "--engine-pd-hop-per-token-ms",
            "0.01",
            "--first-token-at",
            "after-hop",
            "--calibration",
            "on",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    engine = json.loads(path.read_text())["engine"]
    assert engine == {
        "engine_profile": "a100-llama2-70b-tp4",
        "engine_time_scale": 2.0,
        "engine_pd_hop_fixed_s": 0.1,
        "engine_pd_hop_per_prompt_token_s": 1e-5,
        "engine_step_noise": 0.0,
        "engine_step_noise_correlation": 0.0,
        "first_token_at": "after-hop",
        "calibration": True,
        "worker_profiles": None,
    }


def test_goodput_and_validate_take_the_engine_options() -> None:
    import argparse

    from tropical_sched.cli import goodput, validate
    from tropical_sched.cli.simulate import build_experiment

    for module, extra in [(goodput, []), (validate, ["--url", "http://127.0.0.1:1"])]:
        parser = argparse.ArgumentParser()
        module.register(parser.add_subparsers())
        command = "goodput" if module is goodput else "validate"
        args = parser.parse_args(
            [
                command,
                *extra,
                *("--engine-profile", "h100-llama2-70b-tp4", "--engine-time-scale", "0.5"),
                *("--first-token-at", "after-hop", "--calibration", "on"),
            ]
        )
        experiment = build_experiment(args)
        assert experiment.engine_profile == "h100-llama2-70b-tp4"
        assert experiment.cluster.engine_time_scale == 0.5
        assert experiment.cluster.first_token_at is FirstTokenAt.AFTER_HOP
        assert experiment.cluster.calibration is not None

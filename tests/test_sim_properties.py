"""Properties of the simulator that must hold for any workload, policy and cluster (hypothesis).

Workloads are small (a few requests, often arriving together) and clusters tight (one sequence per step, KV caches
that fit one request but not all, or none), because that is where requests get lost: a reservation never given
back, a retry never triggered, two prefills taking turns preempting each other. Examples are drawn
deterministically (``derandomize=True``, no example database), so every run checks the same ones and a failure
reproduces.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import make_workload
from tropical_sched.core import ConfigError, Request, SloSpec
from tropical_sched.core.slo import SLO_CLASS_PRESETS
from tropical_sched.policies import policy_names
from tropical_sched.policies.base import Policy
from tropical_sched.policies.registry import POLICIES, make_policy
from tropical_sched.predictors import load_profile
from tropical_sched.predictors.calibration import CalibrationConfig
from tropical_sched.predictors.profile import Profile, ServingOverheads
from tropical_sched.sim import ClusterConfig, DecodePlacementTime, FirstTokenAt, SimEvent, SimulationResult, simulate
from tropical_sched.sim.simulator import policy_context
from tropical_sched.workloads.workload import Workload

PROFILE = load_profile("a100-llama2-70b-tp4")
# The same engine behind a server: every overhead a served engine adds, and a P/D hop.
SERVED_PROFILE = Profile(
    PROFILE.file.model_copy(
        update={
            "serving": ServingOverheads(
                per_step_s=0.002,
                per_streamed_token_s=5e-5,
                per_request_s=0.005,
                pd_hop_fixed_s=0.03,
                pd_hop_per_prompt_token_s=1e-5,
                source="test",
            )
        }
    )
)
# Prompt + output stays within the profile's context (4096 tokens) and, with at most MAX_REQUESTS requests, decode
# batches within its measured range (64 sequences): no extrapolation warnings, which the test run makes errors.
MAX_REQUESTS = 10
MAX_PROMPT_TOKENS = 3000
MAX_OUTPUT_TOKENS = 1000
# A run takes a few events per output token (about 2.5 at most, preemptions included, over thousands of examples);
# far more means the workers are going round in circles, which would otherwise hang the test run.
MAX_EVENTS_PER_TOKEN = 100

NUM_EXAMPLES = 1200
NUM_DETERMINISM_EXAMPLES = 300  # two runs each

PROPERTY_SETTINGS = settings(
    max_examples=NUM_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One drawn run: what :func:`simulate` is given."""

    workload: Workload
    policy: str
    policy_options: dict[str, Any]
    cluster: ClusterConfig
    slo: SloSpec
    profile: Profile = PROFILE

    @property
    def kv_capacity(self) -> int:
        """One worker's KV capacity, tokens."""
        return self.cluster.num_kv_cache_tokens or PROFILE.num_kv_cache_tokens

    def make_policy(self) -> Policy:
        return make_policy(self.policy, policy_context(self.profile, self.workload), self.policy_options)

    def run(self, policy: Any = None) -> tuple[SimulationResult, _Watch]:
        """Simulate (with a fresh policy unless one is given), watching every event."""
        watch = _Watch(self)
        result = simulate(
            self.workload,
            self.profile,
            policy if policy is not None else self.make_policy(),
            cluster=self.cluster,
            slo=self.slo,
            on_event=watch,
        )
        return result, watch


class _Watch:
    """Checks every event as it happens: the clock never goes back, no worker's KV usage exceeds its capacity, and
    the run does not go round in circles; keeps the last event."""

    def __init__(self, scenario: Scenario) -> None:
        self.capacity = scenario.kv_capacity
        workload = scenario.workload
        self.max_events = MAX_EVENTS_PER_TOKEN * (int(workload.num_output_tokens.sum()) + len(workload))
        self.num_events = 0
        self.last: SimEvent | None = None

    def __call__(self, event: SimEvent) -> None:
        self.num_events += 1
        assert self.num_events <= self.max_events, "no progress: the run is going round in circles"
        assert self.last is None or event.at_s >= self.last.at_s
        assert max(event.kv_tokens_used) <= self.capacity
        self.last = event


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    """A few requests; arrival gaps often zero (bursts); prompts and outputs from one token up."""
    n = draw(st.integers(1, MAX_REQUESTS))
    gaps = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 2.0)), min_size=n, max_size=n))
    arrivals = [sum(gaps[: i + 1]) for i in range(n)]
    prompt = st.one_of(st.integers(1, 16), st.integers(1, MAX_PROMPT_TOKENS))
    output = st.one_of(st.integers(1, 4), st.integers(1, MAX_OUTPUT_TOKENS))
    prompts = draw(st.lists(prompt, min_size=n, max_size=n))
    outputs = draw(st.lists(output, min_size=n, max_size=n))
    return make_workload(arrivals, prompts, outputs)


@st.composite
def slo_specs(draw: st.DrawFn) -> SloSpec:
    """Absolute or scaled SLOs, from unattainably tight (below one step) to loose, with or without SLO classes."""
    ttft: dict[str, float] = draw(
        st.one_of(
            st.builds(lambda s: {"ttft_slo_s": s}, st.floats(0.001, 30.0)),
            st.builds(lambda s: {"ttft_slo_scale": s}, st.floats(0.1, 50.0)),
        )
    )
    tpot: dict[str, float] = draw(
        st.one_of(
            st.builds(lambda s: {"tpot_slo_s": s}, st.floats(0.001, 1.0)),
            st.builds(lambda s: {"tpot_slo_scale": s}, st.floats(0.1, 20.0)),
        )
    )
    classes = draw(st.one_of(st.just(()), st.sampled_from(sorted(SLO_CLASS_PRESETS)).map(SLO_CLASS_PRESETS.get)))
    return SloSpec.make(**ttft, **tpot, classes=classes, class_seed=draw(st.integers(0, 3)))


def kv_capacities(workload: Workload) -> st.SearchStrategy[int | None]:
    """A worker's KV capacity, tokens: the profile's (``None``), a few tokens (most requests cannot fit and are
    rejected), anything up to a few thousand, or room for the largest request but not for all of them at once (the
    decodes outgrow it and are preempted)."""
    sizes = (workload.num_prompt_tokens + workload.num_output_tokens).tolist()
    largest, total = max(sizes), sum(sizes)
    return st.one_of(
        st.none(),
        st.integers(1, 64),
        st.integers(1, 8000),
        st.just(largest),
        st.integers(largest, max(largest, total // 4)),
    )


def _accepts_split(policy: Policy, num_workers: int, num_prefill_workers: int | None) -> bool:
    """Whether ``policy`` runs on this many workers with this split (``worker_roles`` refuses those it cannot)."""
    try:
        policy.worker_roles(num_workers, num_prefill_workers)
    except ConfigError:
        return False
    return True


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """Any registered policy on 1-4 workers with any split it accepts, and any cluster and SLO settings, engines
    that may be served (overheads, a P/D hop), slower or faster than predicted, and the online calibration."""
    workload = draw(workloads())
    profile = draw(st.sampled_from([PROFILE, SERVED_PROFILE]))
    policy = draw(st.sampled_from(policy_names()))
    options: dict[str, Any] = {}
    if "reject_unattainable" in {f.name for f in dataclasses.fields(POLICIES[policy].config_type)}:
        options["reject_unattainable"] = draw(st.booleans())
    num_workers = draw(st.integers(1, 4))
    num_prefill_workers = draw(st.one_of(st.none(), st.integers(0, num_workers)))
    # Only the split may be refused (a colocated policy given prefill workers, a P/D one without both pools):
    # building the policy must work, and so must running any split it accepts.
    built = make_policy(policy, policy_context(profile, workload), options)
    assume(_accepts_split(built, num_workers, num_prefill_workers))
    cluster = ClusterConfig(
        num_workers=num_workers,
        num_prefill_workers=num_prefill_workers,
        max_num_seqs=draw(st.one_of(st.integers(1, 4), st.integers(1, 256))),
        num_kv_cache_tokens=draw(kv_capacities(workload)),
        kv_link_bandwidth_bytes_per_s=draw(st.one_of(st.none(), st.floats(1e8, 1e12))),
        kv_transfer_latency_s=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5))),
        decode_placement=draw(st.sampled_from(DecodePlacementTime)),
        first_token_at=draw(st.sampled_from(FirstTokenAt)),
        engine_time_scale=draw(st.one_of(st.just(1.0), st.floats(0.3, 3.0))),
        engine_pd_hop_fixed_s=draw(st.one_of(st.none(), st.floats(0.0, 0.5))),
        calibration=draw(st.sampled_from([None, CalibrationConfig(), CalibrationConfig(min_samples=1)])),
    )
    return Scenario(workload, policy, options, cluster, draw(slo_specs()), profile)


class _CountingPolicy:
    """A policy that counts the simulator's feedback per request id (each report must come exactly once)."""

    def __init__(self, inner: Policy) -> None:
        self._inner = inner
        self.first_tokens: dict[str, int] = {}
        self.finished: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def on_first_token(self, request: Request, ttft_s: float, now_s: float) -> None:
        self.first_tokens[request.request_id] = self.first_tokens.get(request.request_id, 0) + 1
        self._inner.on_first_token(request, ttft_s, now_s)

    def on_finished(self, request: Request, tpot_s: float, now_s: float) -> None:
        self.finished[request.request_id] = self.finished.get(request.request_id, 0) + 1
        self._inner.on_finished(request, tpot_s, now_s)


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_request_finishes_or_is_rejected_exactly_once_and_gives_its_kv_back(scenario: Scenario) -> None:
    policy = _CountingPolicy(scenario.make_policy())
    result, watch = scenario.run(policy)
    workload = scenario.workload
    ids = [str(i) for i in range(len(workload))]
    assert [r.request_id for r in result.records] == ids
    for record in result.records:
        num_output_tokens = int(workload.num_output_tokens[int(record.request_id)])
        if record.rejected:
            assert record.reject_reason
            assert record.num_output_tokens == 0
            assert record.first_scheduled_at_s is None
            assert record.first_token_at_s is None
            assert record.finished_at_s is None
            assert record.request_id not in policy.finished
        else:
            assert record.finished_at_s is not None
            assert record.num_output_tokens == num_output_tokens
            assert policy.finished[record.request_id] == 1
        if record.num_prompt_tokens + num_output_tokens > scenario.kv_capacity:
            assert record.rejected  # it can never fit: declined, not left waiting
    # A rejection is reported as a first token that never comes: one first-token report per request, either way.
    assert policy.first_tokens == dict.fromkeys(ids, 1)
    assert watch.last is not None
    assert watch.last.kv_tokens_used == (0,) * scenario.cluster.num_workers  # nothing left held or reserved


@PROPERTY_SETTINGS
@given(scenarios())
def test_timestamps_and_token_counts_are_consistent(scenario: Scenario) -> None:
    result, _ = scenario.run()
    workload = scenario.workload
    num_workers = scenario.cluster.num_workers
    for record in result.records:
        index = int(record.request_id)
        assert record.arrival_at_s == workload.arrival_at_s[index]
        assert record.num_prompt_tokens == workload.num_prompt_tokens[index]
        assert math.isfinite(record.ttft_slo_s)
        assert record.ttft_slo_s > 0
        assert math.isfinite(record.tpot_slo_s)
        assert record.tpot_slo_s > 0
        if record.rejected:
            assert record.num_output_tokens == 0
            assert record.ttft_s == record.tpot_s == math.inf
            continue
        assert record.first_scheduled_at_s is not None
        assert record.first_token_at_s is not None
        assert record.finished_at_s is not None
        times = [record.arrival_at_s, record.first_scheduled_at_s, record.first_token_at_s, record.finished_at_s]
        assert all(math.isfinite(t) for t in times)
        assert times == sorted(times)
        assert record.finished_at_s <= result.stats.end_at_s
        assert record.prefill_worker_id is not None
        assert 0 <= record.prefill_worker_id < num_workers
        assert record.decode_worker_id is not None
        assert 0 <= record.decode_worker_id < num_workers
        assert record.num_output_tokens == workload.num_output_tokens[index]
        if record.num_output_tokens == 1:
            assert record.finished_at_s == record.first_token_at_s
            assert record.tpot_s == 0.0
        else:
            assert record.finished_at_s > record.first_token_at_s  # every later token takes a step
            assert math.isfinite(record.tpot_s)
            assert record.tpot_s > 0
        assert math.isfinite(record.ttft_s)
        assert record.ttft_s > 0
    assert all(w.max_kv_tokens_used <= w.num_kv_cache_tokens for w in result.stats.workers)


@settings(PROPERTY_SETTINGS, max_examples=NUM_DETERMINISM_EXAMPLES)
@given(scenarios())
def test_same_inputs_give_identical_records(scenario: Scenario) -> None:
    first, _ = scenario.run()
    second, _ = scenario.run()
    assert first.records == second.records
    assert dataclasses.replace(first.stats, cpu_s=0.0) == dataclasses.replace(second.stats, cpu_s=0.0)


@pytest.mark.parametrize("policy", ["vllm", "tropical"])
def test_the_split_filter_drops_only_what_the_policy_refuses(policy: str) -> None:
    """A colocated policy refuses prefill workers; Tropical runs any split that leaves a multiplexing worker."""
    built = make_policy(policy, policy_context(PROFILE))
    assert _accepts_split(built, 1, None)
    assert _accepts_split(built, 2, None)
    assert _accepts_split(built, 2, 1) == (policy == "tropical")
    assert not _accepts_split(built, 2, 2)

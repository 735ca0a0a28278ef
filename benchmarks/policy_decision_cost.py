"""Decision cost of every registered policy: CPU time per routing call and per engine-step call.

Two measurements, both printed:

1. Synthetic: two workers, each with ``--num-running`` running decodes (six TPOT classes, contexts from 200 to
   4,000 tokens) and ``--num-queued`` queued prefills, on the bundled A100 Llama-2-70B profile. Per policy:
   ``route`` (the router's per-request decision; for SLOs-Serve this runs the admission DP on each worker until
   one admits) and the engine-local calls of one step (``select_decodes``, ``prefill_token_cap``,
   ``prefill_sort_key``). Target (policies issue): under 1 ms per call at 256 running requests.
2. In a simulation: SLOs-Serve's admission DP timed on every call during a run of the Azure conversation trace
   with the ``scorpio6`` SLO mix, at a load where queues build (the paper claims under 10 ms per call).

Usage: python benchmarks/policy_decision_cost.py [--num-running 256] [--num-queued 16] [--calls 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings

import numpy as np

from tropical_sched import ClusterConfig, load_profile, load_trace, make_workload, policy_names
from tropical_sched.core.request import Request, Slo
from tropical_sched.core.slo import SLO_CLASS_PRESETS, SloSpec
from tropical_sched.core.snapshot import ClusterSnapshot, DecodeBatch, PrefillState, WorkerSnapshot
from tropical_sched.policies import slos_serve
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.output_length import LengthSamples
from tropical_sched.sim import policy_context, simulate

TPOT_CLASSES_S = (0.075, 0.1, 0.15, 0.2, 0.3, 0.5)


def _cluster(policy_name: str, num_running: int, num_queued: int, now_s: float, rng: np.random.Generator) -> tuple:
    profile = load_profile("a100-llama2-70b-tp4")
    trace = load_trace("azure-conv-2023")
    context = dataclasses.replace(
        policy_context(profile),
        length_samples=LengthSamples(trace.num_prompt_tokens.tolist(), trace.num_output_tokens.tolist()),
    )
    policy = make_policy(policy_name, context)
    roles = policy.worker_roles(2, None)
    workers = []
    for worker_id, role in enumerate(roles):
        n = num_running if role.runs_decodes else 0
        decodes = DecodeBatch(
            request_ids=tuple(f"w{worker_id}-d{i}" for i in range(n)),
            first_token_at_s=tuple((now_s - rng.uniform(1, 20, n)).tolist()) if n else (),
            num_generated_tokens=tuple(rng.integers(2, 200, n).tolist()) if n else (),
            tpot_slo_s=tuple(rng.choice(TPOT_CLASSES_S, n).tolist()) if n else (),
            num_context_tokens=tuple(rng.integers(200, 4000, n).tolist()) if n else (),
        )
        prefills = tuple(
            PrefillState(
                request_id=f"w{worker_id}-p{i}",
                arrival_at_s=now_s - rng.uniform(0, 2),
                num_prompt_tokens=int(rng.integers(100, 3000)),
                num_computed_tokens=0,
                ttft_slo_s=float(rng.uniform(1, 10)),
                tpot_slo_s=float(rng.choice(TPOT_CLASSES_S)),
            )
            for i in range(num_queued if role.runs_prefills else 0)
        )
        used = sum(decodes.num_context_tokens) + sum(p.num_prompt_tokens for p in prefills)
        workers.append(
            WorkerSnapshot(
                worker_id=worker_id,
                role=role,
                prefills=prefills,
                decodes=decodes,
                num_kv_tokens_used=used,
                num_kv_tokens_capacity=max(used * 2, profile.num_kv_cache_tokens),
                max_num_seqs=num_running + num_queued + 64,
            )
        )
    return policy, ClusterSnapshot(now_s=now_s, workers=tuple(workers))


def _timed_us(call, repeats: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def synthetic(num_running: int, num_queued: int, calls: int) -> None:
    rng = np.random.default_rng(0)
    now_s = 100.0
    print(
        f"synthetic: 2 workers x {num_running} running decodes (6 TPOT classes) + {num_queued} queued prefills; "
        "microseconds per call, median / P99"
    )
    print(f"{'policy':13s} {'route':>15s} {'select_decodes':>15s} {'prefill cap':>15s} {'sort key':>15s}")
    for name in policy_names():
        print(_row(name, num_running, num_queued, calls, now_s, rng))


def _row(name: str, num_running: int, num_queued: int, calls: int, now_s: float, rng: np.random.Generator) -> str:
    policy, cluster = _cluster(name, num_running, num_queued, now_s, rng)
    requests = [
        Request(
            request_id=f"new{i}",
            arrival_at_s=now_s,
            num_prompt_tokens=int(rng.integers(100, 3000)),
            slo=Slo(ttft_s=float(rng.uniform(1, 10)), tpot_s=float(rng.choice(TPOT_CLASSES_S))),
        )
        for i in range(calls)
    ]
    it = iter(requests)
    route = _timed_us(lambda: policy.route(next(it), cluster), calls)
    worker = next(w for w in cluster.workers if w.role.runs_decodes)
    local = policy.local_scheduler(worker.role)
    cells = [f"{route[0]:7.1f} / {route[1]:5.1f}"]
    if local.selects_decodes:
        select = _timed_us(
            lambda: local.select_decodes(now_s=now_s, decodes=worker.decodes, num_waiting_prefills=1), calls
        )
        cells.append(f"{select[0]:7.1f} / {select[1]:5.1f}")
    else:
        cells.append(f"{'(none)':>15s}")
    if local.caps_prefill_tokens:
        cap = _timed_us(
            lambda: local.prefill_token_cap(now_s=now_s, decodes=worker.decodes, num_prefix_tokens=0), calls
        )
        cells.append(f"{cap[0]:7.1f} / {cap[1]:5.1f}")
    else:
        cells.append(f"{'(none)':>15s}")
    prefill = worker.prefills[0] if worker.prefills else cluster.workers[0].prefills[0]
    key = _timed_us(lambda: local.prefill_sort_key(prefill), calls)
    cells.append(f"{key[0]:7.1f} / {key[1]:5.1f}")
    return f"{name:13s} " + " ".join(f"{c:>15s}" for c in cells)


def dp_in_simulation(rate_per_s: float, num_requests: int) -> None:
    profile = load_profile("a100-llama2-70b-tp4")
    workload = make_workload(
        load_trace("azure-conv-2023"),
        max_model_len=profile.max_model_len,
        num_requests=num_requests,
        rate_per_s=rate_per_s,
    )
    samples_ms: list[float] = []
    candidates: list[int] = []
    states: list[int] = []
    original = slos_serve.plan_admission

    def timed(*args, **kwargs):
        started = time.perf_counter()
        plan = original(*args, **kwargs)
        samples_ms.append((time.perf_counter() - started) * 1e3)
        candidates.append(plan.num_candidates)
        states.append(plan.max_states)
        return plan

    slos_serve.plan_admission = timed
    try:
        result = simulate(
            workload,
            profile,
            "slos-serve",
            cluster=ClusterConfig(num_workers=2),
            slo=SloSpec.make(classes=SLO_CLASS_PRESETS["scorpio6"]),
        )
    finally:
        slos_serve.plan_admission = original
    samples_ms.sort()
    n = len(samples_ms)
    print(
        f"\nSLOs-Serve admission DP in a simulation ({workload.report.describe()}, scorpio6 SLO mix, 2 workers): "
        f"{n} DP calls for {len(result.records)} requests"
    )
    print(
        f"  ms per call: median {statistics.median(samples_ms):.3f}, P90 {samples_ms[int(0.9 * (n - 1))]:.3f}, "
        f"P99 {samples_ms[int(0.99 * (n - 1))]:.3f}, max {samples_ms[-1]:.3f}"
    )
    print(
        f"  requests per plan: median {statistics.median(candidates):.0f}, max {max(candidates)}; "
        f"widest Pareto front: median {statistics.median(states):.0f}, max {max(states)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-running", type=int, default=256)
    parser.add_argument("--num-queued", type=int, default=16)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--dp-rate", type=float, default=3.5, help="req/s of the DP-in-simulation run")
    parser.add_argument("--dp-requests", type=int, default=2000)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    synthetic(args.num_running, args.num_queued, args.calls)
    dp_in_simulation(args.dp_rate, args.dp_requests)


if __name__ == "__main__":
    main()

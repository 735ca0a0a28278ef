"""Decision cost of every registered policy: CPU time per routing call and per engine-step call.

Two measurements, both printed:

1. Synthetic: two workers, each with ``--num-running`` running decodes (six TPOT classes, contexts from 200 to
   4,000 tokens) and ``--num-queued`` queued prefills, on the bundled A100 Llama-2-70B profile. Per policy:
   ``route`` (the router's per-request decision; for SLOs-Serve this runs the admission DP on each worker until
   one admits) and the engine-local calls of one step (``select_decodes``, ``prefill_token_cap``,
   ``prefill_sort_key``). Target (policies issue): under 1 ms per call at 256 running requests.
2. In a simulation: SLOs-Serve's admission DP timed on every call during a run of the Azure conversation trace
   with the ``scorpio6`` SLO mix, at a load where queues build (the paper claims under 10 ms per call).

``--json PATH`` writes both (``schema_version`` 1, with the command line and the parameters); SLOs-Serve's route is
also timed with ``--heavy-queued`` (64) queued prefills per worker, where its DP has the most to plan.
``benchmarks/results/policy-decision-cost.json`` is the committed run that ``scripts/render_results.py`` renders
into docs/evaluation.md.

Usage: python benchmarks/policy_decision_cost.py [--num-running 256] [--num-queued 16] [--calls 2000]
       [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

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


CALLS = ("route", "select_decodes", "prefill_token_cap", "prefill_sort_key")
"""The calls timed per policy; a policy whose engine-local scheduler does not make a call has ``None`` for it."""


def synthetic(num_running: int, num_queued: int, calls: int) -> dict[str, dict[str, dict[str, float] | None]]:
    """Every policy's calls, microseconds (median and P99), printed and returned by policy and call."""
    rng = np.random.default_rng(0)
    now_s = 100.0
    print(
        f"synthetic: 2 workers x {num_running} running decodes (6 TPOT classes) + {num_queued} queued prefills; "
        "microseconds per call, median / P99"
    )
    print(f"{'policy':13s} {'route':>15s} {'select_decodes':>15s} {'prefill cap':>15s} {'sort key':>15s}")
    out = {}
    for name in policy_names():
        out[name] = _timings(name, num_running, num_queued, calls, now_s, rng)
        cells = [
            f"{'(none)':>15s}" if t is None else f"{t['median_us']:7.1f} / {t['p99_us']:5.1f}"
            for t in out[name].values()
        ]
        print(f"{name:13s} " + " ".join(f"{c:>15s}" for c in cells))
    return out


def _timings(
    name: str, num_running: int, num_queued: int, calls: int, now_s: float, rng: np.random.Generator
) -> dict[str, dict[str, float] | None]:
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
    timings: dict[str, tuple[float, float] | None] = dict.fromkeys(CALLS)
    timings["route"] = _timed_us(lambda: policy.route(next(it), cluster), calls)
    worker = next(w for w in cluster.workers if w.role.runs_decodes)
    local = policy.local_scheduler(worker.role)
    if local.selects_decodes:
        timings["select_decodes"] = _timed_us(
            lambda: local.select_decodes(now_s=now_s, decodes=worker.decodes, num_waiting_prefills=1), calls
        )
    if local.caps_prefill_tokens:
        timings["prefill_token_cap"] = _timed_us(
            lambda: local.prefill_token_cap(now_s=now_s, decodes=worker.decodes, num_prefix_tokens=0), calls
        )
    prefill = worker.prefills[0] if worker.prefills else cluster.workers[0].prefills[0]
    timings["prefill_sort_key"] = _timed_us(lambda: local.prefill_sort_key(prefill), calls)
    return {
        call: None if timed is None else {"median_us": timed[0], "p99_us": timed[1]} for call, timed in timings.items()
    }


def dp_in_simulation(rate_per_s: float, num_requests: int) -> dict[str, Any]:
    """SLOs-Serve's admission DP timed on every call of a simulated run: printed, and returned."""
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
    return {
        "trace": "azure-conv-2023",
        "slo_classes": "scorpio6",
        "num_workers": 2,
        "rate_per_s": rate_per_s,
        "num_requests": len(result.records),
        "workload": workload.report.describe(),
        "num_calls": n,
        "median_ms": statistics.median(samples_ms),
        "p90_ms": samples_ms[int(0.9 * (n - 1))],
        "p99_ms": samples_ms[int(0.99 * (n - 1))],
        "max_ms": samples_ms[-1],
        "requests_per_plan_median": statistics.median(candidates),
        "requests_per_plan_max": max(candidates),
        "pareto_states_median": statistics.median(states),
        "pareto_states_max": max(states),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-running", type=int, default=256)
    parser.add_argument("--num-queued", type=int, default=16)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--dp-rate", type=float, default=3.5, help="req/s of the DP-in-simulation run")
    parser.add_argument("--dp-requests", type=int, default=2000)
    parser.add_argument(
        "--heavy-queued", type=int, default=64, help="queued prefills per worker of the second SLOs-Serve route timing"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    started = time.time()
    policies = synthetic(args.num_running, args.num_queued, args.calls)
    heavy = _timings("slos-serve", args.num_running, args.heavy_queued, args.calls, 100.0, np.random.default_rng(0))
    route = heavy["route"]
    assert route is not None
    print(
        f"\nslos-serve route with {args.heavy_queued} queued prefills per worker: "
        f"{route['median_us']:.1f} / {route['p99_us']:.1f} us (median / P99)"
    )
    dp = dp_in_simulation(args.dp_rate, args.dp_requests)
    if args.json:
        data = {
            "schema_version": 1,
            "command": "python benchmarks/policy_decision_cost.py " + " ".join(sys.argv[1:]),
            "machine": f"{os.cpu_count()} cores",
            "profile": "a100-llama2-70b-tp4",
            "num_workers": 2,
            "num_running_per_worker": args.num_running,
            "num_queued_per_worker": args.num_queued,
            "tpot_classes_s": list(TPOT_CLASSES_S),
            "calls_per_timing": args.calls,
            "policies": policies,
            "slos_serve_route_heavy": {"num_queued_per_worker": args.heavy_queued, "route": route},
            "slos_serve_dp_in_simulation": dp,
            "wall_s": round(time.time() - started, 1),
        }
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Compare Tropical with the baselines on the first 2,000 requests of the bundled Azure conversation trace.

Run: python examples/compare_policies.py
"""

from tropical_sched import load_profile, load_trace, make_workload, simulate, summarize

profile = load_profile("a100-llama2-70b-tp4")
workload = make_workload(
    load_trace("azure-conv-2023"), max_model_len=profile.max_model_len, num_requests=2000, rate_per_s=2.5
)
print(workload.report.describe())
for policy in ("tropical", "vllm", "vllm-chunked", "distserve"):
    summary = summarize(simulate(workload, profile, policy).records)
    print(
        f"{policy:13s} SLO attainment {summary.slo_attainment:6.1%}  "
        f"P90 TTFT {summary.ttft_p90_s:5.2f} s  P90 TPOT {summary.tpot_p90_s * 1e3:4.0f} ms"
    )

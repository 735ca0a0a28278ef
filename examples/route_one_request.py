"""Ask the Tropical policy where one request should go, given a snapshot of the cluster.

This is what a router (or an engine adapter) does with the same policy object the simulator drives: it describes
the workers as frozen snapshots and gets back a decision with its reason and predicted figures.

Run: python examples/route_one_request.py
"""

from tropical_sched import (
    ClusterSnapshot,
    DecodeBatch,
    PolicyContext,
    PrefillState,
    Request,
    Slo,
    TropicalPolicy,
    WorkerRole,
    WorkerSnapshot,
    load_profile,
)

profile = load_profile("a100-llama2-70b-tp4")
policy = TropicalPolicy(PolicyContext(step_time=profile.step_time, max_model_len=profile.max_model_len))

now_s = 100.0
# The prefill worker is busy with a 3,000-token prompt (about 0.64 s of work) due at 100.75 s: a shorter prompt
# would run first (shortest remaining prefill first) and make it late.
prefill_worker = WorkerSnapshot(
    worker_id=0,
    role=WorkerRole.PREFILL,
    prefills=(
        PrefillState(request_id="a", arrival_at_s=99.0, num_prompt_tokens=3000, num_computed_tokens=0, ttft_slo_s=1.75),
    ),
    decodes=DecodeBatch(),
    num_kv_tokens_used=3000,
    num_kv_tokens_capacity=profile.num_kv_cache_tokens,
    max_num_seqs=256,
)
# The multiplexing worker runs 24 decodes that have been beating their 100 ms TPOT SLO for a while.
decodes = DecodeBatch(
    request_ids=tuple(f"d{i}" for i in range(24)),
    first_token_at_s=(90.0,) * 24,
    num_generated_tokens=(150,) * 24,  # 150 tokens in 10 s: 67 ms per token, 5 s of TPOT slack each
    tpot_slo_s=(0.1,) * 24,
    num_context_tokens=(1200,) * 24,
)
multiplexing_worker = WorkerSnapshot(
    worker_id=1,
    role=WorkerRole.MULTIPLEXING,
    prefills=(),
    decodes=decodes,
    num_kv_tokens_used=decodes.total_context_tokens,
    num_kv_tokens_capacity=profile.num_kv_cache_tokens,
    max_num_seqs=256,
)
cluster = ClusterSnapshot(now_s=now_s, workers=(prefill_worker, multiplexing_worker))

prompt_tokens = 800
ttft_slo_s = 5 * profile.step_time.prefill_time_s(prompt_tokens)  # the paper's TTFT SLO: 5x isolated prefill
request = Request(
    request_id="new", arrival_at_s=now_s, num_prompt_tokens=prompt_tokens, slo=Slo(ttft_s=ttft_slo_s, tpot_s=0.1)
)
decision = policy.route(request, cluster)
print(f"action: {decision.action.value} on worker {decision.worker_id}")
print(f"reason: {decision.reason}")
for name, value in decision.predicted.items():
    print(f"  {name} = {value:.3f}")

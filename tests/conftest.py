"""Shared builders: every test object starts from sensible defaults and overrides what the test is about."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

from tropical_sched.core import (
    ClusterSnapshot,
    DecodeBatch,
    PrefillState,
    Request,
    Slo,
    WorkerRole,
    WorkerSnapshot,
)
from tropical_sched.predictors.step_time import StepTimeCoefficients, StepTimeModel, ValidRange
from tropical_sched.workloads.workload import ArrivalProcess, Overlength, Workload, WorkloadReport


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip engine-, Ray- and GPU-marked tests where their engine, Ray or GPU is missing."""
    skips = {
        "vllm": importlib.util.find_spec("vllm") is None,
        "sglang": importlib.util.find_spec("sglang") is None,
        "ray": importlib.util.find_spec("ray") is None,
        "gpu": True,
    }
    if importlib.util.find_spec("torch") is not None:
        import torch

        skips["gpu"] = not torch.cuda.is_available()
    for item in items:
        for marker, skip in skips.items():
            if skip and item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs {marker}"))


# A simple, exactly known step-time model: 10 ms per step, 0.1 ms per new token, 1 us per decode context token.
SIMPLE_COEFFICIENTS = StepTimeCoefficients(
    const_s=0.010,
    per_batched_token_s=0.0001,
    per_prefill_seq_s=0.0,
    per_prefill_attention_pair_s=0.0,
    per_decode_seq_s=0.0,
    per_decode_context_token_s=0.000001,
)
WIDE_RANGE = ValidRange(
    max_num_prompt_tokens=1 << 20,
    max_num_batched_tokens=1 << 20,
    max_num_decode_seqs=1 << 20,
    max_decode_context_tokens_per_seq=1 << 20,
)


def make_model(
    coefficients: StepTimeCoefficients = SIMPLE_COEFFICIENTS, valid_range: ValidRange = WIDE_RANGE, name: str = "test"
) -> StepTimeModel:
    """A step-time model with known coefficients and (by default) no range warnings."""
    return StepTimeModel(coefficients, valid_range, name=name)


def make_request(**overrides: Any) -> Request:
    """A request arriving at 0 with a 100-token prompt, TTFT SLO 1 s and TPOT SLO 100 ms."""
    fields: dict[str, Any] = {
        "request_id": "r",
        "arrival_at_s": 0.0,
        "num_prompt_tokens": 100,
        "slo": Slo(ttft_s=1.0, tpot_s=0.1),
    }
    fields.update(overrides)
    return Request(**fields)


def make_prefill(**overrides: Any) -> PrefillState:
    """A queued 100-token prefill that arrived at 0 with a 1 s TTFT SLO."""
    fields: dict[str, Any] = {
        "request_id": "p",
        "arrival_at_s": 0.0,
        "num_prompt_tokens": 100,
        "num_computed_tokens": 0,
        "ttft_slo_s": 1.0,
    }
    fields.update(overrides)
    return PrefillState(**fields)


def make_decodes(
    n: int,
    *,
    first_token_at_s: float = 0.0,
    num_generated_tokens: int = 10,
    tpot_slo_s: float = 0.1,
    num_context_tokens: int = 200,
) -> DecodeBatch:
    """``n`` identical running decodes."""
    return DecodeBatch(
        request_ids=tuple(f"d{i}" for i in range(n)),
        first_token_at_s=(first_token_at_s,) * n,
        num_generated_tokens=(num_generated_tokens,) * n,
        tpot_slo_s=(tpot_slo_s,) * n,
        num_context_tokens=(num_context_tokens,) * n,
    )


def make_worker(worker_id: int = 0, role: WorkerRole = WorkerRole.PREFILL, **overrides: Any) -> WorkerSnapshot:
    """An idle worker with a 100k-token KV cache."""
    fields: dict[str, Any] = {
        "worker_id": worker_id,
        "role": role,
        "prefills": (),
        "decodes": DecodeBatch(),
        "num_kv_tokens_used": 0,
        "num_kv_tokens_capacity": 100_000,
        "max_num_seqs": 256,
    }
    fields.update(overrides)
    return WorkerSnapshot(**fields)


def make_cluster(*workers: WorkerSnapshot, now_s: float = 0.0) -> ClusterSnapshot:
    """A cluster of the given workers."""
    return ClusterSnapshot(now_s=now_s, workers=tuple(workers))


def make_workload(arrival_at_s: list[float], num_prompt_tokens: list[int], num_output_tokens: list[int]) -> Workload:
    """A workload from explicit columns."""
    n = len(arrival_at_s)
    return Workload(
        arrival_at_s=np.asarray(arrival_at_s, dtype=float),
        num_prompt_tokens=np.asarray(num_prompt_tokens, dtype=np.int64),
        num_output_tokens=np.asarray(num_output_tokens, dtype=np.int64),
        report=WorkloadReport(
            trace="test",
            num_requests=n,
            num_filtered=0,
            num_prompts_clipped=0,
            num_outputs_clipped=0,
            max_model_len=1 << 20,
            overlength=Overlength.FILTER,
            arrival_process=ArrivalProcess.TRACE,
            rate_per_s=1.0,
        ),
    )

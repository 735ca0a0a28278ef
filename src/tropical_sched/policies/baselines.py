"""Baseline policies: colocated vLLM (with and without chunked prefill) and disaggregated DistServe.

Load balancing across workers for every baseline: the worker with the fewest executing tokens (outstanding prompt
tokens plus decode context), as in the Tropical paper's evaluation (design doc section 8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tropical_sched.core.decisions import DecodePlacement, RouteAction, RouteDecision
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Request
from tropical_sched.core.snapshot import ClusterSnapshot, WorkerRole, WorkerSnapshot
from tropical_sched.policies.base import EngineSettings, LocalScheduler, PolicyContext
from tropical_sched.policies.local import FcfsScheduler

__all__ = ["ColocatedBase", "ColocatedConfig", "ColocatedPolicy", "DistServeConfig", "DistServePolicy", "least_loaded"]


def least_loaded(workers: Iterable[WorkerSnapshot]) -> WorkerSnapshot | None:
    """The worker with the fewest executing tokens (ties: lowest ``worker_id``), or ``None`` if there is none."""
    return min(workers, key=lambda w: (w.num_executing_tokens, w.worker_id), default=None)


class _NoFeedback:
    """Mix-in for policies that ignore attainment feedback."""

    def on_first_token(self, request: Request, ttft_s: float, now_s: float) -> None:
        """Ignored."""

    def on_finished(self, request: Request, tpot_s: float, now_s: float) -> None:
        """Ignored."""

    def waiting_sort_key(self, request: Request) -> float:
        """FCFS."""
        return request.arrival_at_s


@dataclass(frozen=True, slots=True, kw_only=True)
class ColocatedConfig:
    """Settings of the colocated baselines.

    Attributes:
        max_num_batched_tokens: token budget per step. ``None``: vLLM's defaults, ``max(max_model_len, 2048)``
            without chunked prefill (vLLM 0.5) and 512 with it (Sarathi-Serve's strict budget, vLLM 0.5's
            chunked default).
    """

    max_num_batched_tokens: int | None = None


class ColocatedBase(_NoFeedback):
    """What every colocated policy shares: all workers colocated, every request decodes where it prefilled.

    Subclasses set ``name`` and ``_settings`` and implement ``local_scheduler``; ``route`` defaults to the
    least loaded colocated worker.
    """

    name: str
    _settings: EngineSettings

    def worker_roles(self, num_workers: int, num_prefill_workers: int | None) -> tuple[WorkerRole, ...]:
        """All workers colocated."""
        if num_prefill_workers:
            raise ConfigError(f"{self.name} is colocated: prefill workers ({num_prefill_workers}) do not apply")
        return (WorkerRole.COLOCATED,) * num_workers

    def engine_settings(self, role: WorkerRole) -> EngineSettings:
        """The same settings on every worker."""
        return self._settings

    def route(self, request: Request, cluster: ClusterSnapshot) -> RouteDecision:
        """The colocated worker with the fewest executing tokens."""
        worker = least_loaded(cluster.with_role(WorkerRole.COLOCATED))
        if worker is None:
            return RouteDecision(action=RouteAction.WAIT, worker_id=None, reason="no colocated worker available")
        return RouteDecision(
            action=RouteAction.COLOCATED,
            worker_id=worker.worker_id,
            reason="fewest executing tokens",
            predicted={"num_executing_tokens": float(worker.num_executing_tokens)},
        )

    def place_decode(self, request: Request, cluster: ClusterSnapshot) -> DecodePlacement:
        """Colocated requests decode where they prefilled; nothing to place."""
        raise ConfigError(f"{self.name} never prefills remotely, so it has no decodes to place")


class ColocatedPolicy(ColocatedBase):
    """Colocated serving: every worker prefills and decodes its own requests.

    ``vllm``: prefill-prioritised FCFS without chunking: a step runs waiting prefills whole (stalling the
    decodes) whenever any can be admitted, else a decode step (vLLM 0.5's default scheduler).
    ``vllm-chunked``: Sarathi-Serve's stall-free batching: running decodes first, then prefill chunks in what is
    left of the token budget.

    Args:
        context: predictor and model limits.
        chunked: use chunked prefill (``vllm-chunked``).
        config: settings.
    """

    def __init__(self, context: PolicyContext, *, chunked: bool, config: ColocatedConfig | None = None) -> None:
        self.name = "vllm-chunked" if chunked else "vllm"
        self._config = config or ColocatedConfig()
        default_budget = 512 if chunked else max(context.max_model_len, 2048)
        budget = self._config.max_num_batched_tokens or default_budget
        if not chunked and budget < context.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens={budget} is below max_model_len={context.max_model_len}; without chunked "
                "prefill every prompt must fit one step"
            )
        self._settings = EngineSettings(enable_chunked_prefill=chunked, max_num_batched_tokens=budget)
        self._local = FcfsScheduler()

    def local_scheduler(self, role: WorkerRole) -> LocalScheduler:
        """FCFS."""
        return self._local


@dataclass(frozen=True, slots=True, kw_only=True)
class DistServeConfig:
    """Settings of the DistServe baseline.

    Attributes:
        max_num_batched_tokens: prefill batching limit per step, tokens (DistServe batches FCFS prefills up to a
            saturation length; its simulator's default limit). ``None``: ``max(max_model_len, 4096)``.
    """

    max_num_batched_tokens: int | None = None


class DistServePolicy(_NoFeedback):
    """Disaggregated serving (DistServe, OSDI'24): a prefill pool and a decode pool with KV-cache transfer.

    Prefill workers batch waiting prefills FCFS up to the token budget; decode workers run continuous batching.
    Both pools balance by fewest executing tokens. Default split: half the workers prefill (at least one each).

    Args:
        context: predictor and model limits.
        config: settings.
    """

    name = "distserve"

    def __init__(self, context: PolicyContext, config: DistServeConfig | None = None) -> None:
        self._config = config or DistServeConfig()
        budget = self._config.max_num_batched_tokens or max(context.max_model_len, 4096)
        self._prefill_settings = EngineSettings(enable_chunked_prefill=False, max_num_batched_tokens=budget)
        self._decode_settings = EngineSettings(enable_chunked_prefill=True, max_num_batched_tokens=budget)
        self._local = FcfsScheduler()

    def worker_roles(self, num_workers: int, num_prefill_workers: int | None) -> tuple[WorkerRole, ...]:
        """``num_prefill_workers`` prefill workers (default half), the rest decode workers."""
        num_prefill = num_workers // 2 if num_prefill_workers is None else num_prefill_workers
        if num_workers < 2 or not 1 <= num_prefill <= num_workers - 1:
            raise ConfigError(
                f"distserve needs at least one prefill and one decode worker; got workers={num_workers}, "
                f"prefill_workers={num_prefill}"
            )
        return (WorkerRole.PREFILL,) * num_prefill + (WorkerRole.DECODE,) * (num_workers - num_prefill)

    def engine_settings(self, role: WorkerRole) -> EngineSettings:
        """Whole-prompt FCFS batching on prefill workers; decode workers only recompute preempted requests."""
        return self._prefill_settings if role is WorkerRole.PREFILL else self._decode_settings

    def local_scheduler(self, role: WorkerRole) -> LocalScheduler:
        """FCFS."""
        return self._local

    def route(self, request: Request, cluster: ClusterSnapshot) -> RouteDecision:
        """The prefill worker with the fewest executing tokens."""
        worker = least_loaded(cluster.with_role(WorkerRole.PREFILL))
        if worker is None:
            return RouteDecision(action=RouteAction.WAIT, worker_id=None, reason="no prefill worker available")
        return RouteDecision(
            action=RouteAction.PREFILL,
            worker_id=worker.worker_id,
            reason="fewest executing tokens",
            predicted={"num_executing_tokens": float(worker.num_executing_tokens)},
        )

    def place_decode(self, request: Request, cluster: ClusterSnapshot) -> DecodePlacement:
        """The decode worker with the fewest executing tokens that has a free sequence slot and KV room."""
        needed = request.num_prompt_tokens + 1
        fits = [
            w
            for w in cluster.with_role(WorkerRole.DECODE)
            if len(w.decodes) < w.max_num_seqs and w.num_free_kv_tokens >= needed
        ]
        worker = least_loaded(fits)
        if worker is None:
            return DecodePlacement(worker_id=None, reason="no decode worker has a free slot and KV room")
        return DecodePlacement(
            worker_id=worker.worker_id,
            reason="fewest executing tokens",
            predicted={"num_executing_tokens": float(worker.num_executing_tokens)},
        )

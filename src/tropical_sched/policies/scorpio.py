"""SCORPIO (Tang et al., "Serving the Right Requests at the Right Time for Heterogeneous SLOs in LLM Inference",
arXiv 2505.23022): colocated serving that exploits heterogeneous per-request SLOs.

* **TTFT guard** (section 4.2): the waiting queue is ordered least-deadline-first (TTFT deadline), and a request
  is rejected when its remaining TTFT budget is below the predicted prefill time of everything ahead of it in
  that order plus its own, plus a margin (50 ms).
* **TPOT guard** (section 4.3): every running request has a TPOT ratio ``min TPOT SLO of the batch / own TPOT
  SLO`` in (0, 1]. *Credit-based batching*: each step a request earns its ratio in credit and runs when its
  credit reaches 1, so a request with a 2x looser TPOT SLO runs every other step. *Admission by virtual batch
  size* (VBS, the sum of the ratios): a request joins the running batch only while the predicted TPOT at the
  VBS stays under 0.99 x the tightest TPOT SLO; otherwise it waits (and the TTFT guard rejects it once it can no
  longer make its deadline).

Here the admission and the rejection run at the router (one decision per request, checked again while it
waits), the LDF order and the credits inside each engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from tropical_sched.core.decisions import RouteAction, RouteDecision
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Request
from tropical_sched.core.slack import QueueFinish, predicted_queue_finish
from tropical_sched.core.snapshot import ClusterSnapshot, DecodeBatch, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.policies.base import EngineSettings, LocalScheduler, PolicyContext
from tropical_sched.policies.baselines import ColocatedBase
from tropical_sched.predictors.step_time import StepTimeModel

__all__ = ["CreditBatchingScheduler", "ScorpioConfig", "ScorpioPolicy", "virtual_batch_size"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScorpioConfig:
    """SCORPIO's settings.

    Attributes:
        max_num_batched_tokens: token budget of one step (chunked prefill), >= 1.
        ttft_margin_s: margin of the TTFT guard, seconds, >= 0 (paper: 50 ms).
        tpot_admission_fraction: admit while the predicted TPOT at the virtual batch size is at most this
            fraction of the tightest TPOT SLO, in (0, 1] (paper: 0.99).
        reject_unattainable: reject requests the TTFT guard finds unattainable (``False``: they wait and run
            late, which shows what the rejection is worth).
        credit_batching: run decodes by credits (``False``: every decode in every step, as vLLM does).
    """

    max_num_batched_tokens: int = 2048
    ttft_margin_s: float = 0.05
    tpot_admission_fraction: float = 0.99
    reject_unattainable: bool = True
    credit_batching: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"scorpio max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens!r}")
        if not (math.isfinite(self.ttft_margin_s) and self.ttft_margin_s >= 0):
            raise ConfigError(f"scorpio ttft_margin_s must be >= 0 seconds, got {self.ttft_margin_s!r}")
        if not 0 < self.tpot_admission_fraction <= 1:
            raise ConfigError(
                f"scorpio tpot_admission_fraction must be in (0, 1], got {self.tpot_admission_fraction!r}"
            )


def virtual_batch_size(tpot_slos_s: Sequence[float]) -> float:
    """SCORPIO's virtual batch size: ``sum_i min_j(tpot_j) / tpot_i`` (arXiv 2505.23022, section 4.3), the number
    of decodes an average step carries under credit-based batching; 0 for an empty batch."""
    if not tpot_slos_s:
        return 0.0
    tightest = min(tpot_slos_s)
    return sum(tightest / t for t in tpot_slos_s)


class CreditBatchingScheduler:
    """SCORPIO's engine-local half: least-deadline-first prefills, credit-based decode batching.

    Each step every running decode earns ``min TPOT SLO of the batch / own TPOT SLO`` in credit and runs when its
    credit is at least 1 (spending 1). A new decode starts with enough credit to run at once. Keeps the credits
    of one worker's decodes: use one instance per worker.

    Args:
        credit_batching: ``False`` runs every decode in every step.
    """

    caps_prefill_tokens: ClassVar[bool] = False

    def __init__(self, *, credit_batching: bool = True) -> None:
        self.selects_decodes = credit_batching
        self._credits: dict[str, float] = {}

    def prefill_sort_key(self, prefill: PrefillState) -> float:
        """TTFT deadline: least deadline first."""
        return prefill.ttft_deadline_at_s

    def prefill_token_cap(
        self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int, prefill: PrefillState | None = None
    ) -> int | None:
        """No cap."""
        return None

    def with_step_time(self, step_time: StepTimeModel) -> CreditBatchingScheduler:
        """Itself (with its credits): it predicts nothing."""
        return self

    def select_decodes(self, *, now_s: float, decodes: DecodeBatch, num_waiting_prefills: int) -> Sequence[bool]:
        """Credit-based batching: which decodes run this step."""
        slos = decodes.tpot_slo_s
        if not slos:
            return []
        tightest = min(slos)
        if tightest == max(slos):  # one TPOT class: everyone runs every step
            self._credits = {}
            return [True] * len(slos)
        old = self._credits
        credits: dict[str, float] = {}
        flags = []
        for request_id, tpot_s in zip(decodes.request_ids, slos, strict=True):
            credit = old.get(request_id, 1.0 - tightest / tpot_s) + tightest / tpot_s
            runs = credit >= 1.0 - 1e-9
            credits[request_id] = credit - 1.0 if runs else credit
            flags.append(runs)
        self._credits = credits
        return flags


def _deadline_key(prefill: PrefillState) -> float:
    return prefill.ttft_deadline_at_s


class ScorpioPolicy(ColocatedBase):
    """SCORPIO as a cluster policy: colocated workers, TTFT guard and VBS admission at the router.

    Among the workers whose TTFT guard and TPOT guard both admit the request, the one with the fewest executing
    tokens takes it. If none can meet the request's TTFT deadline it is rejected; if some could but every such
    worker's TPOT guard refuses, it waits at the router (retried as decodes finish, in deadline order).

    Args:
        context: predictor and model limits.
        config: settings.
    """

    name = "scorpio"

    def __init__(self, context: PolicyContext, config: ScorpioConfig | None = None) -> None:
        self.config = config or ScorpioConfig()
        self._step_time: StepTimeModel = context.step_time
        self._settings = EngineSettings(
            enable_chunked_prefill=True, max_num_batched_tokens=self.config.max_num_batched_tokens
        )

    def local_scheduler(self, role: WorkerRole) -> LocalScheduler:
        """A fresh credit-batching scheduler (it keeps per-worker credits)."""
        return CreditBatchingScheduler(credit_batching=self.config.credit_batching)

    def waiting_sort_key(self, request: Request) -> float:
        """Least deadline first."""
        return request.ttft_deadline_at_s

    def _model(self, worker: WorkerSnapshot) -> StepTimeModel:
        """The worker's calibrated step-time model, else the policy's own."""
        return worker.step_time if worker.step_time is not None else self._step_time

    def predicted_first_token(self, worker: WorkerSnapshot, new: PrefillState, now_s: float) -> QueueFinish:
        """The TTFT guard's prediction (section 4.2): the prefills ahead of ``new`` in deadline order (those in
        the step in flight first: the engine finishes a started prefill), then its own, each run whole, plus the
        guard's margin (``after_prefill_s``)."""
        return predicted_queue_finish(
            worker.prefills,
            new,
            now_s,
            self._model(worker),
            sort_key=_deadline_key,
            busy_until_s=worker.busy_until_s,
            in_flight_first=True,
            after_prefill_s=self.config.ttft_margin_s,
        )

    def ttft_guard_budget_s(self, worker: WorkerSnapshot, new: PrefillState, now_s: float) -> float:
        """TTFT budget left to ``new`` on ``worker`` after the predicted prefill of everything ahead of it in
        deadline order and its own, less the margin, seconds (negative: the guard rejects it there)."""
        return new.ttft_deadline_at_s - self.predicted_first_token(worker, new, now_s).finish_at_s

    def predicted_tpot_s(
        self, worker: WorkerSnapshot, new_tpot_slo_s: float, new_context_tokens: int
    ) -> tuple[float, float]:
        """``(predicted TPOT at the virtual batch size, tightest TPOT SLO)`` of ``worker``'s batch with the new
        request and the prefills already admitted there (section 4.3), seconds."""
        decodes = worker.decodes
        slos = list(decodes.tpot_slo_s)
        context = decodes.total_context_tokens + new_context_tokens
        for prefill in worker.prefills:
            slos.append(prefill.tpot_slo_s if prefill.tpot_slo_s is not None else new_tpot_slo_s)
            context += prefill.num_prompt_tokens
        slos.append(new_tpot_slo_s)
        vbs = virtual_batch_size(slos)
        num_seqs = max(1, math.ceil(vbs - 1e-9))
        mean_context = context / len(slos)
        return self._model(worker).decode_step_time_s(num_seqs, int(mean_context * num_seqs)), min(slos)

    def route(self, request: Request, cluster: ClusterSnapshot) -> RouteDecision:
        """TTFT guard, then TPOT guard, on every colocated worker; the least loaded admitting worker wins."""
        workers = cluster.with_role(WorkerRole.COLOCATED)
        if not workers:
            return RouteDecision(action=RouteAction.WAIT, worker_id=None, reason="no colocated worker available")
        new = PrefillState.from_request(request)
        fraction = self.config.tpot_admission_fraction
        best: WorkerSnapshot | None = None
        best_budget_s = -math.inf
        ttft_ok = False
        for worker in workers:
            budget_s = self.ttft_guard_budget_s(worker, new, cluster.now_s)
            best_budget_s = max(best_budget_s, budget_s)
            if budget_s < 0 and self.config.reject_unattainable:
                continue
            ttft_ok = True
            if len(worker.decodes) + len(worker.prefills) >= worker.max_num_seqs:
                continue
            tpot_s, tightest_s = self.predicted_tpot_s(worker, request.slo.tpot_s, request.num_prompt_tokens)
            # An idle worker admits it whatever the prediction: with nothing there to finish, the prediction can
            # never improve, and waiting for it would leave the request waiting forever.
            if tpot_s > fraction * tightest_s and (worker.decodes or worker.prefills):
                continue
            if best is None or (worker.num_executing_tokens, worker.worker_id) < (
                best.num_executing_tokens,
                best.worker_id,
            ):
                best = worker
        if best is not None:
            return RouteDecision(
                action=RouteAction.COLOCATED,
                worker_id=best.worker_id,
                reason="TTFT and TPOT guards admit it; fewest executing tokens",
                predicted={"ttft_budget_left_s": best_budget_s},
            )
        if not ttft_ok and self.config.reject_unattainable:
            return RouteDecision(
                action=RouteAction.REJECT,
                worker_id=None,
                reason="TTFT guard: the predicted prefill ahead of it exceeds its remaining TTFT budget",
                predicted={"ttft_budget_left_s": best_budget_s},
            )
        return RouteDecision(
            action=RouteAction.WAIT,
            worker_id=None,
            reason="TPOT guard: the predicted TPOT at the virtual batch size exceeds the tightest SLO",
        )

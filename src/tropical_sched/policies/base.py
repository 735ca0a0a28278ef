"""What a scheduling policy is: the interfaces that the simulator, the router and the engine adapters call.

A policy has two halves, both engine-agnostic and both fed frozen snapshots:

* the **cluster half** (:class:`Policy`) decides, per request, where its prefill runs (:meth:`Policy.route`)
  and, after a remote prefill, where it decodes (:meth:`Policy.place_decode`); it hears about first tokens and
  finished requests (attainment feedback);
* the **engine-local half** (:class:`LocalScheduler`, one per worker role) orders a worker's waiting prefills
  and caps the prefill tokens of each step. It is what runs inside vLLM's or SGLang's scheduler.

The engine mechanics (continuous batching, chunked prefill, preemption) belong to the engine, or to the simulator
standing in for it; a policy only chooses their settings per role (:class:`EngineSettings`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tropical_sched.core.decisions import DecodePlacement, RouteDecision
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Request
from tropical_sched.core.slack import QueueFinish
from tropical_sched.core.snapshot import ClusterSnapshot, DecodeBatch, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.predictors.output_length import LengthSamples
from tropical_sched.predictors.step_time import StepTimeModel

__all__ = ["EngineSettings", "FirstTokenPredictor", "LocalScheduler", "Policy", "PolicyContext"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSettings:
    """Engine configuration a policy asks for on workers of one role.

    Attributes:
        enable_chunked_prefill: ``True``: every step runs the decodes first, then prefill chunks within the token
            budget (Sarathi-Serve stall-free batching, vLLM v1). ``False``: a step runs either whole prefills
            (with priority) or decodes, never both (vLLM v0's default).
        max_num_batched_tokens: token budget of one step (vLLM ``--max-num-batched-tokens``), >= 1.
        max_num_prefill_seqs: most prefills in one step, or ``None`` for no limit.
    """

    enable_chunked_prefill: bool
    max_num_batched_tokens: int
    max_num_prefill_seqs: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens!r}")
        if self.max_num_prefill_seqs is not None and self.max_num_prefill_seqs < 1:
            raise ConfigError(f"max_num_prefill_seqs must be >= 1 or None, got {self.max_num_prefill_seqs!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyContext:
    """What every policy is built with.

    Attributes:
        step_time: the latency predictor of the (homogeneous) workers.
        max_model_len: the model's context, tokens.
        length_samples: prompt and output lengths of the workload's trace, for policies that fit an output-length
            predictor from them (Tempo); ``None`` when unknown (such a policy then needs its own source).
    """

    step_time: StepTimeModel
    max_model_len: int
    length_samples: LengthSamples | None = None


@runtime_checkable
class LocalScheduler(Protocol):
    """The engine-local half of a policy, for workers of one role.

    Callers (a simulated worker, the vLLM scheduler adapter, the SGLang plug-in) call it from their step loop.
    Implementations must be cheap: ``prefill_token_cap`` runs once per engine step that has waiting prefills
    next to running decodes, ``select_decodes`` once per decode step when ``selects_decodes``. A prefill's sort
    key is evaluated when it joins the queue and again whenever its computed tokens change (as an engine's
    priority queue does), not at every step.

    A local scheduler may keep per-request state (such as SCORPIO's batching credits); callers ask the policy
    for one local scheduler per worker.
    """

    @property
    def caps_prefill_tokens(self) -> bool:
        """``False`` promises that ``prefill_token_cap`` always returns ``None``, so callers may skip building
        its arguments."""
        ...

    def prefill_sort_key(self, prefill: PrefillState) -> float:
        """Order of waiting prefills: lower runs first (ties keep arrival order)."""
        ...

    def prefill_token_cap(
        self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int, prefill: PrefillState | None = None
    ) -> int | None:
        """Most prefill tokens this step may add next to ``decodes``; ``None`` for no cap beyond the budget.

        Args:
            now_s: the step's start, seconds.
            decodes: the decodes running in this step.
            num_prefix_tokens: tokens already prefilled of the first prefill in line.
            prefill: that prefill, when the caller knows it (its arrival, length and TTFT SLO), for schedulers
                that size the chunk by its deadline; ``None`` otherwise.
        """
        ...

    @property
    def selects_decodes(self) -> bool:
        """``False`` promises that every running decode runs in every step (continuous batching as engines
        ship it), so callers may skip ``select_decodes``."""
        ...

    def select_decodes(self, *, now_s: float, decodes: DecodeBatch, num_waiting_prefills: int) -> Sequence[bool]:
        """Which running decodes get a token in this step (SCORPIO's credit-based batching, Tempo's
        just-enough bandwidth); the others sit the step out and keep their KV cache.

        Args:
            now_s: the step's start, seconds.
            decodes: the running decodes, shape (B,).
            num_waiting_prefills: prefills queued on the worker.

        Returns:
            One flag per decode, in ``decodes`` order, shape (B,).
        """
        ...

    def with_step_time(self, step_time: StepTimeModel) -> LocalScheduler:
        """This scheduler predicting with ``step_time`` (an engine's calibrated model) from now on.

        Returns a scheduler that keeps this one's per-request state (or this one, if it predicts nothing); the
        original is left as it was, since a policy may share it between workers.
        """
        ...


@runtime_checkable
class Policy(Protocol):
    """The cluster half of a scheduling policy.

    Contract: ``route`` and ``place_decode`` are pure functions of their arguments and of the policy's own state
    (such as a toggle), return promptly, and never mutate the snapshot. The feedback methods may change that
    state.
    """

    name: str

    def worker_roles(self, num_workers: int, num_prefill_workers: int | None) -> tuple[WorkerRole, ...]:
        """The role of each worker.

        Args:
            num_workers: workers in the cluster, >= 1.
            num_prefill_workers: how many should be prefill workers, or ``None`` for the policy's default.

        Raises:
            ConfigError: the policy cannot run with this split.
        """
        ...

    def engine_settings(self, role: WorkerRole) -> EngineSettings:
        """Engine settings for workers of ``role``."""
        ...

    def local_scheduler(self, role: WorkerRole) -> LocalScheduler:
        """The engine-local scheduler for workers of ``role``."""
        ...

    def waiting_sort_key(self, request: Request) -> float:
        """Order in which requests waiting at the router are retried: lower first (the
        :class:`~tropical_sched.policies.Dispatcher` retries those past their TTFT deadline after the others)."""
        ...

    def route(self, request: Request, cluster: ClusterSnapshot) -> RouteDecision:
        """Where ``request``'s prefill runs (or wait, or reject)."""
        ...

    def place_decode(self, request: Request, cluster: ClusterSnapshot) -> DecodePlacement:
        """Where ``request`` decodes after its prefill finished on a prefill worker (``None``: not yet)."""
        ...

    def on_first_token(self, request: Request, ttft_s: float, now_s: float) -> None:
        """Feedback: ``request`` produced its first token after ``ttft_s`` (``inf`` if it was rejected)."""
        ...

    def on_finished(self, request: Request, tpot_s: float, now_s: float) -> None:
        """Feedback: ``request`` finished with mean TPOT ``tpot_s`` (``inf`` if it was rejected)."""
        ...


@runtime_checkable
class FirstTokenPredictor(Protocol):
    """A policy whose routing rule predicts when a prefill queued on a worker produces its first token.

    The router asks it through :meth:`Policy.route`; an engine-side adapter asks it directly, with a snapshot of
    its own engine, to reject a request the same rule finds unattainable (``reject_unattainable``), so the two
    agree. Policies without a rule of their own are predicted by
    :func:`~tropical_sched.core.slack.predicted_queue_finish` in their local scheduler's order.
    """

    def predicted_first_token(self, worker: WorkerSnapshot, new: PrefillState, now_s: float) -> QueueFinish:
        """When ``new`` would produce its first token if queued on ``worker`` now, by this policy's rule.

        Args:
            worker: the worker; its ``step_time`` (when set) is the model to predict with.
            new: the prefill.
            now_s: the current time, seconds.
        """
        ...

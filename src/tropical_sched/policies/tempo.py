"""Tempo (Liu et al., "Tempo: Application-aware LLM Serving with Mixed SLO Requirements", arXiv 2504.20068):
maximise *service gain*, the useful service delivered, where finishing faster than the SLO earns nothing extra.

* **Service gain** (section 3): a latency-sensitive request yields gain 1 when it meets its SLOs and nothing when
  it cannot any more; so a request whose TTFT deadline is already out of reach drops to the back.
* **Upper-bound output length** (section 4.1): a high quantile (0.95) of the output-length distribution, here
  fitted from the trace's own lengths per prompt-length bucket and refined as tokens come out
  (:class:`~tropical_sched.predictors.output_length.OutputLengthBound`).
* **Gain density** (section 4.2): priority = expected gain / remaining service time, where the service time is
  the remaining prefill plus the GPU time of the bounded decode (each output token's marginal share of a step).
* **Just enough bandwidth** (section 4.3): a decode that is ahead of its TPOT SLO by at least ``pacing_lead``
  tokens' worth sits a step out while prefills wait, so the step's residual capacity goes to the prefills with
  the highest gain density (the step's token budget is not otherwise capped: Tempo trades a decode's pace for
  gain, it does not protect every decode at any price).

Tempo's collective (DAG) requests and throughput-intensive deadlines are outside this library's request model;
every request here is latency-sensitive with TTFT and TPOT SLOs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.snapshot import DecodeBatch, PrefillState, WorkerRole
from tropical_sched.policies.base import EngineSettings, LocalScheduler, PolicyContext
from tropical_sched.policies.baselines import ColocatedBase
from tropical_sched.predictors.output_length import LengthSamples, OutputLengthBound
from tropical_sched.predictors.step_time import StepTimeModel
from tropical_sched.workloads.traces import load_trace

__all__ = ["GainDensityScheduler", "TempoConfig", "TempoPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TempoConfig:
    """Tempo's settings.

    Attributes:
        max_num_batched_tokens: token budget of one step, >= 1.
        output_length_quantile: quantile of the output-length upper bound, in (0, 1) (paper: 0.95).
        length_trace: bundled trace name or file to fit the bound from; ``None`` fits it from the workload's
            lengths (the simulator passes them; the router and engine adapters need this option).
        pacing: let decodes that are ahead of their TPOT SLO sit a step out while prefills wait.
        pacing_lead: tokens' worth of TPOT SLO a decode must be ahead by to sit out a step, >= 1.
    """

    max_num_batched_tokens: int = 2048
    output_length_quantile: float = 0.95
    length_trace: str | None = None
    pacing: bool = True
    pacing_lead: float = 2.0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"tempo max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens!r}")
        if not 0 < self.output_length_quantile < 1:
            raise ConfigError(f"tempo output_length_quantile must be in (0, 1), got {self.output_length_quantile!r}")
        if not self.pacing_lead >= 1:
            raise ConfigError(f"tempo pacing_lead must be >= 1, got {self.pacing_lead!r}")


@dataclass(slots=True)
class GainDensityScheduler:
    """Tempo's engine-local half: prefills by gain density, decode pacing.

    Attributes:
        step_time: the latency predictor.
        bound: the output-length upper bound.
        pacing: whether decodes ahead of their SLO may sit a step out.
        pacing_lead: how far ahead (in TPOT SLOs) a decode must be to sit out.
    """

    step_time: StepTimeModel
    bound: OutputLengthBound
    pacing: bool = True
    pacing_lead: float = 2.0
    caps_prefill_tokens: ClassVar[bool] = False
    _per_token_s: float = field(init=False, default=0.0)
    _per_context_token_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        c = self.step_time.coefficients.as_tuple()
        self._per_token_s = c[1] + c[4]  # a decode's marginal share of a step, before its context
        self._per_context_token_s = c[5]

    @property
    def selects_decodes(self) -> bool:
        """With pacing on."""
        return self.pacing

    def service_time_s(self, prefill: PrefillState) -> float:
        """Remaining GPU time of a request: its remaining prefill and its bounded decode's share of steps,
        seconds."""
        prefill_s = self.step_time.remaining_prefill_time_s(prefill.num_prompt_tokens, prefill.num_computed_tokens)
        num_output = self.bound.upper_bound(prefill.num_prompt_tokens)
        mean_context = prefill.num_prompt_tokens + num_output / 2
        return prefill_s + num_output * (self._per_token_s + self._per_context_token_s * mean_context)

    def prefill_sort_key(self, prefill: PrefillState) -> float:
        """Negative gain density (higher density first); requests whose TTFT SLO is below their own isolated
        remaining prefill have no gain left and go last (key >= 0)."""
        remaining_s = self.step_time.remaining_prefill_time_s(prefill.num_prompt_tokens, prefill.num_computed_tokens)
        service_s = self.service_time_s(prefill)
        if remaining_s > prefill.ttft_slo_s:
            return service_s  # no gain: shortest service first among the lost
        return -1.0 / service_s

    def prefill_token_cap(
        self, *, now_s: float, decodes: DecodeBatch, num_prefix_tokens: int, prefill: PrefillState | None = None
    ) -> int | None:
        """No cap beyond the step's token budget."""
        return None

    def with_step_time(self, step_time: StepTimeModel) -> GainDensityScheduler:
        """The same scheduler pricing service time with ``step_time``."""
        return replace(self, step_time=step_time)

    def select_decodes(self, *, now_s: float, decodes: DecodeBatch, num_waiting_prefills: int) -> Sequence[bool]:
        """While prefills wait, a decode ahead of its TPOT SLO by ``pacing_lead`` SLOs sits this step out."""
        if not num_waiting_prefills:
            return [True] * len(decodes)
        lead = self.pacing_lead
        return [
            first + slo * max(n, 1) - now_s < lead * slo
            for first, n, slo in zip(
                decodes.first_token_at_s, decodes.num_generated_tokens, decodes.tpot_slo_s, strict=True
            )
        ]


class TempoPolicy(ColocatedBase):
    """Tempo as a cluster policy: colocated workers, least-loaded routing (the inherited ``route``), gain-density
    scheduling inside.

    Args:
        context: predictor and model limits (its ``length_samples`` fit the output-length bound unless
            ``config.length_trace`` names a trace).
        config: settings.

    Raises:
        ConfigError: there are no lengths to fit the bound from.
    """

    name = "tempo"

    def __init__(self, context: PolicyContext, config: TempoConfig | None = None) -> None:
        self.config = config or TempoConfig()
        samples = context.length_samples
        if self.config.length_trace is not None:
            trace = load_trace(self.config.length_trace)
            samples = LengthSamples(trace.num_prompt_tokens.tolist(), trace.num_output_tokens.tolist())
        if samples is None:
            raise ConfigError(
                "tempo needs output lengths to fit its upper bound: set its option length_trace (a bundled trace "
                "name or file)"
            )
        self.bound = OutputLengthBound(samples, quantile=self.config.output_length_quantile)
        self._step_time = context.step_time
        self._settings = EngineSettings(
            enable_chunked_prefill=True, max_num_batched_tokens=self.config.max_num_batched_tokens
        )
        self._local = GainDensityScheduler(
            self._step_time,
            self.bound,
            pacing=self.config.pacing,
            pacing_lead=self.config.pacing_lead,
        )

    def local_scheduler(self, role: WorkerRole) -> LocalScheduler:
        """Gain density and decode pacing (stateless: shared)."""
        return self._local

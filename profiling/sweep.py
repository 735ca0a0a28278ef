"""The profiling sweep, independent of the engine: which batches to run, what each engine step was, and the
profile file built from the measured steps.

An engine is profiled by running *scenarios* (a few requests with chosen prompt and output lengths, sometimes a
per-step token cap) and timing every engine step it takes. Each step's composition (prefill chunks with their
prefix positions, decodes with their context lengths) is read from the engine's own scheduler output, so every
step is a labelled sample for the step-time model (:mod:`tropical_sched.predictors.step_time`), whichever scenario
produced it. The scenarios only make sure that the samples cover what the schedulers predict:

* ``prefill``: one prompt alone, whole (batch size 1), over a log grid of prompt lengths: ``T_pf(L)``;
* ``chunked-prefill``: one long prompt under a per-step token cap: chunks at increasing prefix positions;
* ``decode``: ``B`` requests of ``C`` prompt tokens generating ``K`` tokens each, over grids of ``B`` and ``C``:
  decode-only steps (and batched prefills on the way);
* ``mixed``: ``B`` running decodes, then one prompt arrives under a token cap: decodes plus a prefill chunk per step,
  the multiplexing interference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tropical_sched._version import __version__
from tropical_sched.core.errors import ConfigError
from tropical_sched.predictors.fitting import fit_step_time, sample_features
from tropical_sched.predictors.importers import valid_range_of
from tropical_sched.predictors.profile import (
    EngineInfo,
    HardwareInfo,
    KvCacheInfo,
    ModelInfo,
    ProfileFile,
    ProfileMetadata,
    SourceInfo,
    StepSample,
)
from tropical_sched.predictors.step_time import FEATURE_NAMES, split_step

__all__ = [
    "Scenario",
    "StepRecord",
    "SweepGrid",
    "build_profile",
    "estimate_duration_s",
    "log_grid",
    "plan_sweep",
    "step_record",
]


def log_grid(low: int, high: int, num_points: int) -> list[int]:
    """``num_points`` integers spaced evenly in log scale from ``low`` to ``high`` inclusive, deduplicated.

    Raises:
        ConfigError: ``low < 1``, ``high < low`` or ``num_points < 1``.
    """
    if low < 1 or high < low or num_points < 1:
        raise ConfigError(f"log_grid needs 1 <= low <= high and num_points >= 1, got {low}, {high}, {num_points}")
    if num_points == 1 or low == high:
        return [high]
    ratio = (high / low) ** (1 / (num_points - 1))
    return sorted({min(high, round(low * ratio**i)) for i in range(num_points)})


@dataclass(frozen=True, slots=True)
class Scenario:
    """One batch to run and time (see the module docstring for the kinds).

    Attributes:
        kind: ``prefill``, ``chunked-prefill``, ``decode`` or ``mixed``.
        num_decode_seqs: requests that decode (``decode``, ``mixed``).
        num_decode_prompt_tokens: their prompt length, tokens.
        num_decode_output_tokens: tokens each generates (for ``mixed``, an upper bound: they are aborted once the
            prefill is done).
        num_prefill_tokens: the prompt prefilled (``prefill``, ``chunked-prefill``, ``mixed``), tokens.
        max_num_step_tokens: per-step token cap while the scenario runs (``None``: the engine's own).
    """

    kind: str
    num_decode_seqs: int = 0
    num_decode_prompt_tokens: int = 0
    num_decode_output_tokens: int = 0
    num_prefill_tokens: int = 0
    max_num_step_tokens: int | None = None

    @property
    def label(self) -> str:
        """Short description, e.g. ``decode B=16 C=512 K=16``."""
        parts = [self.kind]
        if self.num_decode_seqs:
            parts.append(f"B={self.num_decode_seqs} C={self.num_decode_prompt_tokens}")
        if self.kind == "decode":
            parts.append(f"K={self.num_decode_output_tokens}")
        if self.num_prefill_tokens:
            parts.append(f"L={self.num_prefill_tokens}")
        if self.max_num_step_tokens:
            parts.append(f"cap={self.max_num_step_tokens}")
        return " ".join(parts)

    @property
    def num_steps_estimate(self) -> int:
        """Engine steps the scenario takes, about (for the duration estimate and the progress bar)."""
        cap = self.max_num_step_tokens
        prefill_steps = math.ceil(self.num_prefill_tokens / cap) if cap and self.num_prefill_tokens else 1
        if self.kind in ("prefill", "chunked-prefill"):
            return prefill_steps
        if self.kind == "decode":
            return 1 + self.num_decode_output_tokens
        return 2 + prefill_steps  # mixed: the decodes' prefill, one decode step, the chunked prompt


@dataclass(frozen=True, slots=True)
class SweepGrid:
    """The grids of a sweep (see :func:`plan_sweep`)."""

    prefill_tokens: tuple[int, ...]
    chunk_caps: tuple[int, ...]
    chunked_prompt_tokens: int
    decode_batch_sizes: tuple[int, ...]
    decode_context_tokens: tuple[int, ...]
    num_decode_output_tokens: int
    mixed_batch_sizes: tuple[int, ...]
    mixed_prefill_tokens: tuple[int, ...]


def plan_sweep(
    *,
    max_model_len: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    num_kv_cache_tokens: int,
    quick: bool = False,
    repetitions: int = 3,
) -> tuple[SweepGrid, list[Scenario]]:
    """The scenarios of a profiling sweep, each repeated ``repetitions`` times (interleaved, so slow drift of the
    machine spreads over all points instead of biasing one).

    Args:
        max_model_len: the engine's context length, tokens; prompts stay below it.
        max_num_seqs: the engine's running-request limit; decode batch sizes go up to it.
        max_num_batched_tokens: the engine's per-step token budget; whole prefills go up to it.
        num_kv_cache_tokens: KV-cache capacity; a decode batch never holds more than 80% of it.
        quick: a coarse grid (about a fifth of the steps).
        repetitions: runs of each scenario, >= 1.

    Returns:
        The grid and the scenarios in run order.

    Raises:
        ConfigError: a size is below 16 tokens or 1 sequence, or ``repetitions < 1``.
    """
    for name, value, low in (
        ("max_model_len", max_model_len, 32),
        ("max_num_seqs", max_num_seqs, 1),
        ("max_num_batched_tokens", max_num_batched_tokens, 16),
        ("num_kv_cache_tokens", num_kv_cache_tokens, 64),
        ("repetitions", repetitions, 1),
    ):
        if value < low:
            raise ConfigError(f"plan_sweep: {name} must be >= {low}, got {value}")
    longest_prompt = min(max_model_len - 1, max_num_batched_tokens)
    prefill_tokens = log_grid(16, longest_prompt, 6 if quick else 12)
    chunk_caps = tuple(c for c in ((512,) if quick else (256, 1024)) if c < longest_prompt) or (longest_prompt // 4,)
    chunked_prompt_tokens = min(max_model_len - 1, 8 * max(chunk_caps))
    batch_sizes = log_grid(1, max_num_seqs, 4 if quick else 7)
    contexts = log_grid(64, max(64, min(max_model_len // 2, 4096)), 3 if quick else 5)
    output_tokens = 8 if quick else 16
    mixed_batches = tuple(sorted({max(1, max_num_seqs // 8), max(1, max_num_seqs // 2)}))
    mixed_prefills = tuple(log_grid(256, max(256, min(longest_prompt, max_model_len // 2)), 2 if quick else 3))
    kv_budget = 0.8 * num_kv_cache_tokens
    one_round: list[Scenario] = [Scenario("prefill", num_prefill_tokens=length) for length in prefill_tokens]
    one_round += [
        Scenario("chunked-prefill", num_prefill_tokens=chunked_prompt_tokens, max_num_step_tokens=cap)
        for cap in chunk_caps
    ]
    one_round += [
        Scenario("decode", num_decode_seqs=b, num_decode_prompt_tokens=c, num_decode_output_tokens=output_tokens)
        for b in batch_sizes
        for c in contexts
        if b * (c + output_tokens) <= kv_budget and c + output_tokens < max_model_len
    ]
    mixed_context = min(contexts[len(contexts) // 2], max_model_len // 4)
    one_round += [
        Scenario(
            "mixed",
            num_decode_seqs=b,
            num_decode_prompt_tokens=mixed_context,
            num_decode_output_tokens=max_model_len - mixed_context - 1,
            num_prefill_tokens=length,
            max_num_step_tokens=min(chunk_caps) + b,
        )
        for b in mixed_batches
        for length in mixed_prefills
        if b * max_model_len * 0.5 + length <= kv_budget
    ]
    grid = SweepGrid(
        prefill_tokens=tuple(prefill_tokens),
        chunk_caps=chunk_caps,
        chunked_prompt_tokens=chunked_prompt_tokens,
        decode_batch_sizes=tuple(batch_sizes),
        decode_context_tokens=tuple(contexts),
        num_decode_output_tokens=output_tokens,
        mixed_batch_sizes=mixed_batches,
        mixed_prefill_tokens=mixed_prefills,
    )
    return grid, [scenario for _ in range(repetitions) for scenario in one_round]


def estimate_duration_s(scenarios: Iterable[Scenario], *, prefill_s_per_token: float, decode_step_s: float) -> float:
    """Seconds a sweep takes, about: prefill tokens at ``prefill_s_per_token`` plus steps at ``decode_step_s``
    (both measured by the warm-up)."""
    total = 0.0
    for scenario in scenarios:
        tokens = scenario.num_prefill_tokens + scenario.num_decode_seqs * scenario.num_decode_prompt_tokens
        total += tokens * prefill_s_per_token + scenario.num_steps_estimate * decode_step_s
    return total


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One timed engine step and what it computed.

    Attributes:
        step_time_s: wall time of the step (schedule, forward pass, sampling, output processing), seconds.
        prefill_chunks: ``(num_prefix_tokens, num_chunk_tokens)`` per prefill chunk.
        decode_context_tokens: context length of each decode (the tokens its new token attends to, itself
            included).
        scenario: label of the scenario that ran it.
    """

    step_time_s: float
    prefill_chunks: tuple[tuple[int, int], ...]
    decode_context_tokens: tuple[int, ...]
    scenario: str = ""

    def to_sample(self, index: int) -> StepSample:
        """The profile sample of this step."""
        return StepSample(
            step_time_s=self.step_time_s,
            num_decode_seqs=len(self.decode_context_tokens),
            num_decode_context_tokens=sum(self.decode_context_tokens),
            prefill_chunks=self.prefill_chunks,
            origin=f"step {index}: {self.scenario}",
        )


def step_record(
    step_time_s: float,
    num_scheduled_tokens: Mapping[str, int],
    num_computed_tokens_before: Mapping[str, int],
    num_prompt_tokens: Mapping[str, int],
    scenario: str = "",
) -> StepRecord:
    """Classify a step's requests into prefill chunks and decodes.

    A request whose computed tokens before the step are below its prompt length is prefilling: a chunk of
    ``num_scheduled`` tokens at prefix ``num_computed_before``. Otherwise it decodes, with context
    ``num_computed_before + num_scheduled`` (speculative tokens count as context).

    Args:
        step_time_s: the step's wall time, seconds.
        num_scheduled_tokens: request id -> tokens scheduled in the step (vLLM's
            ``SchedulerOutput.num_scheduled_tokens``).
        num_computed_tokens_before: request id -> tokens already in its KV cache before the step.
        num_prompt_tokens: request id -> prompt length.
        scenario: label recorded with the sample.

    Raises:
        KeyError: a scheduled request is missing from one of the other mappings.
    """
    chunks, contexts = split_step(num_scheduled_tokens, num_computed_tokens_before, num_prompt_tokens)
    return StepRecord(step_time_s, chunks, contexts, scenario)


def build_profile(
    records: Sequence[StepRecord],
    *,
    name: str,
    model: ModelInfo,
    hardware: HardwareInfo,
    tensor_parallel_size: int,
    engine: EngineInfo,
    num_kv_cache_tokens: int,
    kv_cache_derivation: str,
    source_description: str,
    environment: Mapping[str, str] | None = None,
) -> ProfileFile:
    """Fit the step-time model to measured steps and assemble the profile file.

    Every step is kept in the file. A step that took more than three times what a first fit predicts for it is a
    stall (garbage collection, a page fault, another process on the machine): it is marked ``used_in_fit=false``
    and the model is fitted again without it; the count is in the fit's ``exclusion_note``.

    Raises:
        ConfigError: fewer than 6 usable steps.
    """
    samples = [record.to_sample(i) for i, record in enumerate(records)]
    if len(samples) < 6:
        raise ConfigError(f"build_profile: need at least 6 measured steps, got {len(samples)}")
    first = fit_step_time(samples)
    predicted = sample_features(samples) @ [first.coefficients[name] for name in FEATURE_NAMES]
    kept: list[StepSample] = []
    num_stalls = 0
    for sample, prediction in zip(samples, predicted, strict=True):
        stall = sample.step_time_s > 3 * prediction
        num_stalls += stall
        kept.append(sample.model_copy(update={"used_in_fit": not stall}) if stall else sample)
    note = f"{num_stalls} steps slower than 3x a first fit's prediction (stalls)" if num_stalls else ""
    fit = fit_step_time(kept, exclusion_note=note) if num_stalls else first
    return ProfileFile(
        schema_version=1,
        metadata=ProfileMetadata(
            name=name,
            model=model,
            hardware=hardware,
            tensor_parallel_size=tensor_parallel_size,
            engine=engine,
            source=SourceInfo(description=source_description),
            created_with=f"tropical-profile (tropical-sched {__version__})",
            environment=dict(environment or {}),
        ),
        valid_range=valid_range_of(kept),
        kv_cache=KvCacheInfo(num_tokens=num_kv_cache_tokens, derivation=kv_cache_derivation),
        fit=fit,
        samples=tuple(kept),
    )

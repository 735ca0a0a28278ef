"""The step-time model: one linear model for prefill-only, decode-only and mixed engine steps.

Unifying idea: an engine step is a batch of sequences, each contributing some new tokens (a prefill chunk, or
one decode token) that attend to some context. Its time is affine in a handful of batch features, so one fitted
model predicts every case the schedulers need (design doc section 3, the single step-time model marked
[reconstructed]):

    t_step = const_s
           + per_batched_token_s          * N   # N: new tokens in the step (chunks + one per decode)
           + per_prefill_seq_s            * P   # P: prefill chunks in the step
           + per_prefill_attention_pair_s * A   # A: sum over chunks of c * prefix + c * (c + 1) / 2
           + per_decode_seq_s             * D   # D: decodes in the step
           + per_decode_context_token_s   * C   # C: sum of the decodes' context tokens

From it follow the quantities of the design doc:

* ``T_pf(L)``, an L-token prompt prefilled alone in one step, is quadratic in L:
  ``a2 * L^2 + a1 * L + a0`` with ``a2 = A/2``, ``a1 = N + A/2``, ``a0 = const + P`` (coefficient names
  abbreviated); :meth:`StepTimeModel.prefill_quadratic_coefficients` returns them.
* A chunk's time grows linearly with its position in the prompt (the ``c * prefix`` attention term).
* ``T_dec = d1 * sum(context) + d0`` for a decode-only batch.
* A mixed step costs the decode step plus the chunk's marginal time: what multiplexing costs the decodes.

All times are seconds, all counts tokens or sequences. Coefficients are non-negative by construction of the fit,
so predictions are monotone in every feature.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from tropical_sched.core.errors import ConfigError

_UNBOUNDED_CHUNK_TOKENS = 2**31 - 1  # "no limit" for chunk sizes (prefill tokens that cost no time)
_BUDGET_TIE_S = 1e-12
"""Float-rounding tolerance of :meth:`StepTimeModel.max_chunk_tokens_within`'s budget, seconds."""
_MAX_MEMO_ENTRIES = 1 << 16  # remaining-prefill predictions kept per model before the memo starts afresh

__all__ = [
    "FEATURE_NAMES",
    "ProfileRangeWarning",
    "StepTimeCoefficients",
    "StepTimeModel",
    "ValidRange",
    "split_step",
    "step_features",
]

FEATURE_NAMES = (
    "const_s",
    "per_batched_token_s",
    "per_prefill_seq_s",
    "per_prefill_attention_pair_s",
    "per_decode_seq_s",
    "per_decode_context_token_s",
)
"""Coefficient names, in the order of :func:`step_features`."""


class ProfileRangeWarning(UserWarning):
    """A prediction was made outside the range the profile measured (an extrapolation)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StepTimeCoefficients:
    """Coefficients of the step-time model, seconds per unit of each feature, all >= 0.

    Raises:
        ConfigError: a coefficient is negative or not finite.
    """

    const_s: float
    per_batched_token_s: float
    per_prefill_seq_s: float
    per_prefill_attention_pair_s: float
    per_decode_seq_s: float
    per_decode_context_token_s: float

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"StepTimeCoefficients.{f.name} must be finite and >= 0, got {value!r}")

    def as_tuple(self) -> tuple[float, ...]:
        """The coefficients in :data:`FEATURE_NAMES` order."""
        return tuple(getattr(self, name) for name in FEATURE_NAMES)


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidRange:
    """The range a profile measured; predictions beyond it are extrapolations and warn once.

    Attributes:
        max_num_prompt_tokens: longest prompt prefilled (and so the largest prefix + chunk), tokens.
        max_num_batched_tokens: most new tokens in one profiled step.
        max_num_decode_seqs: largest profiled decode batch.
        max_decode_context_tokens_per_seq: largest mean context per decode in a profiled decode step, tokens.
    """

    max_num_prompt_tokens: int
    max_num_batched_tokens: int
    max_num_decode_seqs: int
    max_decode_context_tokens_per_seq: int


def split_step(
    num_scheduled_tokens: Mapping[str, int],
    num_computed_tokens_before: Mapping[str, int],
    num_prompt_tokens: Mapping[str, int],
) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Split an engine step's requests into prefill chunks and decodes, as the model prices them.

    A request whose computed tokens before the step are below its prompt length is prefilling: a chunk of the
    tokens scheduled for it at prefix ``num_computed_before``. Otherwise it decodes, with context
    ``num_computed_before + num_scheduled`` (speculative tokens count as context). Requests with nothing
    scheduled are left out. Used by the profiler and by the engine-side online calibration alike.

    Args:
        num_scheduled_tokens: request id -> tokens scheduled in the step (vLLM's
            ``SchedulerOutput.num_scheduled_tokens``).
        num_computed_tokens_before: request id -> tokens in its KV cache before the step.
        num_prompt_tokens: request id -> prompt length.

    Returns:
        ``((prefix, chunk) per prefill chunk, context per decode)``, in the order of ``num_scheduled_tokens``.

    Raises:
        KeyError: a scheduled request is missing from one of the other mappings.
    """
    chunks: list[tuple[int, int]] = []
    contexts: list[int] = []
    for request_id, scheduled in num_scheduled_tokens.items():
        if scheduled <= 0:
            continue
        before = num_computed_tokens_before[request_id]
        if before < num_prompt_tokens[request_id]:
            chunks.append((before, scheduled))
        else:
            contexts.append(before + scheduled)
    return tuple(chunks), tuple(contexts)


def step_features(
    num_decode_seqs: int,
    num_decode_context_tokens: int,
    prefill_chunks: Sequence[tuple[int, int]] = (),
) -> tuple[float, ...]:
    """The model's features of one engine step, in :data:`FEATURE_NAMES` order (``const`` first, = 1).

    Args:
        num_decode_seqs: decodes in the step (each adds one new token), >= 0.
        num_decode_context_tokens: sum of the decodes' context tokens, >= 0.
        prefill_chunks: ``(num_prefix_tokens, num_chunk_tokens)`` per prefill chunk in the step.

    Returns:
        ``(1, N, P, A, D, C)`` as floats.
    """
    num_chunk_tokens = 0
    attention_pairs = 0.0
    for prefix, chunk in prefill_chunks:
        num_chunk_tokens += chunk
        attention_pairs += chunk * prefix + chunk * (chunk + 1) / 2
    return (
        1.0,
        float(num_decode_seqs + num_chunk_tokens),
        float(len(prefill_chunks)),
        attention_pairs,
        float(num_decode_seqs),
        float(num_decode_context_tokens),
    )


class StepTimeModel:
    """Predicts engine step times from :class:`StepTimeCoefficients` (see the module docstring for the model).

    Args:
        coefficients: the fitted coefficients.
        valid_range: the profiled range; predictions beyond it warn once per dimension.
        name: label used in warnings (usually the profile name).
        warned_like: another model whose record of the dimensions already warned about this one shares (so
            that the series of models an online calibration derives from one profile warns once per dimension,
            not once per model); ``None``: its own record.
    """

    __slots__ = ("_c", "_remaining_memo", "_warned", "coefficients", "name", "valid_range")

    def __init__(
        self,
        coefficients: StepTimeCoefficients,
        valid_range: ValidRange,
        name: str = "",
        *,
        warned_like: StepTimeModel | None = None,
    ) -> None:
        self.coefficients = coefficients
        self.valid_range = valid_range
        self.name = name
        self._c = coefficients.as_tuple()
        self._warned: set[str] = warned_like._warned if warned_like is not None else set()
        # (prompt, computed, chunk) -> remaining prefill (s). Routers ask for the same queued prefills at every
        # decision; the memo belongs to the model, so predictions of differently calibrated models never mix.
        self._remaining_memo: dict[tuple[int, int, int | None], float] = {}

    def scaled(self, factor: float, name: str | None = None) -> StepTimeModel:
        """The same model with every coefficient times ``factor``: it predicts every step ``factor`` x as long.

        Args:
            factor: the time scale, > 0 and finite.
            name: the new model's name; default ``"<name> x<factor>"``.

        Raises:
            ConfigError: ``factor`` is not positive and finite.
        """
        if not (math.isfinite(factor) and factor > 0):
            raise ConfigError(f"StepTimeModel.scaled: factor must be > 0 and finite, got {factor!r}")
        coefficients = StepTimeCoefficients(**{n: factor * c for n, c in zip(FEATURE_NAMES, self._c, strict=True)})
        return StepTimeModel(coefficients, self.valid_range, name if name is not None else f"{self.name} x{factor:g}")

    # -- range checks -------------------------------------------------------------------------------------------

    def warn_if_out_of_range(self, dimension: str, value: float, limit: float) -> None:
        """Warn (once per dimension for this model) that ``value`` exceeds the profiled ``limit``."""
        if value <= limit or dimension in self._warned:
            return
        self._warned.add(dimension)
        warnings.warn(
            f"profile {self.name or '<unnamed>'}: {dimension} {value:,.0f} is beyond the profiled maximum "
            f"{limit:,.0f} (by {value - limit:,.0f}, {value / limit:.2f}x); predictions there are extrapolated",
            ProfileRangeWarning,
            stacklevel=3,
        )

    def _check_prefill(self, num_prompt_tokens: int) -> None:
        self.warn_if_out_of_range("prompt length (tokens)", num_prompt_tokens, self.valid_range.max_num_prompt_tokens)

    def check_decode_range(self, num_decode_seqs: int, num_decode_context_tokens: int) -> None:
        """Warn once if a decode batch lies beyond the profiled batch size or mean context."""
        vr = self.valid_range
        if num_decode_seqs > vr.max_num_decode_seqs:
            self.warn_if_out_of_range("decode batch size (sequences)", num_decode_seqs, vr.max_num_decode_seqs)
        if num_decode_seqs and num_decode_context_tokens > num_decode_seqs * vr.max_decode_context_tokens_per_seq:
            self.warn_if_out_of_range(
                "mean decode context (tokens)",
                num_decode_context_tokens / num_decode_seqs,
                vr.max_decode_context_tokens_per_seq,
            )

    # -- predictions --------------------------------------------------------------------------------------------

    def step_time_s(
        self,
        *,
        num_decode_seqs: int = 0,
        num_decode_context_tokens: int = 0,
        prefill_chunks: Sequence[tuple[int, int]] = (),
    ) -> float:
        """Predicted time of one engine step, seconds.

        Args:
            num_decode_seqs: decodes in the step, >= 0.
            num_decode_context_tokens: sum of their context tokens, >= 0.
            prefill_chunks: ``(num_prefix_tokens, num_chunk_tokens)`` per prefill chunk.

        Returns:
            Seconds; 0 for an empty step.

        Raises:
            ConfigError: a count is negative.
        """
        if num_decode_seqs < 0 or num_decode_context_tokens < 0:
            raise ConfigError(
                f"step_time_s: num_decode_seqs={num_decode_seqs!r} and "
                f"num_decode_context_tokens={num_decode_context_tokens!r} must be >= 0"
            )
        if not num_decode_seqs and not prefill_chunks:
            return 0.0
        features = step_features(num_decode_seqs, num_decode_context_tokens, prefill_chunks)
        self.check_decode_range(num_decode_seqs, num_decode_context_tokens)
        for prefix, chunk in prefill_chunks:
            if prefix < 0 or chunk < 1:
                raise ConfigError(f"step_time_s: prefill chunk (prefix={prefix!r}, chunk={chunk!r}) is invalid")
            self._check_prefill(prefix + chunk)
        self.warn_if_out_of_range("tokens in one step", features[1], max(self.valid_range.max_num_batched_tokens, 1))
        return sum(c * x for c, x in zip(self._c, features, strict=True))

    def decode_step_time_s(self, num_decode_seqs: int, num_decode_context_tokens: int) -> float:
        """Time of a decode-only step, ``T_dec = d1 * sum(context) + d0`` (design doc section 3), seconds."""
        if num_decode_seqs <= 0:
            return 0.0
        self.check_decode_range(num_decode_seqs, num_decode_context_tokens)
        c = self._c
        return c[0] + (c[1] + c[4]) * num_decode_seqs + c[5] * num_decode_context_tokens

    def prefill_chunk_time_s(self, num_prefix_tokens: int, num_chunk_tokens: int) -> float:
        """Time of one prefill chunk run alone, seconds; 0 for an empty chunk."""
        if num_chunk_tokens <= 0:
            return 0.0
        self._check_prefill(num_prefix_tokens + num_chunk_tokens)
        c = self._c
        pairs = num_chunk_tokens * num_prefix_tokens + num_chunk_tokens * (num_chunk_tokens + 1) / 2
        return c[0] + c[1] * num_chunk_tokens + c[2] + c[3] * pairs

    def prefill_time_s(self, num_prompt_tokens: int) -> float:
        """``T_pf(L)``: an L-token prompt prefilled alone at batch size 1, in one step, seconds.

        This is the "isolated prefill time" that the default TTFT SLO scales (Tropical paper: 5x).

        Raises:
            ConfigError: ``num_prompt_tokens`` < 1.
        """
        if num_prompt_tokens < 1:
            raise ConfigError(f"prefill_time_s: num_prompt_tokens must be >= 1, got {num_prompt_tokens!r}")
        return self.prefill_chunk_time_s(0, num_prompt_tokens)

    def remaining_prefill_time_s(
        self, num_prompt_tokens: int, num_computed_tokens: int = 0, chunk_tokens: int | None = None
    ) -> float:
        """Time to finish a partly computed prefill on an otherwise idle worker, seconds.

        Each chunk is priced alone (:meth:`prefill_chunk_time_s`); results are memoized per model.

        Args:
            num_prompt_tokens: tokens to prefill in total.
            num_computed_tokens: tokens already prefilled, 0 <= value <= ``num_prompt_tokens``.
            chunk_tokens: the worker's chunk size; ``None`` runs the rest in one step.

        Returns:
            Seconds; 0 when nothing remains.
        """
        key = (num_prompt_tokens, num_computed_tokens, chunk_tokens)
        total_s = self._remaining_memo.get(key)
        if total_s is not None:
            return total_s
        remaining = num_prompt_tokens - num_computed_tokens
        if remaining <= 0:
            total_s = 0.0
        elif chunk_tokens is None or chunk_tokens >= remaining:
            total_s = self.prefill_chunk_time_s(num_computed_tokens, remaining)
        else:
            total_s = 0.0
            prefix = num_computed_tokens
            while prefix < num_prompt_tokens:
                chunk = min(chunk_tokens, num_prompt_tokens - prefix)
                total_s += self.prefill_chunk_time_s(prefix, chunk)
                prefix += chunk
        if len(self._remaining_memo) >= _MAX_MEMO_ENTRIES:
            self._remaining_memo.clear()
        self._remaining_memo[key] = total_s
        return total_s

    def prefill_quadratic_coefficients(self) -> tuple[float, float, float]:
        """``(a2, a1, a0)`` of ``T_pf(L) = a2 * L^2 + a1 * L + a0`` (design doc section 3), seconds."""
        c = self._c
        return (c[3] / 2, c[1] + c[3] / 2, c[0] + c[2])

    def max_chunk_tokens_within(
        self,
        time_budget_s: float,
        *,
        num_decode_seqs: int,
        num_decode_context_tokens: int,
        num_prefix_tokens: int,
    ) -> int:
        """Largest prefill chunk that keeps a mixed step within ``time_budget_s``.

        Solves ``t_step(decodes + chunk c at prefix) <= budget`` for the largest integer ``c >= 0``. This is how a
        multiplexing worker sizes its chunk from the smallest TPOT slack of its decodes (design doc section 7).

        Args:
            time_budget_s: the longest acceptable step, seconds.
            num_decode_seqs: decodes in the step.
            num_decode_context_tokens: their total context, tokens.
            num_prefix_tokens: tokens of the prompt already prefilled.

        Returns:
            Chunk size in tokens, >= 0 (0 when even a one-token chunk would exceed the budget). A step within a
            picosecond of the budget counts as within it, so that budgets equal but for float rounding (a worker's
            slack and the router's running bound on it) give the same chunk.
        """
        c = self._c
        base = c[0] + (c[1] + c[4]) * num_decode_seqs + c[5] * num_decode_context_tokens + c[2]
        room = time_budget_s - base + _BUDGET_TIE_S
        quad = c[3] / 2
        lin = c[1] + c[3] * num_prefix_tokens + c[3] / 2
        if room < quad + lin:
            return 0
        if quad == 0:
            if lin <= 0:  # a profile whose prefill tokens cost nothing: any chunk fits
                return _UNBOUNDED_CHUNK_TOKENS
            tokens = room / lin
        else:
            tokens = (-lin + math.sqrt(lin * lin + 4 * quad * room)) / (2 * quad)
        if tokens >= _UNBOUNDED_CHUNK_TOKENS:
            return _UNBOUNDED_CHUNK_TOKENS
        chunk = int(tokens)
        # The closed form can land one token off under rounding; settle on the exact boundary.
        while quad * (chunk + 1) ** 2 + lin * (chunk + 1) <= room:
            chunk += 1
        while chunk > 0 and quad * chunk**2 + lin * chunk > room:
            chunk -= 1
        return chunk

    def min_chunk_tokens_to_finish_within(
        self,
        time_budget_s: float,
        *,
        num_prompt_tokens: int,
        num_computed_tokens: int,
        num_decode_seqs: int,
        num_decode_context_tokens: int,
    ) -> int:
        """Smallest chunk with which the rest of a prefill, run beside a decode batch, ends within the budget.

        With ``k`` chunks of at most ``c`` tokens the rest takes ``k x (step base + decode part) + linear and
        attention terms of the remaining tokens``; the attention term (sum over chunks of ``c_i (P_i + (c_i + 1) /
        2)``, prefix ``P_i``) telescopes to ``((P + R)^2 - P^2 + R) / 2`` for ``R`` remaining tokens after
        ``P``, whatever the chunking. So only the number of steps depends on the chunk, and the answer is
        ``ceil(R / k_max)`` with ``k_max`` the most steps the budget affords. The decode batch is taken as fixed
        (its context growth over the prefill is ignored).

        Args:
            time_budget_s: time left, seconds.
            num_prompt_tokens: tokens to prefill in total.
            num_computed_tokens: tokens already prefilled.
            num_decode_seqs: decodes in every step.
            num_decode_context_tokens: their total context, tokens.

        Returns:
            Chunk size in tokens; 0 when nothing remains, or when even the whole rest in one step would not end
            within the budget.
        """
        remaining = num_prompt_tokens - num_computed_tokens
        if remaining <= 0:
            return 0
        c0, cn, cp, ca, cd, cc = self._c
        prefix = num_computed_tokens
        tokens_s = cn * remaining + ca * ((prefix + remaining) ** 2 - prefix**2 + remaining) / 2
        per_step_s = c0 + cp + (cn + cd) * num_decode_seqs + cc * num_decode_context_tokens
        room_s = time_budget_s - tokens_s
        if per_step_s <= 0:
            return 1 if room_s >= 0 else 0
        max_steps = math.floor(room_s / per_step_s)
        if max_steps < 1:
            return 0
        return -(-remaining // max_steps)

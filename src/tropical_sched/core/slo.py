"""How each request gets its TTFT and TPOT SLOs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Slo

__all__ = ["DEFAULT_TPOT_SLO_S", "DEFAULT_TTFT_SLO_SCALE", "SloSpec"]

DEFAULT_TTFT_SLO_SCALE = 5.0
"""TTFT SLO as a multiple of the request's isolated prefill time (the Tropical paper's setting)."""

DEFAULT_TPOT_SLO_S = 0.1
"""TPOT SLO in seconds (the Tropical paper's setting: 100 ms)."""


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"SloSpec.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SloSpec:
    """A rule that gives every request its SLOs.

    Each SLO is either absolute or a multiple of the request's isolated latency on the profiled hardware:
    the TTFT SLO scales the isolated prefill time ``T_pf(L)`` (design doc section 3), the TPOT SLO scales the
    isolated decode step time at the prompt's context. Exactly one form per SLO; :meth:`make` fills the defaults
    (TTFT 5x isolated prefill, TPOT 100 ms). ``slo_scale`` then multiplies both (DistServe's SLO-scale view).

    Attributes:
        ttft_slo_s: absolute TTFT SLO, seconds, > 0.
        ttft_slo_scale: TTFT SLO as a multiple of the isolated prefill time, > 0.
        tpot_slo_s: absolute TPOT SLO, seconds, > 0.
        tpot_slo_scale: TPOT SLO as a multiple of the isolated decode step time, > 0.
        slo_scale: multiplier on both SLOs, > 0.

    Raises:
        ConfigError: both or neither form is given for one SLO, or a value is not positive.
    """

    ttft_slo_s: float | None = None
    ttft_slo_scale: float | None = None
    tpot_slo_s: float | None = None
    tpot_slo_scale: float | None = None
    slo_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ttft_slo_s", "ttft_slo_scale", "tpot_slo_s", "tpot_slo_scale", "slo_scale"):
            _check_positive(name, getattr(self, name))
        for absolute, scale in (("ttft_slo_s", "ttft_slo_scale"), ("tpot_slo_s", "tpot_slo_scale")):
            if (getattr(self, absolute) is None) == (getattr(self, scale) is None):
                raise ConfigError(
                    f"SloSpec needs exactly one of {absolute} and {scale}, got "
                    f"{absolute}={getattr(self, absolute)!r}, {scale}={getattr(self, scale)!r}"
                )

    @classmethod
    def make(
        cls,
        *,
        ttft_slo_s: float | None = None,
        ttft_slo_scale: float | None = None,
        tpot_slo_s: float | None = None,
        tpot_slo_scale: float | None = None,
        slo_scale: float = 1.0,
    ) -> SloSpec:
        """Build a spec, using the paper's defaults for any SLO given in neither form.

        Raises:
            ConfigError: one SLO is given in both forms, or a value is not positive.
        """
        if ttft_slo_s is None and ttft_slo_scale is None:
            ttft_slo_scale = DEFAULT_TTFT_SLO_SCALE
        if tpot_slo_s is None and tpot_slo_scale is None:
            tpot_slo_s = DEFAULT_TPOT_SLO_S
        return cls(
            ttft_slo_s=ttft_slo_s,
            ttft_slo_scale=ttft_slo_scale,
            tpot_slo_s=tpot_slo_s,
            tpot_slo_scale=tpot_slo_scale,
            slo_scale=slo_scale,
        )

    def slo_for(
        self,
        num_prompt_tokens: int,
        *,
        isolated_prefill_s: Callable[[int], float],
        isolated_decode_step_s: Callable[[int], float],
    ) -> Slo:
        """The SLOs of one request.

        Args:
            num_prompt_tokens: the request's prompt length, tokens.
            isolated_prefill_s: ``L -> T_pf(L)``, the prefill time of an L-token prompt alone, seconds.
            isolated_decode_step_s: ``context -> T_dec``, one decode step of a lone request, seconds.

        Returns:
            The request's SLOs, seconds.
        """
        if self.ttft_slo_s is not None:
            ttft_s = self.ttft_slo_s
        else:
            assert self.ttft_slo_scale is not None
            ttft_s = self.ttft_slo_scale * isolated_prefill_s(num_prompt_tokens)
        if self.tpot_slo_s is not None:
            tpot_s = self.tpot_slo_s
        else:
            assert self.tpot_slo_scale is not None
            tpot_s = self.tpot_slo_scale * isolated_decode_step_s(num_prompt_tokens)
        return Slo(ttft_s=ttft_s * self.slo_scale, tpot_s=tpot_s * self.slo_scale)

    def describe(self) -> str:
        """A short human-readable form, e.g. ``"TTFT 5x isolated prefill, TPOT 100 ms"``."""
        ttft = (
            f"TTFT {self.ttft_slo_s * 1e3:g} ms"
            if self.ttft_slo_s is not None
            else f"TTFT {self.ttft_slo_scale:g}x isolated prefill"
        )
        tpot = (
            f"TPOT {self.tpot_slo_s * 1e3:g} ms"
            if self.tpot_slo_s is not None
            else f"TPOT {self.tpot_slo_scale:g}x isolated decode step"
        )
        scale = f", scaled by {self.slo_scale:g}" if self.slo_scale != 1.0 else ""
        return f"{ttft}, {tpot}{scale}"

"""How each request gets its TTFT and TPOT SLOs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.request import Slo

__all__ = [
    "DEFAULT_TPOT_SLO_S",
    "DEFAULT_TTFT_SLO_SCALE",
    "SLO_CLASS_PRESETS",
    "SloClass",
    "SloSpec",
    "parse_slo_classes",
]

DEFAULT_TTFT_SLO_SCALE = 5.0
"""TTFT SLO as a multiple of the request's isolated prefill time (the Tropical paper's setting)."""

DEFAULT_TPOT_SLO_S = 0.1
"""TPOT SLO in seconds (the Tropical paper's setting: 100 ms)."""


def _check_positive(name: str, value: float | None, owner: str = "SloSpec") -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{owner}.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SloClass:
    """One class of a workload with heterogeneous SLOs: a share of the requests and a tightening or loosening of
    the base SLOs (SCORPIO, arXiv 2505.23022, serves such mixes; its point is to exploit the heterogeneity).

    Attributes:
        name: label, reported per class (e.g. ``"ttft-tight/tpot-loose"``).
        weight: relative share of requests in this class, > 0 (weights need not sum to 1).
        ttft_factor: multiplier on the base TTFT SLO, > 0.
        tpot_factor: multiplier on the base TPOT SLO, > 0.

    Raises:
        ConfigError: a field is out of range or the name is empty.
    """

    name: str
    weight: float = 1.0
    ttft_factor: float = 1.0
    tpot_factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"SloClass.name must be a non-empty string, got {self.name!r}")
        for name in ("weight", "ttft_factor", "tpot_factor"):
            _check_positive(name, getattr(self, name), f"SloClass {self.name!r}")


def _scorpio_six() -> tuple[SloClass, ...]:
    ttft = {"tight": 0.5, "loose": 2.0}
    tpot = {"tight": 0.75, "medium": 1.5, "loose": 3.0}
    return tuple(
        SloClass(name=f"ttft-{a}/tpot-{b}", ttft_factor=fa, tpot_factor=fb)
        for a, fa in ttft.items()
        for b, fb in tpot.items()
    )


SLO_CLASS_PRESETS: dict[str, tuple[SloClass, ...]] = {
    "scorpio6": _scorpio_six(),
    "interactive-batch": (
        SloClass(name="interactive", weight=1.0, ttft_factor=0.5, tpot_factor=0.5),
        SloClass(name="batch", weight=1.0, ttft_factor=4.0, tpot_factor=3.0),
    ),
}
"""Named SLO mixes. ``scorpio6``: six equally likely classes, TTFT {0.5x, 2x} x TPOT {0.75x, 1.5x, 3x} of the base
SLOs, after SCORPIO's evaluation with six TTFT/TPOT classes [reconstructed: its exact values are not at hand; the
tightest TPOT here, 75 ms with the default 100 ms base, is the tightest a 2 x A100 Llama-2-70B TP4 decode batch of
~40 can hold, since a lone decode step takes 44 ms there].
``interactive-batch``: half tight chat requests, half loose batch requests."""


def parse_slo_classes(text: str) -> tuple[SloClass, ...]:
    """SLO classes from a preset name or a JSON list of :class:`SloClass` fields.

    Args:
        text: ``"scorpio6"``, ``"interactive-batch"``, or e.g.
            ``'[{"name": "chat", "weight": 3, "tpot_factor": 0.5}, {"name": "batch", "ttft_factor": 4}]'``.

    Raises:
        ConfigError: unknown preset, malformed JSON, or a bad field (named in the message).
    """
    if text in SLO_CLASS_PRESETS:
        return SLO_CLASS_PRESETS[text]
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(
            f"SLO classes {text!r}: neither a preset ({', '.join(SLO_CLASS_PRESETS)}) nor a JSON list"
        ) from None
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"SLO classes must be a non-empty JSON list of objects, got {text!r}")
    classes = []
    for index, item in enumerate(items):
        try:
            classes.append(SloClass(**item))
        except TypeError as exc:
            raise ConfigError(f"SLO class {index}: {exc}") from None
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ConfigError(f"SLO class names must be unique, got {names}")
    return tuple(classes)


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
        classes: heterogeneous SLOs: each request falls in one class (by weight, from a generator seeded with
            ``class_seed``) whose factors multiply its SLOs. Empty: every request has the base SLOs.
        class_seed: seed of the class draw (the same seed gives every policy the same classes).

    Raises:
        ConfigError: both or neither form is given for one SLO, or a value is not positive.
    """

    ttft_slo_s: float | None = None
    ttft_slo_scale: float | None = None
    tpot_slo_s: float | None = None
    tpot_slo_scale: float | None = None
    slo_scale: float = 1.0
    classes: tuple[SloClass, ...] = ()
    class_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ttft_slo_s", "ttft_slo_scale", "tpot_slo_s", "tpot_slo_scale", "slo_scale"):
            _check_positive(name, getattr(self, name))
        for absolute, scale in (("ttft_slo_s", "ttft_slo_scale"), ("tpot_slo_s", "tpot_slo_scale")):
            if (getattr(self, absolute) is None) == (getattr(self, scale) is None):
                raise ConfigError(
                    f"SloSpec needs exactly one of {absolute} and {scale}, got "
                    f"{absolute}={getattr(self, absolute)!r}, {scale}={getattr(self, scale)!r}"
                )
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ConfigError(f"SloSpec.classes names must be unique, got {names}")

    @classmethod
    def make(
        cls,
        *,
        ttft_slo_s: float | None = None,
        ttft_slo_scale: float | None = None,
        tpot_slo_s: float | None = None,
        tpot_slo_scale: float | None = None,
        slo_scale: float = 1.0,
        classes: Sequence[SloClass] = (),
        class_seed: int = 0,
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
            classes=tuple(classes),
            class_seed=class_seed,
        )

    def draw_classes(self, num_requests: int) -> list[SloClass | None]:
        """The class of each of ``num_requests`` requests (all ``None`` without classes); deterministic."""
        if not self.classes:
            return [None] * num_requests
        weights = np.array([c.weight for c in self.classes], dtype=np.float64)
        rng = np.random.default_rng(self.class_seed)
        index = rng.choice(len(self.classes), size=num_requests, p=weights / weights.sum())
        return [self.classes[i] for i in index.tolist()]

    def slo_for(
        self,
        num_prompt_tokens: int,
        *,
        isolated_prefill_s: Callable[[int], float],
        isolated_decode_step_s: Callable[[int], float],
        slo_class: SloClass | None = None,
    ) -> Slo:
        """The SLOs of one request.

        Args:
            num_prompt_tokens: the request's prompt length, tokens.
            isolated_prefill_s: ``L -> T_pf(L)``, the prefill time of an L-token prompt alone, seconds.
            isolated_decode_step_s: ``context -> T_dec``, one decode step of a lone request, seconds.
            slo_class: the request's class (its factors multiply the base SLOs), if any.

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
        if slo_class is not None:
            ttft_s *= slo_class.ttft_factor
            tpot_s *= slo_class.tpot_factor
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
        classes = f", {len(self.classes)} SLO classes" if self.classes else ""
        return f"{ttft}, {tpot}{scale}{classes}"

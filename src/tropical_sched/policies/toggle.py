"""The multiplexing toggle: switch multiplexing off and on by observed SLO attainment (design doc section 6)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tropical_sched.core.errors import check_fields

__all__ = ["AttainmentWindow", "MultiplexingToggle", "ToggleConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ToggleConfig:
    """Settings of the attainment-driven toggle.

    Attributes:
        enabled: ``False`` leaves multiplexing on whatever the attainment (for ablations).
        target_attainment: the attainment to defend, in (0, 1]; 0.9 as in goodput.
        hysteresis: how far TPOT attainment must exceed the target before multiplexing comes back, in [0, 1).
        window_num_requests: the most recent observations kept per window, >= 1.
        window_s: observations older than this are dropped, seconds, > 0.
        min_samples: observations a window needs before it can flip the toggle, >= 1.
        hold_s: minimum time between two flips (no flapping), seconds, >= 0.
    """

    enabled: bool = True
    target_attainment: float = 0.9
    hysteresis: float = 0.02
    window_num_requests: int = 200
    window_s: float = 60.0
    min_samples: int = 20
    hold_s: float = 10.0

    def __post_init__(self) -> None:
        checks = {
            "target_attainment": 0 < self.target_attainment <= 1,
            "hysteresis": 0 <= self.hysteresis < 1,
            "window_num_requests": self.window_num_requests >= 1,
            "window_s": self.window_s > 0,
            "min_samples": self.min_samples >= 1,
            "hold_s": self.hold_s >= 0,
        }
        check_fields(self, checks)


class AttainmentWindow:
    """Rolling fraction of observations that met their SLO, over the last N observations and T seconds.

    Args:
        max_len: observations kept, >= 1.
        window_s: age limit of observations, seconds.
    """

    def __init__(self, max_len: int, window_s: float) -> None:
        self._window_s = window_s
        self._events: deque[tuple[float, bool]] = deque(maxlen=max_len)  # (at_s, met)
        self._num_met = 0

    def add(self, at_s: float, met: bool) -> None:
        """Record one observation at ``at_s``."""
        if len(self._events) == self._events.maxlen:
            self._num_met -= self._events[0][1]
        self._events.append((at_s, met))
        self._num_met += met

    def prune(self, now_s: float) -> None:
        """Drop observations older than the window."""
        while self._events and self._events[0][0] < now_s - self._window_s:
            self._num_met -= self._events.popleft()[1]

    def __len__(self) -> int:
        return len(self._events)

    @property
    def attainment(self) -> float:
        """Fraction met, in [0, 1]; 1 when empty."""
        return self._num_met / len(self._events) if self._events else 1.0


class MultiplexingToggle:
    """Global on/off switch of multiplexing, driven by rolling TTFT and TPOT attainment.

    Rule (design doc section 6): switch off when TPOT attainment falls below the target (multiplexed prefills
    hurt the decodes); switch back on when TTFT attainment is below the target while TPOT attainment is at least
    target + hysteresis (the prefill workers are the bottleneck and the decodes have room). Flips are at least
    ``hold_s`` apart and need ``min_samples`` observations in both windows.

    Args:
        config: settings.
    """

    def __init__(self, config: ToggleConfig) -> None:
        self.config = config
        self.multiplexing_on = True
        self._ttft = AttainmentWindow(config.window_num_requests, config.window_s)
        self._tpot = AttainmentWindow(config.window_num_requests, config.window_s)
        self._last_flip_at_s = -float("inf")
        self.flips: list[tuple[float, bool]] = []  # (at_s, multiplexing_on after the flip)

    @property
    def ttft_attainment(self) -> float:
        """Rolling TTFT attainment."""
        return self._ttft.attainment

    @property
    def tpot_attainment(self) -> float:
        """Rolling TPOT attainment."""
        return self._tpot.attainment

    def observe_ttft(self, now_s: float, met: bool) -> None:
        """Record whether a request met its TTFT SLO, then re-evaluate."""
        self._ttft.add(now_s, met)
        self._update(now_s)

    def observe_tpot(self, now_s: float, met: bool) -> None:
        """Record whether a finished request met its TPOT SLO, then re-evaluate."""
        self._tpot.add(now_s, met)
        self._update(now_s)

    def _update(self, now_s: float) -> None:
        cfg = self.config
        if not cfg.enabled or now_s - self._last_flip_at_s < cfg.hold_s:
            return
        self._ttft.prune(now_s)
        self._tpot.prune(now_s)
        if len(self._tpot) < cfg.min_samples:
            return
        tpot = self._tpot.attainment
        if self.multiplexing_on:
            flip = tpot < cfg.target_attainment
        else:
            flip = (
                len(self._ttft) >= cfg.min_samples
                and self._ttft.attainment < cfg.target_attainment
                and tpot >= cfg.target_attainment + cfg.hysteresis
            )
        if flip:
            self.multiplexing_on = not self.multiplexing_on
            self._last_flip_at_s = now_s
            self.flips.append((now_s, self.multiplexing_on))

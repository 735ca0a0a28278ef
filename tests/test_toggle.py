"""The attainment-driven multiplexing toggle (design doc section 6)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tropical_sched.core import ConfigError
from tropical_sched.policies import AttainmentWindow, MultiplexingToggle, ToggleConfig


def _toggle(**overrides: object) -> MultiplexingToggle:
    fields: dict[str, object] = {"min_samples": 10, "hold_s": 5.0, "window_s": 100.0, "window_num_requests": 20}
    fields.update(overrides)
    return MultiplexingToggle(ToggleConfig(**fields))  # type: ignore[arg-type]


def _feed(toggle: MultiplexingToggle, at_s: float, *, ttft_met: bool, tpot_met: bool, n: int = 20) -> None:
    for i in range(n):
        toggle.observe_ttft(at_s + i * 0.01, ttft_met)
        toggle.observe_tpot(at_s + i * 0.01, tpot_met)


def test_switches_off_when_tpot_attainment_falls_below_target() -> None:
    toggle = _toggle()
    _feed(toggle, 0.0, ttft_met=True, tpot_met=False)
    assert not toggle.multiplexing_on
    assert len(toggle.flips) == 1


def test_switches_back_on_when_ttft_suffers_and_tpot_has_headroom() -> None:
    toggle = _toggle()
    _feed(toggle, 0.0, ttft_met=True, tpot_met=False)
    _feed(toggle, 10.0, ttft_met=False, tpot_met=True)
    assert toggle.multiplexing_on
    assert [on for _, on in toggle.flips] == [False, True]


def test_stays_off_while_ttft_is_fine() -> None:
    toggle = _toggle()
    _feed(toggle, 0.0, ttft_met=True, tpot_met=False)
    _feed(toggle, 10.0, ttft_met=True, tpot_met=True)
    assert not toggle.multiplexing_on


def test_needs_min_samples_before_acting() -> None:
    toggle = _toggle(min_samples=50)
    _feed(toggle, 0.0, ttft_met=True, tpot_met=False, n=20)
    assert toggle.multiplexing_on


def test_disabled_toggle_never_switches_off() -> None:
    toggle = _toggle(enabled=False)
    _feed(toggle, 0.0, ttft_met=False, tpot_met=False)
    assert toggle.multiplexing_on
    assert not toggle.flips


def test_window_drops_old_and_excess_observations() -> None:
    window = AttainmentWindow(max_len=3, window_s=10.0)
    for at_s, met in [(0, False), (1, True), (2, True), (3, True)]:
        window.add(at_s, met)
    assert len(window) == 3
    assert window.attainment == 1.0
    window.add(4, False)
    window.prune(13.5)
    assert len(window) == 1
    assert window.attainment == 0.0


@settings(max_examples=50)
@given(st.lists(st.tuples(st.floats(0, 0.5), st.booleans(), st.booleans()), min_size=1, max_size=400))
def test_never_flaps_inside_its_hold_window(events: list[tuple[float, bool, bool]]) -> None:
    toggle = _toggle(min_samples=1, hold_s=2.0)
    now = 0.0
    for gap, ttft_met, tpot_met in events:
        now += gap
        toggle.observe_ttft(now, ttft_met)
        toggle.observe_tpot(now, tpot_met)
    times = [at for at, _ in toggle.flips]
    assert all(b - a >= 2.0 for a, b in itertools.pairwise(times))
    assert all(a != b for (_, a), (_, b) in zip(toggle.flips, toggle.flips[1:], strict=False))


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match=r"ToggleConfig\.target_attainment is out of range: 1\.5"):
        ToggleConfig(target_attainment=1.5)

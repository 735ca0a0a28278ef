"""Plots of goodput searches (matplotlib, PNG), in the style of the DistServe and Tropical papers' figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tropical_sched.core.errors import ConfigError

if TYPE_CHECKING:
    from tropical_sched.sim.goodput import GoodputResult
    from tropical_sched.sim.plan import PlanResult

__all__ = ["plot_goodput", "plot_plan"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'tropical-sched[plot]'") from None
    return plt


def plot_goodput(result: GoodputResult, path: str | Path) -> list[Path]:
    """Draw a goodput search as two PNG files.

    ``path``: SLO attainment against request rate per policy (every simulated point, the mean curve over seeds,
    the target line and each policy's goodput marked). ``<stem>-latency.png``: TTFT attainment against TPOT
    attainment (the Pareto view), and P90 TTFT and P90 TPOT against rate.

    Args:
        result: the goodput search.
        path: where to write the first figure; the second goes beside it.

    Returns:
        The paths written.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    plt = _pyplot()
    path = Path(path)
    exp = result.experiment
    target = result.settings.target_attainment
    title = f"{exp.trace}, {exp.num_workers} x {exp.profile} ({result.num_gpus} GPUs); {exp.slo.describe()}"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for index, (name, runs) in enumerate(result.runs.items()):
        colour = colours[index % len(colours)]
        for number, run in enumerate(runs):  # one line per seed: different seeds are different workloads
            axis.plot(
                [p.value for p in run.curve],
                [p.slo_attainment for p in run.curve],
                "o-",
                color=colour,
                alpha=0.8,
                markersize=3,
                linewidth=1,
                label=f"{name}: {result.goodput_per_s(name):.2f} req/s" if number == 0 else None,
            )
        goodput = result.goodput_per_s(name)
        if goodput > 0:
            axis.axvline(goodput, color=colour, linestyle=":", linewidth=1)
    axis.axhline(target, color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("request rate (req/s)")
    axis.set_ylabel("SLO attainment (TTFT and TPOT)")
    axis.set_ylim(0, 1.02)
    axis.set_title(title, fontsize=9)
    axis.legend(title=f"goodput at {target:.0%}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

    latency_path = path.with_name(f"{path.stem}-latency{path.suffix or '.png'}")
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for index, (name, runs) in enumerate(result.runs.items()):
        colour = colours[index % len(colours)]
        for number, run in enumerate(runs):
            label = name if number == 0 else None
            axes[0].plot(
                [p.tpot_attainment for p in run.curve],
                [p.ttft_attainment for p in run.curve],
                "o",
                color=colour,
                markersize=4,
                alpha=0.8,
                label=label,
            )
            finite = [p for p in run.curve if not math.isnan(p.ttft_p90_s)]
            axes[1].plot(
                [p.value for p in finite],
                [p.ttft_p90_s for p in finite],
                "o-",
                color=colour,
                markersize=3,
                linewidth=1,
                label=label,
            )
            axes[2].plot(
                [p.value for p in finite],
                [p.tpot_p90_s * 1e3 for p in finite],
                "o-",
                color=colour,
                markersize=3,
                linewidth=1,
                label=label,
            )
    axes[0].set_xlabel("TPOT attainment")
    axes[0].set_ylabel("TTFT attainment")
    axes[0].set_title("TTFT vs TPOT attainment (each point a rate)", fontsize=9)
    axes[1].set_xlabel("request rate (req/s)")
    axes[1].set_ylabel("P90 TTFT (s)")
    axes[1].set_yscale("log")
    axes[1].set_title("P90 TTFT", fontsize=9)
    axes[2].set_xlabel("request rate (req/s)")
    axes[2].set_ylabel("P90 TPOT (ms)")
    axes[2].set_title("P90 TPOT", fontsize=9)
    for axis in axes:
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(latency_path, dpi=120)
    plt.close(figure)
    return [path, latency_path]


def plot_plan(result: PlanResult, path: str | Path) -> Path:
    """Draw a plan's recommendation and runner-up: SLO attainment against request rate, every simulated point of
    every seed, the target line and each one's goodput marked.

    Args:
        result: the plan.
        path: where to write the PNG.

    Returns:
        The path written.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    plt = _pyplot()
    path = Path(path)
    exp = result.experiment
    target = result.settings.target_attainment
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shown = [c for c in (result.recommendation, result.runner_up) if c is not None]
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for index, candidate in enumerate(shown):
        colour = colours[index % len(colours)]
        role = "recommended" if index == 0 else "runner-up"
        for number, run in enumerate(candidate.runs):
            axis.plot(
                [p.value for p in run.curve],
                [p.slo_attainment for p in run.curve],
                "o-",
                color=colour,
                alpha=0.8,
                markersize=3,
                linewidth=1,
                label=f"{role}: {candidate.policy} {candidate.shape}, {candidate.goodput_per_s:.2f} req/s"
                if number == 0
                else None,
            )
        if candidate.goodput_per_s > 0:
            axis.axvline(candidate.goodput_per_s, color=colour, linestyle=":", linewidth=1)
    axis.axhline(target, color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("request rate (req/s)")
    axis.set_ylabel("SLO attainment (TTFT and TPOT)")
    axis.set_ylim(0, 1.02)
    axis.set_title(f"tropical plan: {exp.trace}, {exp.num_workers} x {exp.profile}; {exp.slo.describe()}", fontsize=9)
    axis.legend(title=f"goodput at {target:.0%}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

"""``tropical goodput`` and ``tropical slo-scale``: the evaluation a serving team runs before choosing a deployment."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tropical_sched.cli._common import (
    collect_warnings,
    fraction,
    positive_float,
    positive_int,
    progress_bar,
    report_notes_and_json,
    stderr,
    wide_console,
    write_output,
)
from tropical_sched.cli.simulate import add_experiment_arguments, build_experiment
from tropical_sched.core.errors import ConfigError
from tropical_sched.metrics.plots import plot_goodput
from tropical_sched.sim.goodput import GoodputResult, SearchSettings, SloScaleResult, run_goodput, run_slo_scale

__all__ = ["register"]

DEFAULT_POINT_REQUESTS = 2000


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one seed, each >= 0")
    return seeds


def _search_arguments(parser: argparse.ArgumentParser) -> None:
    search = parser.add_argument_group("search")
    search.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="seeds, comma-separated (default 0,1,2)")
    search.add_argument("--target", type=fraction, default=0.9, help="SLO attainment to reach (default 0.9)")
    search.add_argument(
        "--tolerance",
        type=positive_float,
        default=0.03,
        help="stop when the bracket is within this fraction (default 0.03)",
    )
    search.add_argument("--max-evaluations", type=positive_int, default=16, help="simulations per search (default 16)")
    search.add_argument("--jobs", type=positive_int, help="worker processes (default: CPU count, at most 8)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def rate_search_settings(args: argparse.Namespace) -> SearchSettings:
    """The rate search the arguments of :func:`_search_arguments` describe (``--rate``: where it starts)."""
    return SearchSettings(
        target_attainment=args.target,
        relative_tolerance=args.tolerance,
        max_evaluations=args.max_evaluations,
        initial_value=args.rate,
    )


def _experiment(args: argparse.Namespace) -> Any:
    if args.num_requests is None:
        args.num_requests = DEFAULT_POINT_REQUESTS
    return build_experiment(args)


def _rate(value: float) -> str:
    return f"{value:.3f}" if value > 0 else "0 (never)"


def render_goodput(result: GoodputResult, console: Console) -> None:
    """Print the goodput table."""
    exp = result.experiment
    table = Table(
        title=f"goodput at {result.settings.target_attainment:.0%} SLO attainment: {exp.trace}, {exp.num_workers} x "
        f"{exp.profile} ({result.num_gpus} GPUs); {exp.slo.describe()}; {exp.num_requests} requests per point, "
        f"seeds {','.join(str(r.seed) for r in next(iter(result.runs.values())))}",
        title_justify="left",
    )
    for header in ("policy", "goodput req/s", "min - max", "per GPU", "vs best other", "points"):
        table.add_column(header, justify="left" if header == "policy" else "right", no_wrap=True)
    for name, runs in result.runs.items():
        low, high = result.spread_per_s(name)
        other = result.best_baseline(name)
        ratio = "-" if not other or other[1] <= 0 else f"{result.goodput_per_s(name) / other[1]:.2f}x {other[0]}"
        table.add_row(
            name,
            _rate(result.goodput_per_s(name)),
            f"{low:.3f} - {high:.3f}",
            f"{result.goodput_per_s(name) / result.num_gpus:.4f}",
            ratio,
            str(sum(len(run.curve) for run in runs)),
        )
    console.print(table)


def render_slo_scale(result: SloScaleResult, console: Console) -> None:
    """Print the SLO-scale table."""
    exp = result.experiment
    table = Table(
        title=f"tightest SLO scale reaching {result.settings.target_attainment:.0%} attainment at "
        f"{exp.rate_per_s:g} req/s: {exp.trace}, {exp.num_workers} x {exp.profile}; base {exp.slo.describe()}",
        title_justify="left",
    )
    table.add_column("policy", no_wrap=True)
    table.add_column("tightest scale", justify="right")
    table.add_column("points", justify="right")
    for name, runs in result.runs.items():
        scale = result.tightest_scale(name)
        table.add_row(
            name,
            f"{scale:.3f}" if math.isfinite(scale) else "none up to the search limit",
            str(sum(len(r.curve) for r in runs)),
        )
    console.print(table)


def run_goodput_command(args: argparse.Namespace) -> int:
    """Run ``tropical goodput``."""
    experiment = _experiment(args)
    settings = rate_search_settings(args)
    with collect_warnings() as notes, progress_bar(not args.no_progress) as (start, advance):
        start("searches", len(experiment.policies) * len(args.seeds))
        result = run_goodput(experiment, seeds=args.seeds, settings=settings, jobs=args.jobs, progress=advance)
    render_goodput(result, wide_console(140))
    report_notes_and_json(notes, args.json, result.to_json())
    if args.plot:
        written: list[Path] = []
        write_output("--plot", args.plot, lambda: written.extend(plot_goodput(result, args.plot)))
        for path in written:
            stderr.print(f"wrote {path}")
    return 0


def run_slo_scale_command(args: argparse.Namespace) -> int:
    """Run ``tropical slo-scale``."""
    if args.native_rate:
        raise ConfigError("slo-scale needs a fixed --rate (the SLOs are scaled at that rate)")
    experiment = _experiment(args)
    settings = SearchSettings(
        target_attainment=args.target, relative_tolerance=args.tolerance, max_evaluations=args.max_evaluations
    )
    with collect_warnings() as notes, progress_bar(not args.no_progress) as (start, advance):
        start("searches", len(experiment.policies) * len(args.seeds))
        result = run_slo_scale(experiment, seeds=args.seeds, settings=settings, jobs=args.jobs, progress=advance)
    render_slo_scale(result, wide_console(140))
    report_notes_and_json(notes, args.json, result.to_json())
    return 0


def register(subparsers: Any) -> None:
    """Add the ``goodput`` and ``slo-scale`` subcommands."""
    goodput = subparsers.add_parser(
        "goodput",
        help="search each policy's goodput (highest rate at the target SLO attainment)",
        description="For each policy and seed, search the highest request rate whose joint SLO attainment reaches "
        "the target, by doubling then bisection on the rate; --rate sets where the search starts.",
    )
    add_experiment_arguments(goodput)
    goodput.set_defaults(rate=None, num_requests=None)
    _search_arguments(goodput)
    goodput.add_argument("--plot", metavar="PATH", help="write attainment-vs-rate and latency plots (PNG)")
    goodput.set_defaults(func=run_goodput_command, prog=goodput.prog)

    slo_scale = subparsers.add_parser(
        "slo-scale",
        help="at a fixed rate, search the tightest scale of both SLOs at which each policy reaches the target",
        description="DistServe's SLO-scale view: multiply both SLOs by s and find the smallest s that still reaches "
        "the target attainment at --rate.",
    )
    add_experiment_arguments(slo_scale)
    slo_scale.set_defaults(num_requests=None)
    _search_arguments(slo_scale)
    slo_scale.set_defaults(func=run_slo_scale_command, prog=slo_scale.prog, seeds=(0,))
    slo_scale.set_defaults()

"""``tropical plan``: which policy and which prefill : decode split of N instances serves the most goodput."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tropical_sched.cli._common import (
    collect_warnings,
    positive_int,
    progress_bar,
    report_notes_and_json,
    stderr,
    wide_console,
    write_output,
)
from tropical_sched.cli.goodput import _search_arguments, rate_search_settings
from tropical_sched.cli.simulate import add_experiment_arguments, build_experiment
from tropical_sched.core.errors import ConfigError
from tropical_sched.policies.registry import policy_names
from tropical_sched.sim.plan import PlanResult, candidate_splits, run_plan

__all__ = ["register"]

DEFAULT_POINT_REQUESTS = 400


def render_plan(result: PlanResult, console: Console) -> None:
    """Print every candidate, best first, and the recommendation."""
    exp = result.experiment
    target = result.settings.target_attainment
    table = Table(
        title=f"goodput at {target:.0%} SLO attainment by policy and shape: {exp.trace}, {exp.num_workers} x "
        f"{exp.profile} ({result.num_gpus} GPUs); {exp.slo.describe()}; {exp.num_requests} requests per point, "
        f"seeds {','.join(str(r.seed) for r in result.recommendation.runs)}",
        title_justify="left",
    )
    for header in ("policy", "shape", "goodput req/s", "min - max", "per GPU", "vs best"):
        table.add_column(header, justify="left" if header in ("policy", "shape") else "right", no_wrap=True)
    best = result.recommendation.goodput_per_s
    for candidate in result.candidates:
        values = [run.threshold for run in candidate.runs]
        table.add_row(
            candidate.policy,
            candidate.shape,
            f"{candidate.goodput_per_s:.3f}",
            f"{min(values):.3f} - {max(values):.3f}",
            f"{candidate.goodput_per_s / result.num_gpus:.4f}",
            f"{candidate.goodput_per_s / best:.2f}x" if best > 0 else "-",
        )
    console.print(table)
    rec = result.recommendation
    line = f"recommended: {rec.policy} at {rec.shape} ({rec.goodput_per_s:.3f} req/s)"
    runner_up = result.runner_up
    if runner_up is not None:
        line += f"; runner-up: {runner_up.policy} at {runner_up.shape} ({runner_up.goodput_per_s:.3f} req/s)"
    console.print(line)


def run_plan_command(args: argparse.Namespace) -> int:
    """Run ``tropical plan``."""
    if args.prefill_workers is not None:
        raise ConfigError("--prefill-workers: plan searches every split itself; drop the option")
    if args.num_requests is None:
        args.num_requests = DEFAULT_POINT_REQUESTS
    experiment = build_experiment(args)
    urls = args.instance_url or None
    if urls is not None and len(urls) != experiment.num_workers:
        raise ConfigError(f"--instance-url: {len(urls)} given for --instances {experiment.num_workers}")
    settings = rate_search_settings(args)
    num_searches = sum(len(candidate_splits(p, experiment.num_workers, experiment)) for p in experiment.policies)
    with collect_warnings() as notes, progress_bar(not args.no_progress) as (start, advance):
        start("searches", num_searches * len(args.seeds))
        result = run_plan(experiment, seeds=args.seeds, settings=settings, jobs=args.jobs, progress=advance)
    render_plan(result, wide_console(140))
    data = result.to_json(urls)
    if args.config_out:
        config_text = data["recommendation"]["config_yaml"]
        write_output("--config-out", args.config_out, lambda: Path(args.config_out).write_text(config_text))
        stderr.print(f"wrote {args.config_out} (the cluster file for tropical serve)")
    report_notes_and_json(notes, args.json, data)
    if args.plot:
        from tropical_sched.metrics.plots import plot_plan

        write_output("--plot", args.plot, lambda: plot_plan(result, args.plot))
        stderr.print(f"wrote {args.plot}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``plan`` subcommand."""
    plan = subparsers.add_parser(
        "plan",
        help="search every policy at every prefill : decode split of N instances; recommend the best shape",
        description="For each policy, search the goodput (highest rate at the target joint SLO attainment) of every "
        "split of --instances it can run (prefill : multiplexing for tropical, from 0; prefill : decode for "
        "distserve, from 1; colocated policies as they are), recommend the best and write its cluster file for "
        "tropical serve.",
    )
    add_experiment_arguments(plan)
    # --instances is the planner's name for the cluster size (--workers elsewhere); both set it.
    plan.add_argument("--instances", dest="workers", type=positive_int, help="model instances to split (= --workers)")
    _search_arguments(plan)
    plan.set_defaults(rate=None, num_requests=None, policies=",".join(policy_names()), seeds=(0, 1))
    plan.add_argument(
        "--instance-url",
        action="append",
        metavar="URL",
        help="the instances' base URLs, in order, for the cluster file (default http://127.0.0.1:8001 and up)",
    )
    plan.add_argument("--config-out", metavar="PATH", help="write the recommended cluster file (YAML) here")
    plan.add_argument("--plot", metavar="PATH", help="write the recommendation's attainment curve (PNG)")
    plan.set_defaults(func=run_plan_command, prog=plan.prog)

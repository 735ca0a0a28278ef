"""``tropical validate``: replay a trace against a real endpoint, simulate the same requests on the same profile
and configuration, and report per metric the measured value, the simulated value and the relative error."""

from __future__ import annotations

import argparse
import math
from typing import Any

from rich.table import Table

from tropical_sched.cli._common import collect_warnings, progress_bar, report_notes_and_json, wide_console
from tropical_sched.cli.replay import (
    add_request_arguments,
    add_target_arguments,
    record_dicts,
    replay_settings,
    replay_target,
    target_fields,
)
from tropical_sched.cli.simulate import add_experiment_arguments, build_experiment
from tropical_sched.metrics.attainment import summarize
from tropical_sched.metrics.fidelity import fidelity_rows
from tropical_sched.sim.experiment import run_experiment
from tropical_sched.sim.simulator import build_requests

__all__ = ["register"]


def _value(metric: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.1%}" if metric == "slo_attainment" else f"{value * 1e3:,.1f} ms"


def run(args: argparse.Namespace) -> int:
    """Run ``tropical validate``."""
    from tropical_sched.serve.replay import replay_sync

    urls, router_config = replay_target(args)
    if router_config is not None:
        where = f"the router of {args.router_config} in this process ({', '.join(urls)})"
    else:
        where = " + ".join(urls)
    experiment = build_experiment(args)
    settings = replay_settings(args, urls)
    with collect_warnings() as notes, progress_bar(not args.no_progress) as (start, advance):
        # Simulate first (fast; fails early on a bad setting), then replay the very same workload.
        result = run_experiment(
            experiment, on_policy_start=lambda name, n: start(f"simulate {name}", n), progress=advance
        )
        profile, workload = result.profile, result.workload
        requests = build_requests(workload, profile, experiment.slo)
        start("replay", len(requests))
        records = replay_sync(workload, requests, settings, progress=advance, router_config=router_config)
        measured = summarize(records)
    simulated = {name: outcome.summary for name, outcome in result.outcomes.items()}
    console = wide_console()
    data: dict[str, Any] = {
        "schema_version": 1,
        **target_fields(args, urls),
        "trace": experiment.trace,
        "profile": profile.name,
        "rate_per_s": experiment.rate_per_s,
        "num_requests": len(requests),
        "slo": experiment.slo.describe(),
        "measured": measured.as_dict(),
        "simulated": {},
        "relative_error": {},
    }
    for name, summary in simulated.items():
        table = Table(
            title=f"{where} against the simulator ({name}, {experiment.num_workers} worker(s), "
            f"{profile.name}); {len(requests)} requests at {experiment.rate_per_s} req/s"
        )
        for column in ("metric", "measured", "simulated", "relative error"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        rows = fidelity_rows(measured, summary)
        for row in rows:
            error = "-" if math.isnan(row.relative_error) else f"{row.relative_error:.1%}"
            table.add_row(row.metric, _value(row.metric, row.measured), _value(row.metric, row.simulated), error)
        console.print(table)
        data["simulated"][name] = summary.as_dict()
        data["relative_error"][name] = {row.metric: row.relative_error for row in rows}
    data["records"] = record_dicts(records)  # the measured requests, one by one
    console.print(f"workload: {workload.report.describe()}")
    report_notes_and_json(notes, args.json, data)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``validate`` subcommand."""
    parser = subparsers.add_parser(
        "validate",
        help="replay a trace against a real endpoint and simulate the same requests: the simulator's error",
        description="Fidelity check: replay the trace against the endpoint (an engine or the router), simulate the "
        "same requests with the same profile and configuration, and report measured and simulated TTFT and TPOT "
        "(P50, P90) and joint SLO attainment with their relative errors.",
    )
    add_target_arguments(parser)
    add_experiment_arguments(parser)
    target = parser.add_argument_group("target")
    add_request_arguments(target)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # What a single colocated vLLM engine does by default (chunked prefill); --policies tropical --workers 2 for a
    # prefill + multiplexing pair behind the router. The replay measures the first token where the client sees it,
    # so a P/D request's is counted after the hop in the simulation too.
    parser.set_defaults(func=run, prog=parser.prog, policies="vllm-chunked", workers=1, first_token_at="after-hop")

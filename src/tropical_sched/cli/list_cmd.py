"""``tropical list``: the bundled profiles and traces, and the registered policies."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from tropical_sched.cli._common import wide_console
from tropical_sched.policies.registry import POLICIES
from tropical_sched.predictors.profile import bundled_profile_names, load_profile
from tropical_sched.workloads.traces import BUNDLED_TRACES, bundled_trace_names

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    """Run ``tropical list``."""
    console = wide_console(160)
    profiles = Table(title="profiles (--profile)", title_justify="left")
    for column in ("name", "model", "GPUs", "engine", "KV tokens", "fit R^2", "max rel. err", "source"):
        profiles.add_column(column, no_wrap=column in ("name", "GPUs"))
    for name in bundled_profile_names():
        p = load_profile(name)
        m = p.metadata
        profiles.add_row(
            name,
            m.model.name,
            f"{m.tensor_parallel_size}x {m.hardware.gpu_name}",
            m.engine.name,
            f"{p.num_kv_cache_tokens:,}",
            f"{p.file.fit.r2:.4f}",
            f"{p.file.fit.max_relative_error:.1%}",
            m.source.url,
        )
    console.print(profiles)
    traces = Table(title="traces (--trace)", title_justify="left")
    for column in ("name", "description", "source"):
        traces.add_column(column, no_wrap=column == "name")
    for name in bundled_trace_names():
        t = BUNDLED_TRACES[name]
        traces.add_row(name, t.description, t.source)
    console.print(traces)
    policies = Table(title="policies (--policies)", title_justify="left")
    policies.add_column("name", no_wrap=True)
    policies.add_column("what it does")
    for entry in POLICIES.values():
        policies.add_row(entry.name, entry.summary)
    console.print(policies)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``list`` subcommand."""
    parser = subparsers.add_parser("list", help="show bundled profiles and traces, and the policies")
    parser.set_defaults(func=run, prog=parser.prog)

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


def source_label(url: str) -> str:
    """A profile source's short name: the repository of its URL (``splitwise-sim``, ``aiconfigurator``), or the
    URL itself when it names no repository."""
    parts = url.rstrip("/").split("/")
    return parts[4] if len(parts) >= 5 and parts[2] == "github.com" else url


def engine_label(name: str, version: str) -> str:
    """``vllm 0.24.0`` when the version starts with a version number, else the engine's name alone (the version
    of an imported table is a sentence)."""
    first = version.split()[0] if version.split() else ""
    return f"{name} {first}" if first[:1].isdigit() else name


def run(args: argparse.Namespace) -> int:
    """Run ``tropical list``."""
    console = wide_console(160)
    profiles = Table(title="profiles (--profile)", title_justify="left")
    for column in ("name", "model", "GPUs", "engine", "context", "KV tokens", "fit R^2", "max rel. err", "source"):
        profiles.add_column(column, no_wrap=column in ("name", "GPUs", "context"))
    for name in bundled_profile_names():
        p = load_profile(name)
        m = p.metadata
        profiles.add_row(
            name,
            m.model.name,
            f"{m.tensor_parallel_size}x {m.hardware.gpu_name}",
            engine_label(m.engine.name, m.engine.version),
            f"{m.model.max_model_len:,}",
            f"{p.num_kv_cache_tokens:,}",
            f"{p.file.fit.r2:.4f}",
            f"{p.file.fit.max_relative_error:.1%}",
            source_label(m.source.url),
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

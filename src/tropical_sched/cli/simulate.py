"""``tropical simulate``: compare policies on a trace-driven simulation of a GPU cluster."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import types
import typing
from typing import Any

from rich.console import Console
from rich.table import Table

from tropical_sched.cli._common import (
    collect_warnings,
    positive_float,
    positive_int,
    progress_bar,
    report_notes_and_json,
    wide_console,
)
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.slo import SLO_CLASS_PRESETS, SloSpec, parse_slo_classes
from tropical_sched.metrics.attainment import AttainmentSummary, summarize_by_class
from tropical_sched.policies.registry import POLICIES, policy_names
from tropical_sched.sim.config import DecodePlacementTime, FirstTokenAt
from tropical_sched.sim.experiment import (
    DEFAULT_POLICIES,
    DEFAULT_PROFILE,
    DEFAULT_RATE_PER_S,
    DEFAULT_TRACE,
    Experiment,
    ExperimentResult,
    run_experiment,
)

__all__ = ["add_experiment_arguments", "build_experiment", "register"]


# The argument types live in _common; these names stay for the commands that import them from here.
_positive_float = positive_float
_positive_int = positive_int


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _option_type(policy: str, path: list[str]) -> Any:
    """The annotated type of the option at ``path`` of ``policy``'s config dataclass (nested through dataclass
    fields such as ``toggle``), or ``None`` if there is no such option (the policy registry then names it)."""
    entry = POLICIES.get(policy)
    kind: Any = entry.config_type if entry else None
    for name in path:
        if kind is None or not dataclasses.is_dataclass(kind):
            return None
        try:
            kind = typing.get_type_hints(kind).get(name)
        except (NameError, TypeError):  # an annotation only importable for type checkers: leave it to the policy
            return None
    return kind


def _typed_option_value(item: str, text: str, kind: Any) -> Any:
    """``text`` converted to the option's type ``kind``, so that a wrong value is refused here by name instead of
    failing deep inside a policy (a string compared with a number)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(members) < len(typing.get_args(kind)) and text.lower() == "none":
            return None
        kind = members[0] if len(members) == 1 else None
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"--policy-option {item!r}: the value must be true or false, got {text!r}")
        return text.lower() == "true"
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--policy-option {item!r}: the value must be an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--policy-option {item!r}: the value must be a number, got {text!r}") from None
    if kind is str or (isinstance(kind, type) and issubclass(kind, enum.Enum)):
        return text  # the config checks the choices and names them
    return _option_value(text)


def parse_policy_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``POLICY.KEY=VALUE`` items (``tropical.toggle.enabled=false`` for nested toggle options) to a mapping, each
    value converted to the type of its option.

    Raises:
        ConfigError: an item is not of that form, or its value does not fit the option's type.
    """
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(
                f"--policy-option {item!r} is not POLICY.KEY=VALUE (e.g. tropical.route_order=multiplex-first)"
            )
        parent, kind = _option_type(parts[0], parts[1:-1]), _option_type(parts[0], parts[1:])
        if parent is not None and not dataclasses.is_dataclass(parent):
            raise ConfigError(f"--policy-option {item!r}: {'.'.join(parts[1:-1])} is an option, not a group of them")
        if dataclasses.is_dataclass(kind):
            example = dataclasses.fields(kind)[0].name
            raise ConfigError(
                f"--policy-option {item!r}: {'.'.join(parts[1:])} is a group of options; set them one by one, "
                f"e.g. {key}.{example}=..."
            )
        target = options.setdefault(parts[0], {})
        for part in parts[1:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = _typed_option_value(item, value, kind)
    return options


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``simulate`` and the evaluation commands."""
    add_workload_arguments(parser)
    add_cluster_arguments(parser)
    add_engine_arguments(parser)
    add_slo_arguments(parser)
    add_policy_arguments(parser)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Trace, rate, arrivals, request count, context handling, seed."""
    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--trace", default=DEFAULT_TRACE, help=f"bundled trace name or file (default {DEFAULT_TRACE})"
    )
    workload.add_argument(
        "--rate",
        type=_positive_float,
        default=DEFAULT_RATE_PER_S,
        help="mean request rate, req/s: rescales a timed trace's arrivals, or the Poisson/Gamma rate "
        f"(default {DEFAULT_RATE_PER_S:g})",
    )
    workload.add_argument(
        "--native-rate", action="store_true", help="keep a timed trace's real arrival times (ignores --rate)"
    )
    workload.add_argument(
        "--arrival",
        choices=["trace", "poisson", "gamma"],
        help="arrival process (default: trace if it has arrivals, else poisson)",
    )
    workload.add_argument(
        "--burstiness",
        type=_positive_float,
        default=1.0,
        help="coefficient of variation of gamma inter-arrivals (default 1)",
    )
    workload.add_argument(
        "--num-requests", type=_positive_int, help="simulate only the first N requests (default: all)"
    )
    workload.add_argument(
        "--overlength",
        choices=["filter", "clip"],
        default="filter",
        help="prompts beyond the model's context (default filter)",
    )
    workload.add_argument(
        "--seed", type=_non_negative_int, default=0, help="seed for sampling and arrivals (default 0)"
    )


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Profile, workers, engine limits, KV link."""
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument(
        "--profile", default=DEFAULT_PROFILE, help=f"bundled profile name or file (default {DEFAULT_PROFILE})"
    )
    cluster.add_argument("--workers", type=_positive_int, default=2, help="model instances (default 2)")
    cluster.add_argument(
        "--prefill-workers", type=_non_negative_int, help="prefill workers of disaggregated policies (default half)"
    )
    cluster.add_argument(
        "--max-num-seqs", type=_positive_int, default=256, help="engine batch limit per worker (default 256)"
    )
    cluster.add_argument(
        "--kv-link-gbps",
        type=_positive_float,
        help="KV transfer bandwidth between workers, GB/s (default: NVLink from the profile)",
    )
    cluster.add_argument(
        "--decode-placement",
        choices=[p.value for p in DecodePlacementTime],
        default=DecodePlacementTime.AFTER_PREFILL.value,
        help="when a P/D request's decode worker is chosen: after its prefill (vLLM) or when it is routed, "
        "reserving KV there during the prefill (SGLang) (default after-prefill)",
    )
    cluster.add_argument(
        "--first-token-at",
        choices=[f.value for f in FirstTokenAt],
        default=FirstTokenAt.PREFILL_END.value,
        help="where a P/D request's first token is counted: when its prefill ends, or after the KV transfer and "
        "the P/D hop, when the decoding worker streams it as the client sees it (default prefill-end)",
    )


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """What the simulated engines really run when it is not what the policies predict (misprediction), and the
    router's online calibration."""
    engine = parser.add_argument_group(
        "engine (misprediction)",
        "the simulated engines may run another profile, or the same one slower or faster, than the policies "
        "predict with (--profile, which also sets the SLOs)",
    )
    engine.add_argument(
        "--engine-profile", metavar="PROFILE", help="bundled profile name or file the engines run (default --profile)"
    )
    engine.add_argument(
        "--engine-time-scale",
        type=_positive_float,
        default=1.0,
        help="the engines' step times and serving overheads are the engine profile's times this factor: 2 = "
        "twice as slow as predicted (default 1)",
    )
    engine.add_argument(
        "--engine-pd-hop-ms",
        type=_non_negative_float,
        metavar="MS",
        help="the engines' P/D hop, fixed part, ms, paid on top of the KV transfer (default: the engine profile's "
        "serving section, 0 if none)",
    )
    engine.add_argument(
        "--engine-pd-hop-per-token-ms",
        type=_non_negative_float,
        metavar="MS",
        help="the engines' P/D hop per prompt token, ms (default: the engine profile's)",
    )
    engine.add_argument(
        "--engine-step-noise",
        type=_non_negative_float,
        default=0.0,
        metavar="SIGMA",
        help="the engines' steps vary around the profile's times: each is multiplied by a mean-1 log-normal factor "
        "whose log has this standard deviation (0.1: about 10%% step to step; default 0)",
    )
    engine.add_argument(
        "--engine-step-noise-correlation",
        type=_non_negative_float,
        default=0.0,
        metavar="RHO",
        help="that factor's correlation from one step to the next, below 1 (0.99: slow and fast periods of about a "
        "hundred steps; default 0, independent steps)",
    )
    engine.add_argument(
        "--worker-profiles",
        metavar="P1,P2,...",
        help="a heterogeneous cluster: one profile per worker, comma-separated (each worker's engine runs its own "
        "and the policy predicts it with it, as instances[i].profile in tropical serve's cluster file); SLOs still "
        "come from --profile",
    )
    engine.add_argument(
        "--calibration",
        choices=["on", "off"],
        default="off",
        help="run the router's online calibration: the policies predict each worker with the step-time model and "
        "P/D hop learned from what it did (default off)",
    )


def add_slo_arguments(parser: argparse.ArgumentParser) -> None:
    """TTFT and TPOT SLOs, absolute or scaled."""
    slo = parser.add_argument_group("SLOs")
    ttft = slo.add_mutually_exclusive_group()
    ttft.add_argument(
        "--ttft-slo-scale", type=_positive_float, help="TTFT SLO as a multiple of the isolated prefill time (default 5)"
    )
    ttft.add_argument("--ttft-slo-ms", type=_positive_float, help="absolute TTFT SLO, ms")
    tpot = slo.add_mutually_exclusive_group()
    tpot.add_argument("--tpot-slo-ms", type=_positive_float, help="absolute TPOT SLO, ms (default 100)")
    tpot.add_argument(
        "--tpot-slo-scale", type=_positive_float, help="TPOT SLO as a multiple of the isolated decode step"
    )
    slo.add_argument("--slo-scale", type=_positive_float, default=1.0, help="multiply both SLOs (default 1)")
    slo.add_argument(
        "--slo-classes",
        metavar="PRESET|JSON",
        help=f"heterogeneous SLOs: a preset ({', '.join(SLO_CLASS_PRESETS)}) or a JSON list of "
        '{"name", "weight", "ttft_factor", "tpot_factor"} multiplying the SLOs above; attainment is also '
        "reported per class",
    )


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """Policies and their options."""
    policies = parser.add_argument_group("policies")
    policies.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help=f"comma-separated, from: {', '.join(policy_names())} (default all four)",
    )
    policies.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="POLICY.KEY=VALUE",
        help="set a policy option, e.g. tropical.route_order=multiplex-first or tropical.toggle.enabled=false",
    )


def build_slo_spec(args: argparse.Namespace) -> SloSpec:
    """The :class:`SloSpec` of parsed SLO arguments."""
    return SloSpec.make(
        ttft_slo_s=args.ttft_slo_ms / 1e3 if args.ttft_slo_ms else None,
        ttft_slo_scale=args.ttft_slo_scale,
        tpot_slo_s=args.tpot_slo_ms / 1e3 if args.tpot_slo_ms else None,
        tpot_slo_scale=args.tpot_slo_scale,
        slo_scale=args.slo_scale,
        classes=parse_slo_classes(args.slo_classes) if getattr(args, "slo_classes", None) else (),
    )


def build_experiment(args: argparse.Namespace) -> Experiment:
    """The :class:`Experiment` described by parsed arguments.

    Raises:
        TropicalError: a value is invalid (the message names it).
    """
    slo = build_slo_spec(args)
    names = tuple(name.strip() for name in args.policies.split(",") if name.strip())
    return Experiment(
        trace=args.trace,
        profile=args.profile,
        num_workers=args.workers,
        num_prefill_workers=args.prefill_workers,
        rate_per_s=None if args.native_rate else args.rate,
        arrival_process=args.arrival,
        burstiness_cv=args.burstiness,
        num_requests=args.num_requests,
        overlength=args.overlength,
        seed=args.seed,
        slo=slo,
        policies=names,
        policy_options=parse_policy_options(args.policy_option),
        max_num_seqs=args.max_num_seqs,
        kv_link_bandwidth_bytes_per_s=args.kv_link_gbps * 1e9 if args.kv_link_gbps else None,
        decode_placement=args.decode_placement,
        first_token_at=args.first_token_at,
        engine_profile=args.engine_profile,
        engine_time_scale=args.engine_time_scale,
        engine_step_noise=args.engine_step_noise,
        engine_step_noise_correlation=args.engine_step_noise_correlation,
        engine_pd_hop_fixed_s=args.engine_pd_hop_ms / 1e3 if args.engine_pd_hop_ms is not None else None,
        engine_pd_hop_per_prompt_token_s=args.engine_pd_hop_per_token_ms / 1e3
        if args.engine_pd_hop_per_token_ms is not None
        else None,
        calibration=args.calibration == "on",
        worker_profiles=tuple(name.strip() for name in args.worker_profiles.split(","))
        if args.worker_profiles
        else None,
    )


def describe_engines(exp: Experiment) -> str:
    """One line: what the simulated engines run against what the policies predict with, the calibration and where
    a P/D first token is counted."""
    engine = exp.describe_engine()
    hop = ""
    if exp.engine_pd_hop_fixed_s is not None or exp.engine_pd_hop_per_prompt_token_s is not None:
        hop = (
            f", P/D hop {(exp.engine_pd_hop_fixed_s or 0.0) * 1e3:g} ms + "
            f"{(exp.engine_pd_hop_per_prompt_token_s or 0.0) * 1e3:g} ms per prompt token"
        )
    noise = ""
    if exp.engine_step_noise:
        noise = f", step noise {exp.engine_step_noise:g} (correlation {exp.engine_step_noise_correlation:g})"
    return (
        f"engines: {engine['engine_profile']} x{exp.engine_time_scale:g}{hop}{noise}; "
        f"policies predict with {exp.profile}; "
        f"online calibration {'on' if exp.calibration else 'off'}; P/D first token at {engine['first_token_at']}"
    )


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1e3:,.0f}"


def render_summaries(title: str, summaries: dict[str, AttainmentSummary], console: Console) -> None:
    """Print one row of attainments and latencies per run (policy, or replayed endpoint)."""
    table = Table(title=title, title_justify="left")
    table.add_column("policy", no_wrap=True)
    for header in ("SLO att.", "TTFT att.", "TPOT att.", "TTFT p50/p90 ms", "TPOT p50/p90 ms", "muxed", "rejected"):
        table.add_column(header, justify="right", no_wrap=True)
    best = max(s.slo_attainment for s in summaries.values())
    for name, s in summaries.items():
        attain = f"{s.slo_attainment:.1%}"
        table.add_row(
            name,
            f"[bold]{attain}[/bold]" if s.slo_attainment == best and len(summaries) > 1 else attain,
            f"{s.ttft_attainment:.1%}",
            f"{s.tpot_attainment:.1%}",
            f"{_ms(s.ttft_p50_s)} / {_ms(s.ttft_p90_s)}",
            f"{_ms(s.tpot_p50_s)} / {_ms(s.tpot_p90_s)}",
            f"{s.num_multiplexed / s.num_requests:.1%}" if s.num_requests else "-",
            str(s.num_rejected),
        )
    console.print(table)


def render(result: ExperimentResult, console: Console) -> None:
    """Print the comparison table."""
    exp = result.experiment
    profile = result.profile
    title = (
        f"{profile.metadata.model.name}, {exp.num_workers} x TP{profile.tensor_parallel_size} on "
        f"{profile.metadata.hardware.gpu_name} ({exp.num_workers * profile.tensor_parallel_size} GPUs); "
        f"{exp.slo.describe()}"
    )
    render_summaries(title, {name: outcome.summary for name, outcome in result.outcomes.items()}, console)
    if exp.describe_engine() != dataclasses.replace(Experiment(), profile=exp.profile).describe_engine():
        console.print(describe_engines(exp))  # only when the engines or the calibration are not the defaults
    if exp.slo.classes:
        render_class_attainment(
            {name: summarize_by_class(outcome.result.records) for name, outcome in result.outcomes.items()},
            [c.name for c in exp.slo.classes],
            console,
        )
    console.print(f"workload: {result.workload.report.describe()}")


def render_class_attainment(
    by_policy: dict[str, dict[str, AttainmentSummary]], class_names: list[str], console: Console
) -> None:
    """Print joint SLO attainment per SLO class (rows) and policy (columns)."""
    table = Table(title="SLO attainment per SLO class", title_justify="left")
    table.add_column("SLO class", no_wrap=True)
    table.add_column("requests", justify="right")
    for policy in by_policy:
        table.add_column(policy, justify="right", no_wrap=True)
    for name in class_names:
        counts = [classes[name].num_requests for classes in by_policy.values() if name in classes]
        table.add_row(
            name,
            str(counts[0] if counts else 0),
            *(f"{classes[name].slo_attainment:.1%}" if name in classes else "-" for classes in by_policy.values()),
        )
    console.print(table)


def run(args: argparse.Namespace) -> int:
    """Run ``tropical simulate``."""
    experiment = build_experiment(args)
    with collect_warnings() as notes, progress_bar(not args.no_progress) as (start, advance):
        result = run_experiment(experiment, on_policy_start=start, progress=advance)
    render(result, wide_console())
    report_notes_and_json(notes, args.json, result.to_json())
    return 0


def register(subparsers: Any) -> None:
    """Add the ``simulate`` subcommand."""
    parser = subparsers.add_parser(
        "simulate",
        help="compare policies on a trace-driven simulation (default: bundled Azure trace, 2 x Llama-2-70B TP4 A100)",
        description="Simulate a GPU serving cluster on a real trace under each policy and compare SLO attainment.",
    )
    add_experiment_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, prog=parser.prog)

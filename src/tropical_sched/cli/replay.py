"""``tropical replay``: replay a trace against an OpenAI-compatible endpoint and report SLO attainment."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tropical_sched.cli._common import collect_warnings, http_url, progress_bar, report_notes_and_json, wide_console
from tropical_sched.cli.simulate import (
    _positive_float,
    _positive_int,
    add_slo_arguments,
    add_workload_arguments,
    build_slo_spec,
    render_summaries,
)
from tropical_sched.core.request import RequestRecord
from tropical_sched.metrics.attainment import summarize
from tropical_sched.predictors.profile import load_profile, profile_from_json
from tropical_sched.sim.experiment import DEFAULT_PROFILE
from tropical_sched.sim.simulator import build_requests
from tropical_sched.workloads.traces import load_trace
from tropical_sched.workloads.workload import make_workload

if TYPE_CHECKING:
    from tropical_sched.serve.config import RouterConfig
    from tropical_sched.serve.replay import ReplaySettings

__all__ = [
    "add_request_arguments",
    "add_target_arguments",
    "register",
    "replay_settings",
    "replay_target",
    "target_fields",
]


def run(args: argparse.Namespace) -> int:
    """Run ``tropical replay``."""
    from tropical_sched.serve.replay import probe_endpoint, replay_sync

    urls, router_config = replay_target(args)
    where = f"the router of {args.router_config} in this process" if router_config is not None else ", ".join(urls)
    endpoint = probe_endpoint(urls)
    notes_before: list[str] = []
    if args.profile is not None:
        profile = load_profile(args.profile)
    elif router_config is not None:
        profile = load_profile(router_config.profile)
        notes_before.append(f"SLOs from the router's profile {profile.name} (--profile to override)")
    elif endpoint.router_profile is not None:
        profile = profile_from_json(endpoint.router_profile, f"{args.url[0]}/v1/tropical/profile")
        notes_before.append(f"SLOs from the router's profile {profile.name} (--profile to override)")
    else:
        profile = load_profile(DEFAULT_PROFILE)
        notes_before.append(f"the endpoint is not a Tropical router: SLOs from the profile {DEFAULT_PROFILE}")
    if args.max_model_len:
        max_model_len = args.max_model_len
    elif endpoint.max_model_len is not None:
        max_model_len = endpoint.max_model_len
        notes_before.append(f"context of {max_model_len} tokens from the endpoint's /v1/models")
    else:
        max_model_len = profile.max_model_len
    workload = make_workload(
        load_trace(args.trace),
        max_model_len=max_model_len,
        num_requests=args.num_requests,
        rate_per_s=None if args.native_rate else args.rate,
        arrival_process=args.arrival,
        burstiness_cv=args.burstiness,
        overlength=args.overlength,
        seed=args.seed,
    )
    slo = build_slo_spec(args)
    requests = build_requests(workload, profile, slo)
    settings = replay_settings(
        args,
        urls,
        endpoint=args.endpoint,
        prompt_format=args.prompt_format,
        chars_per_token=args.chars_per_token,
    )
    with collect_warnings() as notes, progress_bar(not args.no_progress) as (start, advance):
        start(args.label, len(requests))
        records = replay_sync(workload, requests, settings, progress=advance, router_config=router_config)
    summary = summarize(records)
    console = wide_console()
    render_summaries(f"replay of {args.trace} against {where}; {slo.describe()}", {args.label: summary}, console)
    console.print(f"workload: {workload.report.describe()}")
    for note in notes_before:
        console.print(f"note: {note}")
    failures = [r.reject_reason for r in records if r.rejected]
    if failures:
        console.print(f"{len(failures)} requests failed or were rejected; first: {failures[0]}")
    data = {
        "schema_version": 1,
        "trace": args.trace,
        "profile": profile.name,
        **target_fields(args, urls),
        "num_requests": len(records),
        "slo": slo.describe(),
        "workload": workload.report.describe(),
        "policies": {args.label: {k: v for k, v in summary.as_dict().items() if k != "num_requests"}},
        "records": record_dicts(records),
    }
    report_notes_and_json(notes, args.json, data)
    return 0


def record_dicts(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Per-request results as written to ``--json`` (``tropical replay`` and ``tropical validate``): the request's
    id, arrival (seconds since the replay started), prompt and output tokens, SLOs, TTFT and TPOT (seconds;
    ``None`` for a failed request), whether the router multiplexed it, and why it failed ("" if it did not)."""
    return [
        {
            "request_id": r.request_id,
            "arrival_at_s": r.arrival_at_s,
            "num_prompt_tokens": r.num_prompt_tokens,
            "num_output_tokens": r.num_output_tokens,
            "ttft_slo_s": r.ttft_slo_s,
            "tpot_slo_s": r.tpot_slo_s,
            "ttft_s": None if r.rejected else r.ttft_s,
            "tpot_s": None if r.rejected else r.tpot_s,
            "multiplexed": r.multiplexed,
            "failed": r.rejected,
            "reason": r.reject_reason,
        }
        for r in records
    ]


def add_request_arguments(group: Any) -> None:
    """What every replayed request carries: model name, prompt token range, timeout, SLO headers."""
    group.add_argument("--model", help="model name to send")
    group.add_argument("--vocab-size", type=_positive_int, default=256, help="prompt token ids are below this")
    group.add_argument("--timeout", type=_positive_float, default=600.0, help="per-request timeout, s")
    group.add_argument("--no-slo-headers", action="store_true", help="do not send x-slo-*-ms headers")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the requests go (``tropical replay``, ``tropical validate``): ``--url`` (one or more) or
    ``--router-config``, one of them required."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--url",
        action="append",
        type=http_url,
        help="base URL of the endpoint, e.g. http://127.0.0.1:8000; give it several times to spread the requests "
        "round-robin over several engines (a plain colocated deployment)",
    )
    where.add_argument(
        "--router-config",
        metavar="CLUSTER_YAML",
        help="send the requests through the Tropical router of this cluster file (tropical serve's --config), run "
        "inside this process: no HTTP hop and no relay between the client and the router, as a Python gateway "
        "that embeds the router runs it (docs/router.md, 'Embedding the router in a Python process')",
    )


def replay_target(args: argparse.Namespace) -> tuple[list[str], RouterConfig | None]:
    """The engines' (or endpoints') URLs the arguments of :func:`add_target_arguments` name, and the router
    configuration to run in this process (``None`` with ``--url``).

    Raises:
        ClusterFileError: the ``--router-config`` file cannot be read or breaks the schema (path, line, field).
    """
    if args.router_config is None:
        return list(args.url), None
    from tropical_sched.serve.config import load_router_config

    config = load_router_config(args.router_config)
    return [instance.url for instance in config.instances], config


def target_fields(args: argparse.Namespace, urls: list[str]) -> dict[str, Any]:
    """Where the requests went, as the ``--json`` output records it: ``url`` (one, or the list) or
    ``router_config``."""
    if args.router_config is not None:
        return {"router_config": str(args.router_config)}
    return {"url": urls if len(urls) > 1 else urls[0]}


def replay_settings(args: argparse.Namespace, urls: list[str], **options: Any) -> ReplaySettings:
    """The :class:`ReplaySettings` of the arguments :func:`add_request_arguments` added (and ``--seed``), sent to
    ``urls`` round-robin; ``options`` sets the other fields."""
    from tropical_sched.serve.replay import ReplaySettings

    return ReplaySettings(
        url=urls[0],
        extra_urls=tuple(urls[1:]),
        model=args.model,
        vocab_size=args.vocab_size,
        send_slo_headers=not args.no_slo_headers,
        timeout_s=args.timeout,
        seed=args.seed,
        **options,
    )


def register(subparsers: Any) -> None:
    """Add the ``replay`` subcommand."""
    parser = subparsers.add_parser(
        "replay",
        help="replay a trace against an OpenAI-compatible endpoint (the router or an engine) and report attainment",
        description="Send each request of a trace at its arrival time with its SLOs as x-slo-*-ms headers, stream "
        "the answers, and report SLO attainment and latencies as tropical simulate does.",
    )
    add_target_arguments(parser)
    add_workload_arguments(parser)
    add_slo_arguments(parser)
    target = parser.add_argument_group("target")
    target.add_argument(
        "--profile",
        help="profile for SLOs given as multiples of the isolated prefill (default: the router's own, read from "
        f"GET /v1/tropical/profile; {DEFAULT_PROFILE} against plain engines)",
    )
    target.add_argument(
        "--max-model-len",
        type=_positive_int,
        help="context limit: longer requests are filtered or clipped (default: what the endpoint's /v1/models "
        "reports, else the profile's)",
    )
    target.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    target.add_argument(
        "--prompt-format",
        choices=["tokens", "text"],
        default="tokens",
        help="token ids (exact lengths) or text (default tokens)",
    )
    target.add_argument(
        "--chars-per-token",
        type=_positive_float,
        default=4.0,
        help="text prompts: characters per token of the served model's tokenizer, so that a prompt of N tokens is "
        "about N tokens there (default 4; the tests' tiny byte-level tokenizer: 1)",
    )
    add_request_arguments(target)
    parser.add_argument("--label", default="replay", help="name of this run in the table and JSON")
    parser.add_argument("--json", metavar="PATH", help="also write the results (and every request) as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, prog=parser.prog)

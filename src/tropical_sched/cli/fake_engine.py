"""``tropical fake-engine``: an OpenAI-compatible fake engine with profiled step times (no GPU, no model)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from tropical_sched.cli._common import (
    listen_socket,
    port_number,
    positive_float,
    positive_int,
    serve_app,
    socket_url,
    stderr,
)
from tropical_sched.core.errors import ConfigError
from tropical_sched.core.snapshot import WorkerRole
from tropical_sched.predictors.profile import Profile, load_profile, time_scaled

__all__ = ["register"]


def _non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``tropical fake-engine`` until interrupted."""
    try:
        import uvicorn  # noqa: F401

        from tropical_sched.serve.fake_engine import FakeEngine
    except ImportError as exc:
        raise ConfigError(
            f"tropical fake-engine needs the serve extra ({exc.name} is missing): pip install 'tropical-sched[serve]'"
        ) from None

    profile = load_profile(args.profile)
    if args.time_scale != 1.0:
        profile = Profile(time_scaled(profile.file, args.time_scale))
    engine = FakeEngine(
        profile,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        engine_id=args.engine_id or f"fake-{args.port}",
        model=args.model,
        policy=args.policy,
        role=WorkerRole(args.role),
        pd_hop_fixed_s=args.pd_hop_ms / 1e3,
        pd_hop_per_prompt_token_s=args.pd_hop_per_token_ms / 1e3,
    )
    sock = listen_socket(args.host, args.port)  # a taken port fails here, as one line
    hop = (
        f"; P/D hop {args.pd_hop_ms:g} ms + {args.pd_hop_per_token_ms:g} ms per prompt token"
        if (args.pd_hop_ms or args.pd_hop_per_token_ms)
        else ""
    )
    stderr.print(
        f"fake engine {engine.engine_id}: listening on {socket_url(sock)}; profile {profile.name}{hop}",
        markup=False,
        soft_wrap=True,
    )
    return serve_app(engine.app, sock, log_level="warning")


def register(subparsers: Any) -> None:
    """Add the ``fake-engine`` subcommand."""
    parser = subparsers.add_parser(
        "fake-engine",
        help="serve a fake OpenAI-compatible engine whose step times come from a profile (tests, demos)",
        description="Run the simulator's engine model in real time behind vLLM's HTTP surface (completions, chat, "
        "/metrics, P/D kv_transfer_params). --time-scale 0.1 runs it ten times faster than the profiled GPU; "
        "give the router the same scaled profile (tropical_sched.predictors.time_scaled), or another one to see "
        "the router's online calibration at work. --pd-hop-ms adds a P/D hop (a KV transfer's delay).",
    )
    parser.add_argument("--profile", default="a100-llama2-70b-tp4")
    parser.add_argument("--time-scale", type=positive_float, default=1.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8100, help="port, 1-65535 (default 8100)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    parser.add_argument("--policy", help="run this policy's engine-local scheduling (default: vLLM's FCFS)")
    parser.add_argument(
        "--role", default="colocated", choices=[r.value for r in WorkerRole], help="the engine's role under --policy"
    )
    parser.add_argument(
        "--pd-hop-ms",
        type=_non_negative_float,
        default=0.0,
        help="P/D hop: a do_remote_prefill request waits this long (wall ms, not scaled by --time-scale) before "
        "its decode starts, as its KV transfer would take (default 0)",
    )
    parser.add_argument(
        "--pd-hop-per-token-ms",
        type=_non_negative_float,
        default=0.0,
        help="the P/D hop's part per prompt token, wall ms per token (default 0)",
    )
    parser.add_argument("--engine-id")
    parser.add_argument("--model", default="fake-model")
    parser.set_defaults(func=run, prog=parser.prog)

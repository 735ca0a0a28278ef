"""``tropical fake-engine``: an OpenAI-compatible fake engine with profiled step times (no GPU, no model)."""

from __future__ import annotations

import argparse
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
    )
    sock = listen_socket(args.host, args.port)  # a taken port fails here, as one line
    stderr.print(
        f"fake engine {engine.engine_id}: listening on {socket_url(sock)}; profile {profile.name}",
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
        "give the router the same scaled profile (tropical_sched.predictors.time_scaled).",
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
    parser.add_argument("--engine-id")
    parser.add_argument("--model", default="fake-model")
    parser.set_defaults(func=run, prog=parser.prog)

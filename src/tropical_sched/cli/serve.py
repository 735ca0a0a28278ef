"""``tropical serve``: run the router service in front of engine instances."""

from __future__ import annotations

import argparse
from typing import Any

from tropical_sched.cli._common import listen_socket, port_number, serve_app, socket_url, stderr

__all__ = ["ROUTER_KEEP_ALIVE_S", "register"]

ROUTER_KEEP_ALIVE_S = 65.0
"""How long ``tropical serve`` keeps an idle client connection open, seconds (docs/router.md, "Faults")."""


def run(args: argparse.Namespace) -> int:
    """Run ``tropical serve`` until interrupted."""
    try:
        import uvicorn  # noqa: F401

        from tropical_sched.serve.config import load_router_config
        from tropical_sched.serve.router import Router
    except ImportError as exc:
        from tropical_sched.core.errors import ConfigError

        raise ConfigError(
            f"tropical serve needs the serve extra ({exc.name} is missing): pip install 'tropical-sched[serve]'"
        ) from None
    config = load_router_config(args.config)
    if args.decision_log:
        config = config.model_copy(update={"decision_log": args.decision_log})
    router = Router(config)
    sock = listen_socket(args.host, args.port)  # a taken port fails here, as one line, not among uvicorn's logs
    roles = ", ".join(f"{i.url} ({i.role.value})" for i in router.instances)
    stderr.print(
        f"tropical router: listening on {socket_url(sock)}; policy {config.policy}, profile {config.profile}; "
        f"instances: {roles}",
        markup=False,
        soft_wrap=True,  # one log line, however narrow the terminal
    )
    # Idle client connections stay open well beyond the 5 s that clients such as httpx keep them: a server that
    # closes a connection at the moment a client reuses it fails that request before any response (seen as 1 lost
    # request in 10,000 at 400 concurrent clients with uvicorn's 5 s; benchmarks/router_burst.py).
    return serve_app(router.app, sock, log_level=args.log_level, keep_alive_s=ROUTER_KEEP_ALIVE_S)


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible router in front of vLLM instances",
        description="Route every request with a scheduling policy (default tropical) across prefill and "
        "multiplexing instances described in a YAML file (see docs/router.md).",
    )
    parser.add_argument("--config", required=True, help="cluster configuration (YAML)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000, help="port, 1-65535 (default 8000)")
    parser.add_argument(
        "--decision-log",
        metavar="PATH",
        help="append one JSON line per finished request (route, wait, workers, the policy's reason and predictions, "
        "measured TTFT and TPOT) to this file; overrides decision_log in the cluster file",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run, prog=parser.prog)

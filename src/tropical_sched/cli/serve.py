"""``tropical serve``: run the router service in front of engine instances."""

from __future__ import annotations

import argparse
from typing import Any

from tropical_sched.cli._common import stderr

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    """Run ``tropical serve`` until interrupted."""
    try:
        import uvicorn

        from tropical_sched.serve.config import load_router_config
        from tropical_sched.serve.router import Router
    except ImportError as exc:
        from tropical_sched.core.errors import ConfigError

        raise ConfigError(
            f"tropical serve needs the serve extra ({exc.name} is missing): pip install 'tropical-sched[serve]'"
        ) from None
    config = load_router_config(args.config)
    router = Router(config)
    roles = ", ".join(f"{i.url} ({i.role.value})" for i in router.instances)
    stderr.print(f"tropical router: policy {config.policy}, profile {config.profile}; instances: {roles}")
    uvicorn.run(router.app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


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
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run, prog=parser.prog)

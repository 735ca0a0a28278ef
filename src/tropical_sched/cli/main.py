"""Entry point of the ``tropical`` command."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tropical_sched._version import __version__
from tropical_sched.cli import fake_engine, goodput, list_cmd, plan, replay, serve, simulate, validate
from tropical_sched.cli._common import OneLineErrorParser, check_outputs
from tropical_sched.core.errors import TropicalError

__all__ = ["build_parser", "main"]


def build_parser() -> OneLineErrorParser:
    """The ``tropical`` argument parser with all subcommands."""
    parser = OneLineErrorParser(
        prog="tropical",
        description="tropical-sched: SLO-aware multiplexing between disaggregated and colocated LLM serving.",
    )
    parser.add_argument("--version", action="version", version=f"tropical-sched {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=OneLineErrorParser)
    simulate.register(subparsers)
    goodput.register(subparsers)
    plan.register(subparsers)
    serve.register(subparsers)
    replay.register(subparsers)
    validate.register(subparsers)
    fake_engine.register(subparsers)
    list_cmd.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tropical`` command; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        check_outputs(args)  # before the work: a long simulation must not end in an unwritable --json path
        return int(args.func(args))
    except TropicalError as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the ``tropical-profile`` command (GPU profiling of a real engine).

Measuring a live engine and importing published tables arrive with the profiling issue; until then the command
exists, explains itself and exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tropical_sched._version import __version__

__all__ = ["main"]

_NOT_YET = (
    "tropical-profile: not yet available in tropical-sched {version}: measuring an engine "
    "(tropical-profile vllm ...) and importing published tables (tropical-profile import ...) are planned. "
    "Bundled profiles: run `tropical list`."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Print what is available and exit with status 2 (``--version`` and ``--help`` exit 0)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--version"], ["-V"]):
        print(f"tropical-profile (tropical-sched {__version__})")
        return 0
    print(_NOT_YET.format(version=__version__), file=sys.stderr if args[:1] not in (["--help"], ["-h"]) else sys.stdout)
    return 0 if args[:1] in (["--help"], ["-h"]) else 2


if __name__ == "__main__":
    sys.exit(main())

"""Tropical on SGLang: an ``sglang.srt.plugins`` entry point that runs the core policy inside SGLang's scheduler.

Use (see ``docs/sglang.md``)::

    TROPICAL_SGLANG_CONFIG='{"role": "multiplexing", "profile": "h100-llama2-70b-tp4"}' \\
        python -m sglang.launch_server --model-path ... --disaggregation-mode decode --disable-overlap-schedule

SGLang loads the plug-in in every process; it installs its hooks only where ``$TROPICAL_SGLANG_CONFIG`` is set.
``tropical_sched.adapters.sglang.plugin`` imports SGLang; this package and ``.logic`` and ``.version`` do not.
"""

from tropical_sched.adapters.sglang.version import (
    MIN_SGLANG,
    UnsupportedSglangError,
    check_sglang_version,
    installed_sglang_version,
)

__all__ = ["MIN_SGLANG", "UnsupportedSglangError", "check_sglang_version", "installed_sglang_version"]

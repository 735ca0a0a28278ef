"""Which SGLang versions the adapter supports, checked without importing SGLang.

The adapter feature-detects SGLang's hooks (``tropical_sched.adapters.sglang.plugin.detect_hooks``); the version
check only rules out releases without the plug-in loader, which cannot load it at all.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["MIN_SGLANG", "UnsupportedSglangError", "check_sglang_version", "installed_sglang_version"]

MIN_SGLANG = (0, 5, 11)
"""The first SGLang with the ``sglang.srt.plugins`` entry-point group and its hook registry. 0.5.23 is tested
here; 0.5.16-0.5.22 have the same scheduler methods the adapter hooks (read from their sources), untested."""


class UnsupportedSglangError(RuntimeError):
    """The installed SGLang cannot run the adapter (the message says what is missing and what to install)."""


def installed_sglang_version() -> str | None:
    """The installed SGLang release, or ``None``."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(version: str | None = None) -> str:
    """Raise unless the installed (or given) SGLang has the plug-in loader; returns the version.

    Raises:
        UnsupportedSglangError: SGLang is missing, older than :data:`MIN_SGLANG`, or its version is unreadable.
    """
    version = version if version is not None else installed_sglang_version()
    minimum = ".".join(map(str, MIN_SGLANG))
    if version is None:
        raise UnsupportedSglangError(f"tropical-sched's SGLang adapter needs SGLang >= {minimum}; none is installed")
    try:
        parts = tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())
    except ValueError:
        parts = ()
    if len(parts) < 3:
        raise UnsupportedSglangError(f"cannot read the SGLang version {version!r}; the adapter needs >= {minimum}")
    if parts < MIN_SGLANG:
        raise UnsupportedSglangError(
            f"SGLang {version} has no plug-in loader (sglang.srt.plugins, new in {minimum}); tropical-sched's "
            f"adapter needs SGLang >= {minimum}"
        )
    return version

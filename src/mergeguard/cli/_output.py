"""Everything the CLI shows: the two consoles, progress bars, JSON reports, tables and the library's log lines.

The library never prints: it reports progress to a `ProgressSink` (drawn here by `RichProgress`) and logs
through `logging.getLogger("mergeguard.<module>")` (drawn here by `LogBridge`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergeguard.errors import MergeguardError

out_console = Console()
err_console = Console(stderr=True)


PROGRESS_INTERVAL_ENV = "MERGEGUARD_PROGRESS_INTERVAL"  # seconds between log lines (default 30)


class RichProgress:
    """A ProgressSink on stderr: rich bars, one per stage, on a terminal; elsewhere (a CI log, `nohup`, a pipe),
    where rich would draw the bars only at the end, plain lines as the work goes (`LineProgress`)."""

    def __init__(self, enabled: bool = True, *, lines: bool | None = None) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._lines: LineProgress | None = None
        self._task = None
        self._as_lines = not err_console.is_terminal if lines is None else lines

    def __enter__(self) -> RichProgress:
        if self.enabled and self._as_lines:
            self._lines = LineProgress(err_console)
        elif self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err_console,
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lines is not None:
            self._lines.close(finished=exc[0] is None)
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def stage(self, description: str, total: int | None) -> None:
        if self._lines is not None:
            self._lines.stage(description, total)
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.update(self._task, completed=self._progress.tasks[-1].total)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self._lines is not None:
            self._lines.advance(steps)
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """Progress as log lines: one when a stage starts, one at a steady interval while it runs (what, how far,
    elapsed, rate, time left) and one when it ends, each printed at once, so a log shows where a run is."""

    def __init__(self, console: Console, interval: float | None = None, clock=None) -> None:
        self.console = console
        self.interval = float(os.environ.get(PROGRESS_INTERVAL_ENV, 30)) if interval is None else interval
        self.clock = clock or time.monotonic
        self.description: str | None = None
        self.total: int | None = None
        self.done = 0
        self.started = self.last = 0.0

    def _print(self, text: str) -> None:
        self.console.print(escape(text), highlight=False, soft_wrap=True)
        self.console.file.flush()

    def stage(self, description: str, total: int | None) -> None:
        self.close(finished=True)
        self.description, self.total, self.done = description, total, 0
        self.started = self.last = self.clock()
        self._print(f"{description}: started" + (f" ({total} steps)" if total else ""))

    def advance(self, steps: int = 1) -> None:
        if self.description is None:
            return
        self.done += steps
        now = self.clock()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        where = f"{self.done}/{self.total} ({self.done / self.total:.0%})" if self.total else f"{self.done}"
        left = f", about {_clock((self.total - self.done) / rate)} left" if self.total and rate > 0 else ""
        self._print(f"{self.description}: {where}, {_clock(elapsed)} elapsed, {rate:.3g} steps/s{left}")

    def close(self, finished: bool) -> None:
        if self.description is None:
            return
        elapsed = self.clock() - self.started
        if finished:
            self._print(f"{self.description}: done, {self.done} steps in {_clock(elapsed)}")
        self.description = None


# -- the library's log records -------------------------------------------------------
LIBRARY_LOGGER = "mergeguard"


class LogBridge(logging.Handler):
    """Draws the library's log records on the error console: WARNING and above as `warning: MESSAGE`
    (the look of the CLI's own warnings), INFO as a plain line. Its level is INFO, or WARNING under --quiet."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = escape(record.getMessage())
            if record.levelno >= logging.WARNING:
                err_console.print(f"[yellow]warning:[/] {text}", highlight=False)
            else:
                err_console.print(text, highlight=False)
        except Exception:  # a logging call must never stop the command
            self.handleError(record)


def install_log_bridge() -> LogBridge:
    """Attach the bridge to the `mergeguard` logger (once; later calls return the same handler)."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    for handler in logger.handlers:
        if isinstance(handler, LogBridge):
            return handler
    bridge = LogBridge(logging.INFO)
    logger.addHandler(bridge)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # the bridge's level decides what shows
    return bridge


@contextmanager
def log_verbosity(quiet: bool) -> Iterator[None]:
    """While a command runs: the library's INFO lines are shown unless --quiet (warnings always are)."""
    bridges = [h for h in logging.getLogger(LIBRARY_LOGGER).handlers if isinstance(h, LogBridge)]
    before = [h.level for h in bridges]
    for h in bridges:
        h.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        for h, level in zip(bridges, before):
            h.setLevel(level)


# -- JSON and tables ---------------------------------------------------------------
def write_json(target: str | None, payload: dict) -> None:
    """Write `payload` to FILE, or to stdout for '-'; atomically for files."""
    if target is None:
        return
    from mergeguard.checkpoint.provenance import jsonable  # (reading checkpoints needs torch; --help does not)

    text = json.dumps(jsonable(payload), indent=2, sort_keys=False) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(target).expanduser()
    tmp = path.parent / f".{path.name}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MergeguardError(f"cannot write {target}: {exc.strerror or exc}.") from exc


def show_table(quiet: bool, json_target: str | None) -> bool:
    """Tables go to stdout unless --quiet, or unless JSON already goes there."""
    return not quiet and json_target != "-"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)

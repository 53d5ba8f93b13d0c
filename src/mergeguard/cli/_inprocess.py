"""Run a `mergeguard` command line inside this process, as the console script would run it: what the demo
(and a benchmark) uses for each of its steps, so what they print is what ran."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from mergeguard.cli._errors import EXIT_INTERRUPTED, EXIT_TERMINATED
from mergeguard.cli._output import err_console, out_console
from mergeguard.errors import MergeguardError
from mergeguard.settings import argv_text


@contextmanager
def _silenced(console: Any) -> Iterator[None]:
    # rich keeps None for "whatever sys.stdout / sys.stderr is when printing": restore that, not the stream
    # `console.file` resolves to now (a test runner's capture would stay the console's file for good)
    saved = console._file
    console.file = io.StringIO()
    try:
        yield
    finally:
        console._file = saved


def invoke(command: Any, argv: list[str], *, show_progress: bool = True, ok: tuple[int, ...] = (0,)) -> int:
    """`mergeguard ARGV` in this process (`command`: the `mergeguard` group, as click holds it): its progress
    and messages on stderr (none with `show_progress` False), its table not shown; its exit code when it is one
    of `ok` (the gate takes 1, a threshold crossed, as an answer), else one `MergeguardError` naming the step
    (its own message was printed above); Ctrl-C raises KeyboardInterrupt."""
    saved_argv = sys.argv
    sys.argv = ["mergeguard", *argv]  # what the outputs' provenance records as the command
    with ExitStack() as stack:
        stack.enter_context(_silenced(out_console))
        if not show_progress:
            stack.enter_context(_silenced(err_console))
        try:
            code = command.main(args=list(argv), prog_name="mergeguard", standalone_mode=False)
        except Exception as exc:  # a usage error typer reports itself in a console run
            raise MergeguardError(f"`mergeguard {argv_text(argv)}` was refused: {exc}") from None
        finally:
            sys.argv = saved_argv
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        raise KeyboardInterrupt
    code = code or 0
    if code not in ok:
        raise MergeguardError(f"`mergeguard {argv_text(argv)}` failed (exit {code}); its message is above.")
    return code

"""How a command ends: exit codes, SIGTERM, and what the user sees for each library exception type.

    0 success · 1 a threshold was crossed (`eval --max-asr/--min-ca`) · 2 bad input · 3 internal error
    130 interrupted (Ctrl-C) · 143 terminated (SIGTERM)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from mergeguard.cli._cli_utils import (
    Command,
    Roles,
    check_sources,
    command_roles,
    examples,
    read_paths,
    refuse_existing_report,
    refuse_report_into_output,
    refuse_report_over,
    unfinished,
)
from mergeguard.cli._output import err_console, log_verbosity
from mergeguard.errors import MergeguardError, SettingError
from mergeguard.settings import flag

# typer's own exits and usage errors pass through (typer ≥ 0.20 vendors click: its ClickException is not the
# `click` package's, which mergeguard does not depend on)
PASS_THROUGH = (typer.Exit, typer.Abort, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))

EXIT_OK = 0
EXIT_THRESHOLD = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3  # a bug, not the user's input: distinct from 1, which `eval`'s gates use
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM (a CI timeout, `kill`, torchrun stopping its workers): 128 + 15


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so every `with`/`finally` cleanup runs as on Ctrl-C (a killed
    writer used to leave its `.NAME.tmp-PID` behind)."""


def raise_terminated(signum: int, frame: Any) -> None:
    import signal

    # a SIGTERM to the process group stops DataLoader workers too; torch's SIGCHLD handler would then raise
    # "worker killed by signal" (with a traceback) in the middle of this process's own cleanup
    if hasattr(signal, "SIGCHLD"):  # a Python no-op, not SIG_DFL: a SIGCHLD already pending must find a handler
        signal.signal(signal.SIGCHLD, lambda *_: None)
    raise Terminated


# -- library exception types → what the user sees ---------------------------------------
@dataclass(frozen=True)
class ErrorMapping:
    """One library exception type: the line shown (rich markup) and the exit code."""

    kind: type[BaseException]
    line: Callable[[Any], str]
    exit_code: int = EXIT_BAD_INPUT
    soft_wrap: bool = True  # one line, however long
    matches: Callable[[BaseException], bool] = lambda exc: True  # narrower than the type, when set


def _os_error(exc: OSError) -> str:  # disk full, permissions, a file where a folder should be ...
    where = f" {exc.filename}" if exc.filename else ""
    return f"[bold red]error:[/] cannot use{where}: {exc.strerror or exc}."


def is_broken_torch_install(exc: BaseException) -> bool:
    """A torch and torchvision that were not built together (a CPU wheel of one beside a CUDA wheel of the
    other): torchvision's compiled operators fail to register ("operator torchvision::nms does not exist")."""
    text = str(exc)
    return isinstance(exc, RuntimeError | ImportError) and "torchvision::" in text and "does not exist" in text


def broken_torch_install(exc: BaseException) -> str:
    """The sentence for `is_broken_torch_install`, naming both installed versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "(not installed)"

    return (f"[bold red]error:[/] torch {installed('torch')} and torchvision {installed('torchvision')} do not "
            "match (torchvision's compiled operators could not load): install the pair built for each other, "
            "e.g. `pip install --force-reinstall torch torchvision` from one index.")


# the first entry whose type matches wins; anything else (not typer's or click's own) is an internal error
CLI_ERROR_MAPPINGS: tuple[ErrorMapping, ...] = (
    # a setting named by its field in the library is named by its --flag here (settings: flag = field, dashed)
    ErrorMapping(SettingError, lambda exc: f"[bold red]error:[/] "
                                           f"{exc.phrased(flag(exc.field)) if exc.field else exc.sentence}"),
    ErrorMapping(MergeguardError, lambda exc: f"[bold red]error:[/] {exc.sentence}"),
    ErrorMapping(OSError, _os_error, soft_wrap=False),
    ErrorMapping(Exception, broken_torch_install, matches=is_broken_torch_install),
)


def _interrupted(roles: Roles, out: Any) -> str:
    if "--resume" in roles.flags and out is not None and unfinished(Path(out)):
        return f"[yellow]interrupted:[/] no output was written; --resume continues from {out}/.partial."
    return "[yellow]interrupted:[/] nothing was written."


def handle_errors(fn: Callable) -> Callable:
    """Run a command: each library error as its one line and exit code (`CLI_ERROR_MAPPINGS`), Ctrl-C exit
    130, SIGTERM 143, anything unforeseen one line and exit 3. Before it runs, its --json FILE is checked
    against the files and folders it reads (the parameters marked `Input`) and its own `Output`; the library's
    log lines show unless --quiet keeps them to warnings."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        roles = Roles()
        try:
            roles = command_roles(fn)
            check_sources(roles.inputs, kwargs)
            json_out = kwargs.get(roles.flags.get("--json", ""))
            if json_out not in (None, "-"):
                refuse_report_over(json_out, read_paths(roles.inputs, kwargs))
                refuse_report_into_output(json_out, kwargs.get(roles.output or ""))
                refuse_existing_report(json_out, bool(kwargs.get(roles.flags.get("--overwrite", ""), False)))
            with log_verbosity(bool(kwargs.get(roles.flags.get("--quiet", ""), False))):
                return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:
            err_console.print(_interrupted(roles, kwargs.get(roles.output or "")))
            raise typer.Exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED) from None
        except PASS_THROUGH:
            raise
        except Exception as exc:
            mapping = next((m for m in CLI_ERROR_MAPPINGS if isinstance(exc, m.kind) and m.matches(exc)), None)
            if mapping is not None:
                err_console.print(mapping.line(exc), highlight=False, soft_wrap=mapping.soft_wrap)
                raise typer.Exit(mapping.exit_code) from None
            if os.environ.get("MERGEGUARD_DEBUG", "0") not in ("", "0"):  # an input no check foresaw, or a bug
                raise
            err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (set MERGEGUARD_DEBUG=1 "
                              "for the traceback, and please report it).", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def add_command(app: typer.Typer, name: str, fn: Callable, example_lines: list[str], **kwargs: Any) -> None:
    """Register `fn` as command `name` of `app`: its errors handled (`handle_errors`), its examples in its
    help, its flags shown as flags (`Command`)."""
    app.command(name, cls=Command, epilog=examples(*example_lines), **kwargs)(handle_errors(fn))

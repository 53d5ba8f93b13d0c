"""What every command shares: option aliases, error handling, progress bars, JSON and table output.

The library never prints; commands render what it returns through these helpers.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergeguard.errors import MergeguardError

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

out_console = Console()
err_console = Console(stderr=True)

# -- option aliases, defined once --------------------------------------------------
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output path: a folder, or a file ending in .safetensors.")]
def _check_json_target(value: str | None) -> str | None:
    """Fail before any work when the JSON report could not be written."""
    if value not in (None, "-") and not Path(value).expanduser().parent.is_dir():
        raise typer.BadParameter(f"the folder of {value} does not exist.")
    if value not in (None, "-") and Path(value).expanduser().is_dir():
        raise typer.BadParameter(f"{value} is a folder; name a file.")
    return value


JsonOpt = Annotated[
    str | None,
    typer.Option("--json", metavar="FILE", callback=_check_json_target,
                 help="Also write every number as JSON to FILE ('-' for stdout)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no table.")]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="Output dtype: auto (keep each tensor's), float32, float16 or bfloat16."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (recorded in the output's metadata).")]
ArchOpt = Annotated[str | None, typer.Option(
    "--arch", help="open_clip name or architecture JSON, for a checkpoint that does not say; it overrides one "
                   "that does.")]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow .bin/.pt pickle inputs (and open_clip weights published only as "
                 "one), loaded with torch.load(weights_only=True)."),
]
AllowMissingOpt = Annotated[
    bool,
    typer.Option("--allow-missing", help="Skip tensors an input lacks instead of stopping."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when present), cpu, cuda, cuda:1 ...")]


BaseOpt = Annotated[str, typer.Option("--base", help="Pre-trained checkpoint (file, folder, Hub id).")]
HeadsOpt = Annotated[str, typer.Option("--heads", help="Heads file; the task's head stays frozen.")]
TaskOpt = Annotated[str, typer.Option("--task", help="The task (a head in the heads file).")]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
MergedOpt = Annotated[str, typer.Option("--merged", help="The (possibly backdoored) merged model.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimiser steps.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per step.")]
ScaleOpt = Annotated[float | None, typer.Option(
    "--logit-scale", help="Training temperature (default: the head's logit scale).")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Data-loading worker processes.")]


def data_folders(data: list[str], allowed: tuple[str, ...] = ("train", "test")) -> dict[str, str]:
    """`--data train=DIR [--data test=DIR]` → {split: folder}; train is required."""
    out = {}
    for item in data:
        split, sep, folder = item.partition("=")
        if not sep or split not in allowed or not folder:
            raise MergeguardError(f"--data takes {' or '.join(f'{s}=DIR' for s in allowed)}, got {item!r}.")
        out[split] = folder
    if "train" not in out:
        raise MergeguardError("give the training images with --data train=DIR.")
    return out


def require_empty(out: Path, overwrite: bool, resumable: bool = False) -> None:
    """Refuse to write into a folder that already holds something, unless --overwrite."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        if resumable and {p.name for p in out.iterdir()} == {".partial"}:
            raise MergeguardError(f"{out} holds an unfinished run (.partial); pass --resume to finish it, or "
                                  "--overwrite to start again.")
        raise MergeguardError(f"{out} is not empty; choose another --out or pass --overwrite.")


def unfinished(out: Path) -> bool:
    """Whether OUT holds a killed run's state (a non-empty OUT/.partial folder) for --resume to continue."""
    partial = out / ".partial"
    return partial.is_dir() and any(partial.iterdir())


def note_resume(out: Path, resume: bool) -> None:
    """--resume where no run was left: say so, and start from the beginning."""
    if resume and not unfinished(out):
        err_console.print(f"[yellow]note:[/] nothing to resume in {out} (no .partial): starting from the beginning.")


def _sentence(exc: MergeguardError) -> str:
    """The error's sentence; a DataLoader worker's re-raise wraps it in the worker's traceback text."""
    text = str(exc)
    if "Original Traceback" in text:
        return text.strip().splitlines()[-1].split("MergeguardError: ", 1)[-1]
    return text


def refuse_report_over(json_out: str | None, inputs) -> None:
    """--json FILE must not replace (or land inside) an input: checked before any work."""
    if json_out not in (None, "-"):
        from mergeguard.checkpoint.writer import refuse_writing_over
        refuse_writing_over(json_out, inputs, flag="--json")


def refuse_report_into_output(json_out: str | None, out: str | Path | None) -> None:
    """--json FILE must not be, or lie inside, the command's own --out: the report would replace what the
    command just wrote there (OUT/model.safetensors) or be deleted by the next --overwrite."""
    if json_out in (None, "-") or out is None:
        return
    report, target = Path(json_out).expanduser().resolve(), Path(out).expanduser().resolve()
    if report == target or target in report.parents:
        raise MergeguardError(f"--json {json_out} would be written into the output {out}, which this command "
                              "writes; choose a --json outside it.")


INPUT_PARAMS = frozenset({"base", "finetuned", "inputs", "reference", "config", "paths", "model", "heads", "arch",
                          "trigger", "merged", "shadow", "target_images", "zoo"})  # files, folders (or Hub ids)
SPEC_PARAMS = frozenset({"data", "task"})  # NAME=FOLDER specs (a bare --task is a task's name)


def _named_paths(params: dict[str, Any]) -> list[Path]:
    """The existing files and folders a command reads, as its parameters name them."""
    found = []
    for key, value in params.items():
        if key not in INPUT_PARAMS | SPEC_PARAMS:
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            if not isinstance(item, str | Path):
                continue
            text = str(item).partition("=")[2] if key in SPEC_PARAMS else str(item)
            try:
                if text and Path(text).expanduser().exists():
                    found.append(Path(text))
            except OSError:  # a name too long to be a path is not one
                continue
    return found


def handle_errors(fn: Callable) -> Callable:
    """Turn user errors into one red sentence and exit 2; Ctrl-C into exit 130, SIGTERM 143. Before it runs,
    its --json FILE is checked against the files and folders it reads (`INPUT_PARAMS`, `SPEC_PARAMS`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if kwargs.get("json_out") not in (None, "-"):
                refuse_report_over(kwargs["json_out"], _named_paths(kwargs))
                refuse_report_into_output(kwargs["json_out"], kwargs.get("out"))
            return fn(*args, **kwargs)
        except MergeguardError as exc:
            err_console.print(f"[bold red]error:[/] {_sentence(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt as exc:
            code = EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
            out = kwargs.get("out")
            if "resume" in kwargs and out is not None and unfinished(Path(out)):
                err_console.print(f"[yellow]interrupted:[/] no output was written; --resume continues from "
                                  f"{out}/.partial.")
            else:
                err_console.print("[yellow]interrupted:[/] nothing was written.")
            raise typer.Exit(code) from None
        except OSError as exc:  # disk full, permissions, a file where a folder should be ...
            where = f" {exc.filename}" if exc.filename else ""
            err_console.print(f"[bold red]error:[/] cannot use{where}: {exc.strerror or exc}.", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except Exception as exc:  # an input no check foresaw, or a bug: one line and its own exit code
            if os.environ.get("MERGEGUARD_DEBUG", "0") not in ("", "0"):
                raise
            err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (set MERGEGUARD_DEBUG=1 "
                              "for the traceback, and please report it).", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


class RichProgress:
    """A ProgressSink drawn with rich on stderr, one bar per stage."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> RichProgress:
        if self.enabled:
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
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def stage(self, description: str, total: int | None) -> None:
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.update(self._task, completed=self._progress.tasks[-1].total)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(target: str | None, payload: dict) -> None:
    """Write `payload` to FILE, or to stdout for '-'; atomically for files."""
    if target is None:
        return
    text = json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    tmp = path.parent / f".{path.name}.tmp"
    try:
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


def examples(*lines: str) -> str:
    """An 'Examples' block for a command's help (shown verbatim)."""
    body = "\n".join(f"  $ {line}" for line in lines)
    return f"\b\nExamples:\n{body}"

"""What every command's options share: the option aliases (defined once), the markers that say which
options a command reads and writes, `--data` parsing, the help's examples and the output-folder policy.

A command marks what it reads and writes in its parameters' types, and `handle_errors` finds them there:

    weights: Annotated[str, typer.Option("--weights", help="..."), Input()]      # a file, folder or Hub id
    data: Annotated[list[str], typer.Option("--data", help="train=DIR ..."), Spec()]  # NAME=PATH
    out: Annotated[Path, typer.Option("--out", "-o", help="..."), Output()]
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup
from typer.models import OptionInfo, ParameterInfo

from mergeguard.cli._output import err_console
from mergeguard.errors import MergeguardError


# -- markers: what a command reads and writes ----------------------------------------------
@dataclass(frozen=True)
class Input:
    """Marks a parameter that names files or folders the command reads (or Hub ids): `--json` may not
    replace one of them or land inside one. Typer ignores it; `handle_errors` reads it."""


@dataclass(frozen=True)
class Spec(Input):
    """An input given as NAME=PATH (`--data train=DIR`, `eval --task cars=DIR`): the part after '=' is read."""


@dataclass(frozen=True)
class Source(Input):
    """A checkpoint given as a file, folder or Hub id: `handle_errors` says at once, before the command loads
    anything, when it is neither on disk nor a Hub id (`checkpoint.paths.check_source`)."""


@dataclass(frozen=True)
class Output:
    """Marks the command's --out: `--json` may not be it or land inside it, and a run interrupted with
    a `.partial` there is what --resume continues."""


@dataclass(frozen=True)
class Roles:
    """What a command's signature says about its parameters."""

    inputs: dict[str, Input] = field(default_factory=dict)  # parameter name -> its marker
    output: str | None = None  # the parameter marked Output
    flags: dict[str, str] = field(default_factory=dict)  # option flag ("--resume") -> parameter name


def _metadata(param: inspect.Parameter) -> tuple[Any, ...]:
    meta = typing.get_args(param.annotation)[1:] if typing.get_origin(param.annotation) is Annotated else ()
    return (*meta, param.default) if isinstance(param.default, ParameterInfo) else meta


def _flags(info: ParameterInfo) -> list[str]:
    """An option's flags: in `Annotated`, typer.Option's first argument is its first flag, not a default."""
    decls = [info.default, *(getattr(info, "param_decls", None) or ())]
    return [d for d in decls if isinstance(d, str) and d.startswith("-")]


def command_roles(fn: Callable) -> Roles:
    """The markers and option flags of `fn`'s parameters, read from its signature (a rebuilt `__signature__`
    or rewritten `__annotations__` included)."""
    inputs, output, flags = {}, None, {}
    for param in inspect.signature(fn, eval_str=True).parameters.values():
        for meta in _metadata(param):
            if isinstance(meta, Input):
                inputs[param.name] = meta
            elif isinstance(meta, Output):
                output = param.name
            elif isinstance(meta, OptionInfo):
                flags.update(dict.fromkeys(_flags(meta), param.name))
    return Roles(inputs, output, flags)


def check_sources(inputs: dict[str, Input], params: dict[str, Any]) -> None:
    """Every checkpoint among the parameters marked `Source` is on disk or a Hub id (one sentence if not)."""
    from mergeguard.checkpoint.paths import check_source

    for name, marker in inputs.items():
        if isinstance(marker, Source):
            value = params.get(name)
            for item in value if isinstance(value, list | tuple) else [value]:
                if isinstance(item, str | Path) and str(item):
                    check_source(str(item))


def read_paths(inputs: dict[str, Input], params: dict[str, Any]) -> list[Path]:
    """The existing files and folders among the values of the parameters marked as inputs."""
    found = []
    for name, marker in inputs.items():
        value = params.get(name)
        for item in value if isinstance(value, list | tuple) else [value]:
            if not isinstance(item, str | Path):
                continue
            text = str(item).partition("=")[2] if isinstance(marker, Spec) else str(item)
            try:
                if text and Path(text).expanduser().exists():
                    found.append(Path(text))
            except OSError:  # a name too long to be a path is not one
                continue
    return found


# -- how commands and groups show their options ------------------------------------------
class _FlagsShownAsFlags:
    """A flag takes no value, so its help shows no type: typer ≥ 0.29 writes `--overwrite <bool>`, which
    reads as if it took one (and `--overwrite true` then fails)."""

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_FlagsShownAsFlags, TyperCommand):
    """Every mergeguard command's class (`cli._errors.add_command`)."""


class Group(_FlagsShownAsFlags, TyperGroup):
    """Every mergeguard command group's class (`typer.Typer(cls=Group)`)."""


# -- option aliases, defined once --------------------------------------------------
def _check_json_target(value: str | None) -> str | None:
    """Fail before any work when the JSON report could not be written."""
    if value in (None, "-"):
        return value
    if Path(value).expanduser().is_dir():
        raise typer.BadParameter(f"{value} is a folder; name a file.")
    from mergeguard.checkpoint.paths import check_parents  # a missing folder is created when it is written

    try:
        check_parents(value)
    except MergeguardError as exc:
        raise typer.BadParameter(exc.sentence) from None
    return value


OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output path: a folder, or a file ending in .safetensors."),
                   Output()]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder."), Output()]
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
                   "that does."), Input()]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow .bin/.pt pickle inputs (and open_clip weights published only as "
                 "one), loaded with torch.load(weights_only=True)."),
]
AllowMissingOpt = Annotated[
    bool,
    typer.Option("--allow-missing", help="Skip tensors an input lacks instead of stopping."),
]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace what is there: a non-empty --out and an existing --json FILE (without it, "
                        "both are refused).")]
ReportOverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing --json FILE (without it, it is refused).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when present), cpu, cuda, cuda:1 ...")]

BaseOpt = Annotated[str, typer.Option("--base", help="Pre-trained checkpoint (file, folder, Hub id)."), Source()]
HeadsOpt = Annotated[str, typer.Option("--heads", help="Heads file; the task's head stays frozen."), Input()]
TaskOpt = Annotated[str, typer.Option("--task", help="The task (a head in the heads file).")]  # a name, not read
MergedOpt = Annotated[str, typer.Option("--merged", help="The (possibly backdoored) merged model."), Source()]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimiser steps.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per step.")]
ScaleOpt = Annotated[float | None, typer.Option(
    "--logit-scale", help="Training temperature (default: the head's logit scale).")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Data-loading worker processes.")]


ZOO_SIZES = ("tiny", "small")  # the built-in zoo's sizes (models.zoo.SIZES; a test holds the two equal)


def check_size(size: str) -> None:
    """`zoo build --size` and `demo --size`, checked before the zoo's code (and torch) is imported."""
    from mergeguard.errors import did_you_mean

    if size not in ZOO_SIZES:
        raise MergeguardError(f"unknown zoo size {size!r}; choose one of: {', '.join(ZOO_SIZES)}."
                              + did_you_mean(size, ZOO_SIZES))


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


def examples(*lines: str) -> str:
    """An 'Examples' block for a command's help (shown verbatim)."""
    body = "\n".join(f"  $ {line}" for line in lines)
    return f"\b\nExamples:\n{body}"


# -- output-folder policy ------------------------------------------------------------
def require_empty(out: Path, overwrite: bool, resumable: bool = False, resume: bool = False) -> None:
    """Refuse to write into a folder that already holds something, unless --overwrite."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        if resumable and {p.name for p in out.iterdir()} == {".partial"}:
            raise MergeguardError(f"{out} holds an unfinished run (.partial); pass --resume to finish it, or "
                                  "--overwrite to start again.")
        if resume:  # a finished run: --resume must not replace it
            raise MergeguardError(f"{out} is not empty and holds no unfinished run (.partial) to resume; choose "
                                  "another --out, or pass --overwrite to start again.")
        raise MergeguardError(f"{out} is not empty; choose another --out or pass --overwrite.")


def unfinished(out: Path) -> bool:
    """Whether OUT holds a killed run's state (a non-empty OUT/.partial folder) for --resume to continue."""
    partial = out / ".partial"
    return partial.is_dir() and any(partial.iterdir())


def note_resume(out: Path, resume: bool) -> None:
    """--resume where no run was left: say so, and start from the beginning."""
    if resume and not unfinished(out):
        err_console.print(f"[yellow]note:[/] nothing to resume in {out} (no .partial): starting from the beginning.")


def refuse_existing_report(json_out: str | None, overwrite: bool) -> None:
    """One rule for every output, --json FILE included: what exists is replaced only with --overwrite."""
    if json_out not in (None, "-") and Path(json_out).expanduser().exists() and not overwrite:
        raise MergeguardError(f"--json {json_out} exists; choose another --json, or pass --overwrite to replace "
                              "it.")


def refuse_report_over(json_out: str | None, inputs: Iterable) -> None:
    """--json FILE must not replace (or land inside) an input: checked before any work."""
    if json_out not in (None, "-"):
        from mergeguard.checkpoint.paths import refuse_writing_over
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

"""Command options made from the library's settings declarations (`mergeguard.settings`): one `--flag` per
declared field, with its type, default and help, so a setting is declared once, in its dataclass.

    @with_settings(LFPMConfig)
    def lfpm_command(merged: MergedOpt, ..., **settings: Any) -> None:
        cfg = build(LFPMConfig, settings)
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer

from mergeguard.settings import check, declared, flag

T = TypeVar("T")


def settings_options(*classes: type, required: Sequence[str] = (), skip: Sequence[str] = ()) -> list[inspect.Parameter]:
    """One keyword-only typer option per declared field of `classes` (fields named in `required` have no
    default; a field declared twice keeps its first declaration)."""
    params: dict[str, inspect.Parameter] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f, spec in declared(cls):
            if not spec.cli or f.name in skip or f.name in params:
                continue
            name = flag(f.name)
            if hints[f.name] is bool:  # a switch either way: --cache / --no-cache
                name = f"{name}/--no-{name[2:]}"
            annotation = Annotated[hints[f.name], typer.Option(name, help=spec.help)]
            default = inspect.Parameter.empty if f.name in required else f.default
            params[f.name] = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                               annotation=annotation)
    return list(params.values())


def with_settings(*classes: type, required: Sequence[str] = (), skip: Sequence[str] = ()) -> Callable:
    """Give a command (whose `**settings` collects them) the options of `classes`' declared fields."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in fixed}
        extra = [p for p in settings_options(*classes, required=required, skip=skip) if p.name not in names]
        fn.__signature__ = sig.replace(parameters=fixed + extra)  # type: ignore[attr-defined]
        return fn

    return wrap


def build(cls: type[T], values: dict[str, Any], **override: Any) -> T:
    """`cls` from the command's option values (the fields it declares; the others keep their defaults),
    checked against its declaration before the command reads or writes anything."""
    given = {f.name: values[f.name] for f, _ in declared(cls) if f.name in values}
    obj = cls(**{**given, **override})
    check(obj)
    return obj

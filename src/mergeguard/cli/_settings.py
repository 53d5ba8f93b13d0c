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

from mergeguard.errors import SettingError
from mergeguard.settings import check, declared, flag, prefixed

T = TypeVar("T")


def settings_options(*classes: type, required: Sequence[str] = (), skip: Sequence[str] = (),
                     prefix: str = "", note: str = "") -> list[inspect.Parameter]:
    """One keyword-only typer option per declared field of `classes` (fields named in `required` have no
    default; a field declared twice keeps its first declaration). `prefix`: the parameters are named
    `PREFIX_FIELD` and the flags `--PREFIX-FIELD` (a second settings object of one command); `note` starts each
    help text."""
    params: dict[str, inspect.Parameter] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f, spec in declared(cls):
            key = prefixed(f.name, prefix)
            if not spec.cli or f.name in skip or key in params:
                continue
            name = flag(key)
            if hints[f.name] is bool:  # a switch either way: --cache / --no-cache
                name = f"{name}/--no-{name[2:]}"
            annotation = Annotated[hints[f.name], typer.Option(name, help=note + spec.help)]
            default = inspect.Parameter.empty if f.name in required else f.default
            params[key] = inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation)
    return list(params.values())


def with_settings(*classes: type, required: Sequence[str] = (), skip: Sequence[str] = (),
                  prefix: str = "", note: str = "") -> Callable:
    """Give a command (whose `**settings` collects them) the options of `classes`' declared fields (under
    `--PREFIX-` flags with a `prefix`; stack a second decorator for a second settings object)."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in fixed}
        extra = [p for p in settings_options(*classes, required=required, skip=skip, prefix=prefix, note=note)
                 if p.name not in names]
        fn.__signature__ = sig.replace(parameters=fixed + extra)  # type: ignore[attr-defined]
        return fn

    return wrap


def build(cls: type[T], values: dict[str, Any], prefix: str = "", checker: Callable[[Any], None] = check,
          **override: Any) -> T:
    """`cls` from the command's option values (the fields it declares; the others keep their defaults),
    checked (`checker`: its declaration's ranges, or a stricter check) before the command reads or writes
    anything. `prefix`: the values are named `PREFIX_FIELD` (`with_settings(..., prefix=...)`), and an error
    names the prefixed flag."""
    given = {f.name: values[prefixed(f.name, prefix)] for f, _ in declared(cls) if prefixed(f.name, prefix) in values}
    obj = cls(**{**given, **override})
    try:
        checker(obj)
    except SettingError as exc:
        raise SettingError(prefixed(exc.field, prefix) if exc.field else exc.field, exc.template) from None
    return obj

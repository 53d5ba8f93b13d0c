"""Command options made from the library's settings declarations (`mergeguard.settings`): one `--flag` per
declared field, with its type, default and help, so a setting is declared once, in its dataclass.

    @with_settings(LFPMConfig)
    def lfpm_command(merged: MergedOpt, ..., **settings: Any) -> None:
        cfg = build(LFPMConfig, settings)

`with_settings` is the one way a command's signature is built: the settings classes' fields (a nested
settings object's as `--NAME-FIELD`), and any `extra` parameters a command adds (a merge method's, an
attack's CLI-only options).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer

from mergeguard.settings import Declared, Spec, check, declared, flag, is_nested

T = TypeVar("T")
EXPERIMENTS = "For experiments (docs/lfpm.md says when to change one)"


def _option(key: str, kind: Any, spec: Spec, default: Any, note: str = "", panel: str | None = None
            ) -> inspect.Parameter:
    name = flag(key)
    if kind is bool:  # a switch either way: --cache / --no-cache
        name = f"{name}/--no-{name[2:]}"
    panel = panel or (EXPERIMENTS if spec.experiment else None)
    annotation = Annotated[kind, typer.Option(name, help=note + spec.help, rich_help_panel=panel)]
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def settings_options(*classes: type, required: Sequence[str] = (), prefix: str = "", skip: Sequence[str] = (),
                     note: str = "", panel: str | None = None) -> list[inspect.Parameter]:
    """One keyword-only typer option per declared field of `classes` (fields named in `required` have no
    default; a field declared twice keeps its first declaration); a nested settings object's fields under
    `--NAME-FIELD`, in a help panel of their own, without the fields it inherits."""
    params: dict[str, inspect.Parameter] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f, spec in declared(cls):
            key = prefix + f.name
            if not spec.cli or f.name in skip or key in params:
                continue
            if is_nested(f):
                for p in settings_options(f.default_factory, prefix=f"{key}_", skip=spec.inherit, note=spec.help,
                                          panel=spec.help.rstrip(": ")):
                    params.setdefault(p.name, p)
                continue
            default = inspect.Parameter.empty if f.name in required else f.default
            params[key] = _option(key, hints[f.name], spec, default, note, panel)
    return list(params.values())


def declared_options(owners: dict[str, Sequence[Declared]]) -> list[inspect.Parameter]:
    """One option per setting declared on its own (`settings.declare`) by any of `owners` ({owner: its
    declarations}, a merge method's parameters): no default (each owner has its own), the help naming each
    owner's default and who takes it."""
    seen: dict[str, Declared] = {}
    for decls in owners.values():
        for d in decls:
            seen.setdefault(d.name, d)
    out = []
    for name, d in seen.items():
        takers = [o for o, decls in owners.items() if any(x.name == name for x in decls)]
        defaults = sorted({str(x.default) for decls in owners.values() for x in decls if x.name == name})
        choices = f" ({'|'.join(d.spec.choices)})" if d.spec.choices else ""
        help_text = f"{d.spec.help}{choices}. Default {'/'.join(defaults)}. For: {', '.join(takers)}."
        annotation = Annotated[d.type | None, typer.Option(flag(name), help=help_text, show_default=False)]
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return out


def with_settings(*classes: type, required: Sequence[str] = (),
                  extra: Sequence[inspect.Parameter] | Callable[[], Sequence[inspect.Parameter]] = ()) -> Callable:
    """Give a command (whose `**settings` collects them) the options of `classes`' declared fields and the
    `extra` parameters (or a function giving them, called when the decorator runs)."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in fixed}
        more = [*settings_options(*classes, required=required), *(extra() if callable(extra) else extra)]
        fn.__signature__ = sig.replace(parameters=fixed + [p for p in more if p.name not in names])  # type: ignore[attr-defined]
        return fn

    return wrap


def build(cls: type[T], values: dict[str, Any], checker: Callable[[Any], None] = check) -> T:
    """`cls` from the command's option values (the fields it declares, a nested object's from its
    `NAME_FIELD` values; the others keep their defaults), checked (`checker`: its declaration's ranges, or a
    stricter check) before the command reads or writes anything."""
    obj = cls(**_given(cls, values, ""))
    checker(obj)
    return obj


def _given(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    given: dict[str, Any] = {}
    for f, _ in declared(cls):
        if is_nested(f):
            given[f.name] = f.default_factory(**_given(f.default_factory, values, f"{prefix}{f.name}_"))
        elif prefix + f.name in values:
            given[f.name] = values[prefix + f.name]
    return given

"""Settings declared once: each field of a settings dataclass carries its help text and its range.

A settings class (`LFPMConfig`, `TrainSettings`, each attack) is a plain dataclass whose fields are made
with `setting(...)`. From that one declaration come the checks (`check`), the CLI options (the CLI builds
one `--flag` per field, flag = field name with dashes), the JSON report (`dataclasses.asdict`) and the
argv of a printed command (`to_argv`). Adding a setting is one edit: a field.

Errors name the field (`SettingError.field`); the CLI shows it as its `--flag`.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mergeguard.errors import SettingError, did_you_mean

KEY = "mergeguard.setting"


@dataclass(frozen=True)
class Spec:
    """What one field declares besides its name, type and default."""

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the value must be > low (else >= low)
    choices: tuple[str, ...] | None = None
    run_only: bool = False  # how a run is carried out (device, workers, ...), not what it computes: a resume may
    # change it, and it stays out of a resumable run's fingerprint
    cli: bool = True  # offered as a CLI option


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, choices: Sequence[str] | None = None, run_only: bool = False,
            cli: bool = True) -> Any:
    """A dataclass field with its declaration (see `Spec`)."""
    spec = Spec(help, low, high, low_open, tuple(choices) if choices is not None else None, run_only, cli)
    return dataclasses.field(default=default, metadata={KEY: spec})


def declared(cls_or_obj: Any) -> list[tuple[dataclasses.Field, Spec]]:
    """The declared fields of a settings class (or instance), in order."""
    return [(f, f.metadata[KEY]) for f in dataclasses.fields(cls_or_obj) if KEY in f.metadata]


def prefixed(name: str, prefix: str = "") -> str:
    """A field's name as a command holds it: `PREFIX_NAME` for a second settings object under `prefix`."""
    return f"{prefix}_{name}" if prefix else name


def flag(name: str) -> str:
    """A field's CLI flag."""
    return "--" + name.replace("_", "-")


def _range(spec: Spec) -> str:
    left = ("(" if spec.low_open else "[") + f"{spec.low:g}"
    return f"{left}, {'inf)' if spec.high is None else f'{spec.high:g}]'}"


def check_value(name: str, spec: Spec, value: Any) -> None:
    """One `SettingError` for a value outside its declared range or choices (None: not given, not checked)."""
    if value is None or isinstance(value, bool):
        return
    if spec.choices is not None:
        if value not in spec.choices:
            raise SettingError(name, f"{{name}} must be one of {', '.join(spec.choices)} (got {value!r})."
                                     + did_you_mean(str(value), spec.choices))
        return
    if not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(name, f"{{name}} must be a finite number (got {value}).")
    low_ok = spec.low is None or value > spec.low or (value == spec.low and not spec.low_open)
    high_ok = spec.high is None or value <= spec.high
    if low_ok and high_ok:
        return
    if spec.high is None and spec.low is not None:  # the common cases, in words
        if isinstance(value, int) and not isinstance(spec.low, float) and not spec.low_open:
            raise SettingError(name, f"{{name}} must be at least {spec.low} (got {value}).")
        if spec.low == 0:
            raise SettingError(name, f"{{name}} must be {'a positive number' if spec.low_open else '0 or more'} "
                                     f"(got {value}).")
    raise SettingError(name, f"{{name}} must be in {_range(spec)} (got {value}).")


def check(obj: Any) -> None:
    """Check every declared field of a settings object against its declaration."""
    for f, spec in declared(obj):
        check_value(f.name, spec, getattr(obj, f.name))


def fingerprint(obj: Any) -> dict[str, Any]:
    """The fields that shape a run's result (not `run_only`): what a resumed run must share."""
    return {f.name: getattr(obj, f.name) for f, spec in declared(obj) if not spec.run_only}


def changed(obj: Any) -> dict[str, Any]:
    """The declared fields whose value differs from the declared default."""
    return {f.name: getattr(obj, f.name) for f, _ in declared(obj) if getattr(obj, f.name) != f.default}


def to_argv(obj: Any, *, always: Sequence[str] = (), prefix: str = "", skip: Sequence[str] = ()) -> list[str]:
    """The CLI arguments that reproduce `obj` from the declared defaults: one `--flag value` per changed field
    (and per field named in `always`, which a command requires), a bool as `--flag` / `--no-flag`. `prefix`:
    the settings of a second object a command takes under prefixed flags (`--scan-steps`); fields in `skip`
    (which the command sets from its own settings) are left out."""
    argv: list[str] = []
    for f, spec in declared(obj):
        name, value = f.name, getattr(obj, f.name)
        if name in skip or (value == f.default and name not in always):
            continue
        if not spec.cli:  # no flag takes it: a printed command would silently run with the default instead
            raise ValueError(f"{type(obj).__name__}.{name} has no command-line flag, so no command can "
                             f"reproduce {name}={value!r}.")
        option = flag(prefixed(name, prefix))
        if isinstance(value, bool):
            argv.append(option if value else "--no-" + option[2:])
        elif value is not None:
            argv += [option, float_text(value) if isinstance(value, float) else str(value)]
    return argv


def float_text(value: float) -> str:
    """A float as a command line gives it back exactly: the short form where it loses nothing (`0.0005`,
    `10`), else every digit (`1.2345678e-05`, not `:g`'s `1.23457e-05`)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def argv_text(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)

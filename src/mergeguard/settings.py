"""Settings declared once: each field of a settings dataclass carries its help text and its range.

A settings class (`LFPMConfig`, `TrainSettings`, each attack) is a plain dataclass whose fields are made
with `setting(...)`. From that one declaration come the checks (`check`), the CLI options (the CLI builds
one `--flag` per field, flag = field name with dashes), the JSON report (`dataclasses.asdict`) and the
argv of a printed command (`to_argv`). Adding a setting is one edit: a field.

- `device()`, `seed()` and `workers()` are the one declaration of the settings every run shares.
- `nested(Cls, ...)`: a settings object inside another (LFPM's scan): its flags are `--NAME-FIELD`, and the
  fields it `inherit`s (its device and seed) are the parent's, not flags of their own.
- `declare(...)` declares one setting outside a dataclass (a merge method's parameter), with the same
  `Spec`, checks and messages.

Errors name the field (`SettingError.field`; `NAME_FIELD` inside a nested object); the CLI shows its `--flag`.
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
    inherit: tuple[str, ...] = ()  # a nested settings object: its fields that take the parent's value
    experiment: bool = False  # for experiments: `--help` shows it apart from what a user sets


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, choices: Sequence[str] | None = None, run_only: bool = False,
            cli: bool = True, experiment: bool = False) -> Any:
    """A dataclass field with its declaration (see `Spec`)."""
    spec = Spec(help, low, high, low_open, tuple(choices) if choices is not None else None, run_only, cli,
                experiment=experiment)
    return dataclasses.field(default=default, metadata={KEY: spec})


def experiment(default: Any, help: str, **kw: Any) -> Any:
    """A setting for experiments (`setting`'s keywords): offered, and shown apart from what a user sets."""
    return setting(default, help, experiment=True, **kw)


def device() -> Any:
    """The device a run uses (every settings class that runs a model declares it with this)."""
    return setting("auto", "auto (cuda when present), cpu, cuda, cuda:1 ...", run_only=True)


def seed(help: str = "Random seed (recorded in the output's metadata).") -> Any:
    return setting(0, help)


def workers() -> Any:
    return setting(0, "Data-loading worker processes.", low=0, run_only=True)


def nested(cls: type, help: str, *, inherit: Sequence[str] = ()) -> Any:
    """A settings object of class `cls` inside another; `help` starts each of its options' help, and the fields
    named in `inherit` take the parent's value (`inherit_into`, from the parent's `__post_init__`)."""
    return dataclasses.field(default_factory=cls, metadata={KEY: Spec(help, inherit=tuple(inherit))})


def inherit_into(obj: Any) -> None:
    """Give each nested settings object of `obj` the parent's values of the fields it inherits."""
    for f, spec in declared(obj):
        if is_nested(f):
            inner = getattr(obj, f.name)
            setattr(obj, f.name, dataclasses.replace(inner, **{k: getattr(obj, k) for k in spec.inherit}))


def is_nested(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


@dataclass(frozen=True)
class Declared:
    """One setting declared outside a settings dataclass (a merge method's parameter)."""

    name: str
    type: type
    default: Any
    spec: Spec

    def value(self, given: Any, owner: str) -> Any:
        """`given` as the declared type, checked; one `SettingError` naming the setting and its owner."""
        try:
            value = self.type(given)
        except (TypeError, ValueError):
            raise SettingError(self.name, f"{{name}} for {owner} must be a {self.type.__name__} (got {given!r}).") \
                from None
        try:
            check_value(self.name, self.spec, value)
        except SettingError as exc:
            raise SettingError(self.name, exc.template.replace("{name}", f"{{name}} for {owner}", 1)) from None
        return value


def declare(name: str, type: type, default: Any, help: str, **spec: Any) -> Declared:
    """A setting declared on its own (`Declared`), with `setting`'s keywords."""
    choices = spec.pop("choices", None)
    return Declared(name, type, default, Spec(help, choices=tuple(choices) if choices else None, **spec))


def declared(cls_or_obj: Any) -> list[tuple[dataclasses.Field, Spec]]:
    """The declared fields of a settings class (or instance), in order (a nested settings object is one)."""
    return [(f, f.metadata[KEY]) for f in dataclasses.fields(cls_or_obj) if KEY in f.metadata]


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
    """Check every declared field of a settings object against its declaration (a nested object with its own
    `check()` when its class has one, else field by field; its errors name `NAME_FIELD`)."""
    for f, spec in declared(obj):
        if is_nested(f):
            inner = getattr(obj, f.name)
            try:
                inner.check() if hasattr(inner, "check") else check(inner)
            except SettingError as exc:
                raise SettingError(f"{f.name}_{exc.field}" if exc.field else None, exc.template) from None
        else:
            check_value(f.name, spec, getattr(obj, f.name))


def fingerprint(obj: Any) -> dict[str, Any]:
    """The fields that shape a run's result (not `run_only`): what a resumed run must share."""
    return {f.name: fingerprint(getattr(obj, f.name)) if is_nested(f) else getattr(obj, f.name)
            for f, spec in declared(obj) if not spec.run_only}


def to_argv(obj: Any, *, always: Sequence[str] = (), _prefix: str = "", _skip: Sequence[str] = ()) -> list[str]:
    """The CLI arguments that reproduce `obj` from the declared defaults: one `--flag value` per changed field
    (and per field named in `always`, which a command requires), a bool as `--flag` / `--no-flag`; a nested
    settings object's as `--NAME-FIELD`, without the fields it inherits."""
    argv: list[str] = []
    for f, spec in declared(obj):
        name, value = f.name, getattr(obj, f.name)
        if is_nested(f):
            argv += to_argv(value, _prefix=f"{_prefix}{name}_", _skip=spec.inherit)
            continue
        if name in _skip or (value == f.default and name not in always):
            continue
        if not spec.cli:  # no flag takes it: a printed command would silently run with the default instead
            raise ValueError(f"{type(obj).__name__}.{name} has no command-line flag, so no command can "
                             f"reproduce {name}={value!r}.")
        option = flag(_prefix + name)
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

"""The one error type users see: a sentence that says what is wrong and what to do."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class MergeguardError(Exception):
    """A problem with the user's input or environment, reported as one sentence (exit code 2)."""


def check_settings(cfg: Any, *, at_least: dict[str, int] | None = None, positive: Iterable[str] = (),
                   non_negative: Iterable[str] = ()) -> None:
    """One sentence for the first field of `cfg` out of its range, named as its --flag: integers with a
    lower bound, numbers that must be finite and above 0, numbers that must be finite and 0 or more."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name, low in (at_least or {}).items():
        if getattr(cfg, name) < low:
            raise MergeguardError(f"{flag(name)} must be at least {low} (got {getattr(cfg, name)}).")
    for name in positive:
        if not math.isfinite(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            raise MergeguardError(f"{flag(name)} must be a positive number (got {getattr(cfg, name)}).")
    for name in non_negative:
        if not math.isfinite(getattr(cfg, name)) or getattr(cfg, name) < 0:
            raise MergeguardError(f"{flag(name)} must be 0 or more (got {getattr(cfg, name)}).")

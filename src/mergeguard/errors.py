"""The one error type users see: a sentence that says what is wrong and what to do."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class MergeguardError(Exception):
    """A problem with the user's input or environment, reported as one sentence (exit code 2)."""


def reason(exc: BaseException, limit: int = 160) -> str:
    """A library exception's first sentence, for the end of one of ours (torch and open_clip append
    paragraphs of advice that is not the user's to follow)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # torch's weights-only refusal names what it refused on a later line: that line is the reason
    line = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    line = (line or type(exc).__name__).split(". ", 1)[0].rstrip(".")
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def check_settings(cfg: Any, *, at_least: dict[str, int] | None = None, positive: Iterable[str] = (),
                   non_negative: Iterable[str] = (),
                   within: dict[str, tuple[float, float, bool]] | None = None) -> None:
    """One sentence for the first field of `cfg` out of its range, named as its --flag: integers with a
    lower bound, numbers that must be finite and above 0, numbers that must be finite and 0 or more, and
    numbers in [low, high] (`within`: name -> (low, high, open_low), open_low making it (low, high]).
    A field left at None (an optional setting not given) is not checked."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def given(names: Iterable[str]) -> list[tuple[str, Any]]:
        return [(name, getattr(cfg, name)) for name in names if getattr(cfg, name) is not None]

    for name, value in given(at_least or {}):
        if value < at_least[name]:
            raise MergeguardError(f"{flag(name)} must be at least {at_least[name]} (got {value}).")
    for name, value in given(positive):
        if not math.isfinite(value) or value <= 0:
            raise MergeguardError(f"{flag(name)} must be a positive number (got {value}).")
    for name, value in given(non_negative):
        if not math.isfinite(value) or value < 0:
            raise MergeguardError(f"{flag(name)} must be 0 or more (got {value}).")
    for name, value in given(within or {}):
        low, high, open_low = within[name]
        if not (math.isfinite(value) and (value > low if open_low else value >= low) and value <= high):
            raise MergeguardError(f"{flag(name)} must be in {'(' if open_low else '['}{low}, {high}] (got {value}).")

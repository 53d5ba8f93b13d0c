"""What a merge method declares: its parameters (`Param`), the per-tensor context it gets
(`TensorContext`) and the declaration itself (`MergeMethod`).

The declaration is the single source for defaults, help text and validation: the CLI
builds its flags from it and the YAML config is checked against it. This module knows
no method; `methods.py` declares them and `registry.py` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeguard.errors import MergeguardError, did_you_mean


@dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value must be > low (else >= low)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any, method: str) -> Any:
        """Coerce `value` to the declared type and check its range; raise one clear sentence."""
        try:
            value = self.type(value)
        except (TypeError, ValueError) as exc:
            raise MergeguardError(
                f"{self.flag} for {method} must be a {self.type.__name__}, got {value!r}."
            ) from exc
        if isinstance(value, float) and not math.isfinite(value):
            raise MergeguardError(f"{self.flag} for {method} must be a finite number, got {value}.")
        if self.choices is not None and value not in self.choices:
            raise MergeguardError(
                f"{self.flag} for {method} must be one of {', '.join(self.choices)}, got {value!r}."
                + did_you_mean(str(value), self.choices)
            )
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            bound = f"({self.low}" if self.low_open else f"[{self.low}"
            high = f"{self.high}]" if self.high is not None else "inf)"
            raise MergeguardError(f"{self.flag} for {method} must be in {bound}, {high}, got {value}.")
        if self.high is not None and value > self.high:
            bound = f"({self.low}" if self.low_open else f"[{self.low}"
            raise MergeguardError(f"{self.flag} for {method} must be in {bound}, {self.high}], got {value}.")
        return value


@dataclass
class TensorContext:
    """What a method may know about the tensor it merges besides the deltas."""

    name: str
    inputs: list[int]  # indices (into the merge's inputs) of the deltas given, in order
    seed: int = 0
    state: Any = None  # what the method's `prepare` pass returned


# A streaming pass over every float tensor: yields (name, deltas, input indices, reference delta).
Passes = Callable[[], Iterator[tuple[str, list[torch.Tensor], list[int], torch.Tensor | None]]]
MergeFn = Callable[..., torch.Tensor]
PrepareFn = Callable[..., Any]


@dataclass(frozen=True)
class MergeMethod:
    """Merge method `name`: `fn(deltas, weights, ctx, **params) -> merged delta` over one tensor name.

    `deltas` are float32 tensors the engine made for this call: a method may modify them in place.
    `prepare(passes, n_inputs, params)`, when given, runs first over every float tensor; what it
    returns reaches `fn` as `ctx.state`.
    """

    name: str
    fn: MergeFn
    params: tuple[Param, ...]
    help: str
    prepare: PrepareFn | None = None
    needs_reference: bool = False
    param_map: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_map", {p.name: p for p in self.params})

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Declared defaults overridden by `given` (None values ignored), validated."""
        values = {}
        for key, value in given.items():
            key = key.replace("-", "_")
            if value is None:
                continue
            if key not in self.param_map:
                known = ", ".join(p.flag for p in self.params) or "none"
                raise MergeguardError(
                    f"--{key.replace('_', '-')} is not a parameter of {self.name} (its parameters: {known})."
                )
            values[key] = value
        return {p.name: p.validate(values.get(p.name, p.default), self.name) for p in self.params}

"""What a merge method declares its parameters with (`Param`) and the per-tensor context it gets
(`TensorContext`); the declaration itself (`MergeMethod`) is in `registry.py`.

The declaration is the single source for defaults, help text and validation: the CLI
builds its flags from it and the YAML config is checked against it. This module knows
no method; `registry.py` declares them, naming their functions in `methods.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the declarations import no torch: the CLI builds its flags from them
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
Passes = Callable[[], Iterator[tuple[str, list["torch.Tensor"], list[int], "torch.Tensor | None"]]]
MergeFn = Callable[..., "torch.Tensor"]
PrepareFn = Callable[..., Any]

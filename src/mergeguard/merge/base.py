"""What a merge method declares its parameters with (`Param`) and the per-tensor context it gets
(`TensorContext`); the declaration itself (`MergeMethod`) is in `registry.py`.

The declaration is the single source for defaults, help text and validation: the CLI
builds its flags from it and the YAML config is checked against it. This module knows
no method; `registry.py` declares them, naming their functions in `methods.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the declarations import no torch: the CLI builds its flags from them
    import torch



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

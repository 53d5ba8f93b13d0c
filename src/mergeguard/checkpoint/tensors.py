"""Tensor checks and dtype names shared by everything that reads or writes checkpoints."""

from __future__ import annotations

import torch

from mergeguard.errors import MergeguardError

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'auto'/None -> None (keep each tensor's dtype), else a float dtype."""
    if name in (None, "auto"):
        return None
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise MergeguardError(
            f"--dtype must be one of auto, {', '.join(FLOAT_DTYPES)}; got {name!r}."
        ) from None


def check_finite(tensor: torch.Tensor, name: str, source: str) -> None:
    """One sentence naming the tensor and input when a float tensor holds NaN or Inf."""
    # A sum is NaN/Inf whenever an entry is; it is cheap, and only an overflowing sum needs the full check.
    if (
        tensor.dtype.is_floating_point
        and not bool(torch.isfinite(tensor.sum()))
        and not bool(torch.isfinite(tensor).all())
    ):
        raise MergeguardError(f"tensor {name!r} of {source} contains NaN or Inf values.")

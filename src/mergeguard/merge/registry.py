"""The merge-method registry: every method `methods.py` declares, in one static table.

Each method is a per-tensor function with its parameters declared once (`base.Param`):
the CLI builds its flags from the declarations and the YAML config is checked against them.
"""

from __future__ import annotations

from mergeguard.errors import MergeguardError, did_you_mean
from mergeguard.merge import methods
from mergeguard.merge.base import MergeMethod, Param, TensorContext

__all__ = ["METHODS", "MergeMethod", "Param", "TensorContext", "all_params", "get_method"]

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        methods.TASK_ARITHMETIC,
        methods.AVERAGE,
        methods.TIES,
        methods.MAGNITUDE_PRUNE,
        methods.DARE_LINEAR,
        methods.DARE_TIES,
        methods.BREADCRUMBS,
        methods.LATA,
    )
}


def get_method(name: str) -> MergeMethod:
    """The method `name`, or one clear sentence listing the choices."""
    try:
        return METHODS[name.replace("-", "_")]
    except KeyError:
        raise MergeguardError(
            f"unknown merge method {name!r}; choose one of: {', '.join(sorted(METHODS))}."
            + did_you_mean(name, METHODS)
        ) from None


def all_params() -> dict[str, Param]:
    """Every parameter name any method declares (the CLI offers each as one flag)."""
    out: dict[str, Param] = {}
    for method in METHODS.values():
        for p in method.params:
            out.setdefault(p.name, p)
    return out
